#!/usr/bin/python3 -I
"""`swapon` and `swapoff` inside a lab host: a lab VM has no swap, and never the machine's.

LAB STAND-IN, bind-mounted read-only over /usr/sbin/swapon and /usr/sbin/swapoff in every
lab host by its PID 1 (lab/host_init.py). Swap is global: util-linux's `swapoff -a` in a
host would turn off the machine's swap (it also calls swapoff(2) on /etc/fstab's swap
entries), and the host sees the machine's files. So:

- the host's /proc/swaps is its own, header only: no swap is active in a lab host, so
  the real `swapon --show` prints nothing and `swapon -s`/`--summary` only the header;
  `free` still shows the machine's swap totals (it reads /proc/meminfo);
- `swapoff -a` succeeds and does nothing; `swapoff FILE` fails as util-linux does for a
  file that is not active swap ("swapoff: FILE: swapoff failed: Invalid argument", or
  "No such file or directory"; exit 4);
- activating swap (`swapon FILE`, `swapon -a` with swap in /etc/fstab) fails: a missing
  file or one without a swap signature fails as util-linux says, a real swap area with
  "swapon failed: Operation not permitted" (exit 255). `swapon -a` without swap entries
  succeeds;
- anything else (no arguments, --show, --help, --version, bad options) runs the real
  command, which then reads the host's /proc/swaps.
"""

from __future__ import annotations

import os
import sys

REAL_DIR = "/run/lab-host/real"


def _real(command: str, args: list[str]) -> int:
    os.execv(f"{REAL_DIR}/{command}", [command, *args])
    return 1


def _parse(args: list[str], with_value: set[str]) -> tuple[set[str], list[str], bool]:
    """(options seen, specs, parsed fine)."""
    options: set[str] = set()
    specs: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            specs.extend(args[index:])
            break
        if arg.startswith("--"):
            name, has_value, value = arg.partition("=")
            options.add(name)
            if name in with_value and not has_value:
                if index >= len(args):
                    return options, specs, False
                value = args[index]
                index += 1
            if name in ("--label", "--uuid"):
                specs.append(("LABEL=" if name == "--label" else "UUID=") + value)
            continue
        if arg.startswith("-") and len(arg) > 1:
            letters = arg[1:]
            for position, letter in enumerate(letters):
                option = "-" + letter
                options.add(option)
                if option in with_value:
                    value = letters[position + 1:]
                    if not value:
                        if index >= len(args):
                            return options, specs, False
                        value = args[index]
                        index += 1
                    if option in ("-L", "-U"):
                        specs.append(("LABEL=" if option == "-L" else "UUID=") + value)
                    break
            continue
        specs.append(arg)
    return options, specs, True


def _fstab_swaps() -> list[tuple[str, list[str]]]:
    swaps = []
    try:
        with open("/etc/fstab") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 3 and not fields[0].startswith("#") and fields[2] == "swap":
                    swaps.append((fields[0], fields[3].split(",") if len(fields) > 3 else []))
    except OSError:
        pass
    return swaps


def _is_swap_area(path: str) -> bool:
    page = os.sysconf("SC_PAGE_SIZE")
    with open(path, "rb") as handle:
        header = handle.read(page)
    return header[page - 10:page] in (b"SWAPSPACE2", b"SWAP-SPACE")


def swapoff(args: list[str]) -> int:
    options, specs, ok = _parse(args, {"-L", "-U", "--label", "--uuid"})
    if not ok or options & {"-h", "--help", "-V", "--version"} or \
            not (specs or options & {"-a", "--all"}):
        return _real("swapoff", args)
    status = 0
    for spec in specs:  # nothing is active in a lab host
        if spec.startswith(("LABEL=", "UUID=")):
            print(f"swapoff: cannot find the device for {spec.split('=', 1)[1]}",
                  file=sys.stderr)
            status = 255
            continue
        reason = "Invalid argument" if os.path.exists(spec) else "No such file or directory"
        print(f"swapoff: {spec}: swapoff failed: {reason}", file=sys.stderr)
        status |= 4
    return status


def swapon(args: list[str]) -> int:
    with_value = {"-p", "--priority", "-o", "--options", "-L", "-U", "--label", "--uuid",
                  "-T", "--fstab"}
    options, specs, ok = _parse(args, with_value)
    activate = bool(specs) or bool(options & {"-a", "--all"})
    if not ok or not activate or options & {"-h", "--help", "-V", "--version"}:
        return _real("swapon", args)
    if options & {"-a", "--all"}:
        specs += [spec for spec, opts in _fstab_swaps() if "noauto" not in opts]
    status = 0
    for spec in specs:
        if spec.startswith(("LABEL=", "UUID=")):
            print(f"swapon: cannot find the device for {spec}", file=sys.stderr)
            status = 255
            continue
        try:
            swap_area = _is_swap_area(spec)
        except OSError as exc:
            if options & {"-e", "--ifexists"}:
                continue
            print(f"swapon: cannot open {spec}: {exc.strerror}", file=sys.stderr)
            status = 255
            continue
        if not swap_area:
            print(f"swapon: {spec}: read swap header failed", file=sys.stderr)
        else:
            print(f"swapon: {spec}: swapon failed: Operation not permitted "
                  "(lab host: no swap)", file=sys.stderr)
        status = 255
    return status


def main(argv: list[str]) -> int:
    if os.path.basename(argv[0]) == "swapoff":
        return swapoff(argv[1:])
    return swapon(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
