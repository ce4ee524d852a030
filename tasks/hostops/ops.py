"""Operations: desired state, compared with facts, giving the shell steps of the change.

An operation never talks to a host. It declares the facts it needs (`needs()`), and
`plan(ctx)` computes from them the steps that bring the host to the desired state, none
when it is there already. Steps are data: a name, a shell command, optionally the bytes
fed to the command's standard input (file contents). `tasks.hostops.script` turns the
steps of all operations into one apply script; unit tests assert on the steps directly.

While planning, each operation updates the working copy of the facts with what it will
change, so that later operations of the same run see the state they will meet (a `Line`
after a `File` on the same path edits the new content; a `User` after a `Group` finds
the group).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shlex
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sizing.storage import DATA_FSTYPE, DATA_LABEL, DATA_MOUNT
from tasks.hostops.facts import (
    PACKAGE_RE,
    SYSCTL_RE,
    USER_RE,
    BlockDevice,
    Facts,
    FileState,
    GroupState,
    Needs,
    ServiceState,
    UserState,
    checked_path,
    normalize_sysctl,
    unit_name,
)

BACKUP_DIR = "/var/backups/hostops"
SYSTEMD_DIRS = ("/etc/systemd/", "/lib/systemd/", "/usr/lib/systemd/", "/run/systemd/")
DEFAULT_SYSCTL_FILE = "/etc/sysctl.d/90-platform.conf"
_OWNER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\$?$|^\d+$")


class PlanError(ValueError):
    """The desired state cannot be reached from these facts (e.g. a path is a directory)."""


@dataclass(frozen=True)
class Step:
    """One shell command of an operation's change.

    `stdin` is given to the command's standard input (in the apply script, as a base64
    here-document decoded by the command itself: see `write_steps`). `secret` hides it
    from every rendering.
    """

    name: str
    command: str
    stdin: bytes | None = None
    secret: bool = False

    def render(self) -> str:
        """The step as shown in results, logs and dry runs: never the data itself."""
        if self.stdin is None:
            return self.command
        digest = hashlib.sha256(self.stdin).hexdigest()
        label = "secret, " if self.secret else ""
        return f"{self.command} <<< [{label}{len(self.stdin)} bytes, sha256 {digest}]"


@dataclass(frozen=True)
class Plan:
    """What an operation will do: no steps when the host is already as desired."""

    op: str
    steps: tuple[Step, ...] = ()
    detail: str = "ok"
    cleanup: str | None = None  # shell run if one of the steps fails (temp files, rollback)
    secret: bytes | None = None  # content to scrub from a failure's quoted output

    @property
    def changed(self) -> bool:
        return bool(self.steps)

    def commands(self) -> tuple[str, ...]:
        return tuple(step.render() for step in self.steps)


@dataclass
class PlanContext:
    """The working copy of the facts, and what the operations planned so far change."""

    facts: Facts
    changed: set[str] = field(default_factory=set)  # ids of operations with steps
    changed_paths: list[str] = field(default_factory=list)
    units_dirty: bool = False  # a unit file changed since the last daemon-reload step


def q(word: str) -> str:
    return shlex.quote(word)


def _mode(mode: str | int) -> int:
    try:
        value = mode if isinstance(mode, int) else int(mode, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o7777:
        raise ValueError(f"not a file mode: {mode!r}")
    return value


def _owner(name: str) -> str:
    if not _OWNER_RE.fullmatch(name):
        raise ValueError(f"not a user or group name: {name!r}")
    return name


def _bytes(content: str | bytes) -> bytes:
    return content.encode() if isinstance(content, str) else content


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def temp_path(path: str) -> str:
    """The candidate beside the live file: same filesystem (atomic rename), and a dot name
    that no `*.conf`-style include picks up meanwhile."""
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.hostops-tmp")


def write_steps(path: str, data: bytes, *, chown: str, mode: int, validator: str | None,
                backup: bool, exists: bool, secret: bool,
                expect_sha256: str | None = None,
                expect_absent: bool = False) -> tuple[list[Step], str]:
    """Atomic replacement of `path`: candidate, owner and mode, validation, backup, rename.

    `validator` with `{path}` checks the candidate before it replaces the live file. A
    validator without `{path}` (`netplan generate`, `sshd -t`) can only check the file in
    place: the live file is then replaced and put back (byte for byte, hard link) if the
    validator fails (a new file is removed). The previous content is copied to
    BACKUP_DIR/<path>.<UTC time of the run> ($HOSTOPS_TS, set once by the apply script; the
    first copy of a run wins). `expect_*` guard against a change made since the probe.
    Returns the steps and the cleanup to run if one of them fails.
    """
    tmp = temp_path(path)
    old = f"{tmp}-old"  # the previous file, hard-linked, while an in-place check runs
    placed = f"{tmp}-new"  # marks a new file put in place for an in-place check
    directory = posixpath.dirname(path) or "/"
    steps: list[Step] = []
    if expect_sha256 is not None:
        steps.append(Step("check unchanged since probe", (
            f'[ "$(sha256sum < {q(path)} | cut -d" " -f1)" = {expect_sha256} ] || '
            f"{{ echo {q(path + ' changed since it was probed; run again')}; false; }}")))
    elif expect_absent:
        steps.append(Step("check unchanged since probe", (
            f"[ ! -e {q(path)} ] || "
            f"{{ echo {q(path + ' appeared since it was probed; run again')}; false; }}")))
    in_place = validator is not None and "{path}" not in validator
    leftovers = f"{q(tmp)} {q(old)} {q(placed)}" if in_place else q(tmp)
    steps.append(Step("write candidate",
                      f"[ -d {q(directory)} ] || mkdir -p -- {q(directory)}; "
                      f"rm -f -- {leftovers}; umask 077; base64 -d > {q(tmp)}",
                      stdin=data, secret=secret))
    steps.append(Step("set owner and mode",
                      f"chown {chown} -- {q(tmp)} && chmod {mode:04o} -- {q(tmp)}"))
    if validator is not None and not in_place:
        steps.append(Step("validate", validator.replace("{path}", q(tmp))))
    if backup and exists:
        target = BACKUP_DIR + path
        steps.append(Step("backup", (
            f"mkdir -p -m 0700 {q(BACKUP_DIR)} && mkdir -p -- {q(posixpath.dirname(target))} "
            f'&& {{ [ -e {q(target + ".")}"$HOSTOPS_TS" ] || '
            f'cp -p -- {q(path)} {q(target + ".")}"$HOSTOPS_TS"; }}')))
    cleanup = f"rm -f -- {q(tmp)}"
    if not in_place:
        steps.append(Step("replace", f"mv -f -- {q(tmp)} {q(path)}"))
        return steps, cleanup
    assert validator is not None
    if exists:
        steps.append(Step("keep the live file for rollback", f"ln -f -- {q(path)} {q(old)}"))
        steps.append(Step("replace", f"mv -f -- {q(tmp)} {q(path)}"))
        steps.append(Step("validate in place", validator))
        steps.append(Step("drop the rollback copy", f"rm -f -- {q(old)}"))
        cleanup += f"; if [ -e {q(old)} ]; then mv -f -- {q(old)} {q(path)}; fi"
    else:
        steps.append(Step("replace", f"mv -f -- {q(tmp)} {q(path)} && : > {q(placed)}"))
        steps.append(Step("validate in place", validator))
        steps.append(Step("drop the rollback marker", f"rm -f -- {q(placed)}"))
        cleanup += f"; if [ -e {q(placed)} ]; then rm -f -- {q(path)} {q(placed)}; fi"
    return steps, cleanup


class Operation(ABC):
    """An idempotent primitive: desired state in, steps out (none when already there)."""

    @property
    @abstractmethod
    def id(self) -> str:
        """Unique within a host's run; handlers (`restart_on`...) refer to it."""

    @abstractmethod
    def needs(self) -> Needs:
        """The facts `plan` reads."""

    @abstractmethod
    def plan(self, ctx: PlanContext) -> Plan:
        """The steps from the facts in `ctx` to the desired state; updates `ctx.facts`."""

    def paths(self) -> tuple[str, ...]:
        """Files this operation writes (for daemon-reload after unit files change)."""
        return ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"


