"""The `VsphereHypervisor` block: vCenter's address and credentials, and a pyvmomi session
that implements the phase-1 hypervisor protocol (blocks.hypervisor)."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from prefect.blocks.core import Block
from pydantic import Field, SecretStr
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl
from pyVmomi.VmomiSupport import ManagedObject

from blocks.hypervisor import (
    OWNER_KEY,
    CloudInit,
    EnsureResult,
    HypervisorError,
    TransientHypervisorError,
    VmState,
    VmWanted,
    differences,
)
from sizing.spec import VspherePlacement

T = TypeVar("T")
GB = 1024 * 1024  # KB per GB, vSphere's disk unit

# NotAuthenticated: the session expired (vCenter ends idle ones); the retry logs in again.
# (FileNotFound is a FileFault, so permanent: a clone's missing disk will not appear by
# waiting. The one seen "right after a clone" was vcsim 0.24.2's bug, patched in the lab.)
_TRANSIENT = (ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException,
              vim.fault.TaskInProgress, vim.fault.ConcurrentAccess,
              vmodl.fault.HostCommunication, vim.fault.NotAuthenticated)
_PERMANENT = (vim.fault.InvalidLogin, vim.fault.NoPermission, vim.fault.InsufficientResourcesFault,
              vim.fault.NoDiskSpace, vim.fault.FileFault, vim.fault.InvalidState,
              vmodl.fault.InvalidArgument, vim.fault.DuplicateName)


# What a VmState is made of: read in one round trip per VM.
_STATE_PATHS = ("name", "runtime.powerState", "config.hardware.numCPU",
                "config.hardware.memoryMB", "config.hardware.device", "config.extraConfig",
                "guest.ipAddress")
# What a reconfigure needs beyond the state: read with it, in the same round trip.
_RECONFIGURE_PATHS = (*_STATE_PATHS, "config.cpuHotAddEnabled", "config.memoryHotAddEnabled")


class VsphereHypervisor(Block):
    """vCenter credentials. TLS is verified unless turned off; a private CA may be given."""

    _block_type_name = "vSphere Hypervisor"
    _block_type_slug = "vsphere-hypervisor"
    _description = "vCenter address and credentials used by phase 1 and the drift check."

    address: str = Field(description="vCenter host name or address, with :port if not 443")
    user: str = Field(description="vCenter user, e.g. svc-platform@vsphere.local")
    password: SecretStr
    verify_tls: bool = Field(default=True, description="verify vCenter's TLS certificate")
    ca_bundle: str | None = Field(default=None,
                                  description="PEM of the CA that signed vCenter's certificate")

    def open(self, placement: VspherePlacement,
             lookups: VsphereLookups | None = None) -> VsphereSession:
        """Log in and bind to the spec's placement. Raises HypervisorError on a bad login.
        Sessions given the same `lookups` share what they find of the placement."""
        host, _, port = self.address.rpartition(":") if ":" in self.address else \
            (self.address, "", "443")
        if self.verify_tls:
            context = ssl.create_default_context(cadata=self.ca_bundle or None)
        else:
            context = ssl._create_unverified_context()
        try:
            si = SmartConnect(host=host, port=int(port), user=self.user,
                              pwd=self.password.get_secret_value(), sslContext=context,
                              connectionPoolTimeout=30)
        except vim.fault.InvalidLogin:
            raise HypervisorError(f"vCenter {self.address} refused the login of {self.user}: "
                                  "check the password in this block") from None
        except ssl.SSLCertVerificationError as error:
            raise HypervisorError(f"vCenter {self.address}: TLS verification failed ({error}); "
                                  "set ca_bundle to the CA that signed its certificate") from None
        except ssl.SSLError as error:  # a handshake cut short: the network, not the certificate
            raise TransientHypervisorError(f"vCenter {self.address}: TLS handshake failed: "
                                           f"{error}") from None
        except (ConnectionError, OSError, http.client.HTTPException) as error:
            raise TransientHypervisorError(f"vCenter {self.address} unreachable: {error}") from None
        return VsphereSession(si, self.address, placement, lookups or VsphereLookups())


@dataclass(frozen=True)
class _Ref:
    """A managed object as its type and id, valid in any session on the same vCenter."""

    kind: type
    moid: str


class VsphereLookups:
    """What sessions of one run find of their placement (datacenter, VM folder, template,
    resource pool, datastore, port groups), kept as vCenter object ids: the first session
    that needs a thing looks it up, the others wait for it and take its ids. A run opens as
    many sessions as it makes VMs at once, and each would otherwise spend some twenty-five
    round trips finding the same objects."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a look-up may need another (the datacenter first)
        self._values: dict[str, Any] = {}

    def get(self, key: str, stub: Any, make: Callable[[], T]) -> T:
        """The value under `key`, made by `make()` in this session if nobody has yet, with
        its managed objects bound to `stub` (the asking session's connection)."""
        with self._lock:
            if key not in self._values:
                self._values[key] = _portable(make())
            return cast(T, _bound(self._values[key], stub))


