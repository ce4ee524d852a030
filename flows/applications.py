"""Phase 9: the business applications, eServices and GCO, on RKE2-APPS."""

from __future__ import annotations

from prefect import flow

from flows.common import PhaseResult, plan_or_not_implemented
from tasks.spec import DEFAULT_SPEC


@flow(name="applications")
def applications(spec_path: str = DEFAULT_SPEC, plan_only: bool = False) -> PhaseResult:
    """The business applications, eServices and GCO, on RKE2-APPS.

    With ``plan_only`` it publishes what it would do and changes nothing.
    """
    return plan_or_not_implemented(9, spec_path, plan_only)
