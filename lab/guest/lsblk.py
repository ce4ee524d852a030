#!/usr/bin/python3 -I
"""`lsblk` inside a lab host: the VM's own disks, never the machine's.

LAB STAND-IN, bind-mounted read-only over /usr/bin/lsblk in every lab host by its PID 1
(lab/host_init.py). A lab host shares the machine's kernel and sees its /sys, so the real
lsblk would list the machine's disks (vda, loop devices...), which a product formatting
"the empty disk of the right size" must never see. Instead this reports the disks the
VM has on its hypervisor (lab/hosts.py writes them to /run/lab-host/disks.json at boot):

- sda, the OS disk, with its configured size, mounted at / (the host's root is an
  overlay, shown as such in FSTYPE); it has no device node, so nothing can format it;
- sdb, sdc... the data disks: block device nodes in the host's private /dev made by PID 1
  on loop devices over sparse files of the VM's configured sizes (hosts.py). SIZE is the
  loop device's (from /sys), FSTYPE and LABEL are probed live with the real `blkid -p` on
  the node, MOUNTPOINT comes from the host's /proc/self/mountinfo (by major:minor). So
  the real mkfs, wipefs, blkid and mount act on them, and lsblk sees the result.

Differences from util-linux: FSTYPE, LABEL and UUID need root (the nodes are root:disk
0660 as on a VM, and there is no udev database to read them from); no partitions are
listed (a data disk partitioned inside a lab host shows without children); only the
columns NAME, KNAME, PATH, SIZE, TYPE, FSTYPE, LABEL, UUID, MOUNTPOINT, MOUNTPOINTS, RO,
RM, MAJ:MIN and the options -J/--json, -b/--bytes, -o/--output, -n/--noheadings,
-d/--nodeps, -p/--paths, -l/--list, -a/--all, -f/--fs (short ones alone or grouped, as
in -dnl) and device arguments are understood; anything else fails with exit 1 (util-linux's
usage error status), naming this stand-in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

DISKS_FILE = "/run/lab-host/disks.json"
BLKID = "/usr/sbin/blkid" if os.path.exists("/usr/sbin/blkid") else "/sbin/blkid"
DEFAULT_COLUMNS = ["NAME", "MAJ:MIN", "RM", "SIZE", "RO", "TYPE", "MOUNTPOINTS"]
FS_COLUMNS = ["NAME", "FSTYPE", "LABEL", "UUID", "MOUNTPOINTS"]
KNOWN = {"NAME", "KNAME", "PATH", "SIZE", "TYPE", "FSTYPE", "LABEL", "UUID", "MOUNTPOINT",
         "MOUNTPOINTS", "RO", "RM", "MAJ:MIN"}
NUMERIC = {"SIZE", "RO", "RM"}


def fail(message: str) -> int:
    sys.stderr.write(f"lsblk (lab stand-in): {message}\n")
    return 1


def mounts() -> tuple[dict[str, list[str]], str]:
    """Mount points per major:minor, and the root's file system type."""
    found: dict[str, list[str]] = {}
    root_type = ""
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            separator = fields.index("-")
            point = fields[4].replace("\\040", " ")
            found.setdefault(fields[2], []).append(point)
            if point == "/":
                root_type = fields[separator + 1]
    return found, root_type


def probe(node: str) -> dict[str, str]:
    """The real blkid's low-level probe of the node: TYPE, LABEL, UUID, PTTYPE..."""
    proc = subprocess.run([BLKID, "-p", "-o", "export", node], capture_output=True,
                          text=True, check=False)
    values = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


