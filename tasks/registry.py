"""Phase 3's private registry on the GITOPS VM (role install-docker-registry).

Debian's `docker-registry` (distribution 2.8) serves TLS only, with htpasswd logins and
filesystem storage, on the port of the spec's `artifacts.registry`; every cluster node
reaches it by the name phase 2 put in /etc/hosts. Then the registry is seeded with every
image of the release's images list (sizing.images): each OCI archive is downloaded from
the artifact mirror, checked against the mirror's SHA256SUMS and against the pinned
manifest digest, and copied in with skopeo, digests preserved. An image already there at
its pinned digest is left alone, so a second run changes nothing.

The TLS certificate and the login come from the caller (Vault's PKI and KV in the phase
flow). Secrets travel only as `File(secret=True)` contents (the key, the htpasswd file,
skopeo's auth file): never on a command line, in a result or in a log. The htpasswd entry
is deterministic for a given user and password (bcrypt with a salt derived from them), so
an unchanged password rewrites nothing and does not restart the registry.

`registry_operations` and `seed_operations` are pure (what the host should look like);
`apply_registry` applies both in one probe and at most one apply.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prefect import task
from prefect.cache_policies import NO_CACHE

from sizing.artifacts import SUMS_FILE, image_archive_path
from sizing.images import Image
from sizing.inventory import VM, Inventory
from sizing.spec import PlatformSpec
from sizing.storage import data_dir
from sizing.tiers import Role
from tasks import host_keys, pki
from tasks.hostops import (
    Command,
    ConnectionPool,
    Directory,
    File,
    HostReport,
    Operation,
    Packages,
    Service,
)
from tasks.hostops.ops import q
from tasks.retry import transient_only
from tasks.spec import read_images
from tasks.vault import kv_ensure, password, read_host_file, service_client
from templates import render

log = logging.getLogger(__name__)

PACKAGES = ("docker-registry", "skopeo")
UNIT = "docker-registry"
SYSTEM_USER = "docker-registry"  # made by the package; the unit runs as it
STORAGE_DIR = data_dir("registry")  # blobs, on the data disk (phase 2 mounts it)
CONFIG_DIR = "/etc/docker/registry"
CONFIG_FILE = f"{CONFIG_DIR}/config.yml"
TLS_DIR = f"{CONFIG_DIR}/tls"
CERT_FILE = f"{TLS_DIR}/registry.crt"
KEY_FILE = f"{TLS_DIR}/registry.key"
HTPASSWD_FILE = f"{CONFIG_DIR}/htpasswd"
SEED_AUTH_FILE = f"{CONFIG_DIR}/seed-auth.json"  # skopeo's login for seeding, root only
CERTS_D = "/etc/docker/certs.d"  # <host:port>/ca.crt: where skopeo and docker look for a CA
REGISTRY_PORT = 5000  # what the GITOPS firewall opens (sizing.firewall)
REALM = "platform registry"
BCRYPT_COST = 10
BCRYPT_MAX_BYTES = 72  # bcrypt ignores (the bcrypt module refuses) anything longer
_SALT_CONTEXT = b"platform registry htpasswd salt\0"
_STD64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BCRYPT64 = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_TO_BCRYPT64 = bytes.maketrans(_STD64, _BCRYPT64)


@dataclass(frozen=True)
class RegistryTls:
    """The registry's certificate (with its chain), key, and the CA that clients trust;
    PEM text. The key never shows in a repr."""

    cert_pem: str
    key_pem: str = field(repr=False)
    ca_pem: str

    def __post_init__(self) -> None:
        if "-----BEGIN CERTIFICATE-----" not in self.cert_pem:
            raise ValueError("the registry certificate is not a PEM certificate")
        if "PRIVATE KEY-----" not in self.key_pem:
            raise ValueError("the registry key is not a PEM private key")
        if "-----BEGIN CERTIFICATE-----" not in self.ca_pem:
            raise ValueError("the registry CA is not a PEM certificate")


@dataclass(frozen=True)
class RegistryCredentials:
    """The registry login (pushes and pulls); the password never shows in a repr."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.username or any(c in self.username for c in ":\n\r\t ") or \
                not self.username.isprintable():
            raise ValueError(f"registry user name {self.username!r}: not empty, no colon, "
                             "space or control character")
        if not self.password:
            raise ValueError(f"registry user {self.username}: the password is empty")
        if len(self.password.encode()) > BCRYPT_MAX_BYTES:
            raise ValueError(f"registry user {self.username}: the password is longer than "
                             f"{BCRYPT_MAX_BYTES} bytes, which bcrypt cannot check")
        if any(c in self.password for c in "\n\r\0"):
            raise ValueError(f"registry user {self.username}: the password holds a line "
                             "break or NUL")


