"""Fault injection for the Nutanix stand-in: the failures a busy Prism Central produces.

Tests use it to show that the project's client retries what is transient and reports the
rest. Faults apply to requests in arrival order, counting only those whose "METHOD /path"
matches `path_pattern`. The counters are consumed one after the other: the first
`fail_first` matching requests get `fail_status`, the next `reset_first` lose their
connection before being processed, the next `drop_first` are processed and then lose their
connection before the response (the change happened, the client cannot know).
`delay_seconds` is added before every matching request.

Note that the SDK's own urllib3 retry answers 408/429/503/504 by retrying (up to
`Configuration.max_retry_attempts`, with `backoff_factor`), and that its version check
(`OPTIONS .../unversioned/info`) swallows errors: a fault can land there unseen unless
`path_pattern` excludes it.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    """What to break; see the module docstring for the order the counters are used in."""

    fail_first: int = 0
    fail_status: int = 503
    reset_first: int = 0
    drop_first: int = 0
    delay_seconds: float = 0.0
    path_pattern: str | None = None


@dataclass(frozen=True)
class Decision:
    """What the fault plan does to one request: wait, then act ("fail", "reset", "drop")."""

    delay: float = 0.0
    action: str | None = None
    status: int = 0


class FaultPlan:
    """The live counters of a `Faults`, shared by the server's requests."""

    def __init__(self, faults: Faults | None = None) -> None:
        self._lock = threading.Lock()
        self.injected: list[tuple[str, str]] = []  # (action, "METHOD /path") for tests
        self.set(faults or Faults())

    def set(self, faults: Faults) -> None:
        """Replace the plan; counters start again from the new values."""
        with self._lock:
            self.faults = faults
            self._pattern = re.compile(faults.path_pattern) if faults.path_pattern else None
            self._left = {"fail": faults.fail_first, "reset": faults.reset_first,
                          "drop": faults.drop_first}

    def decide(self, method: str, path: str) -> Decision:
        """Consume the counters for one request and say what to do with it."""
        target = f"{method} {path}"
        with self._lock:
            if self._pattern and not self._pattern.search(target):
                return Decision()
            delay = self.faults.delay_seconds
            for action in ("fail", "reset", "drop"):
                if self._left[action] > 0:
                    self._left[action] -= 1
                    self.injected.append((action, target))
                    return Decision(delay, action, self.faults.fail_status)
            return Decision(delay)
