"""A lab host's /proc/sys: the kernel's own where it is namespaced, per host where it is not.

LAB STAND-IN. Lab hosts share the machine's kernel. Sysctls under net.* (most of them)
and a few under kernel.* (hostname, domainname, the IPC limits, ns_last_pid) and fs.mqueue.*
belong to the host's own namespaces; every other writable key (kernel.*, vm.*, fs.*,
dev.*, abi.*, debug.*, user.*) is global: writing it inside a host would change the real
machine. So PID 1 of every host (lab/host_init.py) mounts this small FUSE file system over
the host's /proc/sys and serves it from a thread:

- namespaced keys and every read-only key pass through to the kernel (reads and writes
  reach the host's own namespaces; errors are the kernel's);
- each writable global key is a per-host copy taken from the machine's value when the
  host first looks it up (not at boot: a boot touches few of some 200 such keys, and
  copying them all cost 3 ms of CPU per boot); writes change only the copy and are
  validated the way the kernel's handlers do where that is easy to know: integer keys
  take whitespace-separated integers (decimal, 0x hex, 0 octal, optional minus) and fail
  with EINVAL otherwise; a table of well-known keys (the usual hardening set) also
  enforces the kernel's ranges and one-way locks (kernel.yama.ptrace_scope 3,
  kernel.unprivileged_bpf_disabled 1, kernel.kexec_load_disabled); string keys keep
  their first line; write-only keys (vm.drop_caches) cannot be read. Lenient: integer
  keys outside that table accept any 64-bit integer (the kernel would refuse values
  beyond an `int` for most of them) and string keys accept any text;
- keys the kernel shows only in the initial network namespace (net.core.bpf_jit_harden,
  net.core.netdev_max_backlog, net.ipv4.tcp_mem, net.nf_conntrack_max...) are per-host
  copies of the machine's values (`init_net` below), so that setting them works as on a
  VM; so is net.bridge.* when the kernel has no br_netfilter at all: it appears once the
  host's modprobe stand-in has "loaded" br_netfilter (lab/guest/kmod.py);
- keys that Debian's kernel has and the machine's may lack (kernel.yama.ptrace_scope,
  kernel.sysrq, kernel.kexec_load_disabled, kernel.modules_disabled,
  kernel.unprivileged_userns_clone; DEBIAN_KERNEL below) are per-host keys with Debian's
  defaults when the machine's kernel has none;
- kernel.random.boot_id is per host and per boot, as on a VM.

Per-host copies are only stored: the kernel keeps enforcing the machine's values.
Stdlib only: this runs under the machine's /usr/bin/python3 inside PID 1.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable

# --- what is namespaced, what is global ------------------------------------------------

# Writable keys outside net/ that the kernel keeps per namespace: UTS, IPC, PID.
NAMESPACED = frozenset({
    "kernel/hostname", "kernel/domainname",
    "kernel/shmmax", "kernel/shmall", "kernel/shmmni", "kernel/shm_rmid_forced",
    "kernel/msgmax", "kernel/msgmni", "kernel/msgmnb", "kernel/sem", "kernel/auto_msgmni",
    "kernel/msg_next_id", "kernel/sem_next_id", "kernel/shm_next_id",
    "kernel/ns_last_pid",
})
NAMESPACED_DIRS = ("fs/mqueue/",)
# Never copied: another file system's mount point.
SKIPPED_DIRS = ("fs/binfmt_misc/",)
MODULES_FILE = "/run/lab-host/modules"
# net.bridge.* as br_netfilter creates them, for kernels without it.
BRIDGE_DEFAULTS = {
    "net/bridge/bridge-nf-call-arptables": b"1\n",
    "net/bridge/bridge-nf-call-ip6tables": b"1\n",
    "net/bridge/bridge-nf-call-iptables": b"1\n",
    "net/bridge/bridge-nf-filter-pppoe-tagged": b"0\n",
    "net/bridge/bridge-nf-filter-vlan-tagged": b"0\n",
    "net/bridge/bridge-nf-pass-vlan-input-dev": b"0\n",
}
# Keys of Debian's kernel (the lab's base is Debian) that the machine's kernel may lack,
# with Debian's defaults.
DEBIAN_KERNEL = {
    "kernel/yama/ptrace_scope": (0o100644, b"0\n"),
    "kernel/sysrq": (0o100644, b"438\n"),
    "kernel/kexec_load_disabled": (0o100644, b"0\n"),
    "kernel/modules_disabled": (0o100644, b"0\n"),
    "kernel/unprivileged_userns_clone": (0o100644, b"1\n"),
}
INT_MAX = 2**31 - 1


def random_uuid() -> str:
    """A version 4 UUID, as the kernel makes boot_id (without importing uuid and the
    platform module it pulls in, at every boot)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


