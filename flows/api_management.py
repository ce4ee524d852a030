"""Phase 7: Gravitee LAN and DMZ and the external API route."""

from __future__ import annotations

from prefect import flow

from flows.common import PhaseResult, plan_or_not_implemented
from tasks.spec import DEFAULT_SPEC


@flow(name="api-management")
def api_management(spec_path: str = DEFAULT_SPEC, plan_only: bool = False) -> PhaseResult:
    """Gravitee LAN and DMZ and the external API route.

    With ``plan_only`` it publishes what it would do and changes nothing.
    """
    return plan_or_not_implemented(7, spec_path, plan_only)
