"""The fork server that starts the PID 1 of every lab host (started by lab/hosts.py).

A new /usr/bin/python3 for each PID 1 cost about 30 ms of CPU per boot, nearly all of
it importing what host_init.py needs; with sixty VMs powered on at once on two cores,
that was a good part of phase 1's time. This process imports host_init.py (and the
stand-ins PID 1 loads) once, then forks for each boot:

- the child is the host's launcher, what `unshare --fork --kill-child` was: it leaves
  this process's session, joins the host's network namespace (made by hosts.py), unshares
  UTS, IPC, mount (recursively private) and PID namespaces, and forks again;
- the grandchild is the host's PID 1: it dies with its launcher (PR_SET_PDEATHSIG),
  mounts the /proc of its PID namespace and runs host_init.main, with stdin /dev/null,
  stdout and stderr on the host's console log and the status pipe on fd 3.

The launcher ignores SIGINT, SIGTERM and SIGHUP and exits with PID 1's status, like
unshare did; SIGKILL to it takes PID 1 along. Both rename themselves (ps shows
`lab-host-launcher PARAMS` and `lab-host-init PARAMS`, PARAMS being the host's
params.json), so that a host's processes are found by its path as before.

Protocol, on one SOCK_SEQPACKET socket whose fd is given on the command line: a request
is a JSON object {"netns": ..., "params": ...} sent with two fds (the write end of the
host's status pipe, its console log); the reply {"pid": launcher pid} once the launcher
exists, or {"error": text}. End of file: exit (hosts already started live on). The
launchers are this process's children; it reaps them. Standard library only, like
host_init.py: it runs under the machine's python3, not the project venv.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import sys
from types import ModuleType

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
ARG_START_FIELD, ARG_END_FIELD = 48, 49  # of /proc/PID/stat (proc(5))
STATUS_FD = 3  # where PID 1 finds the status pipe (hosts.py puts it in params.json)
IDLE_REAP_S = 2.0  # how often an idle server reaps launchers whose host has stopped
LAUNCHER_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # as unshare --fork does

_libc = ctypes.CDLL(None, use_errno=True)


class _SysError(OSError):
    """A failed libc call, with errno and what was being done."""

    def __init__(self, what: str) -> None:
        err = ctypes.get_errno()
        super().__init__(err, f"{what}: {os.strerror(err)}")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise _SysError(what)


def set_title(comm: str, title: str) -> None:
    """Rename this process for ps: its short name (15 bytes) and its command line.

    A forked process keeps its parent's argv, which would make every lab host's
    processes look like this fork server. The title is written over the argv memory the
    kernel shows (Python keeps its own copy of argv), cut to that memory's size: the
    fork server's command line is long enough for a host's params path.
    """
    _libc.prctl(PR_SET_NAME, comm.encode()[:15], 0, 0, 0)
    with open("/proc/self/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[ARG_START_FIELD - 3]), int(fields[ARG_END_FIELD - 3])
    if start and end > start:
        data = title.encode()[:end - start - 1]
        ctypes.memmove(start, data + bytes(end - start - len(data)), end - start)


def _tell(fd: int, step: str, error: BaseException) -> None:
    """Report a failure on the status pipe the way host_init.py reports its own."""
    line = json.dumps({"ok": False, "step": step, "detail": f"{type(error).__name__}: "
                       f"{error}"}) + "\n"
    with contextlib.suppress(OSError):
        os.write(fd, line.encode())


def _pid1(init: ModuleType, params: str) -> int:
    """In the new PID namespace: die with the launcher, own /proc, then boot."""
    for signum in LAUNCHER_IGNORES:
        signal.signal(signum, signal.SIG_DFL)  # host_init sets its own handlers
    # Should the launcher die before this line, hosts.py's teardown kills whatever runs
    # in the host's network namespace (getppid() is 0 here: the parent is outside).
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    _check(_libc.mount(b"proc", b"/proc", b"proc",
                       ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC), None),
           "mount /proc of the host's PID namespace")
    set_title("lab-host-init", f"lab-host-init {params}")
    code: int = init.main([init.__file__, params])
    return code


def _launcher(init: ModuleType, request: dict[str, str], netns_fd: int, status_fd: int,
              console_fd: int) -> int:
    """The host's launcher: enter its namespaces, fork its PID 1, wait for it."""
    params = request["params"]
    os.setsid()
    set_title("lab-host-launch", f"lab-host-launcher {params}")
    step = "enter namespaces"
    try:
        _check(_libc.setns(netns_fd, CLONE_NEWNET), f"join network namespace {request['netns']}")
        _check(_libc.unshare(CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNS | CLONE_NEWPID),
               "unshare UTS, IPC, mount and PID namespaces")
        _check(_libc.mount(b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None),
               "make the host's mounts private")
        step = "standard streams"
        devnull = os.open("/dev/null", os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(console_fd, 1)
        os.dup2(console_fd, 2)
        os.dup2(status_fd, STATUS_FD)
        status_fd = STATUS_FD
        os.closerange(STATUS_FD + 1, os.sysconf("SC_OPEN_MAX"))  # this server's socket too
        for signum in LAUNCHER_IGNORES:
            signal.signal(signum, signal.SIG_IGN)
        step = "start PID 1"
        child = os.fork()
    except BaseException as error:
        _tell(status_fd, step, error)
        return 1
    if child == 0:
        code = 1
        try:
            code = _pid1(init, params)
        except BaseException as error:  # host_init reports its own steps; this is the rest
            _tell(STATUS_FD, "start PID 1", error)
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(code)
    os.close(STATUS_FD)  # PID 1 alone holds the pipe: its end is hosts.py's end of file
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _spawn(init: ModuleType, request: dict[str, str], status_fd: int, console_fd: int) -> int:
    """Fork a launcher for the request; its pid."""
    netns = request["netns"]
    if not netns or "/" in netns or netns.startswith("."):
        raise ValueError(f"bad network namespace name {netns!r}")
    netns_fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _launcher(init, request, netns_fd, status_fd, console_fd)
            finally:
                os._exit(code)
    finally:
        os.close(netns_fd)
    return pid


def _reap() -> None:
    """Collect launchers whose host is gone (a zombie counts as gone for hosts.py)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(init: ModuleType, control_fd: int) -> int:
    """Answer boot requests until the other end of the socket closes."""
    for name in ("procsys", "kmod", "netplan"):  # what PID 1 imports on its way up
        init.guest_module(name)
    sock = socket.socket(fileno=control_fd)
    sock.settimeout(IDLE_REAP_S)
    gc.freeze()  # keep forked children from copying pages for the collector's sake
    while True:
        _reap()
        try:
            message, fds, _, _ = socket.recv_fds(sock, 65536, 2)
        except TimeoutError:
            continue
        if not message:
            return 0
        try:
            request = json.loads(message)
            if len(fds) != 2:
                raise ValueError(f"expected 2 fds with the request, got {len(fds)}")
            reply: dict[str, object] = {"pid": _spawn(init, request, fds[0], fds[1])}
        except Exception as error:
            reply = {"error": f"{type(error).__name__}: {error}"}
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(json.dumps(reply).encode())


def main(argv: list[str]) -> int:
    """argv: this file, host_init.py, the control socket's fd, the lab's state dir (only
    to tell lab fork servers apart in ps)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("host_init", argv[1])
    assert spec is not None and spec.loader is not None
    init = importlib.util.module_from_spec(spec)
    sys.modules["host_init"] = init
    spec.loader.exec_module(init)
    return serve(init, int(argv[2]))
