"""Loading the Prefect blocks a phase needs (credentials of the outside systems)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

from prefect.runtime import flow_run


class MissingBlock(RuntimeError):
    """A block the spec names does not exist in this Prefect (permanent: create it)."""

T = TypeVar("T")

_PER_RUN: dict[tuple[str, ...], Any] = {}
_PER_RUN_LOCK = threading.Lock()
_MAKING: dict[tuple[str, ...], threading.Lock] = {}


def once_per_flow_run(what: tuple[str, ...], make: Callable[[], T]) -> T:
    """``make()`` once per flow run and process, for what all of a run's tasks share (its
    blocks, ids on the Prefect server); tasks that ask together wait for one call rather
    than each making its own. Outside a flow run nothing says when the answer may
    change: it is made at every call."""
    run_id = flow_run.get_id()
    if run_id is None:
        return make()
    key = (str(run_id), *what)
    with _PER_RUN_LOCK:
        if key in _PER_RUN:
            return cast(T, _PER_RUN[key])
        making = _MAKING.setdefault(key, threading.Lock())
    with making:
        with _PER_RUN_LOCK:
            if key in _PER_RUN:
                return cast(T, _PER_RUN[key])
        value = make()
        with _PER_RUN_LOCK:
            if len(_PER_RUN) > 64:  # runs of a long-lived process: keep only recent ones
                _PER_RUN.clear()
                _MAKING.clear()
            _PER_RUN[key] = value
            _MAKING.pop(key, None)
    return value


def load_block(kind: Any, name: str) -> Any:
    """Load a block once per flow run and process: a phase's tasks all use the same
    credentials, and a load per task is an API round trip per VM for nothing."""
    return once_per_flow_run(("block", kind.__name__, name), lambda: _load(kind, name))


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
