"""Phase 2: users, static network, hostname, packages and hardening on every VM, over SSH."""

from __future__ import annotations

from prefect import flow

from flows.common import PhaseResult, plan_or_not_implemented
from tasks.spec import DEFAULT_SPEC


@flow(name="prepare-vms")
def prepare_vms(spec_path: str = DEFAULT_SPEC, plan_only: bool = False) -> PhaseResult:
    """Users, static network, hostname, packages and hardening on every VM, over SSH.

    With ``plan_only`` it publishes what it would do and changes nothing.
    """
    return plan_or_not_implemented(2, spec_path, plan_only)
