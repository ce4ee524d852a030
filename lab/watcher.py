"""The lab's guests: a watcher that follows the simulated hypervisors and boots, stops and
deletes lab hosts as their VMs are powered on, powered off and destroyed.

It plays the part of the guest OS and its VMware tools: on power-on it applies the VM's
cloud-init data (lab.cloudinit), then reports the guest's IP and hostname back to the
hypervisor, which is what phase 1 waits for.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Protocol

from lab.cloudinit import CloudInitError, host_config
from lab.hosts import LabHosts
from lab.network import bridge_for_address
from sizing.spec import PlatformSpec

log = logging.getLogger("lab.watcher")


@dataclass(frozen=True)
class ObservedVM:
    """A VM as the hypervisor shows it."""

    key: str  # the hypervisor's own id (vSphere moref, Nutanix extId)
    name: str
    powered_on: bool
    cloud_init: tuple[str, str] | None  # (metadata, userdata) texts


class VmSource(Protocol):
    """A simulated hypervisor the watcher follows."""

    def vms(self) -> list[ObservedVM]: ...

    def report_guest(self, vm: ObservedVM, ip: IPv4Address, hostname: str) -> None: ...


class Watcher:
    """Keeps lab hosts in step with the VMs of the sources; one `step` per poll."""

    def __init__(self, spec: PlatformSpec, hosts: LabHosts, sources: list[VmSource]) -> None:
        self.spec = spec
        self.hosts = hosts
        self.sources = sources
        self._reported: set[tuple[str, str]] = set()  # (vm key, instance id) told to the source
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def step(self) -> list[str]:
        """Apply one round of changes; return what was done."""
        done: list[str] = []
        observed: list[tuple[VmSource, ObservedVM]] = [
            (source, vm) for source in self.sources for vm in source.vms()]
        counts = Counter(vm.name for _, vm in observed)
        for source, vm in observed:
            if counts[vm.name] > 1:
                self._warn_once(f"dup:{vm.name}", f"{counts[vm.name]} VMs are named {vm.name}; "
                                "the lab boots none of them (a real vCenter refuses this)")
                continue
            if vm.powered_on:
                done += self._power_on(source, vm)
            elif self.hosts.is_running(vm.name):
                self.hosts.stop(vm.name)
                self._reported = {r for r in self._reported if r[0] != vm.key}
                done.append(f"{vm.name}: powered off, host stopped")
        names = set(counts)
        for name in self.hosts.names():
            if name not in names:
                self.hosts.delete(name)
                done.append(f"{name}: VM destroyed, host deleted")
        return done

    def _power_on(self, source: VmSource, vm: ObservedVM) -> list[str]:
        if vm.cloud_init is None:
            self._warn_once(f"nodata:{vm.key}", f"{vm.name}: powered on without cloud-init "
                            "data; it boots unreachable, as a real VM would")
            return []
        try:
            metadata, userdata = vm.cloud_init
            probe = host_config(vm.name, metadata, userdata, bridge="")
        except CloudInitError as error:
            self._warn_once(f"bad:{vm.key}", f"{vm.name}: cloud-init data unusable: {error}")
            return []
        bridge = bridge_for_address(self.spec, probe.address.ip)
        if bridge is None:
            self._warn_once(f"zone:{vm.key}", f"{vm.name}: address {probe.address} is in no "
                            "lab zone; it boots unreachable")
            return []
        done = []
        if not self.hosts.is_running(vm.name):
            config = host_config(vm.name, metadata, userdata, bridge=bridge.name)
            self.hosts.boot(config)
            done.append(f"{vm.name}: powered on, host booted at {config.address.ip}")
        if (vm.key, probe.instance_id) not in self._reported:
            source.report_guest(vm, probe.address.ip, probe.hostname)
            self._reported.add((vm.key, probe.instance_id))
        return done

    def run(self, interval: float = 0.5) -> None:
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        while not stopping:
            try:
                for line in self.step():
                    log.info(line)
            except Exception:  # a passing hypervisor fault must not kill the lab's guests
                log.exception("watcher step failed; retrying")
            time.sleep(interval)


def main() -> None:
    parser = argparse.ArgumentParser(description="boot lab hosts as VMs power on")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from lab.sources import sources_from_env
    from tasks.spec import read_spec

    spec = read_spec(args.spec)
    watcher = Watcher(spec, LabHosts(args.state), sources_from_env(os.environ))
    log.info("watching %d source(s)", len(watcher.sources))
    watcher.run(args.interval)


if __name__ == "__main__":
    main()
