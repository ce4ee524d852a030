"""`platformctl lab up|run|status|down`: the lab, as the README's `make lab` drives it."""

from __future__ import annotations

import argparse
import shutil
from typing import Any

from tasks.spec import DEFAULT_SPEC, read_spec


def add_lab_commands(sub: Any) -> None:
    lab = sub.add_parser("lab", help="the simulated datacenter and its Prefect")
    verbs = lab.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="start the lab (idempotent)")
    up.add_argument("spec", nargs="?", default=DEFAULT_SPEC)
    up.set_defaults(func=cmd_up)
    run = verbs.add_parser("run", help="run the platform/full deployment and wait for it")
    run.add_argument("spec", nargs="?", default=DEFAULT_SPEC)
    run.add_argument("--plan-only", action="store_true",
                     help="publish what every phase would do; change nothing")
    run.set_defaults(func=cmd_run)
    status = verbs.add_parser("status", help="what is running")
    status.add_argument("spec", nargs="?", default=DEFAULT_SPEC)
    status.set_defaults(func=cmd_status)
    down = verbs.add_parser("down", help="stop and remove everything the lab started")
    down.set_defaults(func=cmd_down)


def _stack() -> Any:
    from lab.prefect_stack import PrefectStack

    return PrefectStack.from_env()


def cmd_up(args: argparse.Namespace) -> int:
    read_spec(args.spec)  # a bad spec stops here, before anything starts
    stack = _stack()
    for line in stack.up() or ["already up"]:
        print(f"lab: {line}")
    print(f"lab: Prefect UI at {stack.ui_url}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    read_spec(args.spec)
    stack = _stack()
    if not stack.healthy():
        print("lab: the lab's Prefect server is not running; run `platformctl lab up` first")
        return 1
    code: int = stack.run_deployment("platform/full", {
        "spec_path": args.spec, "plan_only": "true" if args.plan_only else "false"})
    print(f"lab: platform/full {'completed' if code == 0 else 'did not complete'}; "
          f"see {stack.ui_url}/runs")
    return code


def cmd_status(args: argparse.Namespace) -> int:
    stack = _stack()
    print(f"Prefect server  {stack.api_url}  {'healthy' if stack.healthy() else 'down'}")
    print(f"Prefect UI      {stack.ui_url}")
    print(f"state directory {stack.state_dir}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stack = _stack()
    for line in stack.down():
        print(f"lab: {line}")
    if stack.state_dir.exists():
        shutil.rmtree(stack.state_dir)
        print(f"lab: removed {stack.state_dir}")
    print("lab: down")
    return 0
