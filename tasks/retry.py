"""Which failures a task retries: transient faults only; a permanent one fails at once."""

from __future__ import annotations

import http.client
import socket
from typing import Any

from blocks.hypervisor import TransientHypervisorError

TRANSIENT: tuple[type[BaseException], ...] = (
    TransientHypervisorError, ConnectionError, TimeoutError, socket.timeout,
    http.client.HTTPException,
)


def is_transient(error: BaseException | None) -> bool:
    return isinstance(error, TRANSIENT)


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry connection resets, time-outs, 5xx, busy objects."""
    try:
        state.result()
    except BaseException as error:  # the task's own exception, re-raised by result()
        return is_transient(error)
    return False
