"""What the whole machine did during a benchmark run (shared by the benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (every process: the tool, the lab hosts'
    sshd, sudo, shells and Python, Prefect's server, vcsim), from /proc/stat. Over a run:
    the same work costing more CPU in one run than in another is the machine being slower
    then."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
