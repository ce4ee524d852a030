"""Loading blocks once per flow run, and how structured secrets are stored."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tasks import blocks
from tasks.blocks import MissingBlock, load_block, secret_mapping, secret_text


class CountedBlock:
    """A block type whose loads are counted and take a while, as an API round trip does."""

    loads = 0
    lock = threading.Lock()

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def load(cls, name: str) -> CountedBlock:
        with cls.lock:
            cls.loads += 1
        time.sleep(0.05)
        if name == "missing":
            raise ValueError("Unable to find block document named missing")
        return cls(name)


@pytest.fixture()
def in_a_flow_run(monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = uuid.uuid4()
    monkeypatch.setattr(blocks.flow_run, "get_id", lambda: run_id)
    CountedBlock.loads = 0


def test_tasks_starting_together_share_one_load(in_a_flow_run: None) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        loaded = list(pool.map(lambda _: load_block(CountedBlock, "lab-ssh"), range(8)))
    assert CountedBlock.loads == 1
    assert all(block is loaded[0] for block in loaded)
    assert load_block(CountedBlock, "lab-ssh") is loaded[0]
    assert CountedBlock.loads == 1


def test_a_missing_block_names_itself_and_is_not_cached(in_a_flow_run: None) -> None:
    for _ in range(2):
        with pytest.raises(MissingBlock, match="'missing' \\(CountedBlock\\) cannot be loaded"):
            load_block(CountedBlock, "missing")
    assert CountedBlock.loads == 2


def test_outside_a_flow_run_every_call_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocks.flow_run, "get_id", lambda: None)
    CountedBlock.loads = 0
    assert load_block(CountedBlock, "a") is not load_block(CountedBlock, "a")
    assert CountedBlock.loads == 2


def test_a_mapping_is_stored_as_one_json_text_and_read_back() -> None:
    pair: dict[str, Any] = {"kind": "ed25519", "private": "-----BEGIN", "public": "ssh-ed25519"}
    text = secret_text(pair)
    assert isinstance(text, str)
    assert secret_mapping(text) == pair
    assert secret_mapping(pair) == pair  # as earlier versions stored it
    assert secret_text("hvs.token") == "hvs.token"


def test_a_secret_that_is_not_a_mapping_is_refused_without_its_value() -> None:
    with pytest.raises(ValueError) as raised:
        secret_mapping('["s3cr3t-share"]')
    assert "list" in str(raised.value) and "s3cr3t" not in str(raised.value)
