"""Phase 1's tasks hand their hypervisor sessions on within a flow run (tasks.vms): reused
when healthy, closed after an error or a long idle time, all logged out at the end."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import tasks.vms as vms
from sizing.spec import PlatformSpec


class FakeSession:
    """Records whether it was closed; stands for a vSphere or Nutanix session."""

    made = 0

    def __init__(self) -> None:
        FakeSession.made += 1
        self.number = FakeSession.made
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _closed(session: object) -> bool:
    assert isinstance(session, FakeSession)
    return session.closed


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeSession]]:
    made: list[FakeSession] = []

    def open_hypervisor(spec: Any) -> FakeSession:
        made.append(FakeSession())
        return made[-1]

    monkeypatch.setattr(vms, "open_hypervisor", open_hypervisor)
    yield made
    vms._IDLE.clear()


def _in_run(monkeypatch: pytest.MonkeyPatch, run_id: str | None) -> None:
    monkeypatch.setattr(vms.flow_run, "get_id", lambda: run_id)


def test_outside_a_flow_run_every_session_is_closed(opened: list[FakeSession],
                                                    lab_spec: PlatformSpec,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _in_run(monkeypatch, None)
    for _ in range(2):
        with vms.hypervisor(lab_spec):
            pass
    assert len(opened) == 2 and all(s.closed for s in opened)


def test_a_run_reuses_healthy_sessions_and_drops_broken_ones(
        opened: list[FakeSession], lab_spec: PlatformSpec,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _in_run(monkeypatch, "run-1")
    with vms.hypervisor(lab_spec) as first:
        pass
    with vms.hypervisor(lab_spec) as second:
        pass
    assert second is first and not _closed(first) and len(opened) == 1

    with pytest.raises(RuntimeError), vms.hypervisor(lab_spec) as failing:
        raise RuntimeError("vCenter went away")
    assert failing is first and _closed(first)
    with vms.hypervisor(lab_spec) as fresh:
        pass
    assert fresh is not first and len(opened) == 2

    _in_run(monkeypatch, "run-2")  # another run never gets run-1's sessions
    with vms.hypervisor(lab_spec) as other:
        pass
    assert other is not fresh

    _in_run(monkeypatch, "run-1")
    assert vms.close_sessions() == 1 and _closed(fresh) and not _closed(other)


def test_a_long_idle_session_is_logged_out_not_reused(
        opened: list[FakeSession], lab_spec: PlatformSpec,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _in_run(monkeypatch, "run-3")
    with vms.hypervisor(lab_spec) as old:
        pass
    key = next(iter(vms._IDLE))
    since, session = vms._IDLE[key][0]
    vms._IDLE[key][0] = (since - vms._IDLE_SECONDS - 1, session)
    with vms.hypervisor(lab_spec) as new:
        pass
    assert new is not old and _closed(old) and not _closed(new)
