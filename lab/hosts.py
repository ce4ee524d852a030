"""Lab hosts: a simulated VM per IP address, built from namespaces on this machine.

A lab host is what the product sees when it powers on a VM in the lab: a machine at the
VM's address with its own hostname, users, SSH host keys and disk, reachable over real
SSH. It is a network namespace attached to a bridge by a veth pair, plus UTS, IPC, mount
and PID namespaces whose PID 1 (lab/host_init.py, forked by lab/host_forkserver.py)
overlays the machine's whole root copy-on-write and plays cloud-init's part on first
boot. Packages installed on the machine are therefore "on the base image" of every host;
whatever a host changes stays in its overlay upper dir, its disk, which survives stop()
and goes with delete().

State lives under `state_dir/hosts/<name>/` (upper, work, root, params.json, run.json,
console.log), so another process with the same state_dir can stop or delete hosts that
this one booted: hosts are not children to be waited for, they outlive the caller. The
state dir itself is hidden inside every host (it holds the hosts' private keys).

The kernel is the machine's. What is global in it (kernel.*, vm.*, fs.* sysctls, loaded
modules, swap, the clock) must not change when a host changes it, so PID 1 puts labelled
stand-ins in place inside every host (host_init.py's docstring lists them; the code is in
lab/guest/): a per-host /proc/sys served over FUSE (hence /dev/fuse is required),
modprobe/lsmod, swapon/swapoff, chronyd always with -x, and `netplan apply` acting on the
host's own NIC. The host's processes have no CAP_SYS_MODULE nor CAP_SYS_TIME.

Data disks: each disk of the VM after the first (the OS disk, which is the overlay) is a
sparse file of the VM's configured size in `hosts/<name>/disks/` attached to a loop
device at boot; PID 1 gives the host a private block device node for it (/dev/sdb,
/dev/sdc...) and the `lsblk` stand-in (lab/guest/lsblk.py) reports the VM's disks only,
so the real mkfs/mount inside the host act on that file and never on a disk of the
machine. stop() detaches the loop devices (the files stay, like a VM's disks); delete()
removes the files.

boot() returns once the host's sshd listens (about 0.1 s; twenty in parallel in about
1 s on two cores); stop() is a guest shutdown: SIGTERM to every process, SIGKILL after
`stop_grace`. Everything here needs root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from lab.guest.procsys import init_net_snapshot
from lab.systemctl import ensure_systemctl

INIT_SCRIPT = Path(__file__).resolve().with_name("host_init.py")
FORKSERVER_SCRIPT = Path(__file__).resolve().with_name("host_forkserver.py")
# The fork server is started by importing host_forkserver.py, not by running it as a
# script: Python compiles a script at every start but caches a module's bytecode.
FORKSERVER_LAUNCH = (
    "import importlib.util as u, sys; s = u.spec_from_file_location('host_forkserver', "
    "sys.argv[1]); m = sys.modules['host_forkserver'] = u.module_from_spec(s); "
    "s.loader.exec_module(m); sys.exit(m.main(sys.argv[1:]))")
STATUS_FD = 3  # the status pipe in PID 1 (lab/host_forkserver.py puts it there)
GUEST_PYTHON = "/usr/bin/python3"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUEST_ENV = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root", "USER": "root",
             "LOGNAME": "root"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
REQUIRED_TOOLS = ("ip", "nsenter", "sshd")
FUSE_DEVICE = Path("/dev/fuse")  # each host's /proc/sys stand-in is a FUSE file system


@dataclass(frozen=True)
class GuestUser:
    """A cloud-init `users` entry."""

    name: str
    ssh_authorized_keys: tuple[str, ...]
    sudo: bool = True  # passwordless sudo via /etc/sudoers.d/90-cloud-init-users
    shell: str = "/bin/bash"


@dataclass(frozen=True)
class GuestFile:
    """A cloud-init `write_files` entry (written after the users are created)."""

    path: str
    content: str
    permissions: str = "0644"
    owner: str = "root:root"


@dataclass(frozen=True)
class HostConfig:
    """What cloud-init would apply on first boot; built by the lab from a VM's guestinfo."""

    name: str  # VM name, unique in the lab (e.g. "lab-vault-01")
    instance_id: str  # cloud-init applies users/keys/files once per instance id
    hostname: str  # short name
    fqdn: str
    address: IPv4Interface  # e.g. 10.231.0.22/24
    gateway: IPv4Address
    dns: tuple[IPv4Address, ...]
    bridge: str  # an existing Linux bridge in the root namespace
    users: tuple[GuestUser, ...]
    # (type like "ed25519"/"rsa", private key OpenSSH text, public key line)
    host_keys: tuple[tuple[str, str, str], ...]
    write_files: tuple[GuestFile, ...] = ()
    mac: str | None = None  # the VM NIC's MAC; derived from the name when None
    # The VM's virtual disks in bytes as its hypervisor has them: the first is the OS
    # disk (the overlay), each other one a data disk (a loop device, see `_attach_disks`).
    disks_bytes: tuple[int, ...] = ()


