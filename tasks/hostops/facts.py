"""Facts: what a host looks like, gathered for all operations in one shell script.

Each operation declares the facts it needs (`Needs`); `probe_script` turns the union of
those needs into one POSIX shell script that only reads, batching per kind (one `stat`
for every file, one `dpkg-query` for every package, one `systemctl show` for every
unit...), and prints a machine-readable report: lines `hostops<TAB>kind<TAB>...`, or raw
tool output between `hostops<TAB>begin<TAB>section` and `hostops<TAB>end<TAB>section`.
`parse_probe` reads that report back into `Facts`. Both are pure: unit tests run them
without a host.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field

MARK = "hostops"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PRELUDE = f"exec </dev/null\nexport LC_ALL=C PATH={PATH}\n"

_PATH_RE = re.compile(r"^/[^\x00-\x1f\x7f\\]*$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\$?$")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?$")
UNIT_RE = re.compile(r"^[A-Za-z0-9:_.@\\-]+$")
SYSCTL_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class ProbeError(RuntimeError):
    """The probe's report is not what the script prints (truncated, or a tool misbehaved)."""


def checked_path(path: str) -> str:
    """An absolute path without control characters or backslashes (stat/sha256sum print
    such names escaped, and they have no place in a configuration anyway)."""
    if not _PATH_RE.fullmatch(path) or "/../" in f"{path}/" or (
            path.endswith("/") and path != "/"):
        raise ValueError(f"not a plain absolute path: {path!r}")
    return path


def unit_name(name: str) -> str:
    """`ssh` -> `ssh.service`; names with a unit suffix stay as they are."""
    if not UNIT_RE.fullmatch(name):
        raise ValueError(f"not a systemd unit name: {name!r}")
    suffixes = (".service", ".socket", ".timer", ".target", ".mount", ".path", ".slice")
    return name if name.endswith(suffixes) else f"{name}.service"


@dataclass(frozen=True)
class FileState:
    """A path as `stat` sees it (kind is file, directory, symlink or other)."""

    kind: str
    owner: str
    group: str
    mode: int
    size: int = 0
    sha256: str | None = None  # regular files only
    content: bytes | None = None  # only when an operation asked for the content


@dataclass(frozen=True)
class UserState:
    """A passwd entry, and the user's ~/.ssh and authorized_keys as found."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str
    ssh_dir: FileState | None = None
    keys_file: FileState | None = None  # with content


@dataclass(frozen=True)
class GroupState:
    name: str
    gid: int
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServiceState:
    """`systemctl show`: LoadState (loaded / not-found), UnitFileState, ActiveState."""

    load: str
    enabled: str
    active: str


@dataclass(frozen=True)
class BlockDevice:
    """A block device as `lsblk` shows it (sizes in bytes; children: partitions, LVs...)."""

    name: str
    path: str
    size: int
    type: str  # disk, part, lvm, rom, loop...
    fstype: str | None = None
    label: str | None = None
    mountpoint: str | None = None
    children: tuple[BlockDevice, ...] = ()

    def describe(self) -> str:
        """`/dev/sdb (20 GiB, ext4 "x", mounted at /srv)`, for errors."""
        size = f"{self.size / 2**30:g} GiB" if self.size % 2**20 == 0 else f"{self.size} bytes"
        parts = [size, self.type] if self.type != "disk" else [size]
        if self.fstype:
            parts.append(self.fstype + (f" {self.label!r}" if self.label else ""))
        if self.mountpoint:
            parts.append(f"mounted at {self.mountpoint}")
        if self.children:
            parts.append(f"{len(self.children)} partition(s) or volume(s)")
        return f"{self.path} ({', '.join(parts)})"


LSBLK_COLUMNS = "NAME,PATH,SIZE,TYPE,FSTYPE,LABEL,MOUNTPOINT"


@dataclass
class Needs:
    """The facts a set of operations needs; merged across a host's operations."""

    files: set[str] = field(default_factory=set)
    contents: set[str] = field(default_factory=set)  # implies files
    packages: set[str] = field(default_factory=set)
    users: set[str] = field(default_factory=set)
    groups: set[str] = field(default_factory=set)
    services: set[str] = field(default_factory=set)  # full unit names
    sysctls: set[str] = field(default_factory=set)
    checks: set[str] = field(default_factory=set)  # shell commands: does it succeed?
    block_devices: bool = False  # `lsblk` of every block device

    def merge(self, other: Needs) -> Needs:
        for name in ("files", "contents", "packages", "users", "groups", "services",
                     "sysctls", "checks"):
            getattr(self, name).update(getattr(other, name))
        self.block_devices = self.block_devices or other.block_devices
        return self

    @classmethod
    def union(cls, needs: Iterable[Needs]) -> Needs:
        total = cls()
        for item in needs:
            total.merge(item)
        return total


