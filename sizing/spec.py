"""The platform spec: the one YAML file that says what to build.

The model checks shapes and single values (pydantic); the cross-field rules that need the
whole spec (CIDR overlaps, VIPs against allocation ranges, room for the tier's inventory)
live in :mod:`sizing.validate`, so every rule reports the YAML path it is about.
"""

from __future__ import annotations

import re
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from sizing.versions import DEFAULT_VERSIONS, SUPPORTED_VERSIONS

TIERS: tuple[int, ...] = (100, 500, 1000, 10000)
"""The concurrent-user tiers the sizing tables know."""

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_LINUX_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def _check_label(value: str) -> str:
    if not _LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid DNS label: use 1 to 63 lowercase letters, digits or "
            "'-', starting and ending with a letter or digit"
        )
    return value


def _check_domain(value: str) -> str:
    labels = value.split(".")
    if len(value) > 253 or len(labels) < 2 or not all(_LABEL.match(part) for part in labels):
        raise ValueError(
            f"{value!r} is not a valid DNS domain: use two or more dot-separated labels of "
            "lowercase letters, digits and '-', e.g. 'platform.gov.example'"
        )
    return value


def _check_block_name(value: str) -> str:
    if not _BLOCK_NAME.match(value):
        raise ValueError(
            f"{value!r} is not a valid Prefect block name: use lowercase letters, digits and "
            "'-', e.g. 'prod-vcenter'"
        )
    return value


Label = Annotated[str, AfterValidator(_check_label)]
Domain = Annotated[str, AfterValidator(_check_domain)]
BlockName = Annotated[str, AfterValidator(_check_block_name)]
NonEmpty = Annotated[str, Field(min_length=1)]


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must never be silently ignored); specs are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ZoneName(StrEnum):
    LAN = "lan"
    DMZ = "dmz"
    INTEGRATION = "integration"


class Product(StrEnum):
    ESERVICES = "eservices"
    GCO = "gco"


class Portal(StrEnum):
    """The three eServices front ends."""

    FRONT_OFFICE = "front-office"
    INTERNAL_FRONT_OFFICE = "internal-front-office"
    BACK_OFFICE = "back-office"


class HostRange(StrictModel):
    """The addresses the inventory may give to VMs, both ends included."""

    first: IPv4Address
    last: IPv4Address

    def size(self) -> int:
        return int(self.last) - int(self.first) + 1

    def __contains__(self, address: object) -> bool:
        return isinstance(address, IPv4Address) and self.first <= address <= self.last


class Zone(StrictModel):
    """A network zone: one L2 segment (VLAN / port group / Nutanix subnet)."""

    cidr: IPv4Network
    gateway: IPv4Address
    dns: list[IPv4Address] = Field(min_length=1)
    ntp: list[NonEmpty] = Field(min_length=1)
    network: NonEmpty = Field(description="vSphere port group or Nutanix subnet name")
    vlan: int | None = Field(default=None, ge=1, le=4094)
    hosts: HostRange

    @field_validator("cidr", mode="before")
    @classmethod
    def _network_address(cls, value: object) -> object:
        if isinstance(value, str) and "/" in value:
            try:
                IPv4Network(value)
            except ValueError:
                try:
                    fixed = IPv4Network(value, strict=False)
                except ValueError:
                    return value
                raise ValueError(
                    f"{value} has host bits set; the network is {fixed}"
                ) from None
        return value


class Zones(StrictModel):
    lan: Zone
    dmz: Zone
    integration: Zone

    def items(self) -> list[tuple[ZoneName, Zone]]:
        return [(ZoneName.LAN, self.lan), (ZoneName.DMZ, self.dmz),
                (ZoneName.INTEGRATION, self.integration)]

    def get(self, name: ZoneName) -> Zone:
        zone: Zone = getattr(self, name.value)
        return zone


class LoadBalancer(StrictModel):
    vip: IPv4Address


class LoadBalancers(StrictModel):
    """One HAProxy + keepalived pair per zone; the VIP floats between the two nodes."""

    lblan: LoadBalancer
    lbdmz: LoadBalancer
    lbintegration: LoadBalancer


class VspherePlacement(StrictModel):
    datacenter: NonEmpty
    cluster: NonEmpty
    datastore: NonEmpty
    folder: NonEmpty
    template: NonEmpty
    resource_pool: NonEmpty | None = None


class NutanixPlacement(StrictModel):
    cluster: NonEmpty
    image: NonEmpty


class Hypervisor(StrictModel):
    kind: Literal["vsphere", "nutanix"]
    block: BlockName
    concurrency: int = Field(default=8, ge=1, le=64)
    resize: bool = False
    boot_timeout: int = Field(default=600, ge=10, le=3600,
                              description="seconds a new VM has to report its IP (phase 1), "
                                          "and then to accept SSH (phase 2)")
    vsphere: VspherePlacement | None = None
    nutanix: NutanixPlacement | None = None


class Rancher(StrictModel):
    cluster: Literal["apps", "middleware"] = "middleware"
    hostname: Label = "rancher"


class Artifacts(StrictModel):
    mirror: Annotated[str, Field(pattern=r"^https?://[^/\s]+(/\S*)?$")]
    registry: Annotated[str, Field(pattern=r"^[a-z0-9.-]+(:[0-9]{1,5})?$")]
    apt_mirror: Annotated[str, Field(pattern=r"^https?://[^/\s]+(/\S*)?$")] | None = None