class Limits:
    """The kernel handler's range for a key, and a value after which it is locked.
    (A plain class: PID 1 imports this module at every boot, and dataclasses costs
    5 ms of imports.)"""

    __slots__ = ("high", "locked_at", "locked_errno", "low")

    def __init__(self, low: int, high: int, locked_at: int | None = None,
                 locked_errno: int = errno.EINVAL) -> None:
        self.low = low
        self.high = high
        self.locked_at = locked_at  # once the key holds this value, only it is accepted
        self.locked_errno = locked_errno


# The kernel's ranges for keys that hardening guides set (from the kernel's sysctl tables).
LIMITS: dict[str, Limits] = {
    "kernel/kptr_restrict": Limits(0, 2),
    "kernel/dmesg_restrict": Limits(0, 1),
    "kernel/unprivileged_bpf_disabled": Limits(0, 2, locked_at=1, locked_errno=errno.EPERM),
    "kernel/yama/ptrace_scope": Limits(0, 3, locked_at=3),
    "kernel/kexec_load_disabled": Limits(1, 1),
    "kernel/modules_disabled": Limits(1, 1),
    "kernel/io_uring_disabled": Limits(0, 2),
    "kernel/pid_max": Limits(301, 4194304),
    "kernel/perf_event_paranoid": Limits(-INT_MAX - 1, INT_MAX),
    "kernel/randomize_va_space": Limits(-INT_MAX - 1, INT_MAX),
    "kernel/sysrq": Limits(-INT_MAX - 1, INT_MAX),
    "kernel/panic": Limits(-INT_MAX - 1, INT_MAX),
    "kernel/panic_on_oops": Limits(-INT_MAX - 1, INT_MAX),
    "kernel/core_uses_pid": Limits(-INT_MAX - 1, INT_MAX),
    "fs/protected_hardlinks": Limits(0, 1),
    "fs/protected_symlinks": Limits(0, 1),
    "fs/protected_fifos": Limits(0, 2),
    "fs/protected_regular": Limits(0, 2),
    "fs/suid_dumpable": Limits(0, 2),
    "fs/inotify/max_user_watches": Limits(0, INT_MAX),
    "fs/inotify/max_user_instances": Limits(0, INT_MAX),
    "fs/inotify/max_queued_events": Limits(0, INT_MAX),
    "vm/swappiness": Limits(0, 200),
    "vm/max_map_count": Limits(0, INT_MAX),
    "vm/overcommit_memory": Limits(0, 2),
    "vm/panic_on_oom": Limits(0, 2),
    "vm/dirty_ratio": Limits(0, 100),
    "vm/dirty_background_ratio": Limits(0, 100),
    "vm/vfs_cache_pressure": Limits(0, INT_MAX),
    "vm/min_free_kbytes": Limits(0, INT_MAX),
    "vm/drop_caches": Limits(1, 4),
    "kernel/unprivileged_userns_clone": Limits(0, 1),
    "dev/tty/ldisc_autoload": Limits(0, 1),
    "net/core/bpf_jit_harden": Limits(0, 2),
    "net/core/bpf_jit_kallsyms": Limits(0, 1),
    "net/core/netdev_max_backlog": Limits(0, INT_MAX),
    "user/max_user_namespaces": Limits(0, INT_MAX),
}

INTEGERS = re.compile(rb"\s*-?\d+(?:[ \t]+-?\d+)*\s*")
SEPARATORS = b" \t\n"