def _note_written(ctx: PlanContext, path: str) -> None:
    ctx.changed_paths.append(path)
    if path.startswith(SYSTEMD_DIRS):
        ctx.units_dirty = True


class File(Operation):
    """A whole file: content, owner, group, mode; validated, backed up, atomically replaced.

    `validator`: a shell command; `{path}` in it is the candidate (e.g. `sshd -t -f {path}`,
    `visudo -cf {path}`, `nft -c -f {path}`, `haproxy -c -f {path}`); without `{path}` the
    file is checked in place and put back on failure (`netplan generate`). `secret=True`
    keeps the content out of results, logs and errors (only its sha256 shows).
    """

    def __init__(self, path: str, content: str | bytes, *, owner: str = "root",
                 group: str = "root", mode: str | int = "0644", validator: str | None = None,
                 backup: bool = True, secret: bool = False) -> None:
        self.path = checked_path(path)
        self.content = _bytes(content)
        self.owner = _owner(owner)
        self.group = _owner(group)
        self.mode = _mode(mode)
        self.validator = validator
        self.backup = backup
        self.secret = secret

    @property
    def id(self) -> str:
        return f"file {self.path}"

    def needs(self) -> Needs:
        return Needs(files={self.path})

    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    def plan(self, ctx: PlanContext) -> Plan:
        current = ctx.facts.file(self.path)
        if current is not None and current.kind == "directory":
            raise PlanError(f"{self.path} is a directory")
        digest = sha256(self.content)
        secret = self.content if self.secret else None
        steps: list[Step]
        cleanup = None
        if current is None or current.kind != "file" or current.sha256 != digest:
            steps, cleanup = write_steps(
                self.path, self.content, chown=f"{self.owner}:{self.group}", mode=self.mode,
                validator=self.validator, backup=self.backup,
                exists=current is not None and current.kind == "file", secret=self.secret)
            if current is None:
                detail = f"created ({len(self.content)} bytes)"
            elif current.kind != "file":
                detail = f"replaced a {current.kind} with a file"
            else:
                detail = "content changed"
            _note_written(ctx, self.path)
        else:
            steps, changes = _attribute_steps(self.path, current, self.owner, self.group,
                                              self.mode)
            detail = ", ".join(changes) if changes else "ok"
        ctx.facts.files[self.path] = FileState("file", self.owner, self.group, self.mode,
                                               len(self.content), digest, self.content)
        return Plan(self.id, tuple(steps), detail, cleanup, secret)


def _attribute_steps(path: str, current: FileState, owner: str, group: str,
                     mode: int) -> tuple[list[Step], list[str]]:
    steps: list[Step] = []
    changes: list[str] = []
    if (current.owner, current.group) != (owner, group):
        steps.append(Step("set owner", f"chown {owner}:{group} -- {q(path)}"))
        changes.append(f"owner {current.owner}:{current.group} -> {owner}:{group}")
    if current.mode != mode:
        steps.append(Step("set mode", f"chmod {mode:04o} -- {q(path)}"))
        changes.append(f"mode {current.mode:04o} -> {mode:04o}")
    return steps, changes


