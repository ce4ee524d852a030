"""Phase 1: create every VM of the inventory on vSphere or Nutanix AHV, sized by the user tier."""

from __future__ import annotations

from prefect import flow

from flows.common import PhaseResult, plan_or_not_implemented
from tasks.spec import DEFAULT_SPEC


@flow(name="provision-vms")
def provision_vms(spec_path: str = DEFAULT_SPEC, plan_only: bool = False) -> PhaseResult:
    """Create every VM of the inventory on vSphere or Nutanix AHV, sized by the user tier.

    With ``plan_only`` it publishes what it would do and changes nothing.
    """
    return plan_or_not_implemented(1, spec_path, plan_only)
