"""Boot time and memory of the lab hosts of a whole inventory (tier 100, then 10000).

`BENCH lab-boot hosts=… boot_s=… per_host_ms=… mib_per_host=…`: hosts booted in parallel
(8 at a time, as the watcher would under a burst of power-ons), memory from MemAvailable
before and after, with the hosts idle.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Interface
from pathlib import Path

from lab.hosts import GuestUser, HostConfig, LabHosts
from lab.network import LabNetwork, bridge_for_address
from lab.ssh_keys import ensure_identity
from sizing.validate import parse_spec
from tasks import host_keys
from tests.conftest import LAB_SPEC, exclusive_lab


def _available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _configs(users: int, key_dir: Path) -> list[HostConfig]:
    spec = parse_spec(LAB_SPEC.read_text(), "lab", users=users)
    from sizing.inventory import build_inventory

    public = (ensure_identity(key_dir).with_suffix(".pub")).read_text().strip()
    configs = []
    for vm in build_inventory(spec).vms:
        zone = spec.zones.get(vm.zone)
        bridge = bridge_for_address(spec, vm.ip)
        assert bridge is not None
        key = host_keys.generate()
        configs.append(HostConfig(
            name=vm.name, instance_id=f"bench-{vm.name}", hostname=vm.name, fqdn=vm.fqdn,
            address=IPv4Interface(f"{vm.ip}/{zone.cidr.prefixlen}"), gateway=zone.gateway,
            dns=tuple(zone.dns), bridge=bridge.name,
            users=(GuestUser("debian", (public,)),),
            host_keys=((key.kind, key.private, key.public),)))
    return configs


def main() -> None:
    with exclusive_lab(), tempfile.TemporaryDirectory(prefix="bench-lab-") as tmp:
        state = Path(tmp) / "state"
        network = LabNetwork(state)
        network.up(parse_spec(LAB_SPEC.read_text(), "lab"))
        hosts = LabHosts(state)
        try:
            for users in (100, 10000):
                configs = _configs(users, Path(tmp) / "ssh")
                before = _available_mib()
                started = time.monotonic()
                with ThreadPoolExecutor(max_workers=8) as pool:
                    list(pool.map(hosts.boot, configs))
                boot_s = time.monotonic() - started
                time.sleep(3)  # let every init settle into its idle state
                used = before - _available_mib()
                print(f"BENCH lab-boot users={users} hosts={len(configs)} boot_s={boot_s:.2f} "
                      f"per_host_ms={boot_s * 1000 / len(configs):.0f} "
                      f"mib_per_host={used / len(configs):.1f}", flush=True)
                hosts.delete_all()
        finally:
            hosts.delete_all()
            network.down()
