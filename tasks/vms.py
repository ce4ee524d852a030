"""Phase 1's tasks: check the hypervisor, then ensure each VM (create or compare), boot it
and wait for its address. Each opens its own hypervisor session through the spec's block."""

from __future__ import annotations

import time
from typing import cast

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.hypervisor import (
    HypervisorError,
    HypervisorSession,
    TransientHypervisorError,
    VmWanted,
)
from blocks.ssh import SshIdentity
from sizing.inventory import Inventory
from sizing.spec import PlatformSpec
from tasks import host_keys
from tasks.blocks import load_block
from tasks.cloud_init import render_cloud_init
from tasks.retry import transient_only


class Stages:
    """Where a target's seconds went (connect, create, power on, guest IP...), for the
    phase's table: an engineer sees at once whether the hypervisor or the guest is slow."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now

    def text(self) -> str:
        return ", ".join(f"{name} {secs:.2f}" for name, secs in self.seconds.items())


def open_hypervisor(spec: PlatformSpec) -> HypervisorSession:
    """A session on the spec's hypervisor, through the block the spec names."""
    hv = spec.hypervisor
    if hv.kind == "vsphere":
        from blocks.vsphere import VsphereHypervisor

        assert hv.vsphere is not None
        return load_block(VsphereHypervisor, hv.block).open(hv.vsphere)
    from blocks.nutanix import NutanixHypervisor

    assert hv.nutanix is not None
    return load_block(NutanixHypervisor, hv.block).open(hv.nutanix)


@task(name="preflight-hypervisor", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def preflight_hypervisor(spec: PlatformSpec, inventory: Inventory) -> int:
    """Everything phase 1 needs exists, and no foreign VM holds an inventory name or IP.

    Fails with every problem listed before any VM is created. Returns the number of VMs
    of the inventory that exist already.
    """
    networks = sorted({zone.network for _, zone in spec.zones.items()})
    session = open_hypervisor(spec)
    try:
        problems = session.preflight(networks)
        existing = session.list_vms() if not problems else []
    finally:
        session.close()
    wanted = {vm.name: vm for vm in inventory.vms}
    by_ip = {str(vm.ip): vm.name for vm in inventory.vms}
    for vm in existing:
        if vm.name in wanted and vm.owner != spec.name:
            problems.append(f"VM {vm.name} exists but was not created for platform "
                            f"{spec.name} (owner: {vm.owner or 'unknown'})")
        if vm.guest_ip in by_ip and by_ip[vm.guest_ip] != vm.name:
            problems.append(f"address {vm.guest_ip} of {by_ip[vm.guest_ip]} is already used "
                            f"by VM {vm.name}")
    if problems:
        raise HypervisorError(f"{spec.hypervisor.kind} preflight for {spec.name} failed; "
                              "nothing was created:\n  - " + "\n  - ".join(problems))
    return sum(1 for vm in existing if vm.name in wanted)


@task(name="provision-vm", task_run_name="provision-vm-{vm_name}", retries=3,
      retry_delay_seconds=[2, 5, 15], retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def provision_vm(spec: PlatformSpec, inventory: Inventory, vm_name: str) -> dict[str, object]:
    """Ensure one VM: created from the template, or compared (and grown with `resize`);
    powered on; its guest reporting the inventory's IP. Returns its table row."""
    logger = get_run_logger()
    started = time.monotonic()
    stages = Stages()
    vm = inventory.by_name(vm_name)
    identity = cast(SshIdentity, load_block(SshIdentity, spec.ssh.identity_block))
    session = open_hypervisor(spec)
    stages.mark("connect")
    try:
        existing = session.find_vm(vm.name)
        key = host_keys.load(spec, vm)
        if key is None:
            if existing is not None:
                raise HypervisorError(
                    f"VM {vm.name} exists but its SSH host key secret "
                    f"{host_keys.secret_name(spec, vm)} is missing, so no later phase could "
                    "verify it; restore the secret or delete the VM")
            key = host_keys.create(spec, vm)
        stages.mark("host key")
        cloud_init = render_cloud_init(spec, vm, [identity.public_key()], [key],
                                       instance_id=f"{spec.name}-{vm.name}")
        result = session.ensure_vm(VmWanted(
            name=vm.name, vcpu=vm.vcpu, memory_gb=vm.memory_gb, disks_gb=vm.disks_gb,
            network=spec.zones.get(vm.zone).network, owner=spec.name, cloud_init=cloud_init),
            resize=spec.hypervisor.resize)
        stages.mark(result.action if result.action != "unchanged" else "compare")
        changes = list(result.changes)
        if session.power_on(vm.name):
            changes.append("powered on")
            stages.mark("power on")
        ip = session.wait_for_ip(vm.name, str(vm.ip), timeout=spec.hypervisor.boot_timeout)
        stages.mark("guest IP")
    except TransientHypervisorError as error:
        logger.warning("%s: %s (will retry)", vm.name, error)
        raise
    finally:
        session.close()
    action = result.action if result.action != "unchanged" or not changes else "changed"
    for note in result.notes:
        logger.warning(note)
    if changes:
        logger.info("%s %s: %s", vm.name, action, "; ".join(changes))
    state = result.state
    return {"vm": vm.name, "action": action, "vcpu": state.vcpu,
            "memory_gb": state.memory_gb, "disks_gb": list(state.disks_gb), "ip": ip,
            "seconds": round(time.monotonic() - started, 2),
            "stages": stages.text(),
            "notes": "; ".join([*changes, *result.notes])}