class SysctlError(OSError):
    """A write the kernel would refuse; `errno` is what the writer gets."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))


def parse_integers(data: bytes) -> list[int]:
    """Integers as the kernel's proc_dointvec family reads them, or SysctlError(EINVAL).

    Like proc_get_long: leading white space, an optional minus, then a number in base 0
    (0x.. hex, 0.. octal) that must end at white space or the end of the write.
    """
    values: list[int] = []
    pos, end = 0, len(data)
    while True:
        while pos < end and data[pos:pos + 1].isspace():
            pos += 1
        if pos >= end or data[pos] == 0:
            break
        neg = data[pos:pos + 1] == b"-"
        if neg:
            pos += 1
        match = re.match(rb"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*", data[pos:])
        if match is None:
            raise SysctlError(errno.EINVAL)
        token = match.group(0)
        if token[:2] in (b"0x", b"0X"):
            number = int(token[2:], 16)
        elif token.startswith(b"0") and len(token) > 1:
            number = int(token[1:], 8)
        else:
            number = int(token)
        pos += len(token)
        if pos < end and data[pos] not in SEPARATORS and data[pos] != 0:
            raise SysctlError(errno.EINVAL)
        if number > 2**64 - 1 or (neg and number > 2**63):
            raise SysctlError(errno.EINVAL)
        values.append(-number if neg else number)
    if not values:
        raise SysctlError(errno.EINVAL)
    return values


class Key:
    """A per-host sysctl: its mode and current text, validated on write like the kernel."""

    def __init__(self, path: str, mode: int, value: bytes) -> None:
        self.path = path
        self.mode = mode
        self.value = value
        # Write-only keys (vm.drop_caches, vm.compact_memory) are all integers.
        unreadable = not mode & stat.S_IRUSR
        self.integer = unreadable or INTEGERS.fullmatch(value) is not None
        self.width = len(value.split()) if self.integer and value.strip() else 1

    def write(self, data: bytes, offset: int) -> None:
        """Replace the value as the kernel's handler would, or raise SysctlError."""
        if offset > 0:  # sysctl_writes_strict: integer writes past 0 are ignored
            if not self.integer:
                text = self.value.rstrip(b"\n")[:offset] + data.split(b"\n", 1)[0]
                self.value = text + b"\n"
            return
        if not self.integer:
            self.value = data.split(b"\n", 1)[0].split(b"\0", 1)[0] + b"\n"
            return
        values = parse_integers(data)
        limits = LIMITS.get(self.path)
        if limits is not None:
            current = self.value.split()
            low = limits.low
            locked = limits.locked_at is not None and bool(current) and \
                int(current[0]) == limits.locked_at
            if locked and values[0] != limits.locked_at:
                raise SysctlError(limits.locked_errno)
            for number in values[:self.width]:
                if not low <= number <= limits.high:
                    raise SysctlError(errno.EINVAL)
        old = [int(v) for v in self.value.split()] or [0] * self.width
        new = values[:self.width] + old[len(values):self.width]
        self.value = b"\t".join(str(v).encode() for v in new) + b"\n"


# --- the tree ---------------------------------------------------------------------------