class Directory(Operation):
    """A directory with owner, group and mode (parents created as needed)."""

    def __init__(self, path: str, *, owner: str = "root", group: str = "root",
                 mode: str | int = "0755") -> None:
        self.path = checked_path(path)
        self.owner = _owner(owner)
        self.group = _owner(group)
        self.mode = _mode(mode)

    @property
    def id(self) -> str:
        return f"directory {self.path}"

    def needs(self) -> Needs:
        return Needs(files={self.path})

    def plan(self, ctx: PlanContext) -> Plan:
        current = ctx.facts.file(self.path)
        if current is not None and current.kind != "directory":
            raise PlanError(f"{self.path} exists and is a {current.kind}, not a directory")
        if current is None:
            steps = [Step("create", f"mkdir -p -- {q(self.path)} && "
                                    f"chown {self.owner}:{self.group} -- {q(self.path)} && "
                                    f"chmod {self.mode:04o} -- {q(self.path)}")]
            detail = "created"
        else:
            steps, changes = _attribute_steps(self.path, current, self.owner, self.group,
                                              self.mode)
            detail = ", ".join(changes) if changes else "ok"
        ctx.facts.files[self.path] = FileState("directory", self.owner, self.group, self.mode)
        return Plan(self.id, tuple(steps), detail)


class _TextEdit(Operation):
    """Shared by Line and LineAbsent: edit the fetched content, write it back whole."""

    def __init__(self, path: str, *, validator: str | None, backup: bool, create: bool,
                 owner: str, group: str, mode: str | int) -> None:
        self.path = checked_path(path)
        self.validator = validator
        self.backup = backup
        self.create = create
        self.owner = _owner(owner)
        self.group = _owner(group)
        self.mode = _mode(mode)

    def needs(self) -> Needs:
        return Needs(files={self.path}, contents={self.path})

    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    @abstractmethod
    def edit(self, lines: list[str]) -> tuple[list[str], str]:
        """The new lines and what changed (same list object when nothing did)."""

    def plan(self, ctx: PlanContext) -> Plan:
        current = ctx.facts.file(self.path)
        if current is not None and current.kind != "file":
            raise PlanError(f"{self.path} is a {current.kind}, not a file")
        if current is None and not self.create:
            ctx.facts.files[self.path] = None
            return Plan(self.id, (), "file absent")
        if current is not None and current.content is None:
            raise PlanError(f"no content of {self.path} in the facts")
        old = current.content if current is not None and current.content is not None else b""
        text = old.decode("utf-8", "surrogateescape")
        lines = text.splitlines()
        new_lines, detail = self.edit(lines)
        if new_lines is lines:
            return Plan(self.id, (), "ok")
        data = "".join(line + "\n" for line in new_lines).encode("utf-8", "surrogateescape")
        owner, group, mode = ((current.owner, current.group, current.mode) if current
                              else (self.owner, self.group, self.mode))
        steps, cleanup = write_steps(
            self.path, data, chown=f"{owner}:{group}", mode=mode, validator=self.validator,
            backup=self.backup, exists=current is not None, secret=False,
            expect_sha256=current.sha256 if current is not None and current.sha256 else None,
            expect_absent=current is None)
        _note_written(ctx, self.path)
        ctx.facts.files[self.path] = FileState("file", owner, group, mode, len(data),
                                               sha256(data), data)
        return Plan(self.id, tuple(steps), detail, cleanup)


class Line(_TextEdit):
    """A line in a file. With `regexp`, the first line matching it becomes `line` and later
    matches are removed (the file ends with exactly one); without a match, or without
    `regexp`, the line is appended unless present. The file is created if missing
    (`owner`/`group`/`mode` apply only then), and written back like a `File`."""

    def __init__(self, path: str, line: str, regexp: str | None = None, *,
                 validator: str | None = None, backup: bool = True, create: bool = True,
                 owner: str = "root", group: str = "root", mode: str | int = "0644") -> None:
        super().__init__(path, validator=validator, backup=backup, create=create,
                         owner=owner, group=group, mode=mode)
        if "\n" in line:
            raise ValueError("Line takes a single line; use File for more")
        self.line = line
        self.regexp = re.compile(regexp) if regexp is not None else None

    @property
    def id(self) -> str:
        what = self.regexp.pattern if self.regexp is not None else self.line
        return f"line {self.path}: {what}"

    def edit(self, lines: list[str]) -> tuple[list[str], str]:
        if self.regexp is not None:
            matches = [i for i, text in enumerate(lines) if self.regexp.search(text)]
            if matches:
                if len(matches) == 1 and lines[matches[0]] == self.line:
                    return lines, "ok"
                new = list(lines)
                new[matches[0]] = self.line
                for index in reversed(matches[1:]):
                    del new[index]
                extra = f", {len(matches) - 1} duplicate(s) removed" if len(matches) > 1 else ""
                return new, f"line {matches[0] + 1} replaced{extra}"
        if self.line in lines:
            return lines, "ok"
        return [*lines, self.line], "line appended"