def registry_address(spec: PlatformSpec) -> tuple[str, int]:
    """Host name and port of the spec's `artifacts.registry` (the port must be 5000, the
    one the GITOPS firewall opens)."""
    host, _, port = spec.artifacts.registry.partition(":")
    number = int(port) if port else 443
    if number != REGISTRY_PORT:
        raise ValueError(f"artifacts.registry {spec.artifacts.registry}: the registry listens "
                         f"on port {REGISTRY_PORT} (the only one the GITOPS firewall opens "
                         f"for it); write {host}:{REGISTRY_PORT}")
    return host, number


def ca_dir(spec: PlatformSpec) -> str:
    """The directory holding the CA that skopeo (and docker) trust for the registry."""
    return f"{CERTS_D}/{spec.artifacts.registry}"


def _bcrypt_salt(credentials: RegistryCredentials) -> bytes:
    """A bcrypt salt (cost, 22 characters) derived from the user and password by HMAC, so
    the same login always gives the same htpasswd line."""
    raw = hmac.new(credentials.password.encode(), _SALT_CONTEXT + credentials.username.encode(),
                   hashlib.sha256).digest()[:16]
    # bcrypt's base64: the standard one with another alphabet, 16 bytes -> 22 characters.
    encoded = base64.b64encode(raw)[:22].translate(_TO_BCRYPT64)
    return b"$2b$%02d$" % BCRYPT_COST + encoded


def htpasswd_entry(credentials: RegistryCredentials) -> str:
    """The htpasswd line (bcrypt, the only scheme the registry accepts)."""
    hashed = bcrypt.hashpw(credentials.password.encode(), _bcrypt_salt(credentials))
    return f"{credentials.username}:{hashed.decode()}\n"


def auth_file(spec: PlatformSpec, credentials: RegistryCredentials) -> str:
    """skopeo's auth file (containers-auth.json) with the registry login."""
    token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode())
    return json.dumps({"auths": {spec.artifacts.registry: {"auth": token.decode()}}},
                      indent=2, sort_keys=True) + "\n"


def check_certificate(spec: PlatformSpec, tls: RegistryTls) -> None:
    """The certificate names the registry host and matches the key (a mismatch would only
    show later as a TLS failure on every node)."""
    host, _ = registry_address(spec)
    try:
        cert = x509.load_pem_x509_certificate(tls.cert_pem.encode())
    except ValueError:
        raise ValueError("the registry certificate cannot be read (PEM)") from None
    try:
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if host not in names:
        raise ValueError(f"the registry certificate does not name {host} (its DNS names: "
                         f"{', '.join(names) or 'none'})")
    try:
        key = serialization.load_pem_private_key(tls.key_pem.encode(), None)
    except (ValueError, TypeError):
        raise ValueError("the registry key cannot be read (PEM, unencrypted)") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, public):
        raise ValueError("the registry key does not belong to the registry certificate")


