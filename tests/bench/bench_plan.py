"""How long validating a spec and planning its inventory take, per tier (median of runs)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from sizing.inventory import build_inventory
from sizing.plan import build_plan
from sizing.spec import TIERS
from sizing.validate import parse_spec
from tests.conftest import LAB_SPEC


def _median_ms(action: Callable[[], object], runs: int = 30) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    text = LAB_SPEC.read_text()
    for users in TIERS:
        spec = parse_spec(text, "lab", users=users)
        inventory = build_inventory(spec)
        parse_ms = _median_ms(lambda u=users: parse_spec(text, "lab", users=u))  # type: ignore[misc]
        inventory_ms = _median_ms(lambda s=spec: build_inventory(s))  # type: ignore[misc]
        plan_ms = _median_ms(lambda s=spec, i=inventory: build_plan(s, i))  # type: ignore[misc]
        items = sum(len(v) for v in build_plan(spec, inventory).values())
        print(f"BENCH plan users={users} vms={len(inventory.vms)} plan_items={items} "
              f"validate_ms={parse_ms:.2f} inventory_ms={inventory_ms:.3f} "
              f"plan_ms={plan_ms:.3f}", flush=True)
