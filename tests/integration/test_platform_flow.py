"""The `platform` flow in a Prefect test harness: nine subflows in order, artifacts, summary."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter
from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort
from prefect.testing.utilities import prefect_test_harness

from flows.common import PhaseNotImplemented
from flows.kubernetes import kubernetes_clusters
from flows.platform import PlatformFailed, platform
from sizing.plan import PHASES
from tests.conftest import LAB_SPEC

pytestmark = pytest.mark.prefect


@pytest.fixture(scope="module", autouse=True)
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=60):
        yield


async def _flow_runs() -> list[Any]:
    async with get_client() as client:
        return await client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_ASC)


async def _artifact(key: str) -> Any:
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC, limit=1)
        return found[0] if found else None


async def _flow_names(parent_id: Any) -> list[str]:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [parent_id]}),
            sort=FlowRunSort.START_TIME_ASC)
        flows = {f.id: f.name for f in await client.read_flows()}
    return [flows[r.flow_id] for r in runs]


def test_plan_only_runs_the_nine_phases_in_order() -> None:
    state = platform(spec_path=str(LAB_SPEC), plan_only=True, return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert [r["flow"] for r in rows] == [p.flow_name for p in PHASES]
    assert all(r["state"] == "Completed" for r in rows)
    assert rows[0]["planned"] == 18 and rows[8]["planned"] == 4

    parent = state.state_details.flow_run_id
    assert asyncio.run(_flow_names(parent)) == [p.flow_name for p in PHASES]

    summary = asyncio.run(_artifact("platform-summary"))
    assert summary is not None and summary.type == "table"
    assert "Plan only: nothing was changed." in summary.description
    for key in ("platform-inventory", "platform-topology",
                *(f"plan-phase-{p.number}-{p.flow_name}" for p in PHASES)):
        assert asyncio.run(_artifact(key)) is not None, key
    topology = asyncio.run(_artifact("platform-topology"))
    assert "```mermaid" in topology.data


def test_a_failed_phase_stops_the_run_and_the_summary_says_so() -> None:
    # No hypervisor block exists in this harness: phase 1 must fail at once, clearly.
    state = platform(spec_path=str(LAB_SPEC), plan_only=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(PlatformFailed, match=r"phase 1 \(provision-vms\).*'lab-vcenter'.*"
                                             r"create it first"):
        state.result()
    summary = asyncio.run(_artifact("platform-summary"))
    rows = summary.data
    assert '"state": "Failed"' in rows and rows.count('"NotRun"') == 8


def test_an_unbuilt_phase_runs_alone_and_refuses_to_pretend() -> None:
    with pytest.raises(PhaseNotImplemented, match=r"phase 4 .* not implemented yet"):
        kubernetes_clusters(spec_path=str(LAB_SPEC))


def test_a_bad_spec_fails_before_any_phase(tmp_path: Any) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(LAB_SPEC.read_text().replace("users: 100", "users: 101"))
    before = len(asyncio.run(_flow_runs()))
    state = platform(spec_path=str(bad), plan_only=True, return_state=True)
    assert state.is_failed()
    assert "users: 101 is not a sizing tier" in str(state.result(raise_on_failure=False))
    assert len(asyncio.run(_flow_runs())) == before + 1  # the parent only: no phase started
