"""Phase 8: NeuVector on every cluster, Coroot server and agents."""

from __future__ import annotations

from prefect import flow

from flows.common import PhaseResult, plan_or_not_implemented
from tasks.spec import DEFAULT_SPEC


@flow(name="security-monitoring")
def security_monitoring(spec_path: str = DEFAULT_SPEC, plan_only: bool = False) -> PhaseResult:
    """NeuVector on every cluster, Coroot server and agents.

    With ``plan_only`` it publishes what it would do and changes nothing.
    """
    return plan_or_not_implemented(8, spec_path, plan_only)
