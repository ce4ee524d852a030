"""The simulated hypervisors the lab's watcher follows: vcsim (real vSphere API) and the
Nutanix Prism Central stand-in (lab.nutanix.source)."""

from __future__ import annotations

import math
import ssl
import time
from collections.abc import Callable, Mapping
from functools import cache, partial
from ipaddress import IPv4Address
from typing import Any
from urllib.parse import urlsplit

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from lab.cloudinit import CloudInitError, from_guestinfo
from lab.watcher import ObservedVM, VmSource


class VsphereSource:
    """Follows vcsim's VMs through a property-collector filter: vCenter sends only what
    changed (WaitForUpdatesEx), so an idle lab costs nothing and a power-on is seen at once,
    instead of listing every VM ten times a second."""

    def __init__(self, address: str, user: str, password: str) -> None:
        host, _, port = address.partition(":")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the lab's own simulator, on loopback
        self._login = partial(SmartConnect, host=host, port=int(port or 443), user=user,
                              pwd=password, sslContext=context, connectionPoolTimeout=10)
        self._connect()

    def _connect(self) -> None:
        """Log in and subscribe to every VM's name, power state and template flag."""
        self._si = self._login()
        self._content = self._si.RetrieveContent()
        collector = vmodl.query.PropertyCollector
        view = self._content.viewManager.CreateContainerView(self._content.rootFolder,
                                                             [vim.VirtualMachine], True)
        # A collector of its own: its one filter is the watcher's, whatever else the
        # session does.
        self._collector = self._content.propertyCollector.CreatePropertyCollector()
        self._collector.CreateFilter(collector.FilterSpec(
            objectSet=[collector.ObjectSpec(obj=view, skip=True, selectSet=[
                collector.TraversalSpec(name="view", path="view", skip=False,
                                        type=vim.view.ContainerView)])],
            propSet=[collector.PropertySpec(
                type=vim.VirtualMachine,
                pathSet=["name", "runtime.powerState", "config.template"])]),
            partialUpdates=False)
        self._version = ""
        self._props: dict[str, tuple[Any, dict[str, Any]]] = {}
        self.wait(0)  # the first call returns every VM

    def close(self) -> None:
        Disconnect(self._si)

    def wait(self, timeout: float) -> None:
        """Apply what changed, waiting up to ``timeout`` s (whole seconds, vSphere's unit)
        for a first change. A lost session (vcsim restarted) is opened again."""
        options = vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=math.ceil(timeout))
        try:
            update = self._collector.WaitForUpdatesEx(self._version, options)
        except (vmodl.fault.ManagedObjectNotFound, vim.fault.NotAuthenticated,
                ConnectionError, OSError):
            time.sleep(timeout)
            self._connect()
            return
        if update is None:
            return
        for filter_update in update.filterSet or []:
            for change in filter_update.objectSet or []:
                key = str(change.obj._moId)
                if change.kind == "leave":
                    self._props.pop(key, None)
                    continue
                props = self._props.setdefault(key, (change.obj, {}))[1]
                for item in change.changeSet or []:
                    if item.op in ("remove", "indirectRemove"):
                        props.pop(item.name, None)
                    else:
                        props[item.name] = item.val
        self._version = update.version

    def vms(self) -> list[ObservedVM]:
        observed = []
        for key, (obj, props) in list(self._props.items()):
            if props.get("config.template"):
                continue
            # A guest to boot needs both its cloud-init data and its disks: one call.
            details = cache(partial(self._collect, obj, ["config.extraConfig",
                                                         "config.hardware.device"]))
            observed.append(ObservedVM(
                key=key, name=str(props.get("name", key)),
                powered_on=props.get("runtime.powerState") == "poweredOn",
                loader=partial(self._cloud_init, details),
                disks_loader=partial(self._disks, details)))
        return observed

    def _collect(self, obj: Any, paths: list[str]) -> dict[str, Any]:
        """Some properties of one VM, in one property-collector call."""
        collector = vmodl.query.PropertyCollector
        result = self._content.propertyCollector.RetrieveContents([collector.FilterSpec(
            objectSet=[collector.ObjectSpec(obj=obj, skip=False)],
            propSet=[collector.PropertySpec(type=vim.VirtualMachine, pathSet=paths)])])
        return {p.name: p.val for item in result for p in item.propSet}

    @staticmethod
    def _cloud_init(details: Callable[[], dict[str, Any]]) -> tuple[str, str] | None:
        options = details().get("config.extraConfig")
        try:
            return from_guestinfo({o.key: str(o.value) for o in options or []})
        except CloudInitError:
            return None

    @staticmethod
    def _disks(details: Callable[[], dict[str, Any]]) -> tuple[int, ...]:
        """The VM's virtual disks in bytes, in device order (the OS disk first)."""
        devices = details().get("config.hardware.device")
        return tuple(int(d.capacityInBytes or d.capacityInKB * 1024) for d in devices or []
                     if isinstance(d, vim.vm.device.VirtualDisk))

    def report_guest(self, vm: ObservedVM, ip: IPv4Address, hostname: str) -> None:
        """What VMware tools would report once the guest's network is up."""
        known = self._props.get(vm.key)
        if known is None:
            return  # destroyed while it booted
        obj = known[0]
        spec = vim.vm.ConfigSpec(extraConfig=[
            vim.option.OptionValue(key="SET.guest.ipAddress", value=str(ip)),
            vim.option.OptionValue(key="SET.guest.hostName", value=hostname)])
        obj.ReconfigVM_Task(spec)


def sources_from_env(env: Mapping[str, str]) -> list[VmSource]:
    """The sources named by the lab's environment (set by `platformctl lab up`)."""
    sources: list[VmSource] = []
    if env.get("LAB_VCSIM_URL"):
        url = urlsplit(env["LAB_VCSIM_URL"])
        sources.append(VsphereSource(f"{url.hostname}:{url.port}", env["LAB_VCSIM_USER"],
                                     env["LAB_VCSIM_PASSWORD"]))
    if env.get("LAB_PRISM_URL"):
        from lab.nutanix.source import NutanixSource

        sources.append(NutanixSource(env["LAB_PRISM_URL"], env["LAB_PRISM_USER"],
                                     env["LAB_PRISM_PASSWORD"], env["LAB_PRISM_CA"]))
    return sources
