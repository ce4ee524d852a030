"""Shared fixtures: the project's specs and a way to build variants of them."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sizing.spec import PlatformSpec
from tasks.spec import read_spec

# The Prefect test servers (prefect_test_harness) inherit this: no telemetry from tests
# (there is no route out, and each failed attempt logged an error and held SQLite's lock).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Tests call a phase's tasks directly, outside any flow run: their log lines go to pytest's
# capture; Prefect has no flow run to file them under and warned at every one.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

ROOT = Path(__file__).resolve().parent.parent
LAB_SPEC = ROOT / "deployments" / "lab" / "platform.yaml"
EXAMPLES = sorted((ROOT / "deployments" / "example").glob("*.yaml"))


@pytest.fixture(scope="session")
def lab_spec() -> PlatformSpec:
    return read_spec(LAB_SPEC)


@contextmanager
def exclusive_lab() -> Iterator[None]:
    """Hold the network namespace's one lab slot: lab addresses and bridge names are global
    to it, so two test sessions (or a test and a benchmark) take turns instead of colliding.
    `make test` and `make bench` run in a namespace of their own (scripts/own-namespaces.sh)
    and never meet the lab of `make lab`; a bare `pytest` shares the machine's."""
    with open("/run/platform-lab-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run(["ip", "link", "show", "plab-lan"], capture_output=True,
                          check=False).returncode == 0:
            pytest.fail("a lab is already up in this network namespace (bridge plab-lan): "
                        "run the tests with `make test`, which gives them a network of their "
                        "own, or bring that lab down with `make down`")
        yield