class LineAbsent(_TextEdit):
    """No line of the file matches `regexp` (a missing file is fine)."""

    def __init__(self, path: str, regexp: str, *, validator: str | None = None,
                 backup: bool = True) -> None:
        super().__init__(path, validator=validator, backup=backup, create=False,
                         owner="root", group="root", mode="0644")
        self.regexp = re.compile(regexp)

    @property
    def id(self) -> str:
        return f"line absent {self.path}: {self.regexp.pattern}"

    def edit(self, lines: list[str]) -> tuple[list[str], str]:
        kept = [text for text in lines if not self.regexp.search(text)]
        if len(kept) == len(lines):
            return lines, "ok"
        return kept, f"{len(lines) - len(kept)} line(s) removed"


class Sudoers(File):
    """/etc/sudoers.d/<name>, mode 0440, checked by `visudo -cf` before it lands."""

    def __init__(self, name: str, content: str, *, backup: bool = False) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            # sudo skips files whose name has a dot or ends with ~: refuse them here.
            raise ValueError(f"sudoers drop-in name {name!r}: letters, digits, - and _ only")
        super().__init__(f"/etc/sudoers.d/{name}", content, mode="0440",
                         validator="visudo -cf {path}", backup=backup)
        self.name = name

    @property
    def id(self) -> str:
        return f"sudoers {self.name}"


class Packages(Operation):
    """Debian packages installed (apt-get, from whatever sources the host has); a no-op
    when dpkg says they are. `update=True` runs `apt-get update` first, only when
    something is missing."""

    def __init__(self, names: Sequence[str], *, update: bool = False) -> None:
        if isinstance(names, str):
            raise TypeError("Packages takes a list of names")
        for name in names:
            if not PACKAGE_RE.fullmatch(name):
                raise ValueError(f"not a Debian package name: {name!r}")
        self.names = tuple(dict.fromkeys(names))
        self.update = update

    @property
    def id(self) -> str:
        return f"packages {' '.join(self.names)}"

    def needs(self) -> Needs:
        return Needs(packages=set(self.names))

    def plan(self, ctx: PlanContext) -> Plan:
        missing = [name for name in self.names if not ctx.facts.packages.get(name)]
        if not missing:
            return Plan(self.id, (), "installed")
        steps = []
        if self.update:
            steps.append(Step("apt-get update", "apt-get update -q"))
        steps.append(Step("apt-get install", (
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
            "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "
            + " ".join(missing))))
        for name in missing:
            ctx.facts.packages[name] = True
        return Plan(self.id, tuple(steps), f"installed {' '.join(missing)}")


class Group(Operation):
    """A group (with a given gid, if given)."""

    def __init__(self, name: str, *, gid: int | None = None, system: bool = False) -> None:
        if not USER_RE.fullmatch(name):
            raise ValueError(f"not a group name: {name!r}")
        self.name = name
        self.gid = gid
        self.system = system

    @property
    def id(self) -> str:
        return f"group {self.name}"

    def needs(self) -> Needs:
        return Needs(groups={self.name})

    def plan(self, ctx: PlanContext) -> Plan:
        current = ctx.facts.groups.get(self.name)
        if current is None:
            options = (f"-g {self.gid} " if self.gid is not None else "") + \
                      ("-r " if self.system else "")
            ctx.facts.groups[self.name] = GroupState(self.name, self.gid or -1)
            return Plan(self.id, (Step("groupadd", f"groupadd {options}{self.name}"),),
                        "created")
        if self.gid is not None and current.gid != self.gid:
            ctx.facts.groups[self.name] = GroupState(self.name, self.gid, current.members)
            return Plan(self.id, (Step("groupmod", f"groupmod -g {self.gid} {self.name}"),),
                        f"gid {current.gid} -> {self.gid}")
        return Plan(self.id, (), "ok")


