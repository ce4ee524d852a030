"""The lab's background processes: started in their own session, tracked by pid file,
stopped by process group so nothing they spawned outlives `platformctl lab down`."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class Daemon:
    """One named background process of the lab, its pid file and its log."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.state_dir = state_dir
        self.name = name
        self.pidfile = state_dir / f"{name}.pid"
        self.log = state_dir / f"{name}.log"

    def pid(self) -> int | None:
        """The pid if the process is alive (a zombie or a stale pid file counts as dead)."""
        try:
            pid = int(self.pidfile.read_text())
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ValueError):
            return None
        return None if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid

    def start(self, args: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None, user: pwd.struct_passwd | None = None) -> int:
        """Start it in a session of its own, as ``user`` if given (else as we run)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            process = subprocess.Popen(
                args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                user=None if user is None else user.pw_uid,
                group=None if user is None else user.pw_gid,
                extra_groups=None if user is None else [])
        self.pidfile.write_text(str(process.pid))
        return process.pid

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait for ``ready``; on time-out or death, raise with the end of the log."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.pid() is None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                state = "exited" if self.pid() is None else f"not {what} after {timeout:.0f} s"
                raise RuntimeError(f"lab {self.name} {state}; {self.log} ends with:\n{tail}")
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; the pid or None."""
        pid = self.pid()
        self.pidfile.unlink(missing_ok=True)
        if pid is None:
            return None
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.1)
        if _group_alive(pid):
            _signal_group(pid, signal.SIGKILL)
        return pid


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _group_alive(pid: int) -> bool:
    # A leader we started ourselves stays a zombie, and its group "alive", until reaped.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True
