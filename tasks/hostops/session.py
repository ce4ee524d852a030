"""Running operations on hosts: one probe and at most one apply per host, over SSH.

`HostSession.run(ops)` sends the probe script (one round trip), plans every operation
locally from the facts, and, if anything is to change, sends the apply script (a second
round trip). Scripts go to `/bin/sh -s` on the host (through `sudo -n` unless the login
user is root) on standard input, over a channel of the host's Fabric connection.
`ConnectionPool` keeps one connection per host (and per jump host) for a whole phase.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blocks.ssh import HostUnreachable, SshHostError, open_connection, split_jump
from tasks.hostops.facts import Facts, Needs, ProbeError, parse_probe, probe_script
from tasks.hostops.ops import Operation, Plan, PlanError, check_refs, plan_all
from tasks.hostops.script import ApplyReport, apply_script, parse_apply

if TYPE_CHECKING:
    from fabric import Connection

    from blocks.ssh import SshIdentity

log = logging.getLogger("tasks.hostops")

DISK_FULL = "No space left on device"
SUDO_REFUSALS = ("a password is required", "a terminal is required", "not in the sudoers",
                 "is not allowed to run", "may not run sudo")
OUTPUT_LIMIT = 4000  # characters of a failing command's output quoted in an error


@dataclass(frozen=True)
class OpResult:
    """What one operation did (or, in a dry run, would do) on one host."""

    op: str
    changed: bool
    detail: str
    commands: tuple[str, ...] = ()  # rendered: file contents never appear, only sizes/sha256

    @classmethod
    def of(cls, plan: Plan, detail: str | None = None) -> OpResult:
        return cls(plan.op, plan.changed, detail or plan.detail, plan.commands())


@dataclass(frozen=True)
class HostReport:
    """Every operation's result on one host, with the time and SSH round trips it took."""

    host: str
    results: tuple[OpResult, ...]
    dry_run: bool
    seconds: float
    round_trips: int

    @property
    def changed(self) -> list[str]:
        return [result.op for result in self.results if result.changed]

    @property
    def unchanged(self) -> list[str]:
        return [result.op for result in self.results if not result.changed]


class HostOpError(SshHostError):
    """An operation failed on a host: names the host, the step (operation and what it was
    doing) and the cause (a validator's or command's output quoted). `results` holds what
    every operation did before the failure (the failing one and later ones unchanged)."""

    def __init__(self, host: str, step: str, cause: str, *,
                 results: Sequence[OpResult] = (), disk_full: bool = False) -> None:
        super().__init__(host, step, cause)
        self.results = tuple(results)
        self.disk_full = disk_full

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (self.host, self.step, self.cause, self.results,
                                 self.disk_full))


def _rebuild_error(host: str, step: str, cause: str, results: tuple[OpResult, ...],
                   disk_full: bool) -> HostOpError:
    return HostOpError(host, step, cause, results=results, disk_full=disk_full)


def scrub(text: str, secret: bytes | None) -> str:
    """Remove a secret file's lines and long words from a tool's output before quoting it."""
    if not secret:
        return text
    content = secret.decode("utf-8", "replace")
    pieces = {line.strip() for line in content.splitlines() if len(line.strip()) >= 6}
    pieces |= {word for word in content.split() if len(word) >= 8}
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, "[secret]")
    return text


def _quote_output(text: str) -> str:
    text = text.strip()
    if len(text) > OUTPUT_LIMIT:
        text = "…" + text[-OUTPUT_LIMIT:]
    return text or "(no output)"