class User(Operation):
    """A user with a login shell, a primary group (`group`, else its own new one),
    supplementary groups (added, never removed) and, when `authorized_keys` is given, its
    ~/.ssh/authorized_keys: exactly these keys (`exclusive_keys=True`) or these keys added
    to the ones there."""

    def __init__(self, name: str, *, groups: Sequence[str] = (), shell: str = "/bin/bash",
                 home: str | None = None, authorized_keys: Sequence[str] | None = None,
                 exclusive_keys: bool = True, system: bool = False,
                 group: str | None = None) -> None:
        if not USER_RE.fullmatch(name):
            raise ValueError(f"not a user name: {name!r}")
        if group is not None and not USER_RE.fullmatch(group):
            raise ValueError(f"not a group name: {group!r}")
        self.group = group
        for group in groups:
            if not USER_RE.fullmatch(group):
                raise ValueError(f"not a group name: {group!r}")
        self.name = name
        self.groups = tuple(groups)
        self.shell = checked_path(shell)
        self.home = checked_path(home) if home is not None else None
        if isinstance(authorized_keys, str):
            raise TypeError("authorized_keys is a list of public key lines")
        self.authorized_keys = (tuple(key.strip() for key in authorized_keys)
                                if authorized_keys is not None else None)
        for key in self.authorized_keys or ():
            if not key or "\n" in key:
                raise ValueError("an authorized key is one non-empty line")
        self.exclusive_keys = exclusive_keys
        self.system = system

    @property
    def id(self) -> str:
        return f"user {self.name}"

    def needs(self) -> Needs:
        return Needs(users={self.name},
                     groups=set(self.groups) | ({self.group} if self.group else set()))

    def plan(self, ctx: PlanContext) -> Plan:
        for group in (*self.groups, *([self.group] if self.group else [])):
            if ctx.facts.groups.get(group) is None:
                raise PlanError(f"user {self.name}: group {group} does not exist "
                                "(put a Group operation before the User)")
        current = ctx.facts.users.get(self.name)
        steps: list[Step] = []
        changes: list[str] = []
        if current is None:
            home = self.home or f"/home/{self.name}"
            options = [f"-s {q(self.shell)}", f"-m -d {q(home)}"]
            if self.group:
                options.append(f"-g {self.group}")
            if self.groups:
                options.append(f"-G {','.join(self.groups)}")
            if self.system:
                options.append("-r")
            steps.append(Step("useradd", f"useradd {' '.join(options)} {self.name}"))
            changes.append("created")
            current = UserState(self.name, -1, -1, home, self.shell)
            for group in self.groups:
                state = ctx.facts.groups[group]
                assert state is not None
                ctx.facts.groups[group] = GroupState(group, state.gid,
                                                     (*state.members, self.name))
        else:
            if current.shell != self.shell:
                steps.append(Step("set shell", f"usermod -s {q(self.shell)} {self.name}"))
                changes.append(f"shell {current.shell} -> {self.shell}")
            if self.home is not None and current.home != self.home:
                raise PlanError(f"user {self.name} exists with home {current.home}, "
                                f"not {self.home}; move it by hand")
            primary = ctx.facts.groups.get(self.group) if self.group else None
            if primary is not None and primary.gid != current.gid:
                steps.append(Step("set primary group", f"usermod -g {primary.name} {self.name}"))
                changes.append(f"primary group -> {primary.name}")
            missing = []
            for group in self.groups:
                state = ctx.facts.groups[group]
                assert state is not None
                if self.name not in state.members and state.gid != current.gid:
                    missing.append(group)
                    ctx.facts.groups[group] = GroupState(group, state.gid,
                                                         (*state.members, self.name))
            if missing:
                steps.append(Step("add to groups",
                                  f"usermod -a -G {','.join(missing)} {self.name}"))
                changes.append(f"added to {', '.join(missing)}")
        keys_state = current.keys_file
        if self.authorized_keys is not None:
            key_steps, key_change, keys_state = self._keys(current)
            steps += key_steps
            changes += key_change
        ctx.facts.users[self.name] = UserState(self.name, current.uid, current.gid,
                                               current.home, self.shell, current.ssh_dir,
                                               keys_state)
        return Plan(self.id, tuple(steps), ", ".join(changes) or "ok",
                    f"rm -f -- {q(temp_path(current.home + '/.ssh/authorized_keys'))}")

    def _keys(self, current: UserState) -> tuple[list[Step], list[str], FileState]:
        assert self.authorized_keys is not None
        ssh_dir = f"{current.home}/.ssh"
        path = f"{ssh_dir}/authorized_keys"
        have = current.keys_file.content if current.keys_file is not None else None
        have_text = (have or b"").decode("utf-8", "surrogateescape")
        if self.exclusive_keys:
            want_lines = list(dict.fromkeys(self.authorized_keys))
        else:
            present = {_key_blob(line) for line in have_text.splitlines()}
            want_lines = have_text.splitlines() + [
                key for key in dict.fromkeys(self.authorized_keys)
                if _key_blob(key) not in present]
        data = "".join(line + "\n" for line in want_lines).encode("utf-8", "surrogateescape")
        steps: list[Step] = []
        changes: list[str] = []
        directory = current.ssh_dir
        if directory is None or directory.kind != "directory" or \
                directory.owner != self.name or directory.mode != 0o700:
            steps.append(Step("~/.ssh", f"mkdir -p -- {q(ssh_dir)} && chown {self.name}: -- "
                                        f"{q(ssh_dir)} && chmod 0700 -- {q(ssh_dir)}"))
        keys_file = current.keys_file
        if have is None or have != data or keys_file is None:
            write, _ = write_steps(path, data, chown=f"{self.name}:", mode=0o600,
                                   validator=None, backup=False, exists=have is not None,
                                   secret=False)
            steps += write
            changes.append(f"authorized_keys: {len(want_lines)} key(s)")
        elif keys_file.owner != self.name or keys_file.mode != 0o600:
            steps.append(Step("authorized_keys owner and mode",
                              f"chown {self.name}: -- {q(path)} && chmod 0600 -- {q(path)}"))
            changes.append("authorized_keys owner and mode")
        return steps, changes, FileState("file", self.name, "", 0o600, len(data), sha256(data),
                                         data)


def _key_blob(line: str) -> str:
    """The key material of an authorized_keys line (options and comment ignored)."""
    fields = line.split()
    for index, token in enumerate(fields[:-1]):
        if token.startswith(("ssh-", "ecdsa-", "sk-")):
            return fields[index + 1]
    return line.strip()


class UserAbsent(Operation):
    """No such user (its home and mail spool removed with it unless `remove_home=False`)."""

    def __init__(self, name: str, *, remove_home: bool = True) -> None:
        if not USER_RE.fullmatch(name):
            raise ValueError(f"not a user name: {name!r}")
        self.name = name
        self.remove_home = remove_home

    @property
    def id(self) -> str:
        return f"user absent {self.name}"

    def needs(self) -> Needs:
        return Needs(users={self.name})

    def plan(self, ctx: PlanContext) -> Plan:
        if ctx.facts.users.get(self.name) is None:
            return Plan(self.id, (), "absent")
        ctx.facts.users[self.name] = None
        option = "-r " if self.remove_home else ""
        # userdel -r exits 12 when only the mail spool was missing: that is fine.
        return Plan(self.id, (Step("userdel", f"userdel {option}{self.name} || "
                                              f"{{ rc=$?; [ $rc -eq 12 ] || exit $rc; }}"),),
                    "removed")


