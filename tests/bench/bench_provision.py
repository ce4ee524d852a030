"""Phase 1's concurrency: the tier-10000 inventory on the lab's vcsim with every clone
taking 500 ms, once at concurrency 1 and once at 8.

`BENCH provision-vsphere vms=… serial_wall_s=… wall_s=… bound_s=… ratio=… speedup=…
serial_call_s=… call_s=…`: bound_s = ceil(vms / 8) * serial_wall_s / vms (perfect use of 8
slots); ratio = wall_s / bound_s (target <= 1.25); speedup = serial_wall_s / wall_s (target
>= 6). Before it, one `BENCH provision-vsphere-stages concurrency=… <stage>_s=…
machine_cpu_s=…` line per run: a VM task's mean seconds in each stage, and the CPU seconds
the whole machine was busy during the run. Guests boot as lab hosts, so each VM's time
includes powering on and waiting for its reported IP. Each run is a first provisioning: it
makes every VM's SSH host key pair and stores it in Prefect (the keys of the first run are
deleted with its VMs). Prefect's server runs on PostgreSQL, as `make lab` and production
run it: on SQLite, writes that meet wait 2 s each (lab/postgres.py).

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

import yaml

from tests.bench.machine import machine_cpu_seconds
from tests.conftest import LAB_SPEC

SETTLE_S = 65.0


def _stage_means() -> str:
    """Mean seconds per stage over the last phase-1 table (where the time goes)."""
    import asyncio
    import json
    from collections import defaultdict

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def latest() -> list[dict[str, object]]:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["phase-1-provision-vms"])),
                sort=ArtifactSort.CREATED_DESC, limit=1)
            rows: list[dict[str, object]] = json.loads(str(found[0].data))
            return rows

    totals: dict[str, list[float]] = defaultdict(list)
    for row in asyncio.run(latest()):
        for part in str(row["stages"]).split(", "):
            name, _, secs = part.rpartition(" ")
            totals[name.replace(" ", "_")].append(float(secs))
        totals["task"].append(float(str(row["seconds"])))
    return " ".join(f"{name}_s={sum(v) / len(v):.3f}" for name, v in totals.items())


def _run_seconds(flow_run_id: object) -> float:
    """The flow run's start-to-end time as the Prefect server recorded it."""
    import asyncio

    from prefect import get_client

    async def read() -> float:
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
            assert run.start_time is not None and run.end_time is not None
            return (run.end_time - run.start_time).total_seconds()

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


def main() -> None:
    from flows.provision import provision_vms
    from sizing.inventory import build_inventory
    from tasks import host_keys
    from tasks.spec import read_spec
    from tasks.vms import open_hypervisor
    from tests.labkit import lab_with_prefect

    with tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp:
        specs = {}
        for concurrency in (1, 8):
            data = yaml.safe_load(LAB_SPEC.read_text())
            data["users"] = 10000
            data["hypervisor"]["concurrency"] = concurrency
            path = Path(tmp) / f"spec-{concurrency}.yaml"
            path.write_text(yaml.safe_dump(data))
            specs[concurrency] = str(path)
        with lab_with_prefect(specs[8], vcsim_port=18995,
                              vcsim_args=("-method-delay", "CloneVM_Task:500"),
                              prefect_on_postgres=True) as lab:
            walls, calls = {}, {}
            for concurrency in (1, 8):
                _settle_filesystem()
                started, cpu = time.monotonic(), machine_cpu_seconds()
                state = provision_vms(spec_path=specs[concurrency], return_state=True)
                calls[concurrency] = time.monotonic() - started
                cpu = machine_cpu_seconds() - cpu
                walls[concurrency] = _run_seconds(state.state_details.flow_run_id)
                vms = state.result().created
                print(f"BENCH provision-vsphere-stages concurrency={concurrency} "
                      + _stage_means() + f" machine_cpu_s={cpu:.2f}", flush=True)
                spec = read_spec(specs[concurrency])
                session = open_hypervisor(spec)
                try:
                    for vm in session.list_vms():
                        session.delete_vm(vm.name)
                finally:
                    session.close()
                # Each run a first provisioning: the next one makes its host keys too.
                for vm in build_inventory(spec).vms:
                    host_keys.delete_prefect(spec, vm)
                deadline = time.monotonic() + 30
                while lab.hosts.names() and time.monotonic() < deadline:
                    time.sleep(0.2)
        serial, wall = walls[1], walls[8]
        bound = math.ceil(vms / 8) * serial / vms
        print(f"BENCH provision-vsphere vms={vms} serial_wall_s={serial:.2f} "
              f"wall_s={wall:.2f} bound_s={bound:.2f} ratio={wall / bound:.2f} "
              f"speedup={serial / wall:.2f} serial_call_s={calls[1]:.2f} "
              f"call_s={calls[8]:.2f}", flush=True)
