"""The database of the lab's Prefect server: a private PostgreSQL cluster, as in production.

Prefect's default SQLite database takes one write at a time. When two writes meet, the
server answers 503 ("database is locked") and Prefect's client waits two seconds before it
tries again: with eight VMs provisioned at once, a third of the host-key secrets written in
phase 1 paid that wait. A Prefect server that runs a platform runs on PostgreSQL, and so
does the lab's.

The cluster lives under the lab's state directory (removed by `platformctl lab down`), runs
as the `postgres` system user that Debian's package creates, and listens only on a Unix
socket in a directory of its own (mode 0700): no TCP port, no password, no one but root and
`postgres` can connect.
"""

from __future__ import annotations

import glob
import os
import pwd
import stat
import subprocess
from pathlib import Path

from lab.processes import Daemon

DATABASE = "prefect"
OS_USER = "postgres"


class PostgresCluster:
    """One PostgreSQL cluster holding the `prefect` database."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.socket_dir = directory / "run"
        self.daemon = Daemon(directory.parent, "postgres")

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Prefect's server connects with (asyncpg, through the socket)."""
        return f"postgresql+asyncpg://{OS_USER}@/{DATABASE}?host={self.socket_dir}"

    def up(self, timeout: float = 60.0) -> list[str]:
        """Create the cluster if missing, start it if stopped, make the database; idempotent."""
        done: list[str] = []
        bin_dir = _bin_dir()
        account = _account()
        if not (self.data / "PG_VERSION").exists():
            self._initdb(bin_dir, account)
            done.append(f"created a PostgreSQL cluster for Prefect in {self.data}")
        if self.daemon.pid() is None:
            self.daemon.start(
                [str(bin_dir / "postgres"), "-D", str(self.data), "-k", str(self.socket_dir),
                 "-c", "listen_addresses=",
                 # The lab rebuilds its state at each `lab up`; a crash may lose the last
                 # commits but never corrupts (SQLite's WAL mode with synchronous=NORMAL,
                 # Prefect's default, gives the same).
                 "-c", "synchronous_commit=off"],
                env=_env(), cwd=self.directory, user=account)
            done.append(f"started PostgreSQL (socket in {self.socket_dir})")
        self.daemon.wait_until(lambda: self._ready(bin_dir), timeout, "accepting connections")
        if not self._has_database(bin_dir):
            self._psql(bin_dir, "postgres", f"CREATE DATABASE {DATABASE}")
            done.append(f"created database {DATABASE}")
        return done

    def down(self) -> list[str]:
        pid = self.daemon.stop(grace=30)
        return [f"stopped PostgreSQL (pid {pid})"] if pid is not None else []

    def _initdb(self, bin_dir: Path, account: pwd.struct_passwd) -> None:
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        _check_reachable(self.directory.parent, account)
        for path in (self.directory, self.data, self.socket_dir):
            path.mkdir(mode=0o700, exist_ok=True)
            os.chown(path, account.pw_uid, account.pw_gid)
        done = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(self.data), "--auth=trust", "-U", OS_USER,
             "--encoding=UTF8", "--locale=C.UTF-8"],
            env=_env(), cwd=self.directory, user=account.pw_uid, group=account.pw_gid,
            extra_groups=[], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"initdb of the lab's PostgreSQL in {self.data} failed "
                               f"({done.returncode}):\n{done.stdout}{done.stderr}")

    def _ready(self, bin_dir: Path) -> bool:
        return subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", str(self.socket_dir),
                               "-d", "postgres", "-U", OS_USER],
                              env=_env(), check=False).returncode == 0

    def _has_database(self, bin_dir: Path) -> bool:
        rows = self._psql(bin_dir, "postgres",
                          f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
        return rows.strip() == "1"

    def _psql(self, bin_dir: Path, database: str, sql: str) -> str:
        done = subprocess.run([str(bin_dir / "psql"), "-X", "-q", "-t", "-A",
                               "-h", str(self.socket_dir), "-U", OS_USER, "-d", database,
                               "-v", "ON_ERROR_STOP=1", "-c", sql],
                              env=_env(), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the lab's PostgreSQL refused `{sql}` ({done.returncode}): "
                               f"{done.stderr.strip()}")
        return done.stdout


def _bin_dir() -> Path:
    """The newest PostgreSQL server installed the Debian way (package postgresql)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda path: int(Path(path).parent.parent.name))
    if not found:
        raise RuntimeError("the lab's Prefect needs PostgreSQL and none is installed under "
                           "/usr/lib/postgresql; `make setup` installs the Debian package "
                           "postgresql (lab/apt-packages.txt)")
    return Path(found[-1]).parent


def _account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(OS_USER)
    except KeyError:
        raise RuntimeError(f"no system user {OS_USER!r}: PostgreSQL refuses to run as root "
                           "and the Debian package postgresql creates that user") from None


def _check_reachable(directory: Path, account: pwd.struct_passwd) -> None:
    """PostgreSQL runs as `postgres`: every directory above its own must let others in."""
    for path in [directory, *directory.parents]:
        info = path.stat()
        if not info.st_mode & stat.S_IXOTH and info.st_uid != account.pw_uid:
            raise RuntimeError(f"the lab's PostgreSQL runs as {OS_USER!r}, which cannot enter "
                               f"{path} (mode {stat.filemode(info.st_mode)}); give it o+x or "
                               "put the lab state elsewhere (PLATFORM_LAB_STATE)")


def _env() -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PGTZ": "UTC"}
