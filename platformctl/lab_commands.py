"""`platformctl lab up|run|status|down`: the lab, as the README's `make lab` drives it."""

from __future__ import annotations

import argparse
from typing import Any

from platformctl.table import format_table
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
    status = verbs.add_parser("status", help="every VM and service of the lab")
    status.add_argument("spec", nargs="?", default=DEFAULT_SPEC)
    status.set_defaults(func=cmd_status)
    down = verbs.add_parser("down", help="stop and remove everything the lab started")
    down.set_defaults(func=cmd_down)


def _lab(spec_path: str, with_spec: bool = True) -> Any:
    from lab.lab import Lab  # the lab is imported only by its own commands

    return Lab(spec_path, read_spec(spec_path) if with_spec else None)


def cmd_up(args: argparse.Namespace) -> int:
    lab = _lab(args.spec)
    for line in lab.up() or ["everything was already up; nothing changed"]:
        print(f"lab: {line}")
    print(f"lab: Prefect UI at {lab.prefect.ui_url}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    lab = _lab(args.spec)
    if not lab.prefect.healthy():
        print("lab: the lab's Prefect server is not running; run `platformctl lab up` first")
        return 1
    code: int = lab.prefect.run_deployment("platform/full", {
        "spec_path": args.spec, "plan_only": "true" if args.plan_only else "false"})
    if code == 0:
        print(f"lab: platform/full completed; see {lab.prefect.ui_url}/runs")
        return code
    outcome = lab.prefect.last_run("platform/full")
    if outcome is None:
        print(f"lab: platform/full did not start; see {lab.prefect.ui_url}/runs")
    else:
        print(f"lab: platform/full ended {outcome.state}: {outcome.message}")
        print(f"lab: see {outcome.url}")
    return code


def cmd_status(args: argparse.Namespace) -> int:
    lab = _lab(args.spec)
    print(format_table(lab.service_rows(), ("service", "state", "where")))
    rows = lab.vm_rows()
    print()
    if rows:
        print(format_table(rows, ("vm", "power", "ip", "host", "ssh")))
    else:
        print("no VMs yet (phase 1 creates them)")
    print(f"\nPrefect UI: {lab.prefect.ui_url}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    lab = _lab(DEFAULT_SPEC, with_spec=False)
    for line in lab.down():
        print(f"lab: {line}")
    print("lab: down")
    return 0
