"""Phase 6: MinIO, Keycloak, Kafka, n8n and Flowable on RKE2-MIDDLEWARE, through Argo CD."""

from __future__ import annotations

from prefect import flow

from flows.common import PhaseResult, plan_or_not_implemented
from tasks.spec import DEFAULT_SPEC


@flow(name="middleware")
def middleware(spec_path: str = DEFAULT_SPEC, plan_only: bool = False) -> PhaseResult:
    """MinIO, Keycloak, Kafka, n8n and Flowable on RKE2-MIDDLEWARE, through Argo CD.

    With ``plan_only`` it publishes what it would do and changes nothing.
    """
    return plan_or_not_implemented(6, spec_path, plan_only)
