"""The stand-in's Prism Central state: clusters, subnets, images, VMs and tasks.

Everything lives in one JSON file that is rewritten (atomically) after each change, so the
stand-in survives a restart the way Prism Central does. Clusters, subnets and images come
from the constructor only when the file does not exist yet; afterwards the file is the truth.

Changes happen the way Prism Central does them: a request is checked and accepted, a task
is queued, and the change is applied when the task ends. A task is QUEUED for the first
quarter of `task_seconds`, RUNNING until `task_seconds` have passed, then SUCCEEDED or
FAILED; its status is computed from the clock, and due tasks are executed (in order) before
any read. What only the running task can know is checked then: images and subnets that
exist, storage and memory capacity, and that the VM's ETag is still the one the request was
accepted with (Prism fails such tasks with VM_ETAG_MISMATCH).

Capacity model (simulated): a cluster has `memory_bytes` for powered-on VMs and
`storage_bytes` for provisioned disks (thick: every disk counts at full size). Creating a VM
fails when its disks do not fit the free storage or its memory exceeds the whole cluster;
powering one on fails when the memory of the powered-on VMs would exceed the cluster's.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
GiB = 1 << 30
TiB = 1 << 40
STATE_FORMAT = 1
TASK_PREFIX = "ZXJnb24=:"  # base64("ergon"): real v4 task ids look like this


def new_uuid() -> str:
    """A random extId, the form every v4 entity id takes."""
    return str(uuid.uuid4())


def _field(data: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if name in data:
            return data[name]
    return default


@dataclass(frozen=True)
class Cluster:
    """An AHV cluster managed by the Prism Central; capacities are the simulated limits."""

    name: str
    ext_id: str = field(default_factory=new_uuid)
    memory_bytes: int = 512 * GiB
    storage_bytes: int = 20 * TiB
    num_hosts: int = 3

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Cluster:
        """Read camelCase or snake_case keys (inventory files)."""
        return cls(name=str(data["name"]), ext_id=str(_field(data, "extId", "ext_id",
                                                             default=new_uuid())),
                   memory_bytes=int(_field(data, "memoryBytes", "memory_bytes",
                                           default=512 * GiB)),
                   storage_bytes=int(_field(data, "storageBytes", "storage_bytes",
                                            default=20 * TiB)),
                   num_hosts=int(_field(data, "numHosts", "num_hosts", default=3)))


@dataclass(frozen=True)
class Subnet:
    """A VLAN-backed subnet on one cluster (no IP address management)."""

    name: str
    vlan_id: int
    cluster_ext_id: str
    ext_id: str = field(default_factory=new_uuid)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Subnet:
        """Read camelCase or snake_case keys (inventory files)."""
        return cls(name=str(data["name"]), vlan_id=int(_field(data, "vlanId", "vlan_id")),
                   cluster_ext_id=str(_field(data, "clusterExtId", "cluster_ext_id")),
                   ext_id=str(_field(data, "extId", "ext_id", default=new_uuid())))


@dataclass(frozen=True)
class Image:
    """A disk image in the image service; `cluster_ext_ids` empty means every cluster."""

    name: str
    size_bytes: int
    ext_id: str = field(default_factory=new_uuid)
    image_type: str = "DISK_IMAGE"
    cluster_ext_ids: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Image:
        """Read camelCase or snake_case keys (inventory files)."""
        return cls(name=str(data["name"]),
                   size_bytes=int(_field(data, "sizeBytes", "size_bytes")),
                   ext_id=str(_field(data, "extId", "ext_id", default=new_uuid())),
                   image_type=str(_field(data, "type", "image_type", default="DISK_IMAGE")),
                   cluster_ext_ids=tuple(_field(data, "clusterExtIds", "cluster_ext_ids",
                                                default=())))


@dataclass(frozen=True)
class LabNic:
    """One NIC of a VM as the lab sees it."""

    subnet_ext_id: str
    subnet_name: str | None
    vlan_id: int | None
    mac_address: str
    requested_ip: str | None  # the ipv4Config address given at creation, if any
    learned_ips: tuple[str, ...]


@dataclass(frozen=True)
class LabVm:
    """A VM as the lab's guest watcher needs it (not part of the Nutanix API)."""

    ext_id: str
    name: str
    cluster_name: str | None
    power_state: str
    num_vcpus: int
    memory_bytes: int
    user_data: str | None  # decoded cloud-init user data
    meta_data: str | None  # decoded cloud-init metadata (base64 on the wire)
    user_data_b64: str | None  # as given in the request
    meta_data_b64: str | None  # as given in the request
    nics: tuple[LabNic, ...]
    hostname: str | None  # what the guest reported, if anything

    def to_json(self) -> JSON:
        """Plain JSON for the lab's HTTP endpoint."""
        out = dict(self.__dict__)
        out["nics"] = [dict(n.__dict__) for n in self.nics]
        for nic in out["nics"]:
            nic["learned_ips"] = list(nic["learned_ips"])
        return out