class LabHostError(RuntimeError):
    """A lab host operation failed; says which host, which step and why."""

    def __init__(self, host: str, step: str, detail: str) -> None:
        super().__init__(f"lab host {host}: {step} failed: {detail}")
        self.host = host
        self.step = step
        self.detail = detail


MACHINE_NETNS = Path("/run/platform-machine-netns")
"""The machine's network namespace, kept here by scripts/own-namespaces.sh for the command
it runs in a namespace of its own (`make test`, `make bench`)."""
_SNAPSHOT = ("import json, sys\nfrom lab.guest.procsys import init_net_snapshot\n"
             "json.dump(init_net_snapshot(), sys.stdout)")


def initial_net_sysctls(host: str) -> dict[str, tuple[int, str]]:
    """`init_net_snapshot` of the machine's network namespace. The lab normally runs in it;
    under scripts/own-namespaces.sh the kernel hides keys such as net.core.bpf_jit_harden
    from this process, so a process entered into the machine's namespace takes it."""
    if not MACHINE_NETNS.exists():
        return init_net_snapshot()
    done = subprocess.run(["nsenter", f"--net={MACHINE_NETNS}", sys.executable, "-c", _SNAPSHOT],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise LabHostError(host, f"reading the machine's net sysctls (nsenter "
                           f"--net={MACHINE_NETNS})", done.stderr.strip())
    return {path: (int(mode), str(value))
            for path, (mode, value) in json.loads(done.stdout).items()}


@dataclass(frozen=True)
class _Process:
    """A process identified by pid and start time, so a reused pid is not mistaken for it."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> _Process | None:
        """Snapshot a live process, or None if it is gone or a zombie."""
        stat = _stat(pid)
        return None if stat is None or stat[0] in "ZX" else cls(pid, int(stat[19]))

    def alive(self) -> bool:
        """Same process still there and not a zombie."""
        stat = _stat(self.pid)
        return stat is not None and stat[0] not in "ZX" and int(stat[19]) == self.start


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2:].split()


class LabHosts:
    """Boots, stops and deletes lab hosts; all state under `state_dir/hosts/<name>/`."""

    def __init__(self, state_dir: Path, *, stop_grace: float = 5.0,
                 boot_timeout: float = 30.0) -> None:
        """`stop_grace`: how long a host's processes get between SIGTERM and SIGKILL."""
        self.state_dir = Path(state_dir).resolve()
        self.hosts_dir = self.state_dir / "hosts"
        self.stop_grace = stop_grace
        self.boot_timeout = boot_timeout
        # Names in the root namespace are global: tag them with this state dir.
        self._tag = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:5]
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # A launcher whose boot has not been recorded in run.json yet (see _abort).
        self._launchers: dict[str, _Process] = {}
        self._forkserver = _ForkServer(self.state_dir)
        weakref.finalize(self, self._forkserver.close)
        self._systemctl: Path | None = None
        self._init_net: dict[str, tuple[int, str]] | None = None

    # -- naming -----------------------------------------------------------------------

    def host_dir(self, name: str) -> Path:
        """The host's disk and bookkeeping."""
        return self.hosts_dir / _checked_name(name)

    def console_log(self, name: str) -> Path:
        """The init's and sshd's stderr, appended across boots."""
        return self.host_dir(name) / "console.log"

    def netns(self, name: str) -> str:
        """The host's network namespace (`ip netns exec <this> ...` for debugging)."""
        return f"lab{self._tag}-{_checked_name(name)}"

    def _veth(self, name: str) -> str:
        """Host end of the veth pair: unique, at most 15 characters."""
        digest = hashlib.sha256(f"{self.state_dir}\0{name}".encode()).hexdigest()
        return f"lv{digest[:11]}"

    def _mac(self, config: HostConfig) -> str:
        """The NIC's MAC: the VM's own, else stable per name (neighbours' ARP stays valid)."""
        if config.mac:
            return config.mac
        digest = hashlib.sha256(f"{self.state_dir}\0{config.name}".encode()).digest()
        return "02:" + ":".join(f"{byte:02x}" for byte in digest[:5])

    # -- public operations ------------------------------------------------------------

    def boot(self, config: HostConfig,
             on_network: Callable[[], None] | None = None) -> bool:
        """Power the host on and return once its sshd listens; False if it was running.

        `on_network` is called (in this thread) as soon as the host's NIC has its address,
        before cloud-init's users and sshd: where VMware tools would report the guest IP.
        A running host is left alone even if `config` changed (like powering on a VM that
        is on). A host that failed to boot is torn down before the error is raised.
        """
        with self._locked(config.name):
            if self._running(config.name) is not None:
                return False
            self._teardown(config.name)
            self._check_prerequisites(config)
            self._launch(config, on_network)
            return True

    def stop(self, name: str) -> bool:
        """Power off: the host's processes and network go, its disk stays."""
        with self._locked(name):
            return self._teardown(name)

    def delete(self, name: str) -> bool:
        """Power off and remove the disk; False if nothing of the host existed."""
        with self._locked(name):
            existed = self._teardown(name) or self.host_dir(name).exists()
            self._remove_disk(name)
            return existed

    def is_running(self, name: str) -> bool:
        """Whether the host's PID 1 is alive."""
        return self._running(name) is not None

    def booted(self, name: str) -> bool:
        """Whether the host is up once a boot in flight has ended (a guest reports its IP
        halfway through its boot, so a VM can have its IP while sshd is still to come)."""
        return self._settled(name) is not None

    def names(self) -> list[str]:
        """Every host with a disk, running or not."""
        if not self.hosts_dir.is_dir():
            return []
        return sorted(p.name for p in self.hosts_dir.iterdir()
                      if (p / "upper").is_dir() or (p / "run.json").is_file())

    def exec(self, name: str, argv: list[str], input: str | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command as root inside the running host (for tests and debugging).

        Like subprocess.run without check: the caller looks at returncode. On timeout the
        command's process group is killed and LabHostError raised. Unlike the host's own
        processes, the command keeps every capability of the caller.
        """
        init = self._settled(name)
        if init is None:
            raise LabHostError(name, "exec", "host is not running")
        cmd = ["nsenter", "--target", str(init.pid), "--mount", "--uts", "--ipc", "--net",
               "--pid", "--root", "--wd", "--", *argv]
        with subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None
                              else subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=GUEST_ENV,
                              start_new_session=True) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise LabHostError(name, f"exec {argv!r}",
                                   f"timed out after {timeout} s") from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def stop_all(self) -> list[str]:
        """Stop every running host (in parallel); the names that were running."""
        stopped = self._each(self.stop, self._candidates())
        return sorted(name for name, done in stopped.items() if done)

    def delete_all(self) -> list[str]:
        """Delete every host of this state dir (in parallel); the names that existed."""
        deleted = self._each(self.delete, self._candidates())
        return sorted(name for name, done in deleted.items() if done)

    # -- boot -------------------------------------------------------------------------

    def _check_prerequisites(self, config: HostConfig) -> None:
        """Fail before touching anything if the host cannot possibly boot."""
        if os.geteuid() != 0:
            raise LabHostError(config.name, "prerequisites", "lab hosts need root")
        missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool, path=PATH) is None]
        if missing or not os.access(GUEST_PYTHON, os.X_OK):
            raise LabHostError(config.name, "prerequisites",
                               f"missing {', '.join(missing) or GUEST_PYTHON}")
        if not FUSE_DEVICE.is_char_device():
            raise LabHostError(config.name, "prerequisites",
                               f"{FUSE_DEVICE} is missing: a host's /proc/sys needs FUSE")
        bridge = Path("/sys/class/net") / config.bridge
        if not (bridge / "bridge").is_dir():
            raise LabHostError(config.name, "prerequisites",
                               f"bridge {config.bridge} does not exist")
        if not int((bridge / "flags").read_text(), 16) & 0x1:
            raise LabHostError(config.name, "prerequisites", f"bridge {config.bridge} is down")
        if config.gateway not in config.address.network:
            raise LabHostError(config.name, "prerequisites",
                               f"gateway {config.gateway} is outside {config.address.network}")
        if not config.host_keys:
            raise LabHostError(config.name, "prerequisites", "no SSH host keys")

    def _launch(self, config: HostConfig, on_network: Callable[[], None] | None) -> None:
        """Network first, then PID 1; wait for its report and record who it is."""
        name = config.name
        hdir = self.host_dir(name)
        for sub in ("upper", "work", "root"):
            (hdir / sub).mkdir(parents=True, exist_ok=True)
        hdir.chmod(0o700)
        (hdir / "upper").chmod(0o755)  # the guest's "/" takes the upper dir's mode
        if self._systemctl is None:
            try:
                self._systemctl = ensure_systemctl()
            except Exception as exc:
                raise LabHostError(name, "fetch systemctl", str(exc)) from exc
        netns, veth = self.netns(name), self._veth(name)
        try:
            disks = self._attach_disks(config, hdir)
            self._ip(name, "create network",
                     f"netns add {netns}\n"
                     f"link add {veth} type veth peer name eth0 address {self._mac(config)} "
                     f"netns {netns}\n"
                     f"link set {veth} master {config.bridge} up\n")
        except BaseException:
            self._teardown(name)
            raise
        read_fd, write_fd = os.pipe()
        try:
            params_path = hdir / "params.json"
            _write_private(params_path, json.dumps(
                self._params(config, hdir, STATUS_FD, disks), indent=1))
            with (hdir / "console.log").open("ab") as console:
                console.write(f"--- boot {time.strftime('%Y-%m-%dT%H:%M:%S%z')} ---\n".encode())
                console.flush()
                pid = self._forkserver.spawn(name, netns, params_path, write_fd,
                                             console.fileno())
            os.close(write_fd)
            write_fd = -1
            launcher = _Process.of(pid) or _Process(pid, 0)
            self._launchers[name] = launcher
            status = self._await_report(name, read_fd, on_network)
            if not status.get("ok"):
                raise LabHostError(name, str(status.get("step", "boot")),
                                   str(status.get("detail", "")))
            init = self._init_of(launcher.pid)
            if init is None:
                raise LabHostError(name, "boot", "PID 1 vanished right after booting; "
                                   f"console.log ends: {self._console_tail(name)}")
        except BaseException:
            self._abort(name)
            raise
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        self._launchers.pop(name, None)
        _write_private(hdir / "run.json", json.dumps({
            "netns": netns, "veth": veth, "init_pid": init.pid, "init_start": init.start,
            "launcher_pid": launcher.pid, "launcher_start": launcher.start,
            "booted_at": time.time(),
        }))

    def close(self) -> None:
        """Stop this object's fork server (the hosts it started live on); also done when
        the object is collected or the process exits."""
        self._forkserver.close()

    def _attach_disks(self, config: HostConfig, hdir: Path) -> list[dict[str, Any]]:
        """A loop device per data disk, over a sparse file of the disk's size (kept across
        boots, grown if the VM's disk grew); what PID 1 needs to make the host's nodes.
        The OS disk comes first, with its size only (the overlay is the host's root)."""
        if not config.disks_bytes:
            return []
        if len(config.disks_bytes) > 1 + 25:
            raise LabHostError(config.name, "attach disks", "more than 26 disks")
        disks: list[dict[str, Any]] = [{"name": "sda", "size": config.disks_bytes[0],
                                        "os": True}]
        directory = hdir / "disks"
        directory.mkdir(mode=0o700, exist_ok=True)
        for index, size in enumerate(config.disks_bytes[1:], start=1):
            name = f"sd{chr(ord('a') + index)}"
            image = directory / f"{name}.img"
            if size <= 0:
                raise LabHostError(config.name, "attach disks", f"disk {name} has size {size}")
            if image.exists():
                self._detach(config.name, image)  # a loop left by a crash: not this boot's
            if not image.exists() or image.stat().st_size < size:
                with image.open("ab") as handle:
                    os.truncate(handle.fileno(), size)  # sparse: no block written
            loop = _attach_loop(config.name, f"attach disk {name}", image)
            number = os.stat(loop).st_rdev
            disks.append({"name": name, "size": size, "loop": loop,
                          "major": os.major(number), "minor": os.minor(number)})
        return disks

    def _detach(self, name: str, image: Path) -> None:
        """Detach every loop device over `image` and wait until the kernel let go (a
        file system mounted in the host's mount namespace keeps it busy until that
        namespace is gone: the detach is then deferred, see loop(4) autoclear)."""
        deadline = time.monotonic() + 10
        while True:
            found = _run(name, "list loop devices", ["losetup", "--associated", str(image),
                                                    "--noheadings", "--output", "NAME"])
            loops = found.split()
            if not loops:
                return
            for loop in loops:
                subprocess.run(["losetup", "--detach", loop], capture_output=True,
                               check=False, env=GUEST_ENV)
            if time.monotonic() > deadline:
                raise LabHostError(name, "detach disks",
                                   f"{', '.join(loops)} still attached to {image}")
            time.sleep(0.05)

    def _detach_disks(self, name: str) -> None:
        """Detach the loop devices of every data disk of the host."""
        directory = self.host_dir(name) / "disks"
        if directory.is_dir():
            for image in sorted(directory.glob("*.img")):
                self._detach(name, image)

    def _params(self, config: HostConfig, hdir: Path, status_fd: int,
                disks: list[dict[str, Any]]) -> dict[str, Any]:
        """The JSON that host_init.py boots from (holds private keys: mode 600)."""
        return {
            "name": config.name, "instance_id": config.instance_id,
            "hostname": config.hostname, "fqdn": config.fqdn,
            "address": str(config.address), "gateway": str(config.gateway),
            "dns": [str(server) for server in config.dns],
            "users": [{"name": u.name, "ssh_authorized_keys": list(u.ssh_authorized_keys),
                       "sudo": u.sudo, "shell": u.shell} for u in config.users],
            "host_keys": [list(key) for key in config.host_keys],
            "write_files": [{"path": f.path, "content": f.content,
                             "permissions": f.permissions, "owner": f.owner}
                            for f in config.write_files],
            "upper": str(hdir / "upper"), "work": str(hdir / "work"),
            "root": str(hdir / "root"), "systemctl": str(self._systemctl),
            "status_fd": status_fd, "stop_grace": self.stop_grace,
            "hide": [str(self.state_dir)], "mac": self._mac(config),
            "init_net_sysctls": self._init_net_sysctls(config.name),
            "disks": [{key: value for key, value in disk.items() if key != "loop"}
                      for disk in disks],
        }

    def _init_net_sysctls(self, host: str) -> dict[str, tuple[int, str]]:
        """The machine's net.* keys of its initial network namespace: those a host's
        namespace lacks become per-host copies (lab/guest/procsys.py)."""
        with self._locks_guard:
            if self._init_net is None:
                self._init_net = initial_net_sysctls(host)
            return self._init_net

    def _abort(self, name: str) -> None:
        """Undo a failed boot: SIGKILL to the launcher takes PID 1 along."""
        launcher = self._launchers.pop(name, None)
        if launcher is not None:
            self._signal(launcher, signal.SIGKILL)
        self._teardown(name)

    def _await_report(self, name: str, read_fd: int,
                      on_network: Callable[[], None] | None) -> dict[str, Any]:
        """PID 1 writes a JSON line once its network is up ({"network": true}), and a last
        one when sshd listens or a step failed ({"ok": ...}); the last one is returned."""
        deadline = time.monotonic() + self.boot_timeout
        data = b""
        while True:
            while b"\n" in data:
                line, data = data.split(b"\n", 1)
                report: dict[str, Any] = json.loads(line)
                if "ok" in report:
                    return report
                if report.get("network") and on_network is not None:
                    on_network()
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabHostError(name, "boot", f"no report within {self.boot_timeout} s; "
                                   f"console.log ends: {self._console_tail(name)}")
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                return {"ok": False, "step": "boot",
                        "detail": f"PID 1 exited; console.log ends: {self._console_tail(name)}"}
            data += chunk

    def _console_tail(self, name: str, lines: int = 15) -> str:
        """The end of the console log, to quote in errors."""
        try:
            text = self.console_log(name).read_text(errors="replace")
        except FileNotFoundError:
            return "(no console.log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    @staticmethod
    def _init_of(launcher_pid: int) -> _Process | None:
        """The host's PID 1 is the only child of `unshare --fork`."""
        try:
            children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text()
        except FileNotFoundError:
            return None
        pids = [int(pid) for pid in children.split()]
        return _Process.of(pids[0]) if len(pids) == 1 else None

    # -- stop and delete ----------------------------------------------------------------

    def _run_record(self, name: str) -> dict[str, Any] | None:
        """What the last boot recorded, if anything."""
        try:
            record: dict[str, Any] = json.loads((self.host_dir(name) / "run.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return record

    def _running(self, name: str) -> _Process | None:
        """The live PID 1 of the host, or None."""
        record = self._run_record(name)
        if record is None:
            return None
        init = _Process(int(record["init_pid"]), int(record["init_start"]))
        return init if init.alive() else None

    def _settled(self, name: str) -> _Process | None:
        """The host's PID 1, once a boot (or stop) in flight has ended."""
        with self._locked(name):
            return self._running(name)

    def _teardown(self, name: str) -> bool:
        """Stop the processes, then the network; True if the host was running."""
        record = self._run_record(name) or {}
        init = _Process(int(record.get("init_pid", 0)), int(record.get("init_start", 0)))
        was_running = bool(record) and init.alive()
        if was_running:
            self._signal(init, signal.SIGTERM)
            if not _wait_gone(init, self.stop_grace + 5):
                self._signal(init, signal.SIGKILL)
                if not _wait_gone(init, 10):
                    raise LabHostError(name, "stop", f"PID 1 ({init.pid}) survives SIGKILL")
        launcher = _Process(int(record.get("launcher_pid", 0)),
                            int(record.get("launcher_start", 0)))
        if record and not _wait_gone(launcher, 5):
            self._signal(launcher, signal.SIGKILL)  # PID 1 dies with it (PR_SET_PDEATHSIG)
            _wait_gone(launcher, 5)
        netns, veth = self.netns(name), self._veth(name)
        if Path("/run/netns", netns).exists():
            # Stragglers entered the namespace from outside (ip netns exec): a powered-off
            # VM runs nothing.
            pids = _run(name, "list namespace processes", ["ip", "netns", "pids", netns])
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        if Path("/sys/class/net", veth).exists():
            _run(name, "delete veth", ["ip", "link", "del", veth])
        if Path("/run/netns", netns).exists():
            _run(name, "delete network namespace", ["ip", "netns", "del", netns])
        self._detach_disks(name)
        with contextlib.suppress(FileNotFoundError):
            (self.host_dir(name) / "run.json").unlink()
        return was_running

    def _signal(self, process: _Process, signum: signal.Signals) -> None:
        """Signal a process only if it is still the one recorded."""
        if process.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)

    def _remove_disk(self, name: str) -> None:
        """Remove the host's directory, never following a mount into the machine's root."""
        hdir = self.host_dir(name)
        if not hdir.exists():
            return
        prefix = str(hdir) + "/"
        mounted = [point for point in _mount_points() if (point + "/").startswith(prefix)]
        if mounted:
            raise LabHostError(name, "delete disk", f"still mounted: {', '.join(mounted)}")
        for sub in ("upper", "work"):
            if (hdir / sub).exists():
                shutil.rmtree(hdir / sub)
        if (hdir / "root").exists():
            (hdir / "root").rmdir()  # an empty mount point; rmdir refuses anything else
        shutil.rmtree(hdir)

    # -- helpers ------------------------------------------------------------------------

    def _candidates(self) -> list[str]:
        """Every host this state dir knows about."""
        if not self.hosts_dir.is_dir():
            return []
        return sorted(p.name for p in self.hosts_dir.iterdir()
                      if p.is_dir() and NAME_RE.match(p.name))

    @staticmethod
    def _each(operation: Any, names: list[str]) -> dict[str, bool]:
        """Run `operation(name)` for every name in parallel; the first error wins."""
        if not names:
            return {}
        with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
            results = dict(zip(names, pool.map(operation, names), strict=True))
        return results

    def _ip(self, name: str, step: str, batch: str) -> None:
        """Several ip(8) commands in one process."""
        _run(name, step, ["ip", "-batch", "-"], input=batch)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """One operation per host at a time, across threads and processes."""
        _checked_name(name)
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        locks_dir = self.state_dir / "locks"
        locks_dir.mkdir(parents=True, exist_ok=True)
        with lock, (locks_dir / f"{name}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class _ForkServer:
    """This side of lab/host_forkserver.py: started at the first boot, and again at the
    next boot if it has died; one request at a time (a fork takes a millisecond)."""

    REPLY_TIMEOUT_S = 30.0

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.log_path = state_dir / "forkserver.log"  # its own errors, if it has any
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def spawn(self, host: str, netns: str, params: Path, status_fd: int,
              console_fd: int) -> int:
        """Start the launcher of `host` (which forks its PID 1); the launcher's pid."""
        request = json.dumps({"netns": netns, "params": str(params)}).encode()
        with self._lock:
            for attempt in (1, 2):
                sock = self._started()
                try:
                    socket.send_fds(sock, [request], [status_fd, console_fd])
                except OSError as error:  # died since the last boot: the request is lost
                    self._stop()
                    if attempt == 2:
                        raise LabHostError(host, "start PID 1", "the fork server refuses "
                                           f"requests: {error}; {self._log_tail()}") from None
                    continue
                try:
                    reply = sock.recv(65536)
                except OSError as error:  # a timeout included
                    reply, detail = b"", f"no reply ({error})"
                else:
                    detail = "the fork server exited"
                if not reply:
                    self._stop()
                    raise LabHostError(host, "start PID 1", f"{detail}; {self._log_tail()}")
                answer = json.loads(reply)
                if "error" in answer:
                    raise LabHostError(host, "start PID 1", str(answer["error"]))
                return int(answer["pid"])
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Let the server go: it exits at end of file on its socket."""
        with self._lock:
            self._stop()

    def _started(self) -> socket.socket:
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        self._stop()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    [GUEST_PYTHON, "-I", "-S", "-c", FORKSERVER_LAUNCH, str(FORKSERVER_SCRIPT),
                     str(INIT_SCRIPT), str(theirs.fileno()), str(self.state_dir)],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=log, env=GUEST_ENV, cwd="/", start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(self.REPLY_TIMEOUT_S)
        self._sock = ours
        return ours

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            lines = []
        return f"{self.log_path} ends: {' | '.join(lines[-5:]) or '(empty)'}"


def _checked_name(name: str) -> str:
    """VM names become paths and namespace names: keep them tame."""
    if not NAME_RE.match(name):
        raise ValueError(f"invalid lab host name {name!r}")
    return name


def _run(name: str, step: str, argv: list[str], input: str | None = None) -> str:
    """Run a command on the machine; a failure names the host, the step and stderr."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, env=GUEST_ENV)
    if proc.returncode != 0:
        raise LabHostError(name, step, f"`{' '.join(argv)}` exited {proc.returncode}: "
                                       f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


LOOP_CONTROL = "/dev/loop-control"
LOOP_SET_FD = 0x4C00  # linux/loop.h
LOOP_CTL_GET_FREE = 0x4C82


def _attach_loop(name: str, step: str, image: Path) -> str:
    """What `losetup --find --show IMAGE` does, without starting a process on the way
    of every boot: the first free loop device, bound to the image; its path. Two attaches
    at once (threads or processes) may be offered the same free device: the kernel binds
    it to one, and the other asks for the next free one."""
    where = LOOP_CONTROL  # what a failed ioctl names (a failed open names its file)
    try:
        with open(image, "r+b", buffering=0) as backing, \
                open(LOOP_CONTROL, "r+b", buffering=0) as control:
            for _ in range(20):
                where = device = f"/dev/loop{fcntl.ioctl(control, LOOP_CTL_GET_FREE)}"
                fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(fd, LOOP_SET_FD, backing.fileno())
                    return device
                except OSError as error:
                    if error.errno != errno.EBUSY:  # EBUSY: another process took it first
                        raise
                finally:
                    os.close(fd)
            raise OSError(errno.EBUSY, "every free loop device was taken meanwhile")
    except OSError as error:
        raise LabHostError(name, step, f"attaching {image} to a loop device: "
                           f"{error.filename or where}: {error.strerror}") from None


def _write_private(path: Path, content: str) -> None:
    """Write a file only root can read, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    os.replace(tmp, path)


def _wait_gone(process: _Process, timeout: float) -> bool:
    """Poll until the process is gone (or a zombie); False on timeout."""
    deadline = time.monotonic() + timeout
    while process.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _mount_points() -> list[str]:
    """Mount points in this process's mount namespace."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        points.append(point.replace("\\040", " "))
    return points