@dataclass
class Facts:
    """What the probe found. Operations read it while planning, and update a working copy
    with what they will change, so that later operations see the state they will meet."""

    files: dict[str, FileState | None] = field(default_factory=dict)
    packages: dict[str, bool] = field(default_factory=dict)
    users: dict[str, UserState | None] = field(default_factory=dict)
    groups: dict[str, GroupState | None] = field(default_factory=dict)
    services: dict[str, ServiceState] = field(default_factory=dict)
    sysctls: dict[str, str | None] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    block_devices: tuple[BlockDevice, ...] | None = None  # None: not probed

    def copy(self) -> Facts:
        return copy.deepcopy(self)

    def file(self, path: str) -> FileState | None:
        """The probed state of `path`; KeyError if no operation asked for it."""
        if path not in self.files:
            raise KeyError(f"no fact about {path}: the operation did not declare it")
        return self.files[path]


def normalize_sysctl(value: object) -> str:
    """`sysctl` prints multi-value keys separated by tabs: compare on single spaces."""
    return " ".join(str(value).split())


def _q(words: Iterable[str]) -> str:
    return " ".join(shlex.quote(word) for word in sorted(words))


def _section(name: str, command: str) -> str:
    return (f"printf '{MARK}\\tbegin\\t{name}\\n'\n{command}\n"
            f"printf '{MARK}\\tend\\t{name}\\n'\n")


STAT_FORMAT = r"%n\t%F\t%U\t%G\t%a\t%s\n"


def probe_script(needs: Needs) -> str:
    """One read-only shell script that prints every needed fact."""
    parts = ["{\n", PRELUDE]
    files = needs.files | needs.contents
    if files:
        quoted = _q(files)
        parts.append(_section("stat", f"stat --printf='{STAT_FORMAT}' -- {quoted} 2>/dev/null"))
        parts.append(_section("sha256", f"sha256sum -- {quoted} 2>/dev/null"))
    for path in sorted(needs.contents):
        p = shlex.quote(path)
        parts.append(f"if [ -f {p} ]; then printf '{MARK}\\tcontent\\t%s\\t' {p}; "
                     f"base64 -w0 -- {p}; echo; fi\n")
    if needs.packages:
        parts.append(_section("packages", "dpkg-query -W -f='${Package}\\t${db:Status-Abbrev}\\n'"
                                          f" -- {_q(needs.packages)} 2>/dev/null"))
    if needs.users:
        parts.append(
            f"getent passwd {_q(needs.users)} 2>/dev/null | "
            "while IFS=: read -r n x uid gid gecos h sh; do\n"
            f"  printf '{MARK}\\tpasswd\\t%s\\t%s\\t%s\\t%s\\t%s\\n' \"$n\" \"$uid\" \"$gid\" "
            "\"$h\" \"$sh\"\n"
            f"  stat --printf=\"{MARK}\\tustat\\t$n\\t{STAT_FORMAT}\" -- \"$h/.ssh\" "
            "\"$h/.ssh/authorized_keys\" 2>/dev/null\n"
            f"  if [ -f \"$h/.ssh/authorized_keys\" ]; then printf '{MARK}\\tkeys\\t%s\\t' "
            "\"$n\"; base64 -w0 -- \"$h/.ssh/authorized_keys\"; echo; fi\n"
            "done\n")
    if needs.groups:
        parts.append(_section("group", f"getent group {_q(needs.groups)} 2>/dev/null"))
    if needs.services:
        # In argument order, one block per unit, blank-line separated; unknown units
        # come back with LoadState=not-found (systemd and the lab's systemctl alike).
        parts.append(_section("services", "systemctl show -p Id -p LoadState -p UnitFileState"
                                          f" -p ActiveState -- {_q(needs.services)}"
                                          " 2>/dev/null"))
    if needs.sysctls:
        parts.append(_section("sysctl", f"sysctl -- {_q(needs.sysctls)} 2>/dev/null"))
    if needs.block_devices:
        parts.append(_section("lsblk", f"lsblk -J -b -o {LSBLK_COLUMNS}"))
    for index, command in enumerate(sorted(needs.checks)):
        parts.append(f"if ( {command}\n) >/dev/null 2>&1; then r=0; else r=1; fi; "
                     f"printf '{MARK}\\tcheck\\t{index}\\t%s\\n' \"$r\"\n")
    parts.append(f"printf '{MARK}\\tend-probe\\n'\nexit 0\n}}\n")
    return "".join(parts)


