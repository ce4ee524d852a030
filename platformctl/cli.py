"""`platformctl`: validate a spec, print its plan, write its JSON Schema, run the lab.

Exit codes: 0 success, 1 invalid spec or failed command, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from platformctl.table import format_table
from sizing.inventory import build_inventory
from sizing.plan import PHASES, build_plan
from sizing.spec import TIERS, PlatformSpec
from sizing.validate import SpecError
from tasks.spec import DEFAULT_SPEC, read_spec

INVENTORY_COLUMNS = ("name", "role", "cluster", "zone", "ip", "vcpu", "memory_gb", "disks_gb")


def cmd_validate(args: argparse.Namespace) -> int:
    spec = read_spec(args.spec)
    inventory = build_inventory(spec)
    totals = inventory.totals()
    print(f"{args.spec}: valid: {spec.name}, {spec.users} users, {totals['vms']} VMs on "
          f"{spec.hypervisor.kind}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    spec = read_spec(args.spec, users=args.users)
    inventory = build_inventory(spec)
    plan = build_plan(spec, inventory)
    if args.format == "json":
        document = {
            "spec": {"name": spec.name, "users": spec.users, "hypervisor": spec.hypervisor.kind},
            "totals": inventory.totals(),
            "inventory": [vm.row() for vm in inventory.vms],
            "groups": {name: list(members) for name, members in inventory.groups.items()},
            "phases": [{"phase": p.number, "flow": p.flow_name, "title": p.title,
                        "replaces": list(p.roles),
                        "items": [item.row() for item in plan[p.number]]} for p in PHASES],
        }
        print(json.dumps(document, indent=2))
        return 0
    totals = inventory.totals()
    print(f"{spec.name}: {spec.users} concurrent users on {spec.hypervisor.kind}: "
          f"{totals['vms']} VMs, {totals['vcpu']} vCPU, {totals['memory_gb']} GB RAM, "
          f"{totals['disk_gb']} GB disk\n")
    print(format_table([vm.row() for vm in inventory.vms], INVENTORY_COLUMNS))
    for p in PHASES:
        items = plan[p.number]
        print(f"\nPhase {p.number} {p.flow_name} ({p.title}): {len(items)} items")
        print(format_table([item.row() for item in items], ("kind", "name", "target", "detail")))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    text = schema_text()
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote the JSON Schema of the platform spec to {args.output}", file=sys.stderr)
    return 0


def schema_text() -> str:
    schema = PlatformSpec.model_json_schema()
    schema["title"] = "Platform spec"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="platformctl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check a platform spec; exit 1 on errors")
    validate.add_argument("spec", nargs="?", default=DEFAULT_SPEC)
    validate.set_defaults(func=cmd_validate)

    plan = sub.add_parser("plan", help="print the inventory and what each phase will do")
    plan.add_argument("spec", nargs="?", default=DEFAULT_SPEC)
    plan.add_argument("--users", type=int, choices=TIERS,
                      help="size for this tier instead of the spec's")
    plan.add_argument("--format", choices=("table", "json"), default="table")
    plan.set_defaults(func=cmd_plan)

    schema = sub.add_parser("schema", help="write the JSON Schema of the spec")
    schema.add_argument("-o", "--output", help="file to write (default: standard output)")
    schema.set_defaults(func=cmd_schema)

    from platformctl.lab_commands import add_lab_commands

    add_lab_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SpecError as error:
        print(error, file=sys.stderr)
        return 1
    except (FileNotFoundError, RuntimeError) as error:
        print(f"platformctl: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `platformctl plan | head`: the reader left, nothing to say
        sys.stderr.close()
        return 0
    return code


if __name__ == "__main__":
    raise SystemExit(main())