def _portable(value: Any) -> Any:
    if isinstance(value, ManagedObject):
        return _Ref(type(value), value._moId)
    if isinstance(value, (tuple, list)):
        return type(value)(_portable(item) for item in value)
    if isinstance(value, dict):
        return {key: _portable(item) for key, item in value.items()}
    return value


def _bound(value: Any, stub: Any) -> Any:
    if isinstance(value, _Ref):
        return value.kind(value.moid, stub)
    if isinstance(value, (tuple, list)):
        return type(value)(_bound(item, stub) for item in value)
    if isinstance(value, dict):
        return {key: _bound(item, stub) for key, item in value.items()}
    return value


class VsphereSession:
    """One logged-in session on vCenter, bound to a datacenter, cluster, datastore, folder."""

    def __init__(self, si: vim.ServiceInstance, address: str,
                 placement: VspherePlacement, lookups: VsphereLookups) -> None:
        self.si = si
        self.address = address
        self.placement = placement
        self._lookups = lookups
        self.content = si.RetrieveContent()
        self._dc: vim.Datacenter | None = None
        self._networks: dict[str, Any] | None = None
        # Looked up once per session: where clones go, and the VMs this session has found
        # by name (a task finds its VM once, then powers it on and waits for it).
        self._clone_target: tuple[Any, Any, Any, vim.Folder] | None = None
        self._found: dict[str, vim.VirtualMachine] = {}
        # A name the last look-up did not find: ensure_vm, which follows at once (a task
        # asks whether its VM exists, then ensures it), trusts it instead of asking again.
        self._absent: str | None = None
        self._vm_folder: vim.Folder | None = None
        self._portgroup_names: dict[str, str] | None = None  # distributed port groups by key

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a vCenter that went away: nothing to log out
            Disconnect(self.si)

    # --- faults ---------------------------------------------------------------------------

    def _call(self, what: str, action: Callable[[], T]) -> T:
        """Run a vCenter call, sorting its faults into permanent and transient ones."""
        try:
            return action()
        except _TRANSIENT as fault:
            raise TransientHypervisorError(f"vCenter {self.address}: {what}: "
                                           f"{_fault_text(fault)}") from None
        except _PERMANENT as fault:
            raise HypervisorError(f"vCenter {self.address}: {what}: {_fault_text(fault)}") \
                from None
        except vmodl.MethodFault as fault:
            raise HypervisorError(f"vCenter {self.address}: {what}: {_fault_text(fault)}") \
                from None

    def _wait(self, what: str, task: vim.Task, timeout: float = 1800) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            info = task.info
            if info.state == vim.TaskInfo.State.success:
                return info.result
            if info.state == vim.TaskInfo.State.error:
                fault = info.error
                if isinstance(fault, _TRANSIENT):
                    raise TransientHypervisorError(f"vCenter {self.address}: {what}: "
                                                   f"{_fault_text(fault)}")
                raise HypervisorError(f"vCenter {self.address}: {what}: {_fault_text(fault)}")
            if time.monotonic() > deadline:
                raise TransientHypervisorError(f"vCenter {self.address}: {what}: task still "
                                               f"{info.state} after {timeout:.0f} s")
            time.sleep(0.2)

    # --- placement ------------------------------------------------------------------------

    def _children(self, root: Any, kind: type) -> list[Any]:
        assert self.content.viewManager is not None
        view = self.content.viewManager.CreateContainerView(root, [kind], True)
        try:
            return list(view.view)
        finally:
            view.Destroy()

    def _shared(self, key: str, make: Callable[[], T]) -> T:
        """A placement look-up shared with the run's other sessions (VsphereLookups)."""
        return self._lookups.get(key, self.si._stub, make)

    def _datacenter(self) -> vim.Datacenter | None:
        """The placement's datacenter, looked up once per run (it is used by most calls)."""
        if self._dc is None:
            self._dc = self._shared("datacenter", lambda: next(
                (dc for dc in self._children(self.content.rootFolder, vim.Datacenter)
                 if dc.name == self.placement.datacenter), None))
        return self._dc

    def _network(self, name: str) -> Any:
        if self._networks is None:
            dc = self._datacenter()
            self._networks = self._shared("networks", lambda: {
                n.name: n for n in dc.network} if dc is not None else {})
        return self._networks.get(name)

    def _portgroup_name(self, key: str) -> str:
        """A distributed port group's name from its key (a NIC's backing names only the
        key), read once per session for all of them; the key if it is not found."""
        if self._portgroup_names is None:
            self._network("")
            networks = self._networks
            assert networks is not None
            self._portgroup_names = self._shared("port group names", lambda: {
                str(n.key): name for name, n in networks.items()
                if isinstance(n, vim.dvs.DistributedVirtualPortgroup)})
        return self._portgroup_names.get(key, key)

    def _named(self, root: Any, kind: type, name: str) -> Any:
        return next((obj for obj in self._children(root, kind) if obj.name == name), None)

    def preflight(self, networks: list[str]) -> list[str]:
        p = self.placement
        dc = self._call("finding the datacenter", self._datacenter)
        if dc is None:
            names = [d.name for d in self._children(self.content.rootFolder, vim.Datacenter)]
            return [f"datacenter {p.datacenter!r} not found on {self.address} "
                    f"(found: {', '.join(names) or 'none'})"]
        problems = []
        cluster = self._named(dc.hostFolder, vim.ClusterComputeResource, p.cluster)
        if cluster is None:
            problems.append(f"cluster {p.cluster!r} not found in datacenter {p.datacenter}")
        elif p.resource_pool and self._named(cluster.resourcePool, vim.ResourcePool,
                                             p.resource_pool) is None:
            problems.append(f"resource pool {p.resource_pool!r} not found in cluster "
                            f"{p.cluster}")
        if not any(ds.name == p.datastore for ds in dc.datastore):
            problems.append(f"datastore {p.datastore!r} not found in datacenter {p.datacenter}")
        if p.template not in self._index(templates=True):
            if p.template in self._index():
                problems.append(f"{p.template!r} is a VM, not a template: mark it as a "
                                "template")
            else:
                problems.append(f"template {p.template!r} not found in datacenter "
                                f"{p.datacenter}")
        present = {net.name for net in dc.network}
        problems += [f"port group {name!r} not found in datacenter {p.datacenter}"
                     for name in networks if name not in present]
        return problems

    def _folder(self, dc: vim.Datacenter) -> vim.Folder:
        """The spec's VM folder, created if missing (a nested path with '/' is allowed)."""
        folder = dc.vmFolder
        for part in [p for p in self.placement.folder.split("/") if p]:
            child = next((f for f in folder.childEntity
                          if isinstance(f, vim.Folder) and f.name == part), None)
            if child is None:
                try:
                    child = folder.CreateFolder(part)
                except vim.fault.DuplicateName:  # another task made it meanwhile
                    child = next(f for f in folder.childEntity
                                 if isinstance(f, vim.Folder) and f.name == part)
            folder = child
        return folder

    # --- reading VMs ----------------------------------------------------------------------

    def _vm_objects(self) -> list[vim.VirtualMachine]:
        return [vm for vms in self._index().values() for vm in vms]

    def _index(self, templates: bool = False) -> dict[str, list[Any]]:
        """The datacenter's VMs (or only its templates) by name, in ONE property-collector
        call: reading names one by one costs a round trip per VM, which a 60-VM inventory
        times 8 parallel tasks turns into thousands of calls."""
        dc = self._datacenter()
        if dc is None:
            raise HypervisorError(f"datacenter {self.placement.datacenter!r} not found on "
                                  f"{self.address}")
        if self._vm_folder is None:
            self._vm_folder = self._shared("VM folder", lambda: dc.vmFolder)
        assert self.content.viewManager is not None
        view = self.content.viewManager.CreateContainerView(self._vm_folder,
                                                            [vim.VirtualMachine], True)
        collector = vmodl.query.PropertyCollector
        try:
            spec = collector.FilterSpec(
                objectSet=[collector.ObjectSpec(obj=view, skip=True, selectSet=[
                    collector.TraversalSpec(name="view", path="view", skip=False,
                                            type=vim.view.ContainerView)])],
                propSet=[collector.PropertySpec(type=vim.VirtualMachine,
                                                pathSet=["name", "config.template"])])
            assert self.content.propertyCollector is not None
            found = self.content.propertyCollector.RetrieveContents([spec])
        finally:
            view.Destroy()
        index: dict[str, list[Any]] = {}
        for item in found:
            props = {p.name: p.val for p in item.propSet}
            if bool(props.get("config.template")) == templates:
                index.setdefault(str(props.get("name")), []).append(item.obj)
        return index

    def _properties(self, vm: vim.VirtualMachine, paths: list[str]) -> dict[str, Any]:
        """Some properties of one VM in one round trip (reading `vm.config` fetches the
        whole configuration, and each attribute read is a round trip of its own)."""
        assert self.content.propertyCollector is not None
        found = self.content.propertyCollector.RetrieveContents([_vm_filter(vm, paths)])
        return {prop.name: prop.val for item in found for prop in item.propSet}

    def _powered_on(self, vm: vim.VirtualMachine) -> bool:
        return self._properties(vm, ["runtime.powerState"]).get("runtime.powerState") == \
            "poweredOn"

    def _state(self, vm: vim.VirtualMachine) -> VmState:
        return self._state_of(vm, self._properties(vm, list(_STATE_PATHS)))

    def _state_of(self, vm: vim.VirtualMachine, props: dict[str, Any]) -> VmState:
        """The state from properties read with (at least) `_STATE_PATHS`."""
        devices = props.get("config.hardware.device") or []
        disks = tuple(int(d.capacityInKB // GB) for d in devices
                      if isinstance(d, vim.vm.device.VirtualDisk))
        networks = []
        for device in devices:
            if isinstance(device, vim.vm.device.VirtualEthernetCard):
                backing = device.backing
                if isinstance(backing, vim.vm.device.VirtualEthernetCard.NetworkBackingInfo):
                    networks.append(str(backing.deviceName))
                elif isinstance(backing, vim.vm.device.VirtualEthernetCard.
                                DistributedVirtualPortBackingInfo):
                    networks.append(self._portgroup_name(str(backing.port.portgroupKey)))
        extra = {str(o.key): str(o.value) for o in props.get("config.extraConfig") or []}
        return VmState(
            id=str(vm._moId), name=str(props.get("name", "")),
            powered_on=props.get("runtime.powerState") == "poweredOn",
            vcpu=int(props.get("config.hardware.numCPU") or 0),
            memory_gb=int((props.get("config.hardware.memoryMB") or 0) // 1024),
            disks_gb=disks, networks=tuple(networks),
            guest_ip=props.get("guest.ipAddress") or None,
            owner=extra.get(OWNER_KEY))

    def list_vms(self) -> list[VmState]:
        return self._call("listing VMs", lambda: [self._state(vm) for vm in self._vm_objects()])

    def _find(self, name: str, trust_absent: bool = False) -> vim.VirtualMachine | None:
        if name in self._found:
            return self._found[name]
        absent, self._absent = self._absent, None
        if trust_absent and absent == name:
            return None
        found = self._index().get(name, [])
        if len(found) > 1:
            raise HypervisorError(f"vCenter {self.address}: {len(found)} VMs are named {name} "
                                  f"({', '.join(vm._moId for vm in found)}); rename or remove "
                                  "the extra ones")
        if found:
            self._found[name] = found[0]
            return found[0]
        self._absent = name
        return None

    def find_vm(self, name: str) -> VmState | None:
        vm = self._call(f"finding VM {name}", lambda: self._find(name))
        return None if vm is None else self._call(f"reading VM {name}",
                                                  lambda: self._state(vm))

    # --- changing VMs ---------------------------------------------------------------------

    def ensure_vm(self, want: VmWanted, resize: bool) -> EnsureResult:
        vm = self._call(f"finding VM {want.name}", lambda: self._find(want.name, True))
        if vm is None:
            vm = self._create(want)
            return EnsureResult("created", self._state(vm),
                                changes=(f"cloned from {self.placement.template}",))
        props = self._properties(vm, list(_RECONFIGURE_PATHS))
        state = self._state_of(vm, props)
        if state.owner != want.owner:
            raise HypervisorError(
                f"VM {want.name} exists on {self.address} but was not created for platform "
                f"{want.owner} (owner: {state.owner or 'unknown'}); rename or remove it, it "
                "is not touched")
        to_fix, larger = differences(want, state)
        notes = tuple(f"{want.name}: {item}: larger than the spec, left as is"
                      for item in larger)
        if not to_fix:
            return EnsureResult("unchanged", state, notes=notes)
        if not resize:
            return EnsureResult("unchanged", state, notes=notes + tuple(
                f"{want.name}: {item}: below the spec; set hypervisor.resize: true to fix"
                for item in to_fix))
        self._reconfigure(vm, want, props)
        return EnsureResult("changed", self._state(vm), changes=tuple(to_fix), notes=notes)

    def _clone_placement(self) -> tuple[Any, Any, Any, vim.Folder]:
        """(template, resource pool, datastore, folder), looked up once per run."""
        if self._clone_target is None:
            self._clone_target = self._shared("clone target", self._find_clone_target)
        return self._clone_target

    def _find_clone_target(self) -> tuple[Any, Any, Any, vim.Folder]:
        p = self.placement
        dc = self._datacenter()
        assert dc is not None
        cluster = self._named(dc.hostFolder, vim.ClusterComputeResource, p.cluster)
        pool = self._named(cluster.resourcePool, vim.ResourcePool, p.resource_pool) \
            if p.resource_pool else cluster.resourcePool
        datastore = next(ds for ds in dc.datastore if ds.name == p.datastore)
        templates = self._index(templates=True).get(p.template)
        if not templates:
            raise HypervisorError(f"template {p.template!r} not found in {p.datacenter}")
        folder = self._call(f"creating folder {p.folder}", lambda: self._folder(dc))
        return templates[0], pool, datastore, folder

    def _create(self, want: VmWanted) -> vim.VirtualMachine:
        p = self.placement
        template, pool, datastore, folder = self._clone_placement()
        spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=pool, datastore=datastore),
                                powerOn=False, template=False)
        task = self._call(f"cloning {p.template} to {want.name}",
                          lambda: template.CloneVM_Task(folder=folder, name=want.name,
                                                        spec=spec))
        vm = self._wait(f"cloning {p.template} to {want.name}", task)
        self._found[want.name] = vm
        try:
            self._reconfigure(vm, want, self._properties(vm, list(_RECONFIGURE_PATHS)),
                              extra=guestinfo(want.creation_data()) | {OWNER_KEY: want.owner})
        except BaseException:
            # Never leave a half-made VM behind: without its owner mark the next run would
            # take it for a foreign VM. Remove it; the retry (or the next run) clones again.
            self._found.pop(want.name, None)
            with contextlib.suppress(Exception):
                self._wait(f"removing the half-made {want.name}", vm.Destroy_Task())
            raise
        return vm

    def _reconfigure(self, vm: Any, want: VmWanted, current: dict[str, Any],
                     extra: dict[str, str] | None = None) -> None:
        """Grow CPU, memory and disks to the spec and attach the zone's network.

        ``current``: the VM's properties, read with `_RECONFIGURE_PATHS` just before."""
        config: Any = vim.vm.ConfigSpec()
        changes: list[vim.vm.device.VirtualDeviceSpec] = []
        state = self._state_of(vm, current)
        hot_cpu = state.vcpu >= want.vcpu or bool(current.get("config.cpuHotAddEnabled"))
        hot_mem = (state.memory_gb >= want.memory_gb
                   or bool(current.get("config.memoryHotAddEnabled")))
        if state.vcpu < want.vcpu:
            config.numCPUs = want.vcpu
        if state.memory_gb < want.memory_gb:
            config.memoryMB = want.memory_gb * 1024
        devices = list(current.get("config.hardware.device") or [])
        disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
        for index, wanted in enumerate(want.disks_gb):
            if index < len(disks):
                if disks[index].capacityInKB < wanted * GB:
                    disks[index].capacityInKB = wanted * GB
                    changes.append(vim.vm.device.VirtualDeviceSpec(
                        operation=vim.vm.device.VirtualDeviceSpec.Operation.edit,
                        device=disks[index]))
            else:
                changes.append(self._new_disk(devices, changes, wanted))
        nic = next((d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)),
                   None)
        if want.network not in state.networks:
            changes.append(self._nic_spec(vm, nic, want.network))
        config.deviceChange = changes
        if extra:
            config.extraConfig = [vim.option.OptionValue(key=k, value=v)
                                  for k, v in extra.items()]
        must_stop = state.powered_on and not (hot_cpu and hot_mem)
        if must_stop:
            self._wait(f"powering off {want.name} to resize it", vm.PowerOffVM_Task())
        self._wait(f"reconfiguring {want.name}", self._call(
            f"reconfiguring {want.name}", lambda: vm.ReconfigVM_Task(config)))
        if must_stop:
            self._wait(f"powering on {want.name}", vm.PowerOnVM_Task())

    @staticmethod
    def _new_disk(devices: list[Any], pending: list[Any], size_gb: int) -> Any:
        controller = next(d for d in devices
                          if isinstance(d, vim.vm.device.VirtualSCSIController))
        used = {d.unitNumber for d in devices if getattr(d, "controllerKey", None) ==
                controller.key} | {c.device.unitNumber for c in pending
                                   if getattr(c.device, "controllerKey", None) == controller.key}
        unit = next(u for u in range(16) if u != 7 and u not in used)  # 7: the controller
        disk = vim.vm.device.VirtualDisk(
            key=-100 - len(pending), controllerKey=controller.key, unitNumber=unit,
            capacityInKB=size_gb * GB,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(diskMode="persistent",
                                                                   thinProvisioned=True))
        return vim.vm.device.VirtualDeviceSpec(
            operation=vim.vm.device.VirtualDeviceSpec.Operation.add,
            fileOperation=vim.vm.device.VirtualDeviceSpec.FileOperation.create, device=disk)

    def _nic_spec(self, vm: vim.VirtualMachine, nic: Any, network_name: str) -> Any:
        network: Any = self._network(network_name)
        if network is None:
            raise HypervisorError(f"port group {network_name!r} not found in "
                                  f"{self.placement.datacenter}")
        if isinstance(network, vim.dvs.DistributedVirtualPortgroup):
            network = cast(Any, network)
            portgroup = network
            key, switch = self._shared(f"port group {network_name}", lambda: (
                str(portgroup.key), str(portgroup.config.distributedVirtualSwitch.uuid)))
            backing: Any = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(portgroupKey=key, switchUuid=switch))
        else:
            backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                deviceName=network.name, network=network)
        if nic is None:
            nic = vim.vm.device.VirtualVmxnet3(key=-1, addressType="generated")
            operation = vim.vm.device.VirtualDeviceSpec.Operation.add
        else:
            operation = vim.vm.device.VirtualDeviceSpec.Operation.edit
        nic.backing = backing
        nic.connectable = vim.vm.device.VirtualDevice.ConnectInfo(
            startConnected=True, connected=True, allowGuestControl=True)
        return vim.vm.device.VirtualDeviceSpec(operation=operation, device=nic)

    def power_on(self, name: str) -> bool:
        vm = self._call(f"finding VM {name}", lambda: self._find(name))
        if vm is None:
            raise HypervisorError(f"VM {name} not found on {self.address}")
        if self._powered_on(vm):
            return False
        self._wait(f"powering on {name}",
                   self._call(f"powering on {name}", lambda: vm.PowerOnVM_Task()))
        return True

    def wait_for_ip(self, name: str, expected: str, timeout: float) -> str:
        """Follow the VM's `guest.ipAddress` with a property-collector filter: vCenter
        answers as soon as VMware tools report an address (no polling of a VM that takes a
        minute to boot), and tells when the VM is destroyed meanwhile."""
        deadline = time.monotonic() + timeout
        vm = self._call(f"finding VM {name}", lambda: self._find(name))
        if vm is None:
            raise HypervisorError(f"VM {name} not found on {self.address}")
        vanished = HypervisorError(f"VM {name} vanished from {self.address} while booting")
        assert self.content.propertyCollector is not None
        # A collector of its own: its filter and versions are this wait's alone.
        collector = self._call("creating a property collector",
                               self.content.propertyCollector.CreatePropertyCollector)
        seen: str | None = None

        def gone_as_vanished(call: Callable[..., T], *args: Any) -> T:
            # (before _call files it as a fault) vCenter refuses a filter on a VM that is
            # gone; vcsim fails the wait instead of sending "leave".
            try:
                return call(*args)
            except vmodl.fault.ManagedObjectNotFound:
                raise vanished from None

        try:
            self._call(f"following the guest IP of {name}", functools.partial(
                gone_as_vanished, collector.CreateFilter,
                _vm_filter(vm, ["guest.ipAddress"]), False))
            version = ""
            while seen != expected:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HypervisorError(
                        f"VM {name} did not report IP {expected} within {timeout:.0f} s (it "
                        f"reports {seen or 'no IP'}): check its console, cloud-init and the "
                        "port group")
                options = vmodl.query.PropertyCollector.WaitOptions(
                    maxWaitSeconds=max(1, min(math.ceil(left), 60)))
                update = self._call(f"waiting for the guest IP of {name}", functools.partial(
                    gone_as_vanished, collector.WaitForUpdatesEx, version, options))
                if update is None:
                    continue  # nothing changed within maxWaitSeconds
                version = update.version
                for change in (c for f in update.filterSet or [] for c in f.objectSet or []):
                    if change.kind == "leave":
                        raise vanished
                    for item in change.changeSet or []:
                        if item.name == "guest.ipAddress":
                            seen = str(item.val) if item.val else None
            return expected
        finally:
            with contextlib.suppress(Exception):  # the session may be gone: nothing to free
                collector.DestroyPropertyCollector()

    def delete_vm(self, name: str) -> bool:
        vm = self._call(f"finding VM {name}", lambda: self._find(name))
        if vm is None:
            return False
        self._found.pop(name, None)
        if self._powered_on(vm):
            self._wait(f"powering off {name}", vm.PowerOffVM_Task())
        self._wait(f"destroying {name}", vm.Destroy_Task())
        return True


def _vm_filter(vm: vim.VirtualMachine, paths: list[str]) -> Any:
    """A property-collector filter spec for some properties of one VM."""
    collector = vmodl.query.PropertyCollector
    return collector.FilterSpec(
        objectSet=[collector.ObjectSpec(obj=vm, skip=False)],
        propSet=[collector.PropertySpec(type=vim.VirtualMachine, pathSet=paths)])


def guestinfo(cloud_init: CloudInit) -> dict[str, str]:
    """The extraConfig entries that carry cloud-init data to the guest on vSphere (what
    cloud-init's VMware datasource reads): base64, each with its `.encoding` key."""
    out: dict[str, str] = {}
    for key, text in (("guestinfo.metadata", cloud_init.metadata),
                      ("guestinfo.userdata", cloud_init.userdata)):
        out[key] = base64.b64encode(text.encode()).decode()
        out[f"{key}.encoding"] = "base64"
    return out


def _fault_text(fault: object) -> str:
    if fault is None:
        return "unknown fault"
    message = getattr(fault, "msg", None) or getattr(fault, "faultMessage", None) or str(fault)
    return f"{type(fault).__name__}: {message}".strip()