class Tree:
    """/proc/sys as a lab host sees it: the real one (a directory fd) plus per-host keys."""

    def __init__(self, real_fd: int, init_net: dict[str, tuple[int, str]],
                 modules_file: str = MODULES_FILE) -> None:
        """`real_fd`: the host's real /proc/sys, opened before anything covers it.

        `init_net`: net keys of the machine's initial network namespace
        ({path: (mode, value)}); those missing in this host's namespace become per-host.
        """
        self.real_fd = real_fd
        self.modules_file = modules_file
        self.keys: dict[str, Key] = {}
        # Real entries that are no global key (read-only keys, directories): asked once.
        self._not_global: set[str] = set()
        # Per-host keys that do not exist in the kernel's view, with a condition.
        self.virtual: dict[str, Callable[[], bool]] = {}
        always: Callable[[], bool] = lambda: True  # noqa: E731
        for path, (mode, text) in init_net.items():
            if not self.real_exists(path):
                self.keys[path] = Key(path, mode, text.encode())
                self.virtual[path] = always
        for path, (mode, value) in DEBIAN_KERNEL.items():
            if not self.real_exists(path):
                self.keys[path] = Key(path, mode, value)
                self.virtual[path] = always
        if not self.real_exists("net/bridge") and "net/bridge/bridge-nf-call-iptables" \
                not in self.keys:
            for path, value in BRIDGE_DEFAULTS.items():
                self.keys[path] = Key(path, 0o100644, value)
                self.virtual[path] = self._br_netfilter_loaded
        boot_id = f"{random_uuid()}\n".encode()
        self.keys["kernel/random/boot_id"] = Key("kernel/random/boot_id", 0o100444, boot_id)
        self.vdirs: dict[str, set[str]] = {}
        for path in self.virtual:
            parent, _, name = path.rpartition("/")
            self.vdirs.setdefault(parent, set()).add(name)
            while parent:
                grand, _, dname = parent.rpartition("/")
                self.vdirs.setdefault(grand, set()).add(dname)
                parent = grand

    def _br_netfilter_loaded(self) -> bool:
        try:
            with open(self.modules_file, "rb") as handle:
                return any(line.split(b" ", 1)[0] == b"br_netfilter" for line in handle)
        except OSError:
            return False

    def _copy_global(self, path: str) -> Key | None:
        """The per-host copy of a writable global key, made from the machine's current
        value the first time the host looks the key up; None for anything else."""
        if path in self._not_global or path.startswith("net/") or path in NAMESPACED or \
                any((path + "/").startswith(d) for d in (*SKIPPED_DIRS, *NAMESPACED_DIRS)):
            return None
        try:
            st = os.stat(path, dir_fd=self.real_fd, follow_symlinks=False)
        except OSError:
            return None  # not (or not yet: a module may add it) in the kernel's view
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IWUSR:
            self._not_global.add(path)
            return None
        value = b""
        if st.st_mode & stat.S_IRUSR:
            try:
                value = self._read_real(path)
            except OSError:
                value = b""
        key = self.keys[path] = Key(path, st.st_mode, value)
        return key

    def _read_real(self, path: str) -> bytes:
        fd = os.open(path, os.O_RDONLY, dir_fd=self.real_fd)
        try:
            return os.read(fd, 65536)
        finally:
            os.close(fd)

    def listdir_real(self, rel: str) -> list[str]:
        if not rel:
            return os.listdir(self.real_fd)
        fd = os.open(rel, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.real_fd)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def real_exists(self, rel: str) -> bool:
        try:
            os.stat(rel, dir_fd=self.real_fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def _visible(self, path: str) -> bool:
        condition = self.virtual.get(path)
        return condition is None or condition()

    def key(self, path: str) -> Key | None:
        """The per-host key at `path`, if there is one and it is visible now."""
        key = self.keys.get(path)
        if key is None and path:
            key = self._copy_global(path)
        return key if key is not None and self._visible(path) else None

    def _vdir_visible(self, rel: str) -> bool:
        return any(self._visible(path) for path in self.virtual
                   if path.startswith(rel + "/"))

    def stat(self, rel: str) -> tuple[int, float] | None:
        """(mode, mtime) of an entry, or None if it does not exist."""
        key = self.key(rel)
        if key is not None:
            return key.mode, time.time()
        try:
            st = os.stat(rel or ".", dir_fd=self.real_fd, follow_symlinks=False)
            return st.st_mode, st.st_mtime
        except OSError:
            pass
        if rel in self.vdirs and self._vdir_visible(rel):
            return stat.S_IFDIR | 0o555, time.time()
        return None

    def listdir(self, rel: str) -> list[tuple[str, bool]]:
        """(name, is_dir) of a directory's entries."""
        entries: dict[str, bool] = {}
        try:
            for name in self.listdir_real(rel):
                try:
                    st = os.stat(f"{rel}/{name}" if rel else name, dir_fd=self.real_fd,
                                 follow_symlinks=False)
                except OSError:
                    continue
                entries[name] = stat.S_ISDIR(st.st_mode)
        except OSError:
            pass
        for name in self.vdirs.get(rel, ()):
            path = f"{rel}/{name}" if rel else name
            if name in entries:
                continue
            if path in self.keys:
                if self._visible(path):
                    entries[name] = False
            elif self._vdir_visible(path):
                entries[name] = True
        return sorted(entries.items())


# --- FUSE -------------------------------------------------------------------------------

FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_SETATTR = 1, 2, 3, 4
FUSE_OPEN, FUSE_READ, FUSE_WRITE, FUSE_STATFS, FUSE_RELEASE = 14, 15, 16, 17, 18
FUSE_FLUSH, FUSE_INIT, FUSE_OPENDIR, FUSE_READDIR, FUSE_RELEASEDIR = 25, 26, 27, 28, 29
FUSE_INTERRUPT, FUSE_DESTROY, FUSE_BATCH_FORGET = 36, 38, 42
FUSE_MKNOD, FUSE_MKDIR, FUSE_CREATE = 8, 9, 35
FUSE_UNLINK, FUSE_RMDIR, FUSE_RENAME, FUSE_LINK, FUSE_SYMLINK, FUSE_RENAME2 = \
    10, 11, 12, 13, 6, 45
NO_REPLY = (FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT, FUSE_DESTROY)
FATTR_MODE, FATTR_UID, FATTR_GID = 1, 2, 4
FOPEN_DIRECT_IO = 1
IN_HEADER = struct.Struct("=IIQQIIIHH")
OUT_HEADER = struct.Struct("=IiQ")
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("=QQQQII")
ATTR_OUT = struct.Struct("=QII")
OPEN_OUT = struct.Struct("=QII")
READ_IN = struct.Struct("=QQIIQII")
INIT_OUT = struct.Struct("=IIIIHHIIHHI7I")
MAX_WRITE = 65536
TIMEOUT = 1  # seconds the kernel may cache names and attributes


class ProcSysFS:
    """Serves a Tree over /dev/fuse (one thread, requests in order)."""

    def __init__(self, tree: Tree, fuse_fd: int,
                 log: Callable[[str], None] | None = None) -> None:
        self.tree = tree
        self.fd = fuse_fd
        self.log = log or (lambda message: None)
        self.paths: dict[int, str] = {1: ""}
        self.nodes: dict[str, int] = {"": 1}
        self.handles: dict[int, tuple[str, int | None, str]] = {}  # fh: (path, real fd, kind)
        self.next_fh = 1

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve, name="lab-procsys", daemon=True)
        thread.start()
        return thread

    def serve(self) -> None:
        """Answer requests until the file system goes away."""
        while True:
            try:
                request = os.read(self.fd, MAX_WRITE + 4096)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                if exc.errno != errno.ENODEV:
                    self.log(f"procsys: /dev/fuse: {exc}")
                return
            if len(request) < IN_HEADER.size:
                continue
            opcode, unique, nodeid = IN_HEADER.unpack_from(request)[1:4]
            body = request[IN_HEADER.size:]
            if opcode in NO_REPLY:
                continue
            try:
                reply = self.dispatch(opcode, nodeid, body)
                self._reply(unique, 0, reply)
            except OSError as exc:
                self._reply(unique, exc.errno or errno.EIO, b"")
            except Exception as exc:  # never let a request kill the host's /proc/sys
                self.log(f"procsys: opcode {opcode}: {type(exc).__name__}: {exc}")
                self._reply(unique, errno.EIO, b"")

    def _reply(self, unique: int, error: int, payload: bytes) -> None:
        with contextlib.suppress(OSError):  # an interrupted request is forgotten
            os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique)
                     + payload)

    def _attr(self, nodeid: int, mode: int, mtime: float) -> bytes:
        secs, nsecs = int(mtime), int((mtime % 1) * 1e9)
        return ATTR.pack(nodeid, 0, 0, secs, secs, secs, nsecs, nsecs, nsecs, mode,
                         2 if stat.S_ISDIR(mode) else 1, 0, 0, 0, 4096, 0)

    def _node(self, path: str) -> int:
        nodeid = self.nodes.get(path)
        if nodeid is None:
            nodeid = len(self.paths) + 1
            self.paths[nodeid] = path
            self.nodes[path] = nodeid
        return nodeid

    def _path(self, nodeid: int) -> str:
        path = self.paths.get(nodeid)
        if path is None:
            raise OSError(errno.ENOENT, "unknown node")
        return path

    def dispatch(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        if opcode == FUSE_INIT:
            minor, readahead = struct.unpack_from("=III", body)[1:]
            return INIT_OUT.pack(7, min(minor, 31), readahead, 0, 16, 12, MAX_WRITE, 1,
                                 0, 0, 0, *([0] * 7))
        if opcode == FUSE_LOOKUP:
            name = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            parent = self._path(nodeid)
            path = f"{parent}/{name}" if parent else name
            found = self.tree.stat(path)
            if found is None:
                raise OSError(errno.ENOENT, path)
            child = self._node(path)
            return ENTRY_OUT.pack(child, 0, TIMEOUT, TIMEOUT, 0, 0) + \
                self._attr(child, *found)
        if opcode in (FUSE_GETATTR, FUSE_SETATTR):
            path = self._path(nodeid)
            found = self.tree.stat(path)
            if found is None:
                raise OSError(errno.ENOENT, path)
            if opcode == FUSE_SETATTR:
                valid = struct.unpack_from("=I", body)[0]
                if valid & (FATTR_MODE | FATTR_UID | FATTR_GID):
                    raise OSError(errno.EPERM, path)
            return ATTR_OUT.pack(TIMEOUT, 0, 0) + self._attr(nodeid, *found)
        if opcode == FUSE_OPEN:
            return self._open(nodeid, struct.unpack_from("=I", body)[0])
        if opcode == FUSE_READ:
            fh, offset, size = READ_IN.unpack_from(body)[:3]
            return self._read(fh, offset, size)
        if opcode == FUSE_WRITE:
            fh, offset, size = READ_IN.unpack_from(body)[:3]
            data = body[READ_IN.size:READ_IN.size + size]
            return struct.pack("=II", self._write(fh, offset, data), 0)
        if opcode == FUSE_RELEASE:
            fh = struct.unpack_from("=Q", body)[0]
            _, real, _ = self.handles.pop(fh, ("", None, ""))
            if real is not None:
                os.close(real)
            return b""
        if opcode in (FUSE_FLUSH, FUSE_RELEASEDIR):
            return b""
        if opcode == FUSE_OPENDIR:
            path = self._path(nodeid)
            found = self.tree.stat(path)
            if found is None or not stat.S_ISDIR(found[0]):
                raise OSError(errno.ENOTDIR, path)
            return OPEN_OUT.pack(0, 0, 0)
        if opcode == FUSE_READDIR:
            _, offset, size = READ_IN.unpack_from(body)[:3]
            return self._readdir(nodeid, offset, size)
        if opcode == FUSE_STATFS:
            return struct.pack("=QQQQQIIII6I", 0, 0, 0, 0, 0, 4096, 255, 4096, 0, *([0] * 6))
        if opcode in (FUSE_MKNOD, FUSE_MKDIR, FUSE_CREATE):
            raise OSError(errno.ENOENT, "no such sysctl")
        if opcode in (FUSE_UNLINK, FUSE_RMDIR, FUSE_RENAME, FUSE_RENAME2, FUSE_LINK,
                      FUSE_SYMLINK):
            raise OSError(errno.EPERM, "sysctl")
        raise OSError(errno.ENOSYS, f"opcode {opcode}")

    def _open(self, nodeid: int, flags: int) -> bytes:
        path = self._path(nodeid)
        access = flags & os.O_ACCMODE
        key = self.tree.key(path)
        if key is not None:
            # procfs checks the owner bits even for root.
            if access in (os.O_RDONLY, os.O_RDWR) and not key.mode & stat.S_IRUSR:
                raise OSError(errno.EACCES, path)
            if access in (os.O_WRONLY, os.O_RDWR) and not key.mode & stat.S_IWUSR:
                raise OSError(errno.EACCES, path)
            real, kind = None, "key"
        else:
            real = os.open(path, access | os.O_CLOEXEC, dir_fd=self.tree.real_fd)
            kind = "real"
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = (path, real, kind)
        return OPEN_OUT.pack(fh, FOPEN_DIRECT_IO, 0)

    def _read(self, fh: int, offset: int, size: int) -> bytes:
        path, real, _ = self.handles[fh]
        if real is not None:
            return os.pread(real, size, offset)
        key = self.tree.keys[path]
        return key.value[offset:offset + size]

    def _write(self, fh: int, offset: int, data: bytes) -> int:
        path, real, _ = self.handles[fh]
        if real is not None:
            return os.pwrite(real, data, offset)
        if data:
            self.tree.keys[path].write(data, offset)
        return len(data)

    def _readdir(self, nodeid: int, offset: int, size: int) -> bytes:
        path = self._path(nodeid)
        entries = [(".", True), ("..", True), *self.tree.listdir(path)]
        out = b""
        for index in range(offset, len(entries)):
            name, is_dir = entries[index]
            raw = name.encode("utf-8", "surrogateescape")
            child = f"{path}/{name}" if path else name
            ino = nodeid if name in (".", "..") else self._node(child)
            record = struct.pack("=QQII", ino, index + 1, len(raw), 4 if is_dir else 8) + raw
            record += b"\0" * (-len(record) % 8)
            if len(out) + len(record) > size:
                break
            out += record
        return out


M_ARENA_MAX = -8  # glibc's malloc.h


def single_malloc_arena() -> None:
    """Make every thread of this process allocate from glibc's main arena.

    The first time glibc shrinks the heap of a thread's own arena it opens
    /proc/sys/vm/overcommit_memory. In the thread serving this file system that open waits
    for the serving thread itself: a deadlock, and the host's /proc/sys hangs for good
    (seen as probes of phase 2 stuck at `sysctl`). The main arena never asks. Call it
    before the serving thread starts.
    """
    import ctypes

    if ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1) != 1:
        raise OSError("mallopt(M_ARENA_MAX, 1) failed: /proc/sys could not be served safely")


