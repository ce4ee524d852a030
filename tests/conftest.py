"""Shared fixtures: the project's specs and a way to build variants of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sizing.spec import PlatformSpec
from tasks.spec import read_spec

ROOT = Path(__file__).resolve().parent.parent
LAB_SPEC = ROOT / "deployments" / "lab" / "platform.yaml"
EXAMPLES = sorted((ROOT / "deployments" / "example").glob("*.yaml"))


@pytest.fixture(scope="session")
def lab_spec() -> PlatformSpec:
    return read_spec(LAB_SPEC)
