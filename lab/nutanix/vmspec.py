"""Checking a v4 `vmm.v4.ahv.config.Vm` request body before a VM task is queued.

What the request itself gets wrong is refused at once (400, a SchemaValidationError listing
every problem): missing name or cluster, counts and sizes that are not positive integers,
a disk with neither a size nor an image, a NIC without a subnet, user data that is not
base64. What the stand-in does not simulate (CD-ROMs, GPUs, Sysprep, cloning from another
disk, ...) is refused with 501 rather than silently dropped. Whether referenced images and
subnets exist is for the task to find out, as on Prism Central.

`powerState` in a create or update body is ignored, as on Prism: VMs are created OFF and
power changes go through `$actions`.
"""

from __future__ import annotations

import binascii
import ipaddress
import re
from base64 import b64decode
from collections.abc import Mapping
from typing import Any

from lab.nutanix.inventory import new_uuid

JSON = dict[str, Any]
AHV = "vmm.v4.ahv.config."
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{12}$")
BUS_TYPES = ("SCSI", "IDE", "PCI", "SATA", "SPAPR")
NIC_MODELS = ("VIRTIO", "E1000")
MACHINE_TYPES = ("PC", "PSERIES", "Q35")
# Vm attributes kept as given and echoed back (the stand-in gives them no meaning).
ECHOED = ("description", "hardwareClockTimezone", "isVcpuHardPinningEnabled",
          "isCpuPassthroughEnabled", "isMemoryOvercommitEnabled", "isGpuConsoleEnabled",
          "isCpuHotplugEnabled", "isScsiControllerEnabled", "isBrandingEnabled",
          "isVgaConsoleEnabled", "isAgentVm", "numNumaNodes", "bootConfig", "apcConfig",
          "categories", "vtpmConfig", "storageConfig", "enabledCpuFeatures")
# Device lists the stand-in does not simulate: non-empty means 501.
UNSIMULATED = ("cdRoms", "gpus", "serialPorts", "pcieDevices", "customAttributes")


