"""Host operations: idempotent primitives that change only the difference, in two round trips.

Every task that touches a host over SSH (phase 2 and later: HAProxy, Vault, registry,
Gogs, RKE2, Coroot agents) describes the state it wants as a list of operations and runs
them with a `HostSession`. Per host, whatever the number of operations:

1. probe, one round trip: one read-only shell script prints every fact the operations
   need (`facts.probe_script`), batched per kind;
2. plan, locally: each operation compares the facts with its desired state and yields the
   shell steps of the difference, none when the host is already right (`ops`); handlers
   (`Service(restart_on=...)`, `Command(on_change=...)`) fire only when an operation they
   name changes in the same run;
3. apply, one round trip, only if something changes: one shell script runs every step in
   order and stops at the first failure (`script.apply_script`).

The steps are data (`Step(name, command, stdin)`), so unit tests assert on them without a
host, as with pyinfra. `dry_run=True` stops after step 2.

Operations (`tasks.hostops.ops`)::

    File(path, content, *, owner="root", group="root", mode="0644",
         validator=None, backup=True, secret=False)
    Directory(path, *, owner="root", group="root", mode="0755")
    Line(path, line, regexp=None, *, validator=None, backup=True, create=True,
         owner="root", group="root", mode="0644")
    LineAbsent(path, regexp, *, validator=None, backup=True)
    Sudoers(name, content, *, backup=False)       # /etc/sudoers.d/<name>, visudo -cf
    Packages(names, *, update=False)              # dpkg-query; apt-get install the missing
    Group(name, *, gid=None, system=False)
    User(name, *, groups=(), shell="/bin/bash", home=None, authorized_keys=None,
         exclusive_keys=True, system=False)
    UserAbsent(name, *, remove_home=True)
    Sysctl(key, value, *, persist_file="/etc/sysctl.d/90-platform.conf")
    Service(name, *, enabled=True, running=True, restart_on=(), reload_on=())
    Command(command, *, unless=None, creates=None, on_change=(), name=None)
    DataDisk(size_gb, *, mount="/srv/data", label="platform-data", fstype="ext4",
             options="defaults,nofail")     # find or format the data disk, fstab, mount

Files are written atomically: a candidate `.<name>.hostops-tmp` beside the live file gets
its owner and mode, then the validator (`{path}` in it is the candidate: `sshd -t -f
{path}`, `visudo -cf {path}`, `nft -c -f {path}`, `haproxy -c -f {path}`, `keepalived -t
-f {path}`); the previous content is copied to `/var/backups/hostops/<path>.<UTC time>`;
then `mv` replaces the live file. A validator without `{path}` (`netplan generate`)
checks the file in place and the previous file is put back if it fails. On a failed
validator the live file is as it was and the error quotes the validator's output.
`secret=True` keeps a file's content out of results, logs and errors (sizes and sha256
only; a validator's output is scrubbed of the content's lines and long words).

Running (`tasks.hostops.session`)::

    HostTarget(host, known_host_keys, port=22, user=None, zone=None, name=None)
    ConnectionPool(identity, *, jump_host_keys=None)     # context manager, thread-safe
        .connection(target) -> fabric.Connection
        .session(target, *, sudo=None, timeout=1800.0) -> HostSession
    HostSession(connection, *, host=None, sudo=None, timeout=1800.0)
        .run(ops, *, dry_run=False) -> HostReport
        .plan(ops) -> list[Plan]                         # probe + plan, no change
    run_many(pool, [(target, ops), ...], *, dry_run=False, concurrency=None)
        -> dict[label, HostReport | Exception]           # hosts in parallel, all finish
    require_all(outcomes) -> dict[label, HostReport]     # or HostsFailed, every host listed
    HostReport(host, results: tuple[OpResult, ...], dry_run, seconds, round_trips)
        .changed / .unchanged -> list of operation ids
    OpResult(op: str, changed: bool, detail: str, commands: tuple[str, ...])

Transport: each script is fed on standard input to `/bin/sh -s` (through `sudo -n` unless
the login user is root) over a new channel of the host's one Fabric/paramiko connection;
the script is a single `{ ... }` group, so the shell has read all of it before anything
runs, and its commands get /dev/null as input. Fabric's own `run(in_stream=...)` is not
used for it: invoke feeds a stream one byte per 10 ms. `SshIdentity.connect` sets
TCP_NODELAY on its socket: without it each round trip waits for a delayed ACK (40 ms).

Errors all derive from `blocks.ssh.SshHostError(host, step, cause)`:
`HostOpError` (a failed step: validator output quoted, `disk_full` set on "No space left
on device", `results` = what ran before), `HostUnreachable` (transient),
`AuthenticationRefused`, `HostKeyMismatch` (both fingerprints, `SHA256:...`).
Connections come from `blocks.ssh.SshIdentity.connect(host, known_host_keys, ...)`.
"""

from blocks.ssh import AuthenticationRefused, HostKeyMismatch, HostUnreachable, SshHostError
from tasks.hostops.facts import BlockDevice, Facts, Needs
from tasks.hostops.ops import (
    Command,
    DataDisk,
    Directory,
    File,
    Group,
    Line,
    LineAbsent,
    Operation,
    Packages,
    Plan,
    PlanError,
    Service,
    Step,
    Sudoers,
    Sysctl,
    User,
    UserAbsent,
    plan_all,
)
from tasks.hostops.session import (
    ConnectionPool,
    HostOpError,
    HostReport,
    HostSession,
    HostsFailed,
    HostTarget,
    OpResult,
    require_all,
    run_many,
)

__all__ = [
    "AuthenticationRefused",
    "BlockDevice",
    "Command",
    "ConnectionPool",
    "DataDisk",
    "Directory",
    "Facts",
    "File",
    "Group",
    "HostKeyMismatch",
    "HostOpError",
    "HostReport",
    "HostSession",
    "HostTarget",
    "HostUnreachable",
    "HostsFailed",
    "Line",
    "LineAbsent",
    "Needs",
    "OpResult",
    "Operation",
    "Packages",
    "Plan",
    "PlanError",
    "Service",
    "SshHostError",
    "Step",
    "Sudoers",
    "Sysctl",
    "User",
    "UserAbsent",
    "plan_all",
    "require_all",
    "run_many",
]
