"""Phase 1's concurrency: the tier-10000 inventory on the lab's vcsim with every clone
taking 500 ms, once at concurrency 1 and once at 8.

`BENCH provision-vsphere vms=… serial_wall_s=… wall_s=… bound_s=… ratio=… speedup=…
serial_call_s=… call_s=…`: bound_s = ceil(vms / 8) * serial_wall_s / vms (perfect use of 8
slots); ratio = wall_s / bound_s (target <= 1.25); speedup = serial_wall_s / wall_s (target
>= 6). Before it, one `BENCH provision-vsphere-stages concurrency=… <stage>_s=… lead_s=…
tail_s=… slot_use=… machine_cpu_s=…` line per run: a VM task's mean seconds in each stage;
the run's seconds before its first VM task and after its last; the VM tasks' share of the
slots' time in between; and the CPU seconds the whole machine was busy during the run.
Guests boot as lab hosts, so each VM's time includes powering on and waiting for its
reported IP. Each run is a first provisioning: it makes every VM's SSH host key pair and
stores it in Prefect (each run's VMs and keys are deleted after it). An untimed tier-100
run comes first, so that neither timed run carries the process's first-use costs. Prefect's
server runs on PostgreSQL, as `make lab` and production run it: on SQLite, writes that
meet wait 2 s each (lab/postgres.py).

A wall time is the phase's flow run from its start to its end as Prefect records it (the
duration the UI shows). The `*call_s` figures are the Python call's, which also holds what
Prefect does after the run has ended: Prefect 3.9 joins the run's heartbeat thread, which
sleeps in 1 s steps, so every flow call returns 0 to 1 s after its run ended, whatever the
run did.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from tests.bench.machine import machine_cpu_seconds, phase_table
from tests.conftest import LAB_SPEC

if TYPE_CHECKING:
    from lab.lab import Lab

SETTLE_S = 65.0


def _stage_means() -> str:
    """Mean seconds per stage over the last phase-1 table (where the time goes)."""
    from collections import defaultdict

    totals: dict[str, list[float]] = defaultdict(list)
    for row in phase_table("phase-1-provision-vms"):
        for part in str(row["stages"]).split(", "):
            name, _, secs = part.rpartition(" ")
            totals[name.replace(" ", "_")].append(float(secs))
        totals["task"].append(float(str(row["seconds"])))
    return " ".join(f"{name}_s={sum(v) / len(v):.3f}" for name, v in totals.items())


def _run_seconds(flow_run_id: object, slots: int) -> tuple[float, str]:
    """The flow run's start-to-end time as the Prefect server recorded it, and where that
    time went: `lead_s` from the run's start to its first VM task's, `tail_s` from its last
    VM task's end to the run's end, `slot_use` the VM tasks' seconds over the slots'."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> tuple[float, str]:
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
            # The server records task states in batches, each second: wait for the last.
            for _ in range(50):
                tasks = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                    limit=200)
                if all(t.end_time is not None for t in tasks):
                    break
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError(f"flow run {run.id}: task runs without an end after 10 s")
        assert run.start_time is not None and run.end_time is not None
        spans = [(t.start_time, t.end_time) for t in tasks
                 if t.task_key.startswith("provision_vm") and t.start_time and t.end_time]
        first, last = min(s for s, _ in spans), max(e for _, e in spans)
        busy = sum((e - s).total_seconds() for s, e in spans)
        return ((run.end_time - run.start_time).total_seconds(),
                f"lead_s={(first - run.start_time).total_seconds():.2f} "
                f"tail_s={(run.end_time - last).total_seconds():.2f} "
                f"slot_use={busy / (slots * (last - first).total_seconds()):.2f}")

    return asyncio.run(read())


def _settle_filesystem() -> None:
    """Start each run on a filesystem without freshly freed inodes.

    Lab hosts that were just deleted (the first run's; those of the benchmarks before this
    one) leave thousands of freed inodes; on an ext4 without a journal, as this machine's
    root is, the allocator skips any inode freed within the last minute (five while its
    table block is unwritten) one by one at each file created, which cost the second run's
    guests about 0.8 s of CPU on two cores. Flush, then wait that minute out, before each
    run alike.
    """
    os.sync()
    time.sleep(SETTLE_S)


def _spec(tmp: str, users: int, concurrency: int) -> str:
    """The lab spec at ``users`` and ``concurrency``, written under ``tmp``; its path."""
    data = yaml.safe_load(LAB_SPEC.read_text())
    data["users"] = users
    data["hypervisor"]["concurrency"] = concurrency
    path = Path(tmp) / f"spec-{users}-{concurrency}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _remove_all(spec_path: str, lab: Lab) -> None:
    """Delete the run's VMs (waiting for their lab hosts to go) and their host keys, so
    that the next run is a first provisioning too: it makes its keys."""
    from sizing.inventory import build_inventory
    from tasks import host_keys
    from tasks.spec import read_spec
    from tests.labkit import delete_all_vms

    spec = read_spec(spec_path)
    delete_all_vms(lab, spec)
    for vm in build_inventory(spec).vms:
        host_keys.delete_prefect(spec, vm)


def main() -> None:
    from flows.provision import provision_vms
    from tests.labkit import lab_with_prefect

    with tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp:
        specs = {concurrency: _spec(tmp, 10000, concurrency) for concurrency in (1, 8)}
        with lab_with_prefect(specs[8], vcsim_port=18995,
                              vcsim_args=("-method-delay", "CloneVM_Task:500"),
                              prefect_on_postgres=True) as lab:
            # Untimed: a first run in a process pays for imports and clients made once
            # (about 0.8 s here); both timed runs start warm, so neither carries it.
            warm_up = _spec(tmp, 100, 8)
            provision_vms(spec_path=warm_up)
            _remove_all(warm_up, lab)
            walls, calls = {}, {}
            for concurrency in (1, 8):
                _settle_filesystem()
                started, cpu = time.monotonic(), machine_cpu_seconds()
                state = provision_vms(spec_path=specs[concurrency], return_state=True)
                calls[concurrency] = time.monotonic() - started
                cpu = machine_cpu_seconds() - cpu
                walls[concurrency], timeline = _run_seconds(
                    state.state_details.flow_run_id, concurrency)
                vms = state.result().created
                print(f"BENCH provision-vsphere-stages concurrency={concurrency} "
                      + _stage_means() + f" {timeline} machine_cpu_s={cpu:.2f}", flush=True)
                _remove_all(specs[concurrency], lab)
        serial, wall = walls[1], walls[8]
        bound = math.ceil(vms / 8) * serial / vms
        print(f"BENCH provision-vsphere vms={vms} serial_wall_s={serial:.2f} "
              f"wall_s={wall:.2f} bound_s={bound:.2f} ratio={wall / bound:.2f} "
              f"speedup={serial / wall:.2f} serial_call_s={calls[1]:.2f} "
              f"call_s={calls[8]:.2f}", flush=True)
