"""Phase 2: users, static network, hostname, packages and hardening on every VM, over SSH."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import PhaseFailed, PhaseResult, publish_plan, run_bounded, start_phase
from tasks.prepare import prepare_host, ssh_pool
from tasks.spec import DEFAULT_SPEC

_POOL: Any = ThreadPoolTaskRunner(max_workers=256)


@flow(name="prepare-vms", task_runner=_POOL)
def prepare_vms(spec_path: str = DEFAULT_SPEC, plan_only: bool = False) -> PhaseResult:
    """Users, static network, hostname, packages and hardening on every VM, over SSH.

    Every host in parallel, at most `ssh.concurrency` at once; one host failing does not
    stop the others, and the phase then fails listing every failed host.
    """
    logger = get_run_logger()
    _, spec, inventory = start_phase(2, spec_path)
    if plan_only:
        return publish_plan(2, spec, inventory)
    with ssh_pool(spec) as pool:
        rows, failures = run_bounded(prepare_host, "vm_name", [vm.name for vm in inventory.vms],
                                     limit=spec.ssh.concurrency, spec=spec,
                                     inventory=inventory, pool=pool)
    table = [rows[vm.name] if vm.name in rows else
             {"host": vm.name, "ip": str(vm.ip), "login": "", "action": "failed",
              "changed": None, "unchanged": None,
              "changed_items": str(failures[vm.name]).splitlines()[0], "seconds": None}
             for vm in inventory.vms]
    counts = {action: sum(1 for row in table if row["action"] == action)
              for action in ("changed", "unchanged", "failed")}
    create_table_artifact(
        key="phase-2-prepare-vms", table=table,
        description="Phase 2 over SSH: " + ", ".join(f"{n} {a}" for a, n in counts.items()))
    if failures:
        raise PhaseFailed(f"phase 2: {len(failures)} of {len(inventory.vms)} hosts failed:\n"
                          + "\n".join(f"  {name}: {error}" for name, error in failures.items()))
    if not counts["changed"]:
        logger.info("all %d hosts match the spec: nothing changed", counts["unchanged"])
    return PhaseResult(phase=2, name="prepare-vms", changed=counts["changed"],
                       unchanged=counts["unchanged"])