class Sysctl(Operation):
    """A kernel parameter, now (`sysctl -w`) and at boot (a `key = value` line in
    `persist_file`). A key that does not exist yet (module not loaded) is not an error
    until the apply: a `modprobe` earlier in the same run can create it."""

    def __init__(self, key: str, value: str | int, *,
                 persist_file: str = DEFAULT_SYSCTL_FILE) -> None:
        if not SYSCTL_RE.fullmatch(key):
            raise ValueError(f"not a sysctl key: {key!r}")
        self.key = key
        self.value = normalize_sysctl(value)
        self.persist_file = checked_path(persist_file)
        self._line = Line(persist_file, f"{key} = {self.value}",
                          regexp=rf"^\s*{re.escape(key)}\s*=")

    @property
    def id(self) -> str:
        return f"sysctl {self.key}"

    def needs(self) -> Needs:
        return self._line.needs().merge(Needs(sysctls={self.key}))

    def paths(self) -> tuple[str, ...]:
        return (self.persist_file,)

    def plan(self, ctx: PlanContext) -> Plan:
        line = self._line.plan(ctx)
        steps = list(line.steps)
        changes = [f"{self.persist_file} {line.detail}"] if line.changed else []
        runtime = ctx.facts.sysctls.get(self.key)
        if runtime != self.value:
            steps.append(Step("sysctl -w", f"sysctl -q -w {q(f'{self.key}={self.value}')}"))
            changes.append(f"runtime {runtime if runtime is not None else '(absent)'}"
                           f" -> {self.value}")
            ctx.facts.sysctls[self.key] = self.value
        return Plan(self.id, tuple(steps), ", ".join(changes) or "ok", line.cleanup)


GiB = 2**30
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,16}$")
_FSTYPE_RE = re.compile(r"^[a-z0-9]{2,10}$")


