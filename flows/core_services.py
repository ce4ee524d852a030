"""Phase 3: Vault, the private registry, the HAProxy + keepalived pairs and Gogs."""

from __future__ import annotations

from prefect import flow

from flows.common import PhaseResult, plan_or_not_implemented
from tasks.spec import DEFAULT_SPEC


@flow(name="core-services")
def core_services(spec_path: str = DEFAULT_SPEC, plan_only: bool = False) -> PhaseResult:
    """Vault, the private registry, the HAProxy + keepalived pairs and Gogs.

    With ``plan_only`` it publishes what it would do and changes nothing.
    """
    return plan_or_not_implemented(3, spec_path, plan_only)
