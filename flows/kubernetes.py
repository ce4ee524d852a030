"""Phase 4: the RKE2 clusters APPS, MIDDLEWARE and DMZ, and Rancher managing them."""

from __future__ import annotations

from prefect import flow

from flows.common import PhaseResult, plan_or_not_implemented
from tasks.spec import DEFAULT_SPEC


@flow(name="kubernetes-clusters")
def kubernetes_clusters(spec_path: str = DEFAULT_SPEC, plan_only: bool = False) -> PhaseResult:
    """The RKE2 clusters APPS, MIDDLEWARE and DMZ, and Rancher managing them.

    With ``plan_only`` it publishes what it would do and changes nothing.
    """
    return plan_or_not_implemented(4, spec_path, plan_only)