class TaskFailure(Exception):
    """Raised by a task's work: the task ends FAILED with this message."""

    def __init__(self, message: str, code: str, group: str,
                 arguments: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.group = group
        self.arguments = dict(arguments or {})


def etag_of(vm: Mapping[str, Any]) -> str:
    """The VM's current ETag: opaque, and different after every change."""
    digest = hashlib.sha256(f"{vm['extId']}:{vm['etagSeq']}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()


def decode_b64_text(value: str | None) -> str | None:
    """Decode base64 text; None when absent or not base64 (the raw value is kept too)."""
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def _mac() -> str:
    """A MAC in the range AHV assigns (50:6b:8d:...)."""
    tail = uuid.uuid4().bytes[:3]
    return "50:6b:8d:" + ":".join(f"{b:02x}" for b in tail)


class Store:
    """All state, one lock, one JSON file. Every public method is thread-safe."""

    def __init__(self, path: Path, *, clusters: Iterable[Cluster] = (),
                 subnets: Iterable[Subnet] = (), images: Iterable[Image] = (),
                 task_seconds: float = 0.6, prism_central_name: str | None = "prism-central",
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.task_seconds = task_seconds
        self.clock = clock
        self.lock = threading.RLock()
        self.idempotency: OrderedDict[str, tuple[int, JSON]] = OrderedDict()
        if path.exists():
            self.state: JSON = json.loads(path.read_text())
            if self.state.get("format") != STATE_FORMAT:
                raise ValueError(f"{path}: not a Nutanix stand-in state file (format "
                                 f"{self.state.get('format')!r})")
        else:
            self.state = self._seed(list(clusters), list(subnets), list(images),
                                    prism_central_name)
            self.save()

    # ---- state file -------------------------------------------------------------------

    def _seed(self, clusters: list[Cluster], subnets: list[Subnet], images: list[Image],
              pc_name: str | None) -> JSON:
        now = self.clock()
        names = [c.name for c in clusters]
        if len(set(names)) != len(names) or len({c.ext_id for c in clusters}) != len(clusters):
            raise ValueError("cluster names and extIds must be unique")
        known = {c.ext_id for c in clusters}
        for subnet in subnets:
            if subnet.cluster_ext_id not in known:
                raise ValueError(f"subnet {subnet.name}: unknown cluster {subnet.cluster_ext_id}")
        for image in images:
            for cluster in image.cluster_ext_ids:
                if cluster not in known:
                    raise ValueError(f"image {image.name}: unknown cluster {cluster}")
        state: JSON = {"format": STATE_FORMAT, "clusters": {}, "subnets": {}, "images": {},
                       "vms": {}, "tasks": {}, "prismCentral": None}
        if pc_name:
            state["prismCentral"] = {"extId": new_uuid(), "name": pc_name}
        for c in clusters:
            state["clusters"][c.ext_id] = {
                "extId": c.ext_id, "name": c.name, "memoryBytes": c.memory_bytes,
                "storageBytes": c.storage_bytes, "containerExtId": new_uuid(),
                "hostExtIds": [new_uuid() for _ in range(max(1, c.num_hosts))]}
        for s in subnets:
            state["subnets"][s.ext_id] = {
                "extId": s.ext_id, "name": s.name, "vlanId": s.vlan_id,
                "clusterExtId": s.cluster_ext_id}
        for i in images:
            state["images"][i.ext_id] = {
                "extId": i.ext_id, "name": i.name, "sizeBytes": i.size_bytes,
                "type": i.image_type, "clusterExtIds": list(i.cluster_ext_ids),
                "createTime": now}
        return state

    def save(self) -> None:
        """Write the state file atomically (a crash leaves the old or the new file)."""
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
            os.replace(tmp, self.path)

    # ---- lookups (callers hold the lock) ---------------------------------------------------

    @property
    def clusters(self) -> dict[str, JSON]:
        return self.state["clusters"]

    @property
    def subnets(self) -> dict[str, JSON]:
        return self.state["subnets"]

    @property
    def images(self) -> dict[str, JSON]:
        return self.state["images"]

    @property
    def vms(self) -> dict[str, JSON]:
        return self.state["vms"]

    @property
    def tasks(self) -> dict[str, JSON]:
        return self.state["tasks"]

    def memory_in_use(self, cluster_ext_id: str) -> int:
        """Memory of the powered-on VMs of a cluster."""
        return sum(vm["memorySizeBytes"] for vm in self.vms.values()
                   if vm["clusterExtId"] == cluster_ext_id and vm["powerState"] == "ON")

    def storage_in_use(self, cluster_ext_id: str) -> int:
        """Provisioned disk bytes of the VMs of a cluster."""
        return sum(d["sizeBytes"] for vm in self.vms.values()
                   if vm["clusterExtId"] == cluster_ext_id for d in vm["disks"])

    # ---- tasks ---------------------------------------------------------------------------

    def new_task(self, *, kind: str, operation: str, description: str, owner: str,
                 cluster_ext_id: str | None, vm_ext_id: str | None, payload: JSON | None = None,
                 expect_etag: str | None = None) -> JSON:
        """Queue a task; its work runs when it ends (see `settle`)."""
        with self.lock:
            now = self.clock()
            task: JSON = {
                "extId": TASK_PREFIX + new_uuid(), "kind": kind, "operation": operation,
                "operationDescription": description, "owner": owner,
                "clusterExtId": cluster_ext_id, "vmExtId": vm_ext_id,
                "payload": payload or {}, "expectEtag": expect_etag, "createdAt": now,
                "startAt": now + self.task_seconds * 0.25, "endAt": now + self.task_seconds,
                "result": None}
            self.tasks[task["extId"]] = task
            ended = [t for t in self.tasks.values() if t["result"] is not None]
            for old in sorted(ended, key=lambda t: t["endAt"])[:max(len(self.tasks) - 5000, 0)]:
                del self.tasks[old["extId"]]  # Prism, too, forgets old tasks
            self.save()
            return task

    def settle(self) -> bool:
        """Run the work of every task whose time is up, oldest first; True if any ran."""
        with self.lock:
            now = self.clock()
            due = sorted((t for t in self.tasks.values()
                          if t["result"] is None and t["endAt"] <= now),
                         key=lambda t: (t["endAt"], t["createdAt"]))
            for task in due:
                task["result"] = self._execute(task)
            if due:
                self.save()
            return bool(due)

    def task_status(self, task: Mapping[str, Any], now: float) -> str:
        """QUEUED / RUNNING from the clock, then the result's status."""
        if task["result"] is not None:
            return str(task["result"]["status"])
        return "QUEUED" if now < task["startAt"] else "RUNNING"

    def _execute(self, task: JSON) -> JSON:
        work: dict[str, Callable[[JSON], list[JSON]]] = {
            "create_vm": self._do_create, "update_vm": self._do_update,
            "delete_vm": self._do_delete, "power_on": self._do_power_on,
            "power_off": self._do_power_off, "create_disk": self._do_create_disk,
            "update_disk": self._do_update_disk, "create_nic": self._do_create_nic,
            "update_nic": self._do_update_nic}
        try:
            if task["vmExtId"] and task["kind"] != "create_vm":
                vm = self.vms.get(task["vmExtId"])
                if vm is None:
                    raise TaskFailure(
                        f"Failed to perform the operation on the VM with UUID "
                        f"'{task['vmExtId']}', because it is not found.", "VMM-30100",
                        "VM_NOT_FOUND", {"vm_uuid": task["vmExtId"]})
                if task["expectEtag"] and etag_of(vm) != task["expectEtag"]:
                    raise TaskFailure(
                        f"Failed to perform the operation on the VM with UUID "
                        f"'{vm['extId']}', because it was modified after the request was "
                        "accepted (its ETag changed). Read the VM again and retry.",
                        "VMM-30301", "VM_ETAG_MISMATCH", {"vm_uuid": vm["extId"]})
            entities = work[task["kind"]](task)
            return {"status": "SUCCEEDED", "entities": entities, "error": None}
        except TaskFailure as failure:
            affected = ([{"extId": task["vmExtId"], "rel": "vmm:ahv:config:vm"}]
                        if task["kind"] != "create_vm" and task["vmExtId"] else [])
            return {"status": "FAILED", "entities": affected,
                    "error": {"message": failure.message, "code": failure.code,
                              "group": failure.group, "arguments": failure.arguments}}

    def _vm_entity(self, vm: Mapping[str, Any]) -> list[JSON]:
        return [{"extId": vm["extId"], "rel": "vmm:ahv:config:vm", "name": vm["name"]}]

    def _do_create(self, task: JSON) -> list[JSON]:
        spec = copy.deepcopy(task["payload"]["vm"])
        cluster = self.clusters.get(spec["clusterExtId"])
        vm_id = spec["extId"]
        if cluster is None:
            raise TaskFailure(f"Failed to create the VM: cluster '{spec['clusterExtId']}' is no "
                              "longer registered.", "VMM-30102", "CLUSTER_NOT_FOUND",
                              {"cluster_uuid": spec["clusterExtId"]})
        for index, nic in enumerate(spec["nics"]):
            self._check_subnet(vm_id, cluster, nic["subnetExtId"], f"nics[{index}].")
        for index, disk in enumerate(spec["disks"]):
            container = disk.get("containerExtId")
            if container and container != cluster["containerExtId"]:
                raise TaskFailure(
                    f"Failed to perform the operation on the VM with UUID '{vm_id}', due to an "
                    f"invalid argument with key 'disks[{index}].backingInfo.storageContainer."
                    f"extId' and value '{container}': no such storage container on cluster "
                    f"'{cluster['name']}'.", "VMM-30204", "STORAGE_CONTAINER_NOT_FOUND",
                    {"container_uuid": container})
            image_id = disk.get("imageExtId")
            if image_id is None:
                continue
            image = self.images.get(image_id)
            if image is None:
                raise TaskFailure(
                    f"Failed to perform the operation on the VM with UUID '{vm_id}', due to an "
                    f"invalid argument with key 'disks[{index}].backingInfo.dataSource."
                    f"reference.imageExtId' and value '{image_id}': image not found.",
                    "VMM-20005", "IMAGE_NOT_FOUND", {"image_uuid": image_id})
            if image["clusterExtIds"] and cluster["extId"] not in image["clusterExtIds"]:
                raise TaskFailure(
                    f"Failed to perform the operation on the VM with UUID '{vm_id}': image "
                    f"'{image['name']}' is not available on cluster '{cluster['name']}'.",
                    "VMM-20006", "IMAGE_NOT_ON_CLUSTER", {"image_uuid": image_id})
            if disk["sizeBytes"] is None:
                disk["sizeBytes"] = image["sizeBytes"]
            elif disk["sizeBytes"] < image["sizeBytes"]:
                raise TaskFailure(
                    f"Failed to perform the operation on the VM with UUID '{vm_id}', due to an "
                    f"invalid argument with key 'disks[{index}].backingInfo.diskSizeBytes' and "
                    f"value '{disk['sizeBytes']}': smaller than image '{image['name']}' "
                    f"({image['sizeBytes']} bytes).", "VMM-30203", "INVALID_DISK_SIZE",
                    {"disk_size": str(disk["sizeBytes"])})
        self._check_storage(cluster, f"create the VM '{spec['name']}'",
                            sum(d["sizeBytes"] for d in spec["disks"]))
        if spec["memorySizeBytes"] > cluster["memoryBytes"]:
            raise TaskFailure(
                f"Failed to create the VM '{spec['name']}': its memory "
                f"({spec['memorySizeBytes']} bytes) exceeds the memory of cluster "
                f"'{cluster['name']}' ({cluster['memoryBytes']} bytes).",
                "VMM-30402", "INSUFFICIENT_MEMORY",
                {"requested_bytes": str(spec["memorySizeBytes"]),
                 "cluster_bytes": str(cluster["memoryBytes"])})
        now = self.clock()
        spec.update({"createTime": now, "updateTime": now, "powerState": "OFF",
                     "hostExtId": None, "etagSeq": 1, "guestHostname": None})
        for disk in spec["disks"]:
            disk["containerExtId"] = disk.get("containerExtId") or cluster["containerExtId"]
        for nic in spec["nics"]:
            nic["macAddress"] = nic.get("macAddress") or _mac()
        self.vms[vm_id] = spec
        return self._vm_entity(spec)

    def _touch(self, vm: JSON) -> None:
        vm["etagSeq"] += 1
        vm["updateTime"] = self.clock()

    def _do_update(self, task: JSON) -> list[JSON]:
        vm = self.vms[task["vmExtId"]]
        changes: JSON = task["payload"]["changes"]
        if vm["powerState"] == "ON":
            shrink: list[str] = [key for key in ("memorySizeBytes", "numSockets")
                                 if key in changes and changes[key] < vm[key]]
            reshape: list[str] = [key for key in ("numCoresPerSocket", "numThreadsPerCore")
                                  if key in changes and changes[key] != vm[key]]
            if shrink or reshape:
                raise TaskFailure(
                    f"Failed to update the VM with UUID '{vm['extId']}': changing "
                    f"{', '.join(shrink + reshape)} requires the VM to be powered off.",
                    "VMM-30501", "VM_HOTPLUG_NOT_SUPPORTED", {"vm_uuid": vm["extId"]})
            grow = changes.get("memorySizeBytes", vm["memorySizeBytes"]) - vm["memorySizeBytes"]
            self._check_memory(vm, grow, "update")
        vm.update(changes)
        self._touch(vm)
        return self._vm_entity(vm)

    def _check_subnet(self, vm_id: str, cluster: JSON, subnet_id: str, where: str) -> JSON:
        subnet = self.subnets.get(subnet_id)
        if subnet is None:
            raise TaskFailure(
                f"Failed to perform the operation on the VM with UUID '{vm_id}', due to an "
                f"invalid argument with key '{where}networkInfo.subnet.extId' and "
                f"value '{subnet_id}': subnet not found.", "VMM-30201",
                "SUBNET_NOT_FOUND", {"subnet_uuid": subnet_id})
        if subnet["clusterExtId"] != cluster["extId"]:
            raise TaskFailure(
                f"Failed to perform the operation on the VM with UUID '{vm_id}': subnet "
                f"'{subnet['name']}' is not available on cluster '{cluster['name']}'.",
                "VMM-30202", "SUBNET_NOT_ON_CLUSTER", {"subnet_uuid": subnet["extId"]})
        return subnet

    def _check_storage(self, cluster: JSON, what: str, wanted: int) -> None:
        free = cluster["storageBytes"] - self.storage_in_use(cluster["extId"])
        if wanted > free:
            raise TaskFailure(
                f"Failed to {what}: not enough free storage on cluster "
                f"'{cluster['name']}' (requested {wanted} bytes, {max(free, 0)} bytes free).",
                "VMM-30401", "INSUFFICIENT_STORAGE",
                {"requested_bytes": str(wanted), "free_bytes": str(max(free, 0))})

    def _device(self, vm: JSON, kind: str, ext_id: str) -> JSON:
        """A disk or NIC of the VM by its extId."""
        found = next((d for d in vm[f"{kind}s"] if d["extId"] == ext_id), None)
        if found is None:
            label = "disk" if kind == "disk" else "NIC"
            raise TaskFailure(
                f"Failed to perform the operation on the VM with UUID '{vm['extId']}': its "
                f"{label} with UUID '{ext_id}' is not found.", "VMM-30110",
                f"{kind.upper()}_NOT_FOUND", {"vm_uuid": vm["extId"], f"{kind}_uuid": ext_id})
        return found

    def _do_create_disk(self, task: JSON) -> list[JSON]:
        """A disk added (hot-plugged on a running VM, as AHV does for SCSI disks)."""
        vm = self.vms[task["vmExtId"]]
        cluster = self.clusters[vm["clusterExtId"]]
        disk = copy.deepcopy(task["payload"]["disk"])
        if disk.get("imageExtId"):
            image = self.images.get(disk["imageExtId"])
            if image is None:
                raise TaskFailure(
                    f"Failed to perform the operation on the VM with UUID '{vm['extId']}': "
                    f"image '{disk['imageExtId']}' not found.", "VMM-20005", "IMAGE_NOT_FOUND",
                    {"image_uuid": disk["imageExtId"]})
            disk["sizeBytes"] = max(disk["sizeBytes"] or 0, image["sizeBytes"])
        used = {(d["busType"], d["index"]) for d in vm["disks"]}
        if disk["index"] is None:
            disk["index"] = next(i for i in range(len(used) + 1)
                                 if (disk["busType"], i) not in used)
        elif (disk["busType"], disk["index"]) in used:
            raise TaskFailure(
                f"Failed to perform the operation on the VM with UUID '{vm['extId']}': disk "
                f"address {disk['busType']}.{disk['index']} is already in use.", "VMM-30207",
                "DISK_ADDRESS_IN_USE", {"vm_uuid": vm["extId"]})
        self._check_storage(cluster, f"add a disk to the VM with UUID '{vm['extId']}'",
                            disk["sizeBytes"])
        disk["containerExtId"] = disk.get("containerExtId") or cluster["containerExtId"]
        vm["disks"].append(disk)
        self._touch(vm)
        return self._vm_entity(vm)

    def _do_update_disk(self, task: JSON) -> list[JSON]:
        """A disk grown (online, as AHV does); never shrunk."""
        vm = self.vms[task["vmExtId"]]
        disk = self._device(vm, "disk", task["payload"]["extId"])
        size = task["payload"]["disk"]["sizeBytes"]
        if size is not None and size < disk["sizeBytes"]:
            raise TaskFailure(
                f"Failed to perform the operation on the VM with UUID '{vm['extId']}', due to "
                f"an invalid argument with key 'backingInfo.diskSizeBytes' and value '{size}': "
                f"a disk cannot be shrunk (it has {disk['sizeBytes']} bytes).", "VMM-30203",
                "INVALID_DISK_SIZE", {"disk_size": str(size)})
        if size is not None and size > disk["sizeBytes"]:
            self._check_storage(self.clusters[vm["clusterExtId"]],
                                f"grow a disk of the VM with UUID '{vm['extId']}'",
                                size - disk["sizeBytes"])
            disk["sizeBytes"] = size
        self._touch(vm)
        return self._vm_entity(vm)

    def _do_create_nic(self, task: JSON) -> list[JSON]:
        vm = self.vms[task["vmExtId"]]
        nic = copy.deepcopy(task["payload"]["nic"])
        self._check_subnet(vm["extId"], self.clusters[vm["clusterExtId"]], nic["subnetExtId"], "")
        nic["macAddress"] = nic.get("macAddress") or _mac()
        vm["nics"].append(nic)
        self._touch(vm)
        return self._vm_entity(vm)

    def _do_update_nic(self, task: JSON) -> list[JSON]:
        """A NIC moved to another subnet: what the guest had learned on it is gone."""
        vm = self.vms[task["vmExtId"]]
        nic = self._device(vm, "nic", task["payload"]["extId"])
        wanted = task["payload"]["nic"]
        self._check_subnet(vm["extId"], self.clusters[vm["clusterExtId"]],
                           wanted["subnetExtId"], "")
        if wanted["subnetExtId"] != nic["subnetExtId"]:
            nic["subnetExtId"] = wanted["subnetExtId"]
            nic["learnedIps"] = []
        for key in ("ipAddress", "shouldAssignIp", "isConnected", "model"):
            nic[key] = wanted[key]
        self._touch(vm)
        return self._vm_entity(vm)

    def _do_delete(self, task: JSON) -> list[JSON]:
        vm = self.vms.pop(task["vmExtId"])
        return self._vm_entity(vm)

    def _check_memory(self, vm: JSON, extra: int, verb: str) -> None:
        cluster = self.clusters[vm["clusterExtId"]]
        used = self.memory_in_use(cluster["extId"])
        if vm["powerState"] != "ON":
            extra = vm["memorySizeBytes"] + extra
        if extra > 0 and used + extra > cluster["memoryBytes"]:
            free = max(cluster["memoryBytes"] - used, 0)
            raise TaskFailure(
                f"Failed to {verb} the VM with UUID '{vm['extId']}': no host of cluster "
                f"'{cluster['name']}' has enough free memory (requested {extra} bytes, "
                f"{free} bytes free).", "VMM-30403", "INSUFFICIENT_MEMORY",
                {"vm_uuid": vm["extId"], "requested_bytes": str(extra), "free_bytes": str(free)})

    def _do_power_on(self, task: JSON) -> list[JSON]:
        vm = self.vms[task["vmExtId"]]
        if vm["powerState"] == "ON":
            raise TaskFailure(f"Failed to power on the VM with UUID '{vm['extId']}', because "
                              "it is already powered on.", "VMM-30601",
                              "INVALID_POWER_STATE_TRANSITION", {"vm_uuid": vm["extId"]})
        self._check_memory(vm, 0, "power on")
        hosts = self.clusters[vm["clusterExtId"]]["hostExtIds"]
        vm["powerState"] = "ON"
        vm["hostExtId"] = hosts[int(uuid.UUID(vm["extId"])) % len(hosts)]
        self._touch(vm)
        return self._vm_entity(vm)

    def _do_power_off(self, task: JSON) -> list[JSON]:
        vm = self.vms[task["vmExtId"]]
        if vm["powerState"] == "OFF":
            raise TaskFailure(f"Failed to power off the VM with UUID '{vm['extId']}', because "
                              "it is already powered off.", "VMM-30601",
                              "INVALID_POWER_STATE_TRANSITION", {"vm_uuid": vm["extId"]})
        vm["powerState"] = "OFF"
        vm["hostExtId"] = None
        for nic in vm["nics"]:
            nic["learnedIps"] = []
        vm["guestHostname"] = None
        self._touch(vm)
        return self._vm_entity(vm)

    # ---- lab access ------------------------------------------------------------------------

    def lab_vms(self) -> list[LabVm]:
        """Every VM, settled to now, in the form the lab's guest watcher uses."""
        with self.lock:
            self.settle()
            out = []
            for vm in sorted(self.vms.values(), key=lambda v: (v["name"], v["extId"])):
                cloud = vm.get("cloudInit") or {}
                nics = []
                for nic in vm["nics"]:
                    subnet = self.subnets.get(nic["subnetExtId"])
                    nics.append(LabNic(
                        subnet_ext_id=nic["subnetExtId"],
                        subnet_name=subnet["name"] if subnet else None,
                        vlan_id=subnet["vlanId"] if subnet else None,
                        mac_address=nic["macAddress"], requested_ip=nic.get("ipAddress"),
                        learned_ips=tuple(nic.get("learnedIps") or ())))
                cluster = self.clusters.get(vm["clusterExtId"])
                out.append(LabVm(
                    ext_id=vm["extId"], name=vm["name"],
                    cluster_name=cluster["name"] if cluster else None,
                    power_state=vm["powerState"],
                    num_vcpus=vm["numSockets"] * vm["numCoresPerSocket"]
                    * vm["numThreadsPerCore"],
                    memory_bytes=vm["memorySizeBytes"],
                    user_data=decode_b64_text(cloud.get("userData")),
                    meta_data=decode_b64_text(cloud.get("metaData")),
                    user_data_b64=cloud.get("userData"), meta_data_b64=cloud.get("metaData"),
                    nics=tuple(nics), hostname=vm.get("guestHostname")))
            return out

    def report_guest(self, vm_ext_id: str, ips: Mapping[int, Iterable[str]],
                     hostname: str | None = None) -> None:
        """Record what a booted guest reports (learned IPs per NIC index, hostname).

        This is guest-tools data, not configuration: the VM's ETag does not change.
        """
        with self.lock:
            vm = self.vms.get(vm_ext_id)
            if vm is None:
                raise KeyError(f"no VM {vm_ext_id}")
            if vm["powerState"] != "ON":
                raise ValueError(f"VM {vm['name']} is powered off; a guest cannot report")
            for index, addresses in ips.items():
                vm["nics"][index]["learnedIps"] = list(addresses)
            if hostname is not None:
                vm["guestHostname"] = hostname
            self.save()

    def remove_image(self, ext_id: str) -> None:
        """Delete an image behind the clients' back (tasks that need it will fail)."""
        with self.lock:
            del self.images[ext_id]
            self.save()

    def set_capacity(self, cluster_ext_id: str, *, memory_bytes: int | None = None,
                     storage_bytes: int | None = None) -> None:
        """Change a cluster's simulated capacity."""
        with self.lock:
            cluster = self.clusters[cluster_ext_id]
            if memory_bytes is not None:
                cluster["memoryBytes"] = memory_bytes
            if storage_bytes is not None:
                cluster["storageBytes"] = storage_bytes
            self.save()

    # ---- idempotency (NTNX-Request-Id) -----------------------------------------------

    def remember(self, request_id: str, status: int, body: JSON) -> None:
        """Keep the answer to a change so a retry with the same request id gets it again."""
        with self.lock:
            self.idempotency[request_id] = (status, body)
            while len(self.idempotency) > 2000:
                self.idempotency.popitem(last=False)

    def recall(self, request_id: str) -> tuple[int, JSON] | None:
        """The answer already given to this request id, if any."""
        with self.lock:
            return self.idempotency.get(request_id)
