"""The lab's PostgreSQL: where it listens, and a clear refusal of a state directory its
system user cannot reach, before anything is created."""

from __future__ import annotations

import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from lab.postgres import PostgresCluster, _check_reachable


def test_a_directory_the_database_user_cannot_enter_is_named() -> None:
    root = Path(tempfile.mkdtemp())  # under /tmp, which everyone may enter
    try:
        closed = root / "closed"
        closed.mkdir()
        closed.chmod(0o700)
        someone_else = pwd.getpwnam("nobody")
        with pytest.raises(RuntimeError, match=f"cannot enter {closed} .*PLATFORM_LAB_STATE"):
            _check_reachable(closed, someone_else)
        closed.chmod(0o711)
        root.chmod(0o711)
        _check_reachable(closed, someone_else)
    finally:
        shutil.rmtree(root)


def test_it_listens_only_on_a_socket_in_its_own_directory(tmp_path: Path) -> None:
    cluster = PostgresCluster(tmp_path / "postgres")
    assert cluster.url == ("postgresql+asyncpg://postgres@/prefect"
                           f"?host={tmp_path}/postgres/run")
    assert cluster.daemon.pidfile == tmp_path / "postgres.pid"
