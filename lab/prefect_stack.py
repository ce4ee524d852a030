"""The lab's Prefect: a local server (SQLite, loopback), a process work pool and worker.

Everything lives under the lab's state directory, outside the repository, so
`platformctl lab down` removes it whole. Processes are started in their own sessions and
stopped by process group, so no worker's flow-run subprocess outlives `down`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

PROJECT_DIR = Path(__file__).resolve().parent.parent
POOL = "platform"


@dataclass(frozen=True)
class PrefectStack:
    """Where the lab's Prefect lives; derived from the environment, so every command agrees."""

    state_dir: Path
    port: int

    @classmethod
    def from_env(cls) -> PrefectStack:
        state = Path(os.environ.get("PLATFORM_LAB_STATE", "/var/lib/platform-lab"))
        return cls(state_dir=state, port=int(os.environ.get("PLATFORM_LAB_PREFECT_PORT", "4200")))

    @property
    def home(self) -> Path:
        return self.state_dir / "prefect"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment of every Prefect command of the lab (server, worker, CLI)."""
        env = dict(os.environ)
        env.update({
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_UI_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_CLI_PROMPT": "false",
            "PLATFORM_PROJECT_DIR": str(PROJECT_DIR),
        })
        return env

    def _pidfile(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def _running(self, name: str) -> int | None:
        try:
            pid = int(self._pidfile(name).read_text())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _spawn(self, name: str, args: list[str]) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = (self.state_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(args, env=self.env(), cwd=PROJECT_DIR, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        self._pidfile(name).write_text(str(process.pid))
        return process.pid

    def _prefect(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([_prefect_exe(), *args], env=self.env(), cwd=PROJECT_DIR,
                              capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")
        return done

    def up(self, timeout: float = 90.0) -> list[str]:
        """Start what is not running; return what was done (empty when all was up)."""
        done: list[str] = []
        if not self.healthy():
            if self._running("server") is None:
                self._spawn("server", [_prefect_exe(), "server", "start"])
                done.append(f"started Prefect server on {self.ui_url}")
            deadline = time.monotonic() + timeout
            while not self.healthy():
                if time.monotonic() > deadline or self._running("server") is None:
                    log = (self.state_dir / "server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"Prefect server did not become healthy on "
                                       f"{self.api_url} within {timeout:.0f} s; its log "
                                       f"ends with:\n{log}")
                time.sleep(0.5)
        if self._prefect("work-pool", "inspect", POOL, check=False).returncode != 0:
            self._prefect("work-pool", "create", POOL, "--type", "process")
            done.append(f"created process work pool {POOL}")
        if self._running("worker") is None:
            self._spawn("worker", [_prefect_exe(), "worker", "start", "--pool", POOL,
                                   "--type", "process"])
            done.append(f"started a worker on pool {POOL}")
        self._prefect("--no-prompt", "deploy", "--all")
        done.append("applied the deployments of prefect.yaml")
        return done

    def down(self) -> list[str]:
        done = []
        for name in ("worker", "server"):
            pid = self._running(name)
            if pid is not None:
                _stop_group(pid)
                done.append(f"stopped Prefect {name} (pid {pid})")
            self._pidfile(name).unlink(missing_ok=True)
        return done

    def run_deployment(self, name: str, parameters: dict[str, str]) -> int:
        """`prefect deployment run NAME --watch`: its output streams to ours; its exit code."""
        args = [_prefect_exe(), "deployment", "run", name, "--watch"]
        for key, value in parameters.items():
            args += ["--param", f"{key}={value}"]
        return subprocess.run(args, env=self.env(), cwd=PROJECT_DIR, check=False).returncode


def _prefect_exe() -> str:
    return str(Path(sys.executable).parent / "prefect")


def _stop_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
