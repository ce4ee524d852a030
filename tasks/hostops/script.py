"""The apply script: every planned step of a host in one POSIX shell script, and its report.

Steps run in order, each in a command substitution that captures its output. The first
failing step stops the script: it prints `hostops<TAB>fail<TAB>op<TAB>step<TAB>rc<TAB>
<base64 output>`, runs that operation's cleanup (temp file removed, in-place candidate
rolled back), and exits. Each completed operation prints `hostops<TAB>done<TAB>op`; the
end prints `hostops<TAB>end-apply`. The whole script is one `{ ... }` group, so the shell
reads all of it (file contents included) before it runs anything, and then points its
standard input at /dev/null: no command can swallow the rest of the script.
"""

from __future__ import annotations

import base64
import binascii
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from tasks.hostops.facts import MARK, PRELUDE
from tasks.hostops.ops import Plan

DATA_END = "HOSTOPS_DATA"  # never a line of base64 (no underscore in its alphabet)


def apply_script(plans: Sequence[Plan]) -> str:
    """The script applying every plan that has steps (indexes are positions in `plans`)."""
    parts = ["{\n", PRELUDE, "umask 022\n",
             "HOSTOPS_TS=$(date -u +%Y%m%dT%H%M%SZ)\n",
             "_fail() {\n"
             f"  printf '{MARK}\\tfail\\t%s\\t%s\\t%s\\t' \"$1\" \"$2\" \"$3\"\n"
             "  printf '%s' \"$_o\" | base64 -w0; echo\n"
             "  if [ -n \"$_c\" ]; then eval \"$_c\" >/dev/null 2>&1; fi\n"
             f"  printf '{MARK}\\tend-apply\\n'\n"
             "  exit 1\n"
             "}\n"]
    for index, plan in enumerate(plans):
        if not plan.steps:
            continue
        parts.append(f"# {index}: {' '.join(plan.op.split())}\n")
        parts.append(f"_c={shlex.quote(plan.cleanup or '')}\n")
        for number, step in enumerate(plan.steps):
            if step.stdin is None:
                parts.append(f"_o=$( {{ {step.command}\n}} 2>&1 ) || _fail {index} {number} $?\n")
            else:
                encoded = base64.encodebytes(step.stdin).decode()
                parts.append(f"_o=$( {{ {step.command}\n}} 2>&1 <<'{DATA_END}'\n"
                             f"{encoded}{DATA_END}\n) || _fail {index} {number} $?\n")
        parts.append(f"printf '{MARK}\\tdone\\t{index}\\n'\n")
    parts.append(f"printf '{MARK}\\tend-apply\\n'\nexit 0\n}}\n")
    return "".join(parts)


@dataclass(frozen=True)
class Failure:
    """The step that failed: positions in the plans, its exit status and output."""

    op_index: int
    step_index: int
    status: int
    output: str


@dataclass(frozen=True)
class ApplyReport:
    done: tuple[int, ...]
    failure: Failure | None
    complete: bool  # the script reached its end (or its failure handler)


def parse_apply(output: str) -> ApplyReport:
    """Read the apply script's report."""
    done: list[int] = []
    failure = None
    complete = False
    for line in output.split("\n"):
        if not line.startswith(f"{MARK}\t"):
            continue
        fields = line.split("\t")
        if fields[1] == "done":
            done.append(int(fields[2]))
        elif fields[1] == "fail" and len(fields) >= 6:
            try:
                text = base64.b64decode(fields[5]).decode("utf-8", "replace")
            except binascii.Error:
                text = "(unreadable output)"
            failure = Failure(int(fields[2]), int(fields[3]), int(fields[4]), text)
        elif fields[1] == "end-apply":
            complete = True
    return ApplyReport(tuple(done), failure, complete)
