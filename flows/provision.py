"""Phase 1: create every VM of the inventory on vSphere or Nutanix AHV, sized by the user tier."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import PhaseFailed, PhaseResult, publish_plan, run_bounded, start_phase
from tasks.spec import DEFAULT_SPEC
from tasks.vms import close_sessions, preflight_hypervisor, provision_vm, stored_host_keys

# The spec's hypervisor.concurrency bounds the work; the pool only has to be large enough.
_POOL: Any = ThreadPoolTaskRunner(max_workers=64)


@flow(name="provision-vms", task_runner=_POOL)
def provision_vms(spec_path: str = DEFAULT_SPEC, plan_only: bool = False) -> PhaseResult:
    """Create every VM of the inventory on vSphere or Nutanix AHV, sized by the user tier.

    Preflight first (nothing is created when it fails); then every VM in parallel, at most
    `hypervisor.concurrency` at once. With ``plan_only`` it publishes what it would do.
    """
    logger = get_run_logger()
    _, spec, inventory = start_phase(1, spec_path)
    if plan_only:
        return publish_plan(1, spec, inventory)
    try:
        existing = preflight_hypervisor(spec, inventory)
        logger.info("preflight passed: %d of %d VMs exist already", existing,
                    len(inventory.vms))
        keyed = stored_host_keys(spec, inventory)
        rows, failures = run_bounded(provision_vm, "vm_name",
                                     [vm.name for vm in inventory.vms],
                                     limit=spec.hypervisor.concurrency, spec=spec,
                                     inventory=inventory, keyed=keyed)
    finally:
        close_sessions()
    table = [rows[vm.name] if vm.name in rows else
             {"vm": vm.name, "action": "failed", "vcpu": vm.vcpu, "memory_gb": vm.memory_gb,
              "disks_gb": list(vm.disks_gb), "ip": str(vm.ip), "seconds": None,
              "notes": str(failures[vm.name]).splitlines()[0]}
             for vm in inventory.vms]
    counts = {action: sum(1 for row in table if row["action"] == action)
              for action in ("created", "changed", "unchanged", "failed")}
    create_table_artifact(
        key="phase-1-provision-vms", table=table,
        description=f"Phase 1 on {spec.hypervisor.kind} ({spec.hypervisor.block}): "
                    + ", ".join(f"{n} {a}" for a, n in counts.items()))
    if failures:
        raise PhaseFailed(f"phase 1: {len(failures)} of {len(inventory.vms)} VMs failed:\n"
                          + "\n".join(f"  {name}: {error}" for name, error in failures.items()))
    if not counts["created"] and not counts["changed"]:
        logger.info("all %d VMs match the spec: nothing changed", counts["unchanged"])
    return PhaseResult(phase=1, name="provision-vms", created=counts["created"],
                       changed=counts["changed"], unchanged=counts["unchanged"])
