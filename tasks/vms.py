"""Phase 1's tasks: check the hypervisor, then ensure each VM (create or compare), boot it
and wait for its address. Sessions on the hypervisor are opened through the spec's block
and shared by the tasks of one flow run (`hypervisor`, `close_sessions`)."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import cast

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from blocks.hypervisor import (
    EnsureResult,
    HypervisorError,
    HypervisorSession,
    TransientHypervisorError,
    VmWanted,
)
from blocks.ssh import SshIdentity
from sizing.inventory import VM, Inventory
from sizing.spec import PlatformSpec
from tasks import host_keys
from tasks.blocks import load_block, once_per_flow_run
from tasks.cloud_init import HostKey, render_cloud_init
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
        from blocks.vsphere import VsphereHypervisor, VsphereLookups

        assert hv.vsphere is not None
        # A run's sessions share what they find of the placement.
        lookups = once_per_flow_run(("vsphere lookups", hv.block), VsphereLookups)
        return load_block(VsphereHypervisor, hv.block).open(hv.vsphere, lookups)
    from blocks.nutanix import NutanixHypervisor

    assert hv.nutanix is not None
    return load_block(NutanixHypervisor, hv.block).open(hv.nutanix)


_IDLE: dict[tuple[str, str], list[tuple[float, HypervisorSession]]] = {}
_IDLE_LOCK = threading.Lock()
# A session idle longer than this is logged out rather than handed on: vCenter ends idle
# sessions after 30 minutes by default, and a fresh login costs less than a failed call.
_IDLE_SECONDS = 600.0


@contextmanager
def hypervisor(spec: PlatformSpec) -> Iterator[HypervisorSession]:
    """A session on the spec's hypervisor for one task at a time.

    Inside a flow run a session is handed to the run's next task when this one is done:
    a login, its TLS handshake and the placement lookups would otherwise be most of a
    small task's round trips, for every VM. A session that saw an error is closed, never
    handed on (the retry logs in afresh); `close_sessions` logs out the rest at the end.
    """
    run_id = flow_run.get_id()
    key = (str(run_id), spec.hypervisor.block)
    session = None
    stale: list[HypervisorSession] = []
    if run_id is not None:
        with _IDLE_LOCK:
            idle = _IDLE.get(key, [])
            while idle and session is None:
                since, candidate = idle.pop()
                if time.monotonic() - since < _IDLE_SECONDS:
                    session = candidate
                else:
                    stale.append(candidate)
    for old in stale:
        old.close()
    if session is None:
        session = open_hypervisor(spec)
    try:
        yield session
    except BaseException:
        session.close()
        raise
    if run_id is None:
        session.close()
        return
    with _IDLE_LOCK:
        _IDLE.setdefault(key, []).append((time.monotonic(), session))


def close_sessions() -> int:
    """Log out the sessions this flow run's tasks left for each other; how many."""
    run_id = str(flow_run.get_id())
    with _IDLE_LOCK:
        sessions = [session for key in [k for k in _IDLE if k[0] == run_id]
                    for _, session in _IDLE.pop(key)]
    for session in sessions:
        session.close()
    return len(sessions)


