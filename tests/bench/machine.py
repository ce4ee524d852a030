"""What a benchmark run did, as the machine and Prefect saw it (shared by the benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (every process: the tool, the lab hosts'
    sshd, sudo, shells and Python, Prefect's server, vcsim), from /proc/stat. Over a run:
    the same work costing more CPU in one run than in another is the machine being slower
    then."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def phase_table(key: str) -> list[dict[str, Any]]:
    """The last table artifact with this key (a phase's rows: one per VM)."""
    import asyncio
    import json

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def latest() -> list[dict[str, Any]]:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC, limit=1)
            rows: list[dict[str, Any]] = json.loads(str(found[0].data))
            return rows

    return asyncio.run(latest())