class DataDisk(Operation):
    """A VM's data disk formatted, in /etc/fstab by label (nofail; systemd reloaded when the
    line changes) and mounted at `mount`.

    Because it formats disks, it is strict. A disk already carrying `label` is used as it
    is (never formatted again). Otherwise the one candidate is formatted: a whole disk
    (lsblk TYPE disk) with no partition, no file system or other signature, not mounted,
    of exactly `size_gb` GiB (what the hypervisor was asked for). None or several
    candidates is a PlanError naming every device seen, its size and why it was refused.
    The format step checks again on the host, in the same shell step, just before
    `mkfs` (block device, size, `wipefs -n`, `blkid -p`, not mounted): a disk used since
    the probe is left alone. The mount step refuses a mount point that is already a mount
    point or not empty (mounting would hide what is there).
    """

    def __init__(self, size_gb: int, *, mount: str = DATA_MOUNT, label: str = DATA_LABEL,
                 fstype: str = DATA_FSTYPE, options: str = "defaults,nofail") -> None:
        if not isinstance(size_gb, int) or size_gb < 1:
            raise ValueError(f"not a disk size in GiB: {size_gb!r}")
        if not _LABEL_RE.fullmatch(label):
            raise ValueError(f"not a file system label (1-16 of A-Z a-z 0-9 _ . -): {label!r}")
        if not _FSTYPE_RE.fullmatch(fstype):
            raise ValueError(f"not a file system type: {fstype!r}")
        if "nofail" not in options.split(","):
            raise ValueError("a data disk's fstab options need nofail: a VM whose data disk "
                             "is missing must still boot and be reachable")
        if not re.fullmatch(r"[A-Za-z0-9_=,.-]+", options):
            raise ValueError(f"not mount options: {options!r}")
        self.size_gb = size_gb
        self.mount = checked_path(mount)
        if self.mount == "/":
            raise ValueError("a data disk cannot be mounted at /")
        self.label = label
        self.fstype = fstype
        self.options = options
        self.fstab_line = f"LABEL={label} {self.mount} {fstype} {options} 0 2"
        self._line = Line("/etc/fstab", self.fstab_line,
                          regexp=rf"^\s*[^#\s]\S*\s+{re.escape(self.mount)}\s")
        self.empty_check = f"test -z \"$(ls -A -- {q(self.mount)} 2>/dev/null)\""

    @property
    def id(self) -> str:
        return f"data disk {self.mount}"

    def needs(self) -> Needs:
        return self._line.needs().merge(Needs(block_devices=True, checks={self.empty_check}))

    def paths(self) -> tuple[str, ...]:
        return ("/etc/fstab",)

    def candidates(self, devices: Iterable[BlockDevice]
                   ) -> tuple[list[BlockDevice], list[tuple[BlockDevice, str]]]:
        """The disks that may be formatted, and every other device with why not."""
        want = self.size_gb * GiB
        ok: list[BlockDevice] = []
        refused: list[tuple[BlockDevice, str]] = []
        for device in devices:
            reasons = []
            if device.type != "disk":
                reasons.append(f"not a whole disk (type {device.type or 'unknown'})")
            if device.children:
                reasons.append("has partitions or volumes")
            if device.fstype:
                reasons.append(f"carries a {device.fstype} signature")
            if device.mountpoint:
                reasons.append(f"mounted at {device.mountpoint}")
            if device.size != want:
                reasons.append(f"size {device.size} bytes, not {self.size_gb} GiB ({want})")
            if reasons:
                refused.append((device, "; ".join(reasons)))
            else:
                ok.append(device)
        return ok, refused

    def plan(self, ctx: PlanContext) -> Plan:
        devices = ctx.facts.block_devices
        if devices is None:
            raise KeyError("no fact about block devices: the operation did not declare it")
        everything = list(_walk(devices))
        labelled = [d for d in everything if d.label == self.label]
        if len(labelled) > 1:
            raise PlanError(f"several devices carry the label {self.label}: "
                            f"{', '.join(d.describe() for d in labelled)}; keep one")
        elsewhere = [d for d in everything if d.mountpoint == self.mount
                     and d.label != self.label]
        if elsewhere:
            raise PlanError(f"{self.mount} is already the mount point of "
                            f"{elsewhere[0].describe()}, not of a disk labelled {self.label}")
        steps: list[Step] = []
        changes: list[str] = []
        if labelled:
            disk = labelled[0]
            if disk.fstype != self.fstype:
                raise PlanError(f"{disk.describe()} carries the label {self.label} but is not "
                                f"{self.fstype}; not touching it")
            if disk.mountpoint not in (None, self.mount):
                raise PlanError(f"{disk.describe()} is mounted elsewhere than {self.mount}")
        else:
            found, refused = self.candidates(devices)
            if len(found) != 1:
                seen = "; ".join(f"{d.describe()}: {why}" for d, why in refused) or "none"
                what = ("no disk" if not found else
                        f"{len(found)} disks ({', '.join(d.path for d in found)})")
                raise PlanError(
                    f"{what} can be the {self.size_gb} GiB data disk for {self.mount} (a whole "
                    f"disk of exactly {self.size_gb} GiB, no partition, no file system or "
                    f"signature, not mounted); refused: {seen}")
            disk = found[0]
            steps.append(Step("format", self._format(disk)))
            changes.append(f"{disk.path} formatted {self.fstype} {self.label}")
        line = self._line.plan(ctx)
        steps += line.steps
        if line.changed:
            changes.append(f"/etc/fstab {line.detail}")
            # systemd makes its mount units from fstab: let it see the new line.
            steps.append(Step("daemon-reload", "systemctl daemon-reload"))
        if disk.mountpoint != self.mount:
            if not ctx.facts.checks.get(self.empty_check, True):
                raise PlanError(f"{self.mount} is not empty: mounting {disk.path} there would "
                                "hide its content; move it away first")
            steps.append(Step("mount", self._mount(disk)))
            changes.append(f"mounted at {self.mount}")
        mounted = BlockDevice(disk.name, disk.path, disk.size, disk.type, self.fstype,
                              self.label, self.mount, disk.children)
        ctx.facts.block_devices = tuple(_replace(devices, disk, mounted))
        detail = ", ".join(changes) if changes else f"ok ({disk.path})"
        return Plan(self.id, tuple(steps), detail, line.cleanup)

    def _format(self, disk: BlockDevice) -> str:
        """mkfs, after checking on the host that the disk is still unused (same step)."""
        d = q(checked_path(disk.path))
        want = self.size_gb * GiB
        why = f"{disk.path}: not formatting it, "
        return "\n".join([
            f"[ -b {d} ] || {_fail(why + 'no longer a block device')}",
            f"s=$(blockdev --getsize64 {d}) || exit 1",
            f'[ "$s" = {want} ] || {{ echo {q(why + "its size is")} "$s" bytes; exit 1; }}',
            f"w=$(wipefs -n {d}) || exit 1",
            f'[ -z "$w" ] || {{ echo {q(why + "wipefs -n finds a signature:")}; '
            'echo "$w"; exit 1; }',
            f"r=0; blkid -p {d} >/dev/null 2>&1 || r=$?",
            f'[ "$r" -eq 2 ] || {{ echo {q(why + "blkid -p finds something:")}; '
            f"blkid -p {d}; exit 1; }}",
            f"! findmnt -rn -S {d} >/dev/null || {_fail(why + 'it is mounted')}",
            f"mkfs.{self.fstype} -q -L {q(self.label)} {d}",
        ])

    def _mount(self, disk: BlockDevice) -> str:
        m = q(self.mount)
        return "\n".join([
            f"mkdir -p -- {m}",
            f"! mountpoint -q -- {m} || {_fail(self.mount + ' is a mount point already')}",
            f'[ -z "$(ls -A -- {m})" ] || {_fail(self.mount + " is not empty")}',
            f"mount -t {self.fstype} -o {q(self.options)} -- {q(disk.path)} {m}",
        ])


def _fail(message: str) -> str:
    return f"{{ echo {q(message)}; exit 1; }}"


def _walk(devices: Iterable[BlockDevice]) -> Iterable[BlockDevice]:
    for device in devices:
        yield device
        yield from _walk(device.children)


def _replace(devices: Iterable[BlockDevice], old: BlockDevice,
             new: BlockDevice) -> Iterable[BlockDevice]:
    for device in devices:
        if device == old:
            yield new
        else:
            yield BlockDevice(device.name, device.path, device.size, device.type,
                              device.fstype, device.label, device.mountpoint,
                              tuple(_replace(device.children, old, new)))


def _ref(op: Operation | str) -> str:
    return op if isinstance(op, str) else op.id


