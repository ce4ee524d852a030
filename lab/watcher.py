"""The lab's guests: a watcher that follows the simulated hypervisors and boots, stops and
deletes lab hosts as their VMs are powered on, powered off and destroyed.

It plays the part of the guest OS and its VMware tools: on power-on it applies the VM's
cloud-init data (lab.cloudinit) and gives the host the VM's disks as the hypervisor has
them (their sizes; lab.hosts makes the data disks), then reports the guest's IP and
hostname back to the hypervisor, which is what phase 1 waits for.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Protocol

from lab.cloudinit import CloudInitError, host_config
from lab.hosts import LabHosts
from lab.network import bridge_for_address
from sizing.spec import PlatformSpec

log = logging.getLogger("lab.watcher")
LIVENESS_PERIOD_S = 1.0


@dataclass
class ObservedVM:
    """A VM as the hypervisor shows it. The cloud-init data is read only when needed (a
    guest to boot), since it is the bulk of what a poll would otherwise transfer."""

    key: str  # the hypervisor's own id (vSphere moref, Nutanix extId)
    name: str
    powered_on: bool
    loader: Callable[[], tuple[str, str] | None] = field(repr=False,
                                                          default=lambda: None)
    # The VM's virtual disks in bytes, OS disk first, read when a guest boots.
    disks_loader: Callable[[], tuple[int, ...]] = field(repr=False, default=lambda: ())
    _loaded: list[tuple[str, str] | None] = field(default_factory=list, repr=False)

    @property
    def cloud_init(self) -> tuple[str, str] | None:
        """(metadata, userdata) texts, or None for a VM without cloud-init data."""
        if not self._loaded:
            self._loaded.append(self.loader())
        return self._loaded[0]

    @property
    def disks_bytes(self) -> tuple[int, ...]:
        """The VM's disk sizes as its hypervisor has them (the lab host's disks)."""
        return self.disks_loader()


class VmSource(Protocol):
    """A simulated hypervisor the watcher follows."""

    def vms(self) -> list[ObservedVM]: ...

    def report_guest(self, vm: ObservedVM, ip: IPv4Address, hostname: str) -> None: ...

    def close(self) -> None: ...

    def wait(self, timeout: float) -> None:
        """Return once something may have changed, or after ``timeout`` s at most (a source
        that is told of changes returns at the first one; one that polls, after its poll
        period)."""
        ...


class Watcher:
    """Keeps lab hosts in step with the VMs of the sources; one `step` per poll."""

    def __init__(self, spec: PlatformSpec, hosts: LabHosts, sources: list[VmSource]) -> None:
        self.spec = spec
        self.hosts = hosts
        self.sources = sources
        self._reported: set[str] = set()  # keys of the VMs whose guest was reported
        self._warned: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="guest-boot")
        self._booting: dict[str, tuple[str, Future[list[str]]]] = {}
        self._next_liveness = 0.0  # when to look again whether reported guests still run

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
        done += self._finished_boots()
        # A guest that died is booted again, found at most LIVENESS_PERIOD_S later: every
        # step (one per change the hypervisor reports, many a second while VMs are made)
        # reading each running host's records would cost more than all else it does.
        now = time.monotonic()
        check_alive = now >= self._next_liveness
        if check_alive:
            self._next_liveness = now + LIVENESS_PERIOD_S
        for source, vm in observed:
            if counts[vm.name] > 1:
                self._warn_once(f"dup:{vm.name}", f"{counts[vm.name]} VMs are named {vm.name}; "
                                "the lab boots none of them (a real vCenter refuses this)")
                continue
            if vm.key in self._booting:
                continue  # its guest is booting: look again once that is over
            if vm.powered_on:
                if vm.key not in self._reported or (check_alive and
                                                    not self.hosts.is_running(vm.name)):
                    # Guests boot side by side and without holding up the next poll, as
                    # VMs powered on together do.
                    self._booting[vm.key] = (vm.name, self._pool.submit(self._power_on,
                                                                        source, vm))
            elif self.hosts.is_running(vm.name):
                self.hosts.stop(vm.name)
                self._reported.discard(vm.key)
                done.append(f"{vm.name}: powered off, host stopped")
        names = set(counts)
        in_flight = {name for name, _ in self._booting.values()}
        for name in self.hosts.names():
            if name not in names and name not in in_flight:
                self.hosts.delete(name)
                done.append(f"{name}: VM destroyed, host deleted")
        return done

    def _finished_boots(self) -> list[str]:
        done: list[str] = []
        for key, (name, future) in list(self._booting.items()):
            if not future.done():
                continue
            del self._booting[key]
            error = future.exception()
            if error is not None:
                log.error("%s: guest boot failed: %s", name, error)
            else:
                done += future.result()
        return done

    def _power_on(self, source: VmSource, vm: ObservedVM) -> list[str]:
        if vm.key in self._reported and self.hosts.is_running(vm.name):
            return []  # up and known: nothing to read, nothing to do
        if vm.cloud_init is None:
            self._warn_once(f"nodata:{vm.key}", f"{vm.name}: powered on without cloud-init "
                            "data; it boots unreachable, as a real VM would")
            return []
        try:
            metadata, userdata = vm.cloud_init
            parsed = host_config(vm.name, metadata, userdata, bridge="")
        except CloudInitError as error:
            self._warn_once(f"bad:{vm.key}", f"{vm.name}: cloud-init data unusable: {error}")
            return []
        bridge = bridge_for_address(self.spec, parsed.address.ip)
        if bridge is None:
            self._warn_once(f"zone:{vm.key}", f"{vm.name}: address {parsed.address} is in no "
                            "lab zone; it boots unreachable")
            return []

        def report() -> None:
            if vm.key not in self._reported:
                source.report_guest(vm, parsed.address.ip, parsed.hostname)
                self._reported.add(vm.key)

        done = []
        if not self.hosts.is_running(vm.name):
            config = replace(parsed, bridge=bridge.name, disks_bytes=vm.disks_bytes)
            # The IP is reported once the guest's network is up, as the guest agent
            # would; sshd comes a moment later (phase 2 waits for it).
            self.hosts.boot(config, on_network=report)
            done.append(f"{vm.name}: powered on, host booted at {config.address.ip}")
        report()
        return done

    def run(self, interval: float = 1.0) -> None:
        """Step until SIGTERM: at each change a source reports, and at least every
        ``interval`` s (a host that died is booted again)."""
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
                for source in self.sources:
                    source.wait(interval / len(self.sources))
            except Exception:  # a passing hypervisor fault must not kill the lab's guests
                log.exception("watcher step failed; retrying")
                time.sleep(interval)


def main() -> None:
    parser = argparse.ArgumentParser(description="boot lab hosts as VMs power on")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=1.0)
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
