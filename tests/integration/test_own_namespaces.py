"""scripts/own-namespaces.sh, which `make test` and `make bench` run under: the command
gets a network and a /run of its own, its exit code comes back unchanged, and the
machine's /run is never mounted over."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "own-namespaces.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces need root")


def _run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *command], capture_output=True, text=True, timeout=30,
                          check=False, env={**os.environ, **(env or {})})


def test_the_command_has_only_a_loopback_and_a_fresh_run() -> None:
    done = _run("sh", "-c", "readlink /proc/self/ns/net; ip -o link show; "
                "stat -f -c %T /run; ls -A /run")
    assert done.returncode == 0, done.stderr
    namespace, link, mount, *run = done.stdout.splitlines()
    assert namespace != os.readlink("/proc/self/ns/net")
    assert link.split(":")[1].strip() == "lo"  # `ip -o`: one line per link, and only one
    assert "UP" in link.split(">")[0]
    assert mount == "tmpfs"
    assert run == ["lock", "netns", "sshd"]


def test_a_run_inside_leaves_the_machine_untouched() -> None:
    before = sorted(p.name for p in Path("/run").iterdir())
    done = _run("sh", "-c", "ip link add plab-probe type bridge && touch /run/probe")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in Path("/run").iterdir()) == before
    assert subprocess.run(["ip", "link", "show", "plab-probe"], capture_output=True,
                          check=False).returncode != 0


@pytest.mark.parametrize("inherited", ["1", str(os.getpid())])
def test_an_inherited_marker_does_not_skip_the_namespaces(inherited: str) -> None:
    done = _run("readlink", "/proc/self/ns/net", env={"PLATFORM_OWN_NAMESPACES": inherited})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() != os.readlink("/proc/self/ns/net")


def test_the_exit_code_comes_back_unchanged() -> None:
    assert _run("sh", "-c", "exit 5").returncode == 5  # pytest's "no tests collected"
    assert _run("true").returncode == 0


def test_no_command_is_a_usage_error() -> None:
    done = _run()
    assert done.returncode == 2
    assert "usage:" in done.stderr
