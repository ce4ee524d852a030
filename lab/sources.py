"""The simulated hypervisors the lab's watcher follows: vcsim (real vSphere API)."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
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
        content = self._si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder,
                                                       [vim.VirtualMachine], True)
        try:
            spec = vmodl.query.PropertyCollector.FilterSpec(
                objectSet=[vmodl.query.PropertyCollector.ObjectSpec(
                    obj=view, skip=True,
                    selectSet=[vmodl.query.PropertyCollector.TraversalSpec(
                        name="view", path="view", skip=False, type=vim.view.ContainerView)])],
                propSet=[vmodl.query.PropertyCollector.PropertySpec(
                    type=vim.VirtualMachine,
                    pathSet=["name", "runtime.powerState", "config.template",
                             "config.extraConfig"])])
            result = content.propertyCollector.RetrieveContents([spec])
        finally:
            view.Destroy()
        observed = []
        self._by_key = {}
        for item in result:
            props = {p.name: p.val for p in item.propSet}
            if props.get("config.template"):
                continue
            extra = {o.key: str(o.value) for o in props.get("config.extraConfig", []) or []}
            try:
                cloud_init = from_guestinfo(extra)
            except CloudInitError:
                cloud_init = None
            key = str(item.obj._moId)
            self._by_key[key] = item.obj
            observed.append(ObservedVM(
                key=key, name=str(props.get("name", key)),
                powered_on=props.get("runtime.powerState") == "poweredOn",
                cloud_init=cloud_init))
        return observed

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
    return sources