def registry_operations(spec: PlatformSpec, vm: VM, tls: RegistryTls | None,
                        credentials: RegistryCredentials, *,
                        ca_pem: str | None = None) -> list[Operation]:
    """The registry on the GITOPS VM, in the order it is applied (its auth file for
    seeding included, at SEED_AUTH_FILE). ``tls`` None keeps the certificate and key on
    the host as they are (still current); ``ca_pem`` is then the CA clients trust."""
    if vm.role is not Role.GITOPS:
        raise ValueError(f"{vm.name} is a {vm.role.value} VM; the registry belongs on the "
                         "GITOPS VM")
    host, port = registry_address(spec)
    group = SYSTEM_USER
    storage = Directory(STORAGE_DIR, owner=SYSTEM_USER, group=SYSTEM_USER, mode="0750")
    tls_files: list[Operation] = []
    if tls is not None:
        check_certificate(spec, tls)
        ca_pem = tls.ca_pem
        tls_files = [File(CERT_FILE, tls.cert_pem, group=group, mode="0644"),
                     File(KEY_FILE, tls.key_pem, group=group, mode="0640", secret=True)]
    if ca_pem is None:
        raise ValueError("registry_operations needs the CA (tls or ca_pem)")
    htpasswd = File(HTPASSWD_FILE, htpasswd_entry(credentials), group=group, mode="0640",
                    secret=True)
    config = File(CONFIG_FILE, render("registry/config.yml.j2", storage=STORAGE_DIR, port=port,
                                      certificate=CERT_FILE, key=KEY_FILE, realm=REALM,
                                      htpasswd=HTPASSWD_FILE))
    service = Service(UNIT, restart_on=[config, *tls_files, htpasswd])
    ca_file = f"{ca_dir(spec)}/ca.crt"
    ping = f"curl -sS -o /dev/null --max-time 5 --cacert {q(ca_file)} " \
           f"{q(f'https://{spec.artifacts.registry}/v2/')}"
    wait = Command(f"i=0; until {ping}; do i=$((i+1)); [ $i -lt 60 ] || "
                   f"{{ echo 'the registry does not answer on {host}:{port} after 30 s'; "
                   "exit 1; }; sleep 0.5; done",
                   unless=ping, on_change=[service], name="wait for the registry")
    return [Packages(PACKAGES),
            storage,
            Directory(CONFIG_DIR),
            Directory(TLS_DIR, group=group, mode="0750"),
            *tls_files, htpasswd, config,
            Directory(CERTS_D),
            Directory(ca_dir(spec)),
            File(ca_file, ca_pem),
            File(SEED_AUTH_FILE, auth_file(spec, credentials), mode="0600", secret=True),
            service,
            wait]


def _seed_command(spec: PlatformSpec, image: Image, auth_path: str) -> str:
    """Download, check, copy in, clean up: one shell command (run in a subshell by the
    apply script; the trap removes the download whatever happens)."""
    mirror = spec.artifacts.mirror.rstrip("/")
    relative = image_archive_path(image)
    archive = q(f"oci-archive:{relative}")
    target = q(f"docker://{spec.artifacts.registry}/{image.reference}")
    unlisted = q(f"{relative} is not listed in {mirror}/{SUMS_FILE}")
    corrupt = q(f"{relative}: its sha256 differs from the one in {mirror}/{SUMS_FILE}")
    return (
        "set -e; tmp=$(mktemp -d /var/tmp/registry-seed.XXXXXX); "
        "trap 'rm -rf -- \"$tmp\"' EXIT; cd \"$tmp\"; "
        f"curl -fsS --retry 3 -o {SUMS_FILE} {q(f'{mirror}/{SUMS_FILE}')}; "
        f"awk -v p={q(relative)} '$2 == p' {SUMS_FILE} > want; "
        f"[ -s want ] || {{ echo {unlisted}; exit 1; }}; "
        f"curl -fsS --retry 3 --create-dirs -o {q(relative)} {q(f'{mirror}/{relative}')}; "
        f"sha256sum --quiet --strict -c want || {{ echo {corrupt}; exit 1; }}; "
        f"got=$(skopeo inspect --format '{{{{.Digest}}}}' {archive}); "
        f"[ \"$got\" = {image.digest} ] || {{ echo \"{relative} holds the manifest $got, "
        f"but the images list pins {image.digest}\"; exit 1; }}; "
        f"skopeo copy --quiet --preserve-digests --authfile {q(auth_path)} "
        f"--dest-cert-dir {q(ca_dir(spec))} {archive} {target}"
    )