class Service(Operation):
    """A systemd unit enabled (or not) and running (or not); restarted when one of
    `restart_on`, reloaded when one of `reload_on` changed in this same run (operations or
    their ids, listed before the Service). A unit started by this run is not restarted
    again. `systemctl daemon-reload` runs first when a unit file changed. `None` leaves
    that aspect alone."""

    ENABLED = ("enabled", "enabled-runtime", "static", "alias", "indirect", "generated")
    ACTIVE = ("active", "reloading", "activating")

    def __init__(self, name: str, *, enabled: bool | None = True, running: bool | None = True,
                 restart_on: Iterable[Operation | str] = (),
                 reload_on: Iterable[Operation | str] = ()) -> None:
        self.unit = unit_name(name)
        self.enabled = enabled
        self.running = running
        self.restart_on = tuple(_ref(op) for op in restart_on)
        self.reload_on = tuple(_ref(op) for op in reload_on)

    @property
    def id(self) -> str:
        return f"service {self.unit}"

    def needs(self) -> Needs:
        return Needs(services={self.unit})

    def plan(self, ctx: PlanContext) -> Plan:
        state = ctx.facts.services.get(self.unit) or ServiceState("not-found", "", "inactive")
        if state.load == "not-found":  # a package or unit file of this run may bring it
            state = ServiceState("not-found", "disabled", "inactive")
        unit = q(self.unit)
        steps: list[Step] = []
        changes: list[str] = []
        if ctx.units_dirty:
            steps.append(Step("daemon-reload", "systemctl daemon-reload"))
            ctx.units_dirty = False
        enable = self.enabled is True and state.enabled not in self.ENABLED
        disable = self.enabled is False and state.enabled in ("enabled", "enabled-runtime")
        active = state.active in self.ACTIVE
        start = self.running is True and not active
        stop = self.running is False and active
        restart_by = [ref for ref in self.restart_on if ref in ctx.changed]
        reload_by = [ref for ref in self.reload_on if ref in ctx.changed]
        if enable and start:
            steps.append(Step("enable and start", f"systemctl enable --now {unit}"))
            changes.append("enabled and started")
        else:
            if enable:
                steps.append(Step("enable", f"systemctl enable {unit}"))
                changes.append("enabled")
            if start:
                steps.append(Step("start", f"systemctl start {unit}"))
                changes.append("started")
        if disable:
            steps.append(Step("disable", f"systemctl disable {unit}"))
            changes.append("disabled")
        if stop:
            steps.append(Step("stop", f"systemctl stop {unit}"))
            changes.append("stopped")
        elif active and self.running is not False:
            if restart_by:
                steps.append(Step("restart", f"systemctl restart {unit}"))
                changes.append(f"restarted ({', '.join(restart_by)} changed)")
            elif reload_by:
                steps.append(Step("reload", f"systemctl reload {unit}"))
                changes.append(f"reloaded ({', '.join(reload_by)} changed)")
        if steps and not changes:  # only the daemon-reload: not a change of this unit
            changes.append("units reloaded")
        ctx.facts.services[self.unit] = ServiceState(
            "loaded",
            "enabled" if enable else "disabled" if disable else state.enabled,
            "active" if start or (active and not stop) else "inactive")
        return Plan(self.id, tuple(steps), ", ".join(changes) or "ok")


class Command(Operation):
    """A shell command that only runs when needed: `unless` (a read-only check command,
    run in the probe; the command runs when the check fails), `creates` (runs when that
    path is missing) or `on_change` (runs when one of those operations changed in this
    run). At least one is required: a command without a guard is not idempotent."""

    def __init__(self, command: str, *, unless: str | None = None, creates: str | None = None,
                 on_change: Iterable[Operation | str] = (), name: str | None = None) -> None:
        self.command = command
        self.unless = unless
        self.creates = checked_path(creates) if creates is not None else None
        self.on_change = tuple(_ref(op) for op in on_change)
        if unless is None and creates is None and not self.on_change:
            raise ValueError(f"command {command!r} needs a guard: unless, creates or on_change")
        self.name = name or command

    @property
    def id(self) -> str:
        return f"command {self.name}"

    def needs(self) -> Needs:
        needs = Needs()
        if self.unless is not None:
            needs.checks.add(self.unless)
        if self.creates is not None:
            needs.files.add(self.creates)
        return needs

    def plan(self, ctx: PlanContext) -> Plan:
        reasons = [f"{ref} changed" for ref in self.on_change if ref in ctx.changed]
        if self.unless is not None and not ctx.facts.checks.get(self.unless, False):
            reasons.append("check failed")
        if self.creates is not None and ctx.facts.file(self.creates) is None:
            reasons.append(f"{self.creates} missing")
        if not reasons:
            return Plan(self.id, (), "ok")
        if self.unless is not None:
            ctx.facts.checks[self.unless] = True
        if self.creates is not None:
            ctx.facts.files[self.creates] = FileState("file", "root", "root", 0o644)
        return Plan(self.id, (Step("run", self.command),), f"ran ({', '.join(reasons)})")


def plan_all(ops: Sequence[Operation], facts: Facts) -> list[Plan]:
    """Plan every operation in order on a working copy of `facts`."""
    check_refs(ops)
    ctx = PlanContext(facts.copy())
    plans = []
    for op in ops:
        plan = op.plan(ctx)
        if plan.changed:
            ctx.changed.add(op.id)
        plans.append(plan)
    return plans


def check_refs(ops: Sequence[Operation]) -> None:
    """Ids are unique; handlers refer to operations listed before them."""
    seen: set[str] = set()
    for op in ops:
        if op.id in seen:
            raise ValueError(f"two operations with the id {op.id!r}")
        refs = [*getattr(op, "restart_on", ()), *getattr(op, "reload_on", ()),
                *getattr(op, "on_change", ())]
        for ref in refs:
            if ref not in seen:
                raise ValueError(f"{op.id} refers to {ref!r}, which is not an operation "
                                 "listed before it")
        seen.add(op.id)