def mount(target: str, real_fd: int, init_net: dict[str, tuple[int, str]],
          mount_fn: Callable[[str, str, str, int, str], None],
          log: Callable[[str], None] | None = None) -> ProcSysFS:
    """Mount the per-host /proc/sys over `target` and start serving it."""
    tree = Tree(real_fd, init_net)
    single_malloc_arena()
    fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    server = ProcSysFS(tree, fuse_fd, log)
    mount_fn("lab-procsys", target, "fuse.lab-procsys", 0x2 | 0x4 | 0x8,
             f"fd={fuse_fd},rootmode=40555,user_id=0,group_id=0,allow_other,"
             "default_permissions")
    server.start()
    return server


def init_net_snapshot(root: str = "/proc/sys") -> dict[str, tuple[int, str]]:
    """Writable and read-only net keys of the caller's network namespace, except the
    per-interface ones: run in the initial namespace, it gives Tree its `init_net`."""
    snapshot: dict[str, tuple[int, str]] = {}
    base = os.path.join(root, "net")
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = os.path.relpath(dirpath, root)
        if re.fullmatch(r"net/ipv[46]/(conf|neigh)", rel_dir):
            dirnames[:] = []
            continue
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                mode = os.stat(path).st_mode
                value = ""
                if mode & stat.S_IRUSR:
                    with open(path, "rb") as handle:
                        value = handle.read(65536).decode("utf-8", "replace")
            except OSError:
                continue
            snapshot[f"{rel_dir}/{name}"] = (mode, value)
    return snapshot


if __name__ == "__main__":  # manual check: python3 procsys.py MOUNTPOINT (in a mount ns)
    import ctypes

    _libc = ctypes.CDLL(None, use_errno=True)

    def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
        if _libc.mount(source.encode(), target.encode(), fstype.encode(),
                       ctypes.c_ulong(flags), data.encode()) != 0:
            raise OSError(ctypes.get_errno(), "mount")

    fs = mount(sys.argv[1], os.open("/proc/sys", os.O_RDONLY | os.O_DIRECTORY),
               init_net_snapshot(), _mount, lambda m: print(m, file=sys.stderr))
    threading.Event().wait()