def devices() -> list[dict[str, Any]]:
    """The host's disks, each a dict of column values."""
    try:
        with open(DISKS_FILE) as handle:
            disks = json.load(handle)
    except FileNotFoundError:
        disks = []
    mounted, root_type = mounts()
    rows = []
    for disk in disks:
        name = disk["name"]
        row: dict[str, Any] = {"NAME": name, "KNAME": name, "PATH": f"/dev/{name}",
                               "TYPE": "disk", "RO": 0, "RM": 0, "UUID": None}
        if disk.get("os"):
            row.update({"SIZE": int(disk["size"]), "FSTYPE": root_type or None, "LABEL": None,
                        "MAJ:MIN": "0:0", "MOUNTPOINTS": ["/"]})
        else:
            number = f"{disk['major']}:{disk['minor']}"
            try:
                with open(f"/sys/dev/block/{number}/size") as handle:
                    size = int(handle.read()) * 512
            except OSError:
                size = int(disk["size"])
            found = probe(f"/dev/{name}")
            fstype = found.get("TYPE") or found.get("PTTYPE")
            row.update({"SIZE": size, "FSTYPE": fstype, "LABEL": found.get("LABEL"),
                        "UUID": found.get("UUID"), "MAJ:MIN": number,
                        "MOUNTPOINTS": mounted.get(number, [])})
        row["MOUNTPOINT"] = row["MOUNTPOINTS"][0] if row["MOUNTPOINTS"] else None
        rows.append(row)
    return rows


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "K", "M", "G", "T", "P"):
        if value < 1024 or unit == "P":
            return f"{value:.0f}{unit}" if unit == "B" or value == int(value) \
                else f"{value:.1f}{unit}"
        value /= 1024
    return str(size)


FLAGS = "Jbnpdlaf"  # the short options without an argument


def split_short(argv: list[str]) -> list[str]:
    """Grouped short options one by one, as getopt reads them: -dnl is -d -n -l, and -no X
    or -noX is -n -o X."""
    out: list[str] = []
    for arg in argv:
        if len(arg) > 2 and arg[0] == "-" and arg[1] in FLAGS:
            for position, letter in enumerate(arg[1:], start=1):
                if letter == "o":
                    out.append("-o" + arg[position + 1:])
                    break
                out.append("-" + letter)
        else:
            out.append(arg)
    return out


def main(argv: list[str]) -> int:
    json_out, in_bytes, headings = False, False, True
    paths = False
    columns = list(DEFAULT_COLUMNS)
    wanted: list[str] = []
    argv = split_short(argv)
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg in ("-J", "--json"):
            json_out = True
        elif arg in ("-b", "--bytes"):
            in_bytes = True
        elif arg in ("-n", "--noheadings"):
            headings = False
        elif arg in ("-p", "--paths"):
            paths = True
        elif arg in ("-d", "--nodeps", "-l", "--list", "-a", "--all"):
            pass  # no partitions are listed anyway; every disk is shown
        elif arg in ("-f", "--fs"):
            columns = list(FS_COLUMNS)
        elif arg in ("-o", "--output") or arg.startswith(("-o", "--output=")):
            if arg in ("-o", "--output"):
                if index >= len(argv):
                    return fail(f"option {arg} requires an argument")
                value = argv[index]
                index += 1
            else:
                value = arg.split("=", 1)[1] if arg.startswith("--") else arg[2:]
            columns = [c.strip().upper() for c in value.split(",") if c.strip()]
            unknown = [c for c in columns if c not in KNOWN]
            if unknown:
                return fail(f"unknown column: {','.join(unknown)}")
        elif arg.startswith("-"):
            return fail(f"option {arg} is not simulated")
        else:
            wanted.append(arg)
    rows = devices()
    if wanted:
        chosen = []
        for item in wanted:
            match = [r for r in rows if item in (r["PATH"], r["NAME"])]
            if not match:
                return fail(f"{item}: not a block device")
            chosen += match
        rows = chosen
    if paths:
        for row in rows:
            row["NAME"] = row["PATH"]
    if json_out:
        out = []
        for row in rows:
            entry: dict[str, Any] = {}
            for column in columns:
                cell: Any = row[column]
                if column == "SIZE" and not in_bytes:
                    cell = human(int(cell))
                if column in ("RO", "RM"):
                    cell = bool(cell)
                entry[column.lower()] = cell
            out.append(entry)
        sys.stdout.write(json.dumps({"blockdevices": out}, indent=3) + "\n")
        return 0
    lines = [columns] if headings else []
    for row in rows:
        cells = []
        for column in columns:
            value = row[column]
            if column == "SIZE" and not in_bytes:
                value = human(int(value))
            elif column == "MOUNTPOINTS":
                value = ",".join(value)
            cells.append("" if value is None else str(value))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))] if lines else []
    for line in lines:
        padded = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        sys.stdout.write(" ".join(padded).rstrip() + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    sys.exit(main(sys.argv[1:]))
