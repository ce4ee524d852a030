"""The lab's Prefect: a local server (loopback, on PostgreSQL as in production; see
lab/postgres.py), a process work pool and worker.

Everything lives under the lab's state directory, outside the repository, so
`platformctl lab down` removes it whole. Processes are started in their own sessions and
stopped by process group, so no worker's flow-run subprocess outlives `down`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from lab.postgres import PostgresCluster
from lab.processes import Daemon

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
    def database(self) -> PostgresCluster:
        return PostgresCluster(self.state_dir / "postgres")

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
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.database.url,
            # Connections beyond the pool are closed after use, and each new one forks a
            # PostgreSQL backend: at 8 VMs at once that churn cost 1.6 s of CPU in 12 s.
            "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
            # Task-run states are written 50 at a time, or each second, not one per
            # transaction: one at a time, recording 8 tasks' states took a third of the
            # server's CPU. The UI shows a task's state up to a second later.
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "50",
            "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
            "PREFECT_UI_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_CLI_PROMPT": "false",
            "PLATFORM_PROJECT_DIR": str(PROJECT_DIR),
        })
        return env

    def daemon(self, name: str) -> Daemon:
        return Daemon(self.state_dir, f"prefect-{name}")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _prefect(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([_prefect_exe(), *args], env=self.env(), cwd=PROJECT_DIR,
                              capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")
        return done

    def serve(self, timeout: float = 90.0) -> list[str]:
        """The database and the server, started if they are not running; what was done."""
        done = self.database.up()
        server = self.daemon("server")
        if not self.healthy():
            if server.pid() is None:
                server.start([_prefect_exe(), "server", "start"], self.env(), PROJECT_DIR)
                done.append(f"started Prefect server on {self.ui_url}")
            server.wait_until(self.healthy, timeout, f"healthy on {self.api_url}")
        return done

    def up(self, timeout: float = 90.0) -> list[str]:
        """Start what is not running; return what was done (empty when all was up)."""
        done = self.serve(timeout)
        if self._prefect("work-pool", "inspect", POOL, check=False).returncode != 0:
            self._prefect("work-pool", "create", POOL, "--type", "process")
            done.append(f"created process work pool {POOL}")
        worker = self.daemon("worker")
        if worker.pid() is None:
            worker.start([_prefect_exe(), "worker", "start", "--pool", POOL, "--type",
                          "process"], self.env(), PROJECT_DIR)
            done.append(f"started a worker on pool {POOL}")
        stamp = self.state_dir / "deployed.sha256"
        digest = hashlib.sha256((PROJECT_DIR / "prefect.yaml").read_bytes()).hexdigest()
        if done or not stamp.exists() or stamp.read_text() != digest:
            self._prefect("--no-prompt", "deploy", "--all")
            stamp.write_text(digest)
            done.append("deployments of prefect.yaml applied")
        return done

    def down(self) -> list[str]:
        done = []
        for name in ("worker", "server"):
            pid = self.daemon(name).stop()
            if pid is not None:
                done.append(f"stopped Prefect {name} (pid {pid})")
        return done + self.database.down()

    def run_deployment(self, name: str, parameters: dict[str, str]) -> int:
        """`prefect deployment run NAME --watch`: its output streams to ours; its exit code."""
        args = [_prefect_exe(), "deployment", "run", name, "--watch"]
        for key, value in parameters.items():
            args += ["--param", f"{key}={value}"]
        return subprocess.run(args, env=self.env(), cwd=PROJECT_DIR, check=False).returncode

    def last_run(self, deployment: str) -> RunOutcome | None:
        """The latest flow run of `deployment` ("flow/name"), or None if it has none: what
        `lab run` prints after a failure, so the cause shows without opening the UI."""
        flow, _, name = deployment.partition("/")
        with httpx.Client(base_url=self.api_url, timeout=10) as client:
            found = client.get(f"/deployments/name/{flow}/{name}")
            found.raise_for_status()
            runs = client.post("/flow_runs/filter", json={
                "deployments": {"id": {"any_": [found.json()["id"]]}},
                "sort": "EXPECTED_START_TIME_DESC", "limit": 1})
            runs.raise_for_status()
        latest = runs.json()
        if not latest:
            return None
        run = latest[0]
        state = run.get("state") or {}
        return RunOutcome(url=f"{self.ui_url}/runs/flow-run/{run['id']}",
                          state=state.get("name", "unknown"),
                          message=state.get("message") or "")


@dataclass(frozen=True)
class RunOutcome:
    """How a flow run ended, as the UI shows it."""

    url: str
    state: str
    message: str


def _prefect_exe() -> str:
    return str(Path(sys.executable).parent / "prefect")
