"""The parent flow `platform`: the nine phases in order, and a summary that always lands."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import State

from flows.api_management import api_management
from flows.applications import applications
from flows.common import PhaseResult
from flows.core_services import core_services
from flows.foundation import cluster_foundation
from flows.kubernetes import kubernetes_clusters
from flows.middleware import middleware
from flows.prepare import prepare_vms
from flows.provision import provision_vms
from flows.security_monitoring import security_monitoring
from sizing.inventory import build_inventory
from sizing.plan import PHASES, topology
from tasks.spec import DEFAULT_SPEC, load_spec
from templates import render

PHASE_FLOWS: tuple[Callable[..., Any], ...] = (
    provision_vms, prepare_vms, core_services, kubernetes_clusters, cluster_foundation,
    middleware, api_management, security_monitoring, applications,
)


class PlatformFailed(RuntimeError):
    """A phase failed; the summary artifact says which and what was left undone."""


def _summary_row(number: int, state: str, seconds: float,
                 result: PhaseResult | None = None) -> dict[str, object]:
    phase = PHASES[number - 1]
    counts = result or PhaseResult(phase=number, name=phase.flow_name)
    return {
        "phase": number, "flow": phase.flow_name, "state": state,
        "planned": counts.planned, "created": counts.created, "changed": counts.changed,
        "unchanged": counts.unchanged, "failed": counts.failed,
        "seconds": round(seconds, 2),
    }


@flow(name="platform")
def platform(spec_path: str = DEFAULT_SPEC, plan_only: bool = False) -> list[dict[str, object]]:
    """Build the whole platform from the spec, phase 1 to 9; stop at the first failed phase.

    Returns the summary rows (also published as the `platform-summary` table artifact).
    """
    logger = get_run_logger()
    spec = load_spec(spec_path)
    inventory = build_inventory(spec)
    create_table_artifact(
        key="platform-inventory",
        table=[vm.row() for vm in inventory.vms],
        description=f"Inventory of {spec.name} for {spec.users} concurrent users: "
                    + ", ".join(f"{k} {v}" for k, v in inventory.totals().items()),
    )
    create_markdown_artifact(
        key="platform-topology",
        markdown=render("plan/topology.md.j2", **topology(spec, inventory)),
        description="Zones, load balancers, clusters and VMs",
    )

    rows: list[dict[str, object]] = []
    failure: str | None = None
    for number, phase_flow in enumerate(PHASE_FLOWS, start=1):
        if failure is not None:
            rows.append(_summary_row(number, "NotRun", 0.0))
            continue
        logger.info("phase %d/9 %s starting", number, PHASES[number - 1].flow_name)
        started = time.monotonic()
        state: State[Any] = phase_flow(spec_path=spec_path, plan_only=plan_only,
                                       return_state=True)
        seconds = time.monotonic() - started
        if state.is_completed():
            result: PhaseResult = state.result()
            rows.append(_summary_row(number, state.name or "Completed", seconds, result))
        else:
            error = state.result(raise_on_failure=False)
            failure = f"phase {number} ({PHASES[number - 1].flow_name}) {state.name}: {error}"
            rows.append(_summary_row(number, state.name or "Failed", seconds))
            logger.error(failure)

    create_table_artifact(
        key="platform-summary",
        table=rows,
        description=("Plan only: nothing was changed. " if plan_only else "")
                    + (f"Stopped: {failure}" if failure else "All nine phases completed."),
    )
    if failure is not None:
        raise PlatformFailed(failure)
    return rows
