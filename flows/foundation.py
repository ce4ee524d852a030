"""Phase 5: Argo CD, cert-manager, Longhorn and the Vault injector on the clusters."""

from __future__ import annotations

from prefect import flow

from flows.common import PhaseResult, plan_or_not_implemented
from tasks.spec import DEFAULT_SPEC


@flow(name="cluster-foundation")
def cluster_foundation(spec_path: str = DEFAULT_SPEC, plan_only: bool = False) -> PhaseResult:
    """Argo CD, cert-manager, Longhorn and the Vault injector on the clusters.

    With ``plan_only`` it publishes what it would do and changes nothing.
    """
    return plan_or_not_implemented(5, spec_path, plan_only)