class HostSession:
    """Operations on one host over one (reused) Fabric connection."""

    def __init__(self, connection: Connection, *, host: str | None = None,
                 sudo: bool | None = None, timeout: float = 1800.0) -> None:
        """`host`: the name errors and reports use (defaults to the connection's host);
        `sudo`: run as root through `sudo -n` (default: unless the login user is root);
        `timeout`: seconds a script may run without finishing its output."""
        self.connection = connection
        self.host = host or connection.host
        self.sudo = connection.user != "root" if sudo is None else sudo
        self.timeout = timeout
        self.round_trips = 0

    @property
    def shell(self) -> str:
        """The remote command the scripts are fed to."""
        return "sudo -n /bin/sh -s" if self.sudo else "/bin/sh -s"

    # -- the two round trips --------------------------------------------------------------

    def probe(self, needs: Needs) -> Facts:
        """The facts `needs` names (no round trip when it names none)."""
        if needs == Needs():
            return Facts()
        status, out, err = self.execute(probe_script(needs), step="probe")
        try:
            return parse_probe(out, needs)
        except (ProbeError, ValueError, IndexError) as error:
            raise self._script_failure("probe", status, out, err, str(error)) from None

    def plan(self, ops: Sequence[Operation]) -> list[Plan]:
        """Probe, then plan every operation (what a dry run shows)."""
        check_refs(ops)
        facts = self.probe(Needs.union(op.needs() for op in ops))
        try:
            return plan_all(ops, facts)
        except (PlanError, KeyError) as error:
            raise HostOpError(self.host, "plan", str(error).strip("'\"")) from None

    def run(self, ops: Sequence[Operation], *, dry_run: bool = False) -> HostReport:
        """Bring the host to the state `ops` describe; a result for every operation.

        Raises HostOpError (or HostUnreachable, AuthenticationRefused, HostKeyMismatch)
        naming the host, the step and the cause; then `error.results` tells what the
        operations before the failing one did.
        """
        started = time.monotonic()
        trips = self.round_trips
        plans = self.plan(ops)
        changing = [plan for plan in plans if plan.changed]
        if changing and not dry_run:
            self._apply(plans)
        report = HostReport(self.host, tuple(OpResult.of(plan) for plan in plans), dry_run,
                            time.monotonic() - started, self.round_trips - trips)
        log.info("%s: %s%d changed, %d unchanged in %.2f s (%d round trips)", self.host,
                 "dry run: " if dry_run else "", len(report.changed), len(report.unchanged),
                 report.seconds, report.round_trips)
        for result in report.results:
            if result.changed:
                log.debug("%s: %s: %s: %s", self.host, result.op, result.detail,
                          "; ".join(result.commands))
        return report

    def _apply(self, plans: list[Plan]) -> ApplyReport:
        status, out, err = self.execute(apply_script(plans), step="apply")
        report = parse_apply(out)
        wanted = [index for index, plan in enumerate(plans) if plan.changed]
        if report.failure is not None:
            raise self._step_failure(plans, report)
        if not report.complete or list(report.done) != wanted:
            raise self._script_failure("apply", status, out, err,
                                       "the apply script stopped before its end")
        return report

    def _step_failure(self, plans: list[Plan], report: ApplyReport) -> HostOpError:
        failure = report.failure
        assert failure is not None
        plan = plans[failure.op_index]
        step = plan.steps[failure.step_index]
        output = scrub(failure.output, plan.secret)
        disk_full = DISK_FULL in output
        if step.name == "validate":
            cause = (f"the validator `{step.command}` rejected the new content (exit "
                     f"{failure.status}); the live file is untouched. It said:\n"
                     f"{_quote_output(output)}")
        elif step.name == "validate in place":
            cause = (f"the validator `{step.command}` rejected the new content (exit "
                     f"{failure.status}); the previous file was put back. It said:\n"
                     f"{_quote_output(output)}")
        else:
            cause = f"`{step.render()}` exited {failure.status}: {_quote_output(output)}"
        if disk_full:
            cause = f"disk full ({DISK_FULL}): {cause}"
        done = set(report.done)
        results = []
        for index, item in enumerate(plans):
            if index in done or not item.changed:
                results.append(OpResult.of(item))
            elif index == failure.op_index:
                results.append(OpResult(item.op, False, f"failed at {step.name}",
                                        item.commands()))
            else:
                results.append(OpResult(item.op, False, "not run (an earlier step failed)",
                                        item.commands()))
        return HostOpError(self.host, f"{plan.op}: {step.name}", cause, results=results,
                           disk_full=disk_full)

    def _script_failure(self, step: str, status: int, out: str, err: str,
                        problem: str) -> HostOpError:
        said = _quote_output(err or out)
        if any(sign in err for sign in SUDO_REFUSALS):
            return HostOpError(self.host, "sudo",
                               f"{self.connection.user} cannot run commands as root without "
                               f"a password (sudo -n): {said}")
        if DISK_FULL in err + out:
            return HostOpError(self.host, step, f"disk full ({DISK_FULL}): {said}",
                               disk_full=True)
        return HostOpError(self.host, step, f"{problem} (exit {status}): {said}")

    # -- transport ------------------------------------------------------------------------

    def execute(self, script: str, *, step: str) -> tuple[int, str, str]:
        """Feed `script` to the host's shell; (exit status, stdout, stderr). One round trip."""
        import paramiko

        open_connection(self.connection)
        transport = self.connection.transport
        self.round_trips += 1
        try:
            channel = transport.open_session(timeout=self.connection.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as error:
            self.connection.close()
            raise HostUnreachable(self.host, step, f"cannot open an SSH channel: {error}") \
                from None
        errors: list[bytes] = []
        try:
            channel.settimeout(self.timeout)
            channel.exec_command(self.shell)
            reader = threading.Thread(target=_drain_stderr, args=(channel, errors),
                                      daemon=True)
            reader.start()
            try:
                channel.sendall(script.encode())
                channel.shutdown_write()
            except OSError:
                pass  # the remote side quit early (sudo refused): read what it said
            chunks = []
            while True:
                data = channel.recv(65536)
                if not data:
                    break
                chunks.append(data)
            reader.join(self.timeout)
            status = channel.recv_exit_status()
        except TimeoutError:
            raise HostOpError(self.host, step, f"no answer within {self.timeout:.0f} s") \
                from None
        except (paramiko.SSHException, OSError, EOFError) as error:
            self.connection.close()
            raise HostUnreachable(self.host, step, f"the SSH session broke: {error}") \
                from None
        finally:
            channel.close()
        return (status, b"".join(chunks).decode("utf-8", "replace"),
                b"".join(errors).decode("utf-8", "replace"))


def _drain_stderr(channel: Any, errors: list[bytes]) -> None:
    try:
        while True:
            data = channel.recv_stderr(65536)
            if not data:
                return
            errors.append(data)
    except (OSError, EOFError):
        return


@dataclass(frozen=True)
class HostTarget:
    """Where a host is and how to trust it: its address, the host keys phase 1 injected,
    optionally the port, login user, zone (for the zone's jump host) and a display name."""

    host: str
    known_host_keys: tuple[str, ...]
    port: int = 22
    user: str | None = None
    zone: str | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.host


class ConnectionPool:
    """One open connection per (host, port, user), and per jump host, for a whole phase.

    Thread-safe: tasks running in parallel share it. Use as a context manager (or call
    `close()`) so that every connection is closed at the end of the phase.
    """

    def __init__(self, identity: SshIdentity, *,
                 jump_host_keys: Mapping[str, Sequence[str]] | None = None) -> None:
        """`jump_host_keys`: jump host -> its host key lines (a jump host is not a VM of
        phase 1, so its keys come from the spec)."""
        self.identity = identity
        self.jump_host_keys = dict(jump_host_keys or {})
        self._connections: dict[tuple[str, int, str], Connection] = {}
        self._keys: dict[tuple[str, int, str], tuple[str, ...]] = {}
        self._jumps: dict[str, Connection] = {}
        self._locks: dict[tuple[str, int, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lock(self, key: tuple[str, int, str]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def connection(self, target: HostTarget) -> Connection:
        """The open connection to `target` (made on first use, reopened if it dropped)."""
        user = target.user or self.identity.user
        key = (target.host, target.port, user)
        with self._lock(key):
            connection = self._connections.get(key)
            if connection is not None and self._keys[key] == target.known_host_keys:
                open_connection(connection)
                return connection
            if connection is not None:
                connection.close()
            jump = self._jump(target.zone)
            connection = self.identity.connect(target.host, target.known_host_keys,
                                               port=target.port, user=user, jump=jump)
            self._connections[key] = connection
            self._keys[key] = target.known_host_keys
            return connection

    def _jump(self, zone: str | None) -> Connection | None:
        spec = self.identity.jump_hosts.get(zone) if zone is not None else None
        if spec is None:
            return None
        with self._lock((spec, 0, "jump")):
            jump = self._jumps.get(spec)
            if jump is None:
                user, host, port = split_jump(spec)
                keys = self.jump_host_keys.get(spec) or self.jump_host_keys.get(host, ())
                jump = self.identity.connect(host, keys, port=port, user=user)
                self._jumps[spec] = jump
            return jump

    def session(self, target: HostTarget, **options: Any) -> HostSession:
        """A HostSession on the pooled connection (options as HostSession's)."""
        return HostSession(self.connection(target), host=target.label, **options)

    def drop(self, target: HostTarget) -> None:
        """Close and forget the connection to `target` (e.g. before deleting its user)."""
        key = (target.host, target.port, target.user or self.identity.user)
        with self._lock(key):
            connection = self._connections.pop(key, None)
            self._keys.pop(key, None)
        if connection is not None:
            connection.close()

    def close(self) -> None:
        with self._guard:
            connections = list(self._connections.values()) + list(self._jumps.values())
            self._connections.clear()
            self._jumps.clear()
            self._keys.clear()
        for connection in connections:
            connection.close()


def run_many(pool: ConnectionPool, work: Iterable[tuple[HostTarget, Sequence[Operation]]],
             *, dry_run: bool = False,
             concurrency: int | None = None) -> dict[str, HostReport | Exception]:
    """Run each host's operations, hosts in parallel (at most `concurrency`, by default
    the identity's); every host finishes its work whatever happens to the others.
    Returns host label -> its HostReport, or the exception that stopped it."""
    items = list(work)
    if not items:
        return {}
    limit = concurrency or pool.identity.concurrency

    def one(item: tuple[HostTarget, Sequence[Operation]]) -> HostReport | Exception:
        target, ops = item
        try:
            return pool.session(target).run(ops, dry_run=dry_run)
        except Exception as error:  # reported per host; the caller decides
            log.warning("%s", error if isinstance(error, SshHostError)
                        else f"{target.label}: {error!r}")
            return error

    with ThreadPoolExecutor(max_workers=min(limit, len(items))) as executor:
        outcomes = list(executor.map(one, items))
    return {target.label: outcome for (target, _), outcome in zip(items, outcomes, strict=True)}


class HostsFailed(Exception):
    """Some hosts failed (after every host finished its work): one line per failed host."""

    def __init__(self, errors: Mapping[str, Exception]) -> None:
        lines = [f"{len(errors)} host(s) failed:"] + [
            f"- {error}" if isinstance(error, SshHostError) else f"- {label}: {error!r}"
            for label, error in sorted(errors.items())]
        super().__init__("\n".join(lines))
        self.errors = dict(errors)


def require_all(outcomes: Mapping[str, HostReport | Exception]) -> dict[str, HostReport]:
    """The reports of `run_many`, or HostsFailed listing every host that failed."""
    errors = {label: outcome for label, outcome in outcomes.items()
              if isinstance(outcome, Exception)}
    if errors:
        raise HostsFailed(errors)
    return {label: outcome for label, outcome in outcomes.items()
            if isinstance(outcome, HostReport)}