def _stat_line(line: str) -> tuple[str, FileState]:
    path, kind, owner, group, mode, size = line.split("\t")
    kinds = {"regular file": "file", "regular empty file": "file", "directory": "directory",
             "symbolic link": "symlink"}
    return path, FileState(kinds.get(kind, "other"), owner, group, int(mode, 8), int(size))


def parse_probe(output: str, needs: Needs) -> Facts:
    """The probe's report as Facts; every needed fact is present (absent things as None)."""
    facts = Facts()
    sections: dict[str, list[str]] = {}
    stats: dict[str, FileState] = {}
    contents: dict[str, bytes] = {}
    passwd: dict[str, tuple[int, int, str, str]] = {}
    ustat: dict[str, dict[str, FileState]] = {}
    keys: dict[str, bytes] = {}
    check_results: dict[int, bool] = {}
    current: str | None = None
    ended = False
    for line in output.split("\n"):
        if line.startswith(f"{MARK}\t"):
            fields = line.split("\t")
            kind = fields[1]
            if kind == "begin":
                current = fields[2]
                sections[current] = []
            elif kind == "end":
                current = None
            elif kind == "content":
                contents[fields[2]] = _b64(fields[3])
            elif kind == "passwd":
                passwd[fields[2]] = (int(fields[3]), int(fields[4]), fields[5], fields[6])
            elif kind == "ustat":
                path, state = _stat_line("\t".join(fields[3:]))
                ustat.setdefault(fields[2], {})[path] = state
            elif kind == "keys":
                keys[fields[2]] = _b64(fields[3])
            elif kind == "check":
                check_results[int(fields[2])] = fields[3] == "0"
            elif kind == "end-probe":
                ended = True
            continue
        if current is not None:
            sections[current].append(line)
    if not ended:
        raise ProbeError("the probe's report is incomplete (the script did not finish)")

    for line in sections.get("stat", []):
        if line:
            path, state = _stat_line(line)
            stats[path] = state
    hashes: dict[str, str] = {}
    for line in sections.get("sha256", []):
        digest, _, path = line.partition("  ")
        if path:
            hashes[path] = digest
    for path in needs.files | needs.contents:
        found = stats.get(path)
        if found is not None and found.kind == "file":
            found = FileState(found.kind, found.owner, found.group, found.mode, found.size,
                              hashes.get(path),
                              contents.get(path) if path in needs.contents else None)
        facts.files[path] = found

    installed = {}
    for line in sections.get("packages", []):
        if "\t" in line:
            name, status = line.split("\t", 1)
            installed[name] = len(status) >= 2 and status[1] == "i"
    facts.packages = {name: installed.get(name, False) for name in needs.packages}

    for name in needs.users:
        if name not in passwd:
            facts.users[name] = None
            continue
        uid, gid, home, shell = passwd[name]
        entries = ustat.get(name, {})
        keys_state = entries.get(f"{home}/.ssh/authorized_keys")
        if keys_state is not None and keys_state.kind == "file":
            keys_state = FileState(keys_state.kind, keys_state.owner, keys_state.group,
                                   keys_state.mode, keys_state.size, None, keys.get(name, b""))
        facts.users[name] = UserState(name, uid, gid, home, shell, entries.get(f"{home}/.ssh"),
                                      keys_state)

    groups: dict[str, GroupState] = {}
    for line in sections.get("group", []):
        fields = line.split(":")
        if len(fields) == 4:
            members = tuple(m for m in fields[3].split(",") if m)
            groups[fields[0]] = GroupState(fields[0], int(fields[2]), members)
    facts.groups = {name: groups.get(name) for name in needs.groups}

    if needs.services:
        blocks: list[dict[str, str]] = [{}]
        for line in sections.get("services", []):
            if not line.strip():
                if blocks[-1]:
                    blocks.append({})
                continue
            key, _, value = line.partition("=")
            blocks[-1][key] = value
        blocks = [block for block in blocks if block]
        units = sorted(needs.services)
        if len(blocks) != len(units):
            raise ProbeError(f"systemctl show answered {len(blocks)} units for {len(units)}: "
                             f"{', '.join(units)}")
        for unit, block in zip(units, blocks, strict=True):
            facts.services[unit] = ServiceState(block.get("LoadState", ""),
                                                block.get("UnitFileState", ""),
                                                block.get("ActiveState", ""))

    values: dict[str, str] = {}
    for line in sections.get("sysctl", []):
        key, sep, value = line.partition(" = ")
        if sep:
            values[key.strip()] = normalize_sysctl(value)
    facts.sysctls = {key: values.get(key) for key in needs.sysctls}

    for index, command in enumerate(sorted(needs.checks)):
        if index not in check_results:
            raise ProbeError(f"no result for the check {command!r}")
        facts.checks[command] = check_results[index]
    if needs.block_devices:
        facts.block_devices = parse_lsblk("\n".join(sections.get("lsblk", [])))
    return facts