def present_check(spec: PlatformSpec, image: Image, auth_path: str) -> str:
    """Succeeds when the registry serves `image`'s tag at its pinned digest."""
    target = f"docker://{spec.artifacts.registry}/{image.reference}"
    return (f"[ \"$(skopeo inspect --no-tags --format '{{{{.Digest}}}}' --authfile "
            f"{q(auth_path)} --cert-dir {q(ca_dir(spec))} {q(target)})\" = {image.digest} ]")


def seed_operations(spec: PlatformSpec, images: Sequence[Image],
                    auth_file_path: str) -> list[Operation]:
    """One command per image, each skipped when the registry has that tag at its pinned
    digest (a tag at another digest is put back to the pinned one)."""
    return [Command(_seed_command(spec, image, auth_file_path),
                    unless=present_check(spec, image, auth_file_path),
                    name=f"seed {image.reference}")
            for image in images]


def apply_registry(pool: ConnectionPool, spec: PlatformSpec, inventory: Inventory, vm: VM,
                   tls: RegistryTls | None, credentials: RegistryCredentials,
                   images: Sequence[Image], *, ca_pem: str | None = None) -> HostReport:
    """Ensure the registry on `vm` and seed it; one probe and at most one apply over SSH
    as the admin user. The report lists every operation, changed or not."""
    host, _ = registry_address(spec)
    named = next((other for other in inventory.vms if other.fqdn == host), None)
    if named is not None and named.name != vm.name:
        raise ValueError(f"artifacts.registry names {named.name} ({host}), but the registry "
                         f"is being installed on {vm.name}")
    ops = registry_operations(spec, vm, tls, credentials, ca_pem=ca_pem) + \
        seed_operations(spec, images, SEED_AUTH_FILE)
    report = pool.session(host_keys.admin_target(spec, vm)).run(ops)
    if report.changed:
        log.info("%s: registry changed: %s", vm.name, ", ".join(report.changed))
    return report


KV_CREDENTIALS = "registry/admin"


def gitops_vm(inventory: Inventory) -> VM:
    return inventory.of_role(Role.GITOPS)[0]


@task(name="ensure-registry", retries=2, retry_delay_seconds=[5, 15],
      retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def ensure_registry(spec: PlatformSpec, inventory: Inventory, pool: ConnectionPool,
                    images_path: str) -> dict[str, object]:
    """The registry with its login from Vault and a certificate from Vault's PKI (renewed
    only when due), seeded with the release's images; a table row of what changed."""
    started = time.monotonic()
    vm = gitops_vm(inventory)
    images = read_images(images_path)
    vault = service_client(spec)
    login, _ = kv_ensure(vault, KV_CREDENTIALS,
                         lambda: {"username": "platform", "password": password()})
    credentials = RegistryCredentials(str(login["username"]), str(login["password"]))
    host, _ = registry_address(spec)
    session = pool.session(host_keys.admin_target(spec, vm))
    dns = sorted({host, f"{vm.name}.{spec.domain}"}, key=lambda n: n != host)
    ca = pki.root_certificate(vault)
    bundle = pki.renewal(vault, ca, read_host_file(session, CERT_FILE), host, dns,
                         [str(vm.ip)])
    tls = RegistryTls(bundle.certificate, bundle.private_key, ca) if bundle else None
    report = apply_registry(pool, spec, inventory, vm, tls, credentials, images, ca_pem=ca)
    return {"service": "registry", "host": vm.name,
            "endpoint": f"https://{spec.artifacts.registry}",
            "version": f"docker-registry, {len(images)} images",
            "changed": ", ".join(report.changed),
            "seconds": round(time.monotonic() - started, 2)}
