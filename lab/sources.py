"""The simulated hypervisors the lab's watcher follows: vcsim (real vSphere API) and the
Nutanix Prism Central stand-in (lab.nutanix.source)."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from functools import partial
from ipaddress import IPv4Address
from typing import Any
from urllib.parse import urlsplit

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from lab.cloudinit import CloudInitError, from_guestinfo
from lab.watcher import ObservedVM, VmSource


class VsphereSource:
    """Reads every VM of vcsim in one property-collector call per poll."""

    def __init__(self, address: str, user: str, password: str) -> None:
        host, _, port = address.partition(":")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the lab's own simulator, on loopback
        self._si = SmartConnect(host=host, port=int(port or 443), user=user, pwd=password,
                                sslContext=context, connectionPoolTimeout=10)
        self._by_key: dict[str, Any] = {}

    def close(self) -> None:
        Disconnect(self._si)

    def vms(self) -> list[ObservedVM]:
        observed = []
        self._by_key = {}
        for obj, props in self._collect(None, ["name", "runtime.powerState",
                                               "config.template"]):
            if props.get("config.template"):
                continue
            key = str(obj._moId)
            self._by_key[key] = obj
            observed.append(ObservedVM(
                key=key, name=str(props.get("name", key)),
                powered_on=props.get("runtime.powerState") == "poweredOn",
                loader=partial(self._cloud_init, obj), disks_loader=partial(self._disks, obj)))
        return observed

    def _collect(self, obj: Any, paths: list[str]) -> list[tuple[Any, dict[str, Any]]]:
        """Properties of every VM (``obj`` None) or of one, in one property-collector call."""
        content = self._si.RetrieveContent()
        collector = vmodl.query.PropertyCollector
        view = None
        if obj is None:
            view = content.viewManager.CreateContainerView(content.rootFolder,
                                                           [vim.VirtualMachine], True)
            object_spec = collector.ObjectSpec(obj=view, skip=True, selectSet=[
                collector.TraversalSpec(name="view", path="view", skip=False,
                                        type=vim.view.ContainerView)])
        else:
            object_spec = collector.ObjectSpec(obj=obj, skip=False)
        try:
            result = content.propertyCollector.RetrieveContents([collector.FilterSpec(
                objectSet=[object_spec],
                propSet=[collector.PropertySpec(type=vim.VirtualMachine, pathSet=paths)])])
        finally:
            if view is not None:
                view.Destroy()
        return [(item.obj, {p.name: p.val for p in item.propSet}) for item in result]

    def _cloud_init(self, obj: Any) -> tuple[str, str] | None:
        found = self._collect(obj, ["config.extraConfig"])
        options = found[0][1].get("config.extraConfig", []) if found else []
        try:
            return from_guestinfo({o.key: str(o.value) for o in options or []})
        except CloudInitError:
            return None

    def _disks(self, obj: Any) -> tuple[int, ...]:
        """The VM's virtual disks in bytes, in device order (the OS disk first)."""
        found = self._collect(obj, ["config.hardware.device"])
        devices = found[0][1].get("config.hardware.device", []) if found else []
        return tuple(int(d.capacityInBytes or d.capacityInKB * 1024) for d in devices or []
                     if isinstance(d, vim.vm.device.VirtualDisk))

    def report_guest(self, vm: ObservedVM, ip: IPv4Address, hostname: str) -> None:
        """What VMware tools would report once the guest's network is up."""
        obj = self._by_key[vm.key]
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