class SpecProblems(Exception):
    """The body breaks the schema; `problems` is a list of (attribute path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{a}: {m}" for a, m in problems))
        self.problems = problems


class Unsimulated(Exception):
    """The body uses a feature that real Prism has and the stand-in does not simulate."""


def is_uuid(value: Any) -> bool:
    """True for the canonical textual UUID every v4 extId is."""
    return isinstance(value, str) and bool(UUID_RE.match(value))


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def obj(self, data: Mapping[str, Any], key: str, path: str, *,
            required: bool = False) -> Mapping[str, Any] | None:
        value = data.get(key)
        if value is None:
            if required:
                self.fail(path, "must not be null")
            return None
        if not isinstance(value, Mapping):
            self.fail(path, "must be an object")
            return None
        return value

    def positive(self, data: Mapping[str, Any], key: str, path: str, *,
                 required: bool = False, minimum: int = 1) -> int | None:
        value = data.get(key)
        if value is None:
            if required:
                self.fail(path, "must not be null")
            return None
        if not _int(value):
            self.fail(path, "must be an integer")
            return None
        if value < minimum:
            self.fail(path, f"must be greater than or equal to {minimum}")
            return None
        return int(value)

    def text(self, data: Mapping[str, Any], key: str, path: str, *,
             required: bool = False) -> str | None:
        value = data.get(key)
        if value is None:
            if required:
                self.fail(path, "must not be null")
            return None
        if not isinstance(value, str):
            self.fail(path, "must be a string")
            return None
        if required and not value.strip():
            self.fail(path, "must not be blank")
            return None
        return value

    def ext_id(self, data: Mapping[str, Any] | None, path: str, *,
               required: bool = True) -> str | None:
        value = None if data is None else data.get("extId")
        if value is None:
            if required:
                self.fail(f"{path}.extId", "must not be null")
            return None
        if not is_uuid(value):
            self.fail(f"{path}.extId", "must match the UUID pattern")
            return None
        return str(value).lower()


def _object_type(data: Mapping[str, Any]) -> str | None:
    value = data.get("$objectType")
    return value if isinstance(value, str) else None


def _disk(check: _Checker, data: Any, path: str) -> JSON | None:
    if not isinstance(data, Mapping):
        check.fail(path, "must be an object")
        return None
    address = check.obj(data, "diskAddress", f"{path}.diskAddress")
    bus, index = "SCSI", None
    if address is not None:
        bus = address.get("busType", "SCSI")
        if bus not in BUS_TYPES:
            check.fail(f"{path}.diskAddress.busType", f"must be one of {', '.join(BUS_TYPES)}")
        index = check.positive(address, "index", f"{path}.diskAddress.index", minimum=0)
    backing = check.obj(data, "backingInfo", f"{path}.backingInfo", required=True)
    if backing is None:
        return None
    kind = _object_type(backing)
    if kind not in (None, AHV + "VmDisk"):
        raise Unsimulated(f"{path}.backingInfo of type {kind}")
    size = check.positive(backing, "diskSizeBytes", f"{path}.backingInfo.diskSizeBytes")
    image = None
    source = check.obj(backing, "dataSource", f"{path}.backingInfo.dataSource")
    if source is not None:
        reference = check.obj(source, "reference", f"{path}.backingInfo.dataSource.reference",
                              required=True)
        if reference is not None:
            ref_type = _object_type(reference)
            if ref_type not in (None, AHV + "ImageReference"):
                raise Unsimulated(f"{path}.backingInfo.dataSource.reference of type {ref_type}")
            image = reference.get("imageExtId")
            if not is_uuid(image):
                check.fail(f"{path}.backingInfo.dataSource.reference.imageExtId",
                           "must not be null and must match the UUID pattern")
                image = None
    elif "diskSizeBytes" not in backing:
        check.fail(f"{path}.backingInfo.diskSizeBytes",
                   "must not be null for a disk without a data source")
    container = check.obj(backing, "storageContainer", f"{path}.backingInfo.storageContainer")
    container_id = check.ext_id(container, f"{path}.backingInfo.storageContainer",
                                required=False) if container is not None else None
    return {"extId": new_uuid(), "diskExtId": new_uuid(), "busType": bus, "index": index,
            "sizeBytes": size, "imageExtId": image.lower() if image else None,
            "containerExtId": container_id}


def _nic(check: _Checker, data: Any, path: str) -> JSON | None:
    if not isinstance(data, Mapping):
        check.fail(path, "must be an object")
        return None
    network = data.get("nicNetworkInfo") or data.get("networkInfo")
    where = f"{path}.{'nicNetworkInfo' if data.get('nicNetworkInfo') else 'networkInfo'}"
    if not isinstance(network, Mapping):
        check.fail(f"{path}.networkInfo", "must not be null")
        return None
    kind = _object_type(network)
    if kind not in (None, AHV + "NicNetworkInfo", AHV + "VirtualEthernetNicNetworkInfo"):
        raise Unsimulated(f"{where} of type {kind}")
    nic_type = network.get("nicType", "NORMAL_NIC")
    if nic_type != "NORMAL_NIC":
        raise Unsimulated(f"{where}.nicType {nic_type}")
    if network.get("vlanMode", "ACCESS") != "ACCESS":
        raise Unsimulated(f"{where}.vlanMode {network.get('vlanMode')}")
    subnet = check.ext_id(check.obj(network, "subnet", f"{where}.subnet", required=True),
                          f"{where}.subnet")
    ip, assign = None, None
    ipv4 = check.obj(network, "ipv4Config", f"{where}.ipv4Config")
    if ipv4 is not None:
        assign = ipv4.get("shouldAssignIp")
        if assign is not None and not isinstance(assign, bool):
            check.fail(f"{where}.ipv4Config.shouldAssignIp", "must be a boolean")
        address = check.obj(ipv4, "ipAddress", f"{where}.ipv4Config.ipAddress")
        if address is not None:
            value = address.get("value")
            try:
                ip = str(ipaddress.IPv4Address(value))
            except (ipaddress.AddressValueError, ValueError, TypeError):
                check.fail(f"{where}.ipv4Config.ipAddress.value", "must be an IPv4 address")
    backing = data.get("nicBackingInfo") or data.get("backingInfo") or {}
    model, mac, connected = "VIRTIO", None, True
    if isinstance(backing, Mapping):
        b_type = _object_type(backing)
        if b_type not in (None, AHV + "EmulatedNic", AHV + "VirtualEthernetNic"):
            raise Unsimulated(f"{path} backing of type {b_type}")
        model = backing.get("model", "VIRTIO")
        if model not in NIC_MODELS:
            check.fail(f"{path}.backingInfo.model", f"must be one of {', '.join(NIC_MODELS)}")
        mac = backing.get("macAddress")
        if mac is not None and not (isinstance(mac, str) and re.fullmatch(
                r"(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac)):
            check.fail(f"{path}.backingInfo.macAddress", "must be a MAC address")
        connected = bool(backing.get("isConnected", True))
    if subnet is None:
        return None
    return {"extId": new_uuid(), "subnetExtId": subnet, "model": model,
            "macAddress": mac.lower() if isinstance(mac, str) else None,
            "isConnected": connected, "ipAddress": ip, "shouldAssignIp": assign,
            "learnedIps": []}


def _cloud_init(check: _Checker, data: Mapping[str, Any]) -> JSON | None:
    custom = check.obj(data, "guestCustomization", "guestCustomization")
    if custom is None:
        return None
    config = check.obj(custom, "config", "guestCustomization.config", required=True)
    if config is None:
        return None
    kind = _object_type(config)
    if kind not in (None, AHV + "CloudInit") or "sysprepScript" in config:
        raise Unsimulated(f"guestCustomization.config of type {kind or 'Sysprep'}")
    source = config.get("datasourceType", "CONFIG_DRIVE_V2")
    if source != "CONFIG_DRIVE_V2":
        check.fail("guestCustomization.config.datasourceType", "must be CONFIG_DRIVE_V2")
    meta = check.text(config, "metadata", "guestCustomization.config.metadata")
    script = check.obj(config, "cloudInitScript", "guestCustomization.config.cloudInitScript")
    user = None
    if script is not None:
        s_type = _object_type(script)
        if s_type not in (None, AHV + "Userdata") or "keyValuePairs" in script:
            raise Unsimulated(f"cloudInitScript of type {s_type or 'CustomKeyValues'}")
        user = check.text(script, "value", "guestCustomization.config.cloudInitScript.value",
                          required=True)
    for name, value, limit in (("cloudInitScript.value", user, 128000),
                               ("metadata", meta, 32000)):
        if value is None:
            continue
        if len(value) > limit:
            check.fail(f"guestCustomization.config.{name}",
                       f"length must be less than or equal to {limit}")
            continue
        try:
            b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            check.fail(f"guestCustomization.config.{name}", "must be base64 encoded")
    return {"userData": user, "metaData": meta, "datasourceType": source}


def _common(check: _Checker, data: Mapping[str, Any], *, creating: bool) -> JSON:
    """The scalar attributes both create and update accept."""
    out: JSON = {}
    name = check.text(data, "name", "name", required=creating)
    if name is not None:
        if not name.strip():
            check.fail("name", "must not be blank")
        elif len(name) > 80:
            check.fail("name", "size must be between 1 and 80")
        else:
            out["name"] = name
    for key, required in (("numSockets", creating), ("numCoresPerSocket", False),
                          ("numThreadsPerCore", False), ("memorySizeBytes", creating)):
        value = check.positive(data, key, key, required=required)
        if value is not None:
            out[key] = value
    machine = data.get("machineType")
    if machine is not None:
        if machine not in MACHINE_TYPES:
            check.fail("machineType", f"must be one of {', '.join(MACHINE_TYPES)}")
        else:
            out["machineType"] = machine
    for key in UNSIMULATED:
        if data.get(key):
            raise Unsimulated(f"'{key}' in a VM body")
    extra = {key: data[key] for key in ECHOED if data.get(key) is not None}
    if extra:
        out["extra"] = extra
    return out


def parse_create(data: Any) -> JSON:
    """Check a create body; return the VM as the store keeps it (before the task runs)."""
    if not isinstance(data, Mapping):
        raise SpecProblems([("", "the request body must be a JSON object")])
    check = _Checker()
    vm = _common(check, data, creating=True)
    cluster = check.ext_id(check.obj(data, "cluster", "cluster", required=True), "cluster")
    disks: list[JSON] = []
    raw_disks = data.get("disks") or []
    if not isinstance(raw_disks, list):
        check.fail("disks", "must be an array")
        raw_disks = []
    for index, raw in enumerate(raw_disks):
        disk = _disk(check, raw, f"disks[{index}]")
        if disk:
            disks.append(disk)
    used = set()
    for disk in disks:
        if disk["index"] is None:
            continue
        key = (disk["busType"], disk["index"])
        if key in used:
            check.fail("disks", f"duplicate disk address {key[0]}.{key[1]}")
        used.add(key)
    for disk in disks:
        if disk["index"] is None:
            disk["index"] = next(i for i in range(1024) if (disk["busType"], i) not in used)
            used.add((disk["busType"], disk["index"]))
    nics: list[JSON] = []
    raw_nics = data.get("nics") or []
    if not isinstance(raw_nics, list):
        check.fail("nics", "must be an array")
        raw_nics = []
    for index, raw in enumerate(raw_nics):
        nic = _nic(check, raw, f"nics[{index}]")
        if nic:
            nics.append(nic)
    cloud = _cloud_init(check, data)
    if check.problems:
        raise SpecProblems(check.problems)
    vm_id = new_uuid()
    vm.update({
        "extId": vm_id, "clusterExtId": cluster, "disks": disks, "nics": nics,
        "cloudInit": cloud, "numCoresPerSocket": vm.get("numCoresPerSocket", 1),
        "numThreadsPerCore": vm.get("numThreadsPerCore", 1),
        "machineType": vm.get("machineType", "PC"),
        "biosUuid": data.get("biosUuid") if is_uuid(data.get("biosUuid")) else new_uuid(),
        "generationUuid": new_uuid(), "extra": vm.get("extra", {})})
    return vm


def parse_device(kind: str, data: Any) -> JSON:
    """Check the body of a disk or NIC call (`Disk` or `Nic`, as in a VM's lists)."""
    check = _Checker()
    parsed = (_disk if kind == "disk" else _nic)(check, data, "$")
    if check.problems or parsed is None:
        raise SpecProblems(check.problems or [("", "the request body must be a JSON object")])
    return parsed


def parse_update(data: Any, current: Mapping[str, Any]) -> JSON:
    """Check an update (PUT) body; return only the attributes it changes.

    Like Prism, the PUT of a whole Vm changes its own attributes; disks, NICs, guest
    customization and power state in the body are ignored (they have their own calls).
    """
    if not isinstance(data, Mapping):
        raise SpecProblems([("", "the request body must be a JSON object")])
    check = _Checker()
    out = _common(check, data, creating=False)
    cluster = data.get("cluster")
    if isinstance(cluster, Mapping) and cluster.get("extId") not in (None,
                                                                     current["clusterExtId"]):
        check.fail("cluster.extId", "cannot be changed by an update (migrate the VM instead)")
    ext_id = data.get("extId")
    if ext_id is not None and ext_id != current["extId"]:
        check.fail("extId", "does not match the VM in the path")
    if check.problems:
        raise SpecProblems(check.problems)
    extra = dict(current.get("extra") or {})
    extra.update(out.pop("extra", {}))
    changes = {k: v for k, v in out.items() if current.get(k) != v}
    if extra != (current.get("extra") or {}):
        changes["extra"] = extra
    return changes