def parse_lsblk(text: str) -> tuple[BlockDevice, ...]:
    """`lsblk -J -b -o LSBLK_COLUMNS` output as BlockDevices (sizes as numbers or strings,
    as util-linux versions print them)."""
    try:
        data = json.loads(text)
        return tuple(_block_device(item) for item in data["blockdevices"])
    except (ValueError, KeyError, TypeError) as error:
        raise ProbeError(f"unreadable lsblk output ({type(error).__name__}: {error}): "
                         f"{text[:200]!r}") from None


def _block_device(item: dict[str, object]) -> BlockDevice:
    name = str(item["name"])
    path = item.get("path") or f"/dev/{name}"
    size = item.get("size")
    children = item.get("children") or []
    if not isinstance(children, list):
        raise TypeError(f"children of {name} is not a list")
    mountpoint = item.get("mountpoint")
    points = item.get("mountpoints")
    if mountpoint is None and isinstance(points, list):
        mountpoint = next((m for m in points if m), None)
    return BlockDevice(name=name, path=str(path), size=int(str(size)) if size is not None else 0,
                       type=str(item.get("type") or ""),
                       fstype=_optional(item.get("fstype")), label=_optional(item.get("label")),
                       mountpoint=_optional(mountpoint),
                       children=tuple(_block_device(child) for child in children))


def _optional(value: object) -> str | None:
    return None if value is None or value == "" else str(value)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as error:
        raise ProbeError(f"unreadable content in the probe's report ({error})") from None
