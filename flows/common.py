"""What every phase flow shares: its result counts, its plan artifact, its start."""

from __future__ import annotations

from typing import Any, NoReturn

from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from sizing.inventory import Inventory, build_inventory
from sizing.plan import Phase, build_plan, phase
from sizing.spec import PlatformSpec
from tasks.spec import load_spec


class PhaseResult(BaseModel):
    """The counts a phase reports to the parent's `platform-summary` table."""

    phase: int
    name: str
    planned: int = 0
    created: int = 0
    changed: int = 0
    unchanged: int = 0
    failed: int = 0


class PhaseNotImplemented(RuntimeError):
    """Raised by a phase whose real work has not been built yet: never a silent success."""


def start_phase(number: int, spec_path: str) -> tuple[Phase, PlatformSpec, Inventory]:
    """Load and validate the spec and compute the inventory (each phase runs alone too)."""
    spec = load_spec(spec_path)
    return phase(number), spec, build_inventory(spec)


def publish_plan(number: int, spec: PlatformSpec, inventory: Inventory) -> PhaseResult:
    """The plan_only run of a phase: a table artifact of what it would create."""
    current = phase(number)
    items = build_plan(spec, inventory)[number]
    create_table_artifact(
        key=f"plan-phase-{number}-{current.flow_name}",
        table=[item.row() for item in items],
        description=f"Phase {number}, {current.title}: what a real run would create or "
                    f"ensure ({len(items)} items) for spec {spec.name}, "
                    f"{spec.users} users. Replaces: {', '.join(current.roles)}.",
    )
    return PhaseResult(phase=number, name=current.flow_name, planned=len(items))


def not_implemented(number: int) -> NoReturn:
    current = phase(number)
    raise PhaseNotImplemented(
        f"phase {number} ({current.flow_name}: {current.title}) is not implemented yet; "
        f"run it with plan_only=true to see what it will do"
    )


def plan_or_not_implemented(number: int, spec_path: str, plan_only: bool) -> PhaseResult:
    """The body of a phase that only plans so far; a real run fails loudly."""
    _, spec, inventory = start_phase(number, spec_path)
    if plan_only:
        return publish_plan(number, spec, inventory)
    not_implemented(number)


class PhaseFailed(RuntimeError):
    """Some targets of a phase failed; the others finished their work first."""


def run_bounded(task_fn: Any, item_arg: str, items: list[str], limit: int, **kwargs: Any,
                ) -> tuple[dict[str, Any], dict[str, BaseException]]:
    """Submit ``task_fn(<item_arg>=item, **kwargs)`` for every item, ``limit`` at once.

    Every item runs to its end even when others fail, so a failure never leaves the rest
    half-done. Returns (results by item, exceptions by item).
    """
    from prefect.futures import as_completed
    from prefect.utilities.annotations import quote

    # Quoted: Prefect would otherwise walk the whole spec and inventory of every call
    # looking for futures in them (a visible share of a 60-VM phase's CPU).
    kwargs = {name: quote(value) for name, value in kwargs.items()}

    results: dict[str, Any] = {}
    failures: dict[str, BaseException] = {}
    pending = list(items)
    running: dict[Any, str] = {}
    while pending or running:
        while pending and len(running) < limit:
            item = pending.pop(0)
            running[task_fn.submit(**{item_arg: item}, **kwargs)] = item
        future = next(as_completed(list(running)))
        item = running.pop(future)
        try:
            results[item] = future.result()
        except Exception as error:
            failures[item] = error
    return results, failures
