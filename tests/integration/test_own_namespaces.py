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


def test_the_command_has_only_a_loopback_its_own_sys_and_a_fresh_run() -> None:
    done = _run("sh", "-c", "readlink /proc/self/ns/net; ip -o link show; ls /sys/class/net; "
                "mountpoint -q /sys/fs/cgroup && echo cgroups || echo none; "
                "stat -f -c %T /run; stat -L -c %i /run/platform-machine-netns; ls -A /run")
    assert done.returncode == 0, done.stderr
    namespace, link, sys_net, cgroups, mount, machine, *run = done.stdout.splitlines()
    assert namespace != os.readlink("/proc/self/ns/net")
    assert link.split(":")[1].strip() == "lo"  # `ip -o`: one line per link, and only one
    assert "UP" in link.split(">")[0]
    assert sys_net == "lo"  # the lab looks for its bridges there
    assert cgroups == ("cgroups" if os.path.ismount("/sys/fs/cgroup") else "none")
    assert mount == "tmpfs"
    made = {"lock", "netns", "platform-machine-netns", "sshd"}
    assert made <= set(run) <= made | {"mount"}  # mount(8) keeps its utab in /run/mount
    # the lab reads the sysctls only the machine's namespace has from there
    assert int(machine) == os.stat("/proc/self/ns/net").st_ino


def test_a_run_inside_leaves_the_machine_untouched() -> None:
    before = sorted(p.name for p in Path("/run").iterdir())
    done = _run("sh", "-c", "ip link add plab-probe type bridge && touch /run/probe")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in Path("/run").iterdir()) == before
    assert subprocess.run(["ip", "link", "show", "plab-probe"], capture_output=True,
                          check=False).returncode != 0


@pytest.mark.parametrize("inherited", ["1", str(os.getpid())])
def test_an_inherited_marker_does_not_skip_the_namespaces(inherited: str) -> None:
    # The script once re-ran itself behind this marker; nothing in the environment may
    # make it run a command in the machine's namespaces.
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