@task(name="preflight-hypervisor", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def preflight_hypervisor(spec: PlatformSpec, inventory: Inventory) -> int:
    """Everything phase 1 needs exists, and no foreign VM holds an inventory name or IP.

    Fails with every problem listed before any VM is created. Returns the number of VMs
    of the inventory that exist already.
    """
    networks = sorted({zone.network for _, zone in spec.zones.items()})
    with hypervisor(spec) as session:
        problems = session.preflight(networks)
        existing = session.list_vms() if not problems else []
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


@task(name="stored-host-keys", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def stored_host_keys(spec: PlatformSpec, inventory: Inventory) -> frozenset[str]:
    """The VMs whose SSH host key pair is stored already (names only, never a key)."""
    return frozenset(host_keys.stored(spec, list(inventory.vms)))


@task(name="provision-vm", task_run_name="provision-vm-{vm_name}", retries=3,
      retry_delay_seconds=[2, 5, 15], retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def provision_vm(spec: PlatformSpec, inventory: Inventory, keyed: frozenset[str],
                 vm_name: str) -> dict[str, object]:
    """Ensure one VM: created from the template, or compared (and grown with `resize`);
    powered on; its guest reporting the inventory's IP. Returns its table row.

    ``keyed``: the VMs whose host key pair was stored when the phase began. Only a VM to
    create needs its pair (in its cloud-init); one that exists must have one stored.
    """
    logger = get_run_logger()
    started = time.monotonic()
    stages = Stages()
    vm = inventory.by_name(vm_name)
    with hypervisor(spec) as session:
        stages.mark("connect")
        try:
            result, changes, ip = _ensure_running(spec, vm, keyed, session, stages)
        except TransientHypervisorError as error:
            logger.warning("%s: %s (will retry)", vm.name, error)
            raise
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


def _ensure_running(spec: PlatformSpec, vm: VM, keyed: frozenset[str],
                    session: HypervisorSession, stages: Stages,
                    ) -> tuple[EnsureResult, list[str], str]:
    """The VM made or checked, powered on, reporting its IP: (result, changes, IP)."""
    cloud_init = None
    storing: tuple[HostKey, Future[HostKey]] | None = None
    if session.find_vm(vm.name) is None:
        key = None
        # A pair may be stored already: by an earlier run, or by this task's earlier try.
        if vm.name in keyed or task_run.run_count > 1:
            key = host_keys.load(spec, vm)
        if key is None:
            key = host_keys.generate()
            # Stored while the hypervisor clones (each takes a while), and awaited before
            # the VM first powers on: no VM boots with a pair that is not kept. (In this
            # run's Prefect context: its settings and its run.)
            storing = key, _KEY_STORES.submit(contextvars.copy_context().run,
                                              host_keys.store, spec, vm, key)
        identity = cast(SshIdentity, load_block(SshIdentity, spec.ssh.identity_block))
        cloud_init = render_cloud_init(spec, vm, [identity.public_key()], [key],
                                       instance_id=f"{spec.name}-{vm.name}")
    elif vm.name not in keyed and host_keys.load(spec, vm) is None:
        # (not in ``keyed`` yet stored: this task's earlier try made the VM and its pair)
        raise HypervisorError(
            f"VM {vm.name} exists but its SSH host key secret "
            f"{host_keys.secret_name(spec, vm)} is missing (in Prefect and in Vault), so "
            "no later phase could verify it; restore the secret, or delete the VM (safe if "
            "it never booted: a run stopped while creating it) and run phase 1 again")
    try:
        result = session.ensure_vm(VmWanted(
            name=vm.name, vcpu=vm.vcpu, memory_gb=vm.memory_gb, disks_gb=vm.disks_gb,
            network=spec.zones.get(vm.zone).network, owner=spec.name, cloud_init=cloud_init),
            resize=spec.hypervisor.resize)
    finally:
        if storing is not None:
            wait([storing[1]])  # whatever happened, the store is over before we go on
    stages.mark(result.action if result.action != "unchanged" else "compare")
    if storing is not None:
        _kept_or_undone(session, vm, *storing, created=result.action == "created")
        stages.mark("host key stored")
    changes = list(result.changes)
    if session.power_on(vm.name):
        changes.append("powered on")
        stages.mark("power on")
    ip = session.wait_for_ip(vm.name, str(vm.ip), timeout=spec.hypervisor.boot_timeout)
    stages.mark("guest IP")
    return result, changes, ip


# Host-key stores run beside the clones (beyond 16 at once they queue: each is one API call).
_KEY_STORES = ThreadPoolExecutor(max_workers=16, thread_name_prefix="host-key-store")


def _kept_or_undone(session: HypervisorSession, vm: VM, key: HostKey,
                    storing: Future[HostKey], created: bool) -> None:
    """The VM's new pair is kept; if it is not, the VM just made with it (never powered
    on) is deleted again, so that no VM exists whose host key nobody can verify."""
    try:
        kept = storing.result()
        if kept == key:
            return
        problem: Exception = TransientHypervisorError(
            f"VM {vm.name}: another host key pair was stored for it meanwhile; the VM made "
            "with the new one is deleted and made again with the stored one")
    except Exception as error:
        problem = error
    if created:
        session.delete_vm(vm.name)
    raise problem