class Ssh(StrictModel):
    user: Annotated[str, Field(pattern=_LINUX_USER.pattern)]
    identity_block: BlockName
    bootstrap_user: Annotated[str, Field(pattern=_LINUX_USER.pattern)] | None = None
    remove_bootstrap_user: bool = Field(
        default=True, description="phase 2 deletes the template's login once the admin "
                                  "user works")
    admin_group: Annotated[str, Field(pattern=_LINUX_USER.pattern)] = "platform-admins"
    allowed_from: list[IPv4Network] | None = Field(
        default=None, description="networks SSH is accepted from (the orchestrator, the "
                                  "admins); default: the LAN zone")
    concurrency: int = Field(default=20, ge=1, le=256)


DEFAULT_PACKAGES = ("openssh-server", "sudo", "chrony", "nftables", "netplan.io", "python3",
                    "curl", "ca-certificates")


class VaultSettings(StrictModel):
    block: BlockName = Field(default="platform-vault",
                             description="the VaultServer block phase 3 creates and every "
                                         "later phase logs in with")
    shares: int = Field(default=5, ge=1, le=10)
    threshold: int = Field(default=3, ge=1, le=10)
    unseal: Literal["prefect", "operators"] = "prefect"
    operator_pgp_keys: list[NonEmpty] = Field(default_factory=list)


class Middleware(StrictModel):
    flowable: bool | None = Field(
        default=None, description="Flowable BPM; defaults to on with eservices, off without"
    )


class Eservices(StrictModel):
    portals: list[Portal] = Field(default_factory=lambda: list(Portal), min_length=1)


class RoleOverride(StrictModel):
    count: int | None = Field(default=None, ge=0)
    vcpu: int | None = Field(default=None, ge=1, le=256)
    memory_gb: int | None = Field(default=None, ge=1, le=4096)
    disks_gb: list[Annotated[int, Field(ge=1, le=65536)]] | None = Field(default=None, min_length=1)


class Versions(StrictModel):
    """Component versions; each must be in the supported matrix (sizing.versions)."""

    rke2: str = DEFAULT_VERSIONS["rke2"]
    rancher: str = DEFAULT_VERSIONS["rancher"]
    vault: str = DEFAULT_VERSIONS["vault"]
    gogs: str = DEFAULT_VERSIONS["gogs"]
    argocd: str = DEFAULT_VERSIONS["argocd"]
    cert_manager: str = DEFAULT_VERSIONS["cert_manager"]
    longhorn: str = DEFAULT_VERSIONS["longhorn"]
    minio: str = DEFAULT_VERSIONS["minio"]
    keycloak: str = DEFAULT_VERSIONS["keycloak"]
    kafka: str = DEFAULT_VERSIONS["kafka"]
    n8n: str = DEFAULT_VERSIONS["n8n"]
    flowable: str = DEFAULT_VERSIONS["flowable"]
    gravitee: str = DEFAULT_VERSIONS["gravitee"]
    neuvector: str = DEFAULT_VERSIONS["neuvector"]
    coroot: str = DEFAULT_VERSIONS["coroot"]

    @field_validator("*")
    @classmethod
    def _supported(cls, value: str, info: object) -> str:
        name = getattr(info, "field_name", "")
        supported = SUPPORTED_VERSIONS[name]
        if value not in supported:
            raise ValueError(
                f"{name} {value} is not in the supported matrix; supported: "
                + ", ".join(supported)
            )
        return value


class PlatformSpec(StrictModel):
    """Everything that decides what the platform looks like, validated before any action."""

    name: Label
    domain: Domain
    users: int
    products: list[Product] = Field(min_length=1)
    hypervisor: Hypervisor
    zones: Zones
    load_balancers: LoadBalancers
    rancher: Rancher = Rancher()
    versions: Versions = Versions()
    artifacts: Artifacts
    ssh: Ssh
    vault: VaultSettings = VaultSettings()
    middleware: Middleware = Middleware()
    eservices: Eservices | None = None
    overrides: dict[str, RoleOverride] = Field(default_factory=dict)
    base_packages: list[NonEmpty] = Field(default_factory=lambda: list(DEFAULT_PACKAGES),
                                          description="installed on every VM by phase 2")

    @field_validator("users")
    @classmethod
    def _tier(cls, value: int) -> int:
        if value not in TIERS:
            raise ValueError(
                f"{value} is not a sizing tier; users must be exactly one of "
                + ", ".join(str(t) for t in TIERS)
            )
        return value

    @field_validator("products")
    @classmethod
    def _unique_products(cls, value: list[Product]) -> list[Product]:
        if len(set(value)) != len(value):
            raise ValueError("a product is listed twice; list each of eservices, gco once")
        return value

    @property
    def flowable(self) -> bool:
        """Flowable runs when asked, and by default whenever eServices is deployed."""
        if self.middleware.flowable is None:
            return Product.ESERVICES in self.products
        return self.middleware.flowable

    @property
    def portals(self) -> list[Portal]:
        if Product.ESERVICES not in self.products:
            return []
        return list(self.eservices.portals) if self.eservices else list(Portal)
