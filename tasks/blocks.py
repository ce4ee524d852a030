"""Loading the Prefect blocks a phase needs (credentials of the outside systems)."""

from __future__ import annotations

import json
import threading
from typing import Any

from prefect.runtime import flow_run


class MissingBlock(RuntimeError):
    """A block the spec names does not exist in this Prefect (permanent: create it)."""

_BLOCKS: dict[tuple[str, str, str], Any] = {}
_BLOCKS_LOCK = threading.Lock()
_LOADING: dict[tuple[str, str, str], threading.Lock] = {}


def load_block(kind: Any, name: str) -> Any:
    """Load a block once per flow run and process: a phase's tasks all use the same
    credentials, and a load per task is an API round trip per VM for nothing. Tasks that
    start together wait for one load rather than each making its own."""
    run_id = flow_run.get_id()
    if run_id is None:  # outside a flow run nothing says when the block may change
        return _load(kind, name)
    key = (str(run_id), kind.__name__, name)
    with _BLOCKS_LOCK:
        if key in _BLOCKS:
            return _BLOCKS[key]
        loading = _LOADING.setdefault(key, threading.Lock())
    with loading:
        with _BLOCKS_LOCK:
            if key in _BLOCKS:
                return _BLOCKS[key]
        block = _load(kind, name)
        with _BLOCKS_LOCK:
            if len(_BLOCKS) > 64:  # runs of a long-lived process: keep only recent ones
                _BLOCKS.clear()
                _LOADING.clear()
            _BLOCKS[key] = block
            _LOADING.pop(key, None)
    return block


def _load(kind: Any, name: str) -> Any:
    try:
        return kind.load(name)
    except ValueError as error:
        raise MissingBlock(f"Prefect block {name!r} ({kind.__name__}) cannot be loaded: "
                           f"{error}; create it first (see the README)") from None


def secret_text(value: str | dict[str, Any]) -> str:
    """What a Secret block stores: a text, and a mapping as its JSON text. Prefect 3.9
    masks a Secret whose value is a text (`********` in the UI and to any API reader
    without `include_secrets`), but shows one whose value is a mapping in the clear."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def secret_mapping(value: object) -> dict[str, Any]:
    """A mapping stored with `secret_text` (or, by earlier versions, as a mapping)."""
    data = json.loads(value) if isinstance(value, str) else value
    if not isinstance(data, dict):
        raise ValueError(f"a Secret block meant to hold a mapping holds a {type(data).__name__}")
    return data
