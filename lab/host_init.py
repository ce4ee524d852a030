"""PID 1 of a lab host: builds the guest's root, plays cloud-init, then supervises sshd.

Run by lab/host_forkserver.py, which imports this file once and forks a PID 1 per boot,
so it already sits in the host's network, UTS, IPC, mount and PID namespaces. It runs
under the machine's /usr/bin/python3 with the standard library only: it must not depend
on the project venv, which the host sees like any other directory of the base.

Boot, in order (each step is named in the error sent back to hosts.py):
1. mount an overlay of the whole base root (lower = /, upper/work = the host's disk);
2. mount fresh proc, sysfs, a small /dev, tmpfs /run, /tmp, /dev/shm; hide the lab's
   state dir; bind the systemctl replacement read-only over /usr/bin/systemctl; put the
   kernel stand-ins in place (below); pivot_root into the overlay; drop CAP_SYS_MODULE
   and CAP_SYS_TIME from the bounding set of everything the host will run;
3. like systemd-modules-load then systemd-sysctl: mark the modules of the host's
   modules-load.d loaded, apply the host's sysctl.d (to its own copies of the keys);
4. set the hostname; populate /run; once per disk, disable the services the base
   machine has enabled; mount the /etc/fstab entries of the VM's data disks; once per
   instance id, play cloud-init (machine-id, hosts, resolv.conf,
   /etc/netplan/50-cloud-init.yaml, users, sudoers, SSH host keys, write_files);
   install the lab's ssh.service and its notify drop-ins;
5. bring up lo and eth0, announcing the address (arp_notify): from the VM's configuration,
   or, once the guest has changed its netplan files, the way `netplan apply` does;
6. start `sshd -D -e`, report ready once it listens, start the units enabled in this
   host; then reap zombies, forward SIGHUP to sshd (so `kill -HUP 1` reloads it),
   restart it if it dies, and on SIGTERM stop every process of the host and exit.

Kernel stand-ins. The host shares the machine's kernel; whatever is global in it is
replaced inside the host by a labelled stand-in, so that nothing a host does changes the
machine (each file documents its own behaviour and its differences from a VM):
- /proc/sys is lab/guest/procsys.py, a FUSE file system served by a thread of this PID 1:
  namespaced keys (most of net.*, kernel.hostname, the IPC keys...) are the kernel's,
  every writable global key (kernel.*, vm.*, fs.*, dev.*, user.*...) is a per-host copy
  made at boot and validated like the kernel does; net keys that only the initial
  network namespace has (hosts.py passes their values) and, on kernels without it,
  net.bridge.* are per-host too; so are the keys a Debian kernel has and the machine's
  may lack (kernel.yama.ptrace_scope, kernel.sysrq...);
- /usr/sbin/modprobe, lsmod and systemd-modules-load are lab/guest/kmod.py: modules
  "load" into the host's /run/lab-host/modules (also the host's /proc/modules where the
  kernel has one);
- /usr/sbin/swapon and swapoff are lab/guest/swap.py, and /proc/swaps is the host's own
  (empty): a lab host has no swap and cannot touch the machine's;
- /usr/sbin/chronyd is lab/guest/chronyd.py: the real chronyd, always with -x (never
  steers the clock);
- netplan's script is lab/guest/netplan.py: the real netplan, except that `apply`
  configures the host's NIC itself;
- /usr/bin/lsblk is lab/guest/lsblk.py: the VM's own disks (sda the OS disk, sdb... the
  data disks), never the machine's; the data disks are block device nodes in the host's
  private /dev on loop devices hosts.py attached, so the real mkfs, blkid, wipefs and
  mount work on them.
The real commands stay reachable for the stand-ins under /run/lab-host/real/. A command
that is a symlink to a multi-call binary (modprobe -> kmod) is replaced in the host's
disk by the mount point; one that is missing (kmod not installed) is created: the
stand-ins exist in every host. Packages whose files are covered (kmod, chrony,
netplan.io, util-linux's swapon/swapoff, systemd's systemctl) cannot be upgraded inside
a host: dpkg cannot replace a mount point.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import grp
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

TYPE_CHECKING = False  # typing costs milliseconds at each boot, for annotations only
if TYPE_CHECKING:
    from typing import Any, NoReturn

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INSTANCE_ID_FILE = "/var/lib/cloud/data/instance-id"
DISK_MARKER = "/var/lib/lab-host/disk-prepared"
WANTS_DIR = "/etc/systemd/system/multi-user.target.wants"
SSH_UNITS = ("ssh.service", "sshd.service")
SUDOERS_FILE = "/etc/sudoers.d/90-cloud-init-users"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
GUEST_DIR = Path(__file__).resolve().with_name("guest")
LAB_RUN = "/run/lab-host"  # the stand-ins' state inside the host
NIC_FILE = f"{LAB_RUN}/nic"
CLOUD_NETPLAN = "/etc/netplan/50-cloud-init.yaml"
CLOUD_NETPLAN_RECORD = "/var/lib/lab-host/netplan-from-cloud-init.json"
SWAPS_HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
# (command, stand-in in lab/guest, whether the stand-in needs the real command,
#  whether to create the command when the base lacks it)
STAND_INS = (
    ("/usr/sbin/modprobe", "kmod.py", False, True),
    ("/usr/bin/lsmod", "kmod.py", False, True),
    ("/usr/sbin/lsmod", "kmod.py", False, False),
    ("/usr/lib/systemd/systemd-modules-load", "kmod.py", False, False),
    ("/usr/sbin/swapon", "swap.py", True, False),
    ("/usr/sbin/swapoff", "swap.py", True, False),
    ("/usr/sbin/chronyd", "chronyd.py", True, False),
    ("/usr/sbin/netplan", "netplan.py", False, False),
    ("/usr/bin/lsblk", "lsblk.py", False, True),
)
MULTI_CALL = ("kmod", "busybox")
PR_CAPBSET_DROP = 24
CAP_SYS_MODULE = 16
CAP_SYS_TIME = 25

SSH_UNIT = """\
# Installed by the lab (lab/host_init.py). In a lab host sshd is supervised by PID 1:
# starting, restarting or reloading ssh checks the configuration and asks PID 1 to make
# sshd re-read it (SIGHUP); the unit's main process is a placeholder, so stopping ssh
# leaves sshd and its sessions running.
[Unit]
Description=OpenBSD Secure Shell server (lab host)

[Service]
Type=simple
ExecStartPre=/usr/sbin/sshd -t
ExecStart=/bin/sh -c 'kill -HUP 1 && exec sleep infinity'
ExecReload=/bin/sh -c '/usr/sbin/sshd -t && kill -HUP 1'

[Install]
WantedBy=multi-user.target
Alias=sshd.service
"""

_libc = ctypes.CDLL(None, use_errno=True)
_procsys_server: Any = None  # the FUSE server of /proc/sys: lives as long as PID 1


def guest_module(name: str) -> ModuleType:
    """A stand-in of lab/guest as a module (PID 1 runs with -I: no sys.path to rely on)."""
    qualified = f"lab_guest_{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(qualified, GUEST_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
    return module


class BootError(Exception):
    """A boot step failed; `step` names it for the error hosts.py raises."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail


class Shutdown(Exception):
    """Raised from the SIGTERM handler to leave the supervision loop."""


def log(message: str) -> None:
    """One line to the console log (stderr), stamped like a kernel console."""
    sys.stderr.write(f"[{time.monotonic():12.3f}] init: {message}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Name the boot step so that any failure inside it says where it happened."""
    try:
        yield
    except BootError:
        raise
    except Exception as exc:
        raise BootError(name, f"{type(exc).__name__}: {exc}") from exc


def run(step_name: str, argv: list[str], input: str | None = None) -> str:
    """Run a command of the guest; a failure quotes its stderr."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                          env={"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root"})
    if proc.returncode != 0:
        raise BootError(step_name, f"`{' '.join(argv)}` exited {proc.returncode}: "
                                   f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def mount(source: str, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    """mount(2) without spawning mount(8): a dozen mounts per boot, twenty hosts at once."""
    rc = _libc.mount(source.encode(), target.encode(),
                     fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                     data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} {source} on {target}"
                           f"{' -o ' + data if data else ''}: {os.strerror(err)}")


def bind_file(source: str, target: str, read_only: bool) -> None:
    """Bind one file over another (created empty if missing), optionally read-only."""
    if not os.path.lexists(target):
        Path(target).touch(mode=0o644)
    mount(source, target, None, MS_BIND)
    if read_only:
        mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def build_root(params: dict[str, Any]) -> None:
    """Overlay the base root and give it its own kernel filesystems, then enter it."""
    root = params["root"]
    with step("mount overlay root"):
        mount("overlay", root, "overlay", 0,
              f"lowerdir=/,upperdir={params['upper']},workdir={params['work']}")
    with step("mount kernel filesystems"):
        mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount("sysfs", f"{root}/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount("tmpfs", f"{root}/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=20%")
        mount("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    with step("mount /dev"):
        dev = f"{root}/dev"
        mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=1m")
        for name in DEVICES:
            bind_file(f"/dev/{name}", f"{dev}/{name}", read_only=False)
        os.mkdir(f"{dev}/pts", 0o755)
        mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=0620,gid=5")
        os.symlink("pts/ptmx", f"{dev}/ptmx")
        os.mkdir(f"{dev}/shm", 0o1777)
        mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        for fd, stream in enumerate(("stdin", "stdout", "stderr")):
            os.symlink(f"/proc/self/fd/{fd}", f"{dev}/{stream}")
        os.symlink("/proc/self/fd", f"{dev}/fd")
    with step("data disk nodes"):
        make_disk_nodes(params, dev)
    with step("hide the lab's state"):
        # The overlay shows the whole machine, the lab's state dir included: other
        # hosts' disks and their private keys are none of this guest's business.
        for path in params.get("hide", []):
            if os.path.isdir(f"{root}{path}"):
                mount("tmpfs", f"{root}{path}", "tmpfs",
                      MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")
    if params.get("systemctl"):
        with step("bind systemctl"):
            bind_file(params["systemctl"], f"{root}/usr/bin/systemctl", read_only=True)
    with step("kernel stand-ins"):
        install_stand_ins(params, root)
    with step("pivot_root"):
        number = SYS_PIVOT_ROOT.get(os.uname().machine)
        if number is None:
            raise OSError(f"no pivot_root syscall number for {os.uname().machine}")
        os.chdir(root)
        if _libc.syscall(number, b".", b".") != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pivot_root {root}: {os.strerror(err)}")
        if _libc.umount2(b".", MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"detach the old root: {os.strerror(err)}")
        os.chdir("/")


def make_disk_nodes(params: dict[str, Any], dev: str) -> None:
    """/dev/sdb... for the VM's data disks: nodes of the loop devices hosts.py attached to
    the host's disk files. No node is made for anything else: the host's /dev has no
    device of the machine's disks, so nothing in it can open them by name."""
    disk_group = grp.getgrnam("disk").gr_gid if _has_group("disk") else 0
    for disk in params.get("disks", []):
        if disk.get("os"):
            continue
        name = str(disk["name"])
        if not name.startswith("sd") or "/" in name:
            raise OSError(f"unexpected disk name {name!r}")
        node = f"{dev}/{name}"
        os.mknod(node, 0o660 | stat.S_IFBLK, os.makedev(int(disk["major"]), int(disk["minor"])))
        os.chown(node, 0, disk_group)
        os.chmod(node, 0o660)


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def resolve_in_root(root: str, path: str, depth: int = 0) -> str:
    """`path` with every symlink resolved inside `root` (absolute targets included)."""
    if depth > 20:
        raise OSError(f"too many levels of symbolic links: {path}")
    parts = [part for part in path.split("/") if part]
    current = ""
    for index, part in enumerate(parts):
        candidate = f"{current}/{part}"
        if os.path.islink(root + candidate):
            target = os.readlink(root + candidate)
            base = target if target.startswith("/") else os.path.normpath(f"{current}/{target}")
            rest = "/".join(parts[index + 1:])
            return resolve_in_root(root, base + (f"/{rest}" if rest else ""), depth + 1)
        current = candidate
    return current or "/"


def install_stand_ins(params: dict[str, Any], root: str) -> None:
    """Cover what is global in the shared kernel with the host's own (module docstring)."""
    global _procsys_server
    os.makedirs(f"{root}{LAB_RUN}/real", mode=0o755)
    procsys = guest_module("procsys")
    for later in ("kmod", "netplan"):  # loaded while their files are surely in sight
        guest_module(later)
    real_sys = os.open(f"{root}/proc/sys", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    init_net = {path: (int(mode), str(value))
                for path, (mode, value) in params.get("init_net_sysctls", {}).items()}
    _procsys_server = procsys.mount(f"{root}/proc/sys", real_sys, init_net, mount, log)
    # The VM's disks, for the lsblk stand-in (lab/guest/lsblk.py).
    Path(f"{root}{LAB_RUN}/disks.json").write_text(json.dumps(params.get("disks", [])))
    # The machine's swap and modules are not the host's.
    Path(f"{root}{LAB_RUN}/swaps").write_text(SWAPS_HEADER)
    if os.path.exists(f"{root}/proc/swaps"):
        bind_file(f"{root}{LAB_RUN}/swaps", f"{root}/proc/swaps", read_only=False)
    modules = f"{root}{LAB_RUN}/modules"
    machine_modules = ""
    if os.path.exists(f"{root}/proc/modules"):
        machine_modules = Path(f"{root}/proc/modules").read_text()
    Path(modules).write_text(machine_modules)
    if os.path.exists(f"{root}/proc/modules"):
        bind_file(modules, f"{root}/proc/modules", read_only=False)
    params["_machine_modules"] = machine_modules
    for command, stand_in, needs_real, create in STAND_INS:
        if not os.access(GUEST_DIR / stand_in, os.X_OK):
            raise OSError(f"{GUEST_DIR / stand_in} is not executable (chmod 755)")
        target = f"{root}{command}"
        if not os.path.lexists(target):
            if not create:
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            Path(target).touch(mode=0o755)
        resolved = resolve_in_root(root, command)
        if not os.path.exists(root + resolved):
            continue  # a dangling link: nothing to stand in for
        if needs_real:
            bind_file(root + resolved, f"{root}{LAB_RUN}/real/{os.path.basename(command)}",
                      read_only=True)
        if os.path.basename(resolved) in MULTI_CALL:
            # Covering kmod itself would take modinfo, insmod... along: replace the link.
            os.unlink(target)
            Path(target).touch(mode=0o755)
            resolved = command
        bind_file(str(GUEST_DIR / stand_in), root + resolved, read_only=True)


def drop_capabilities() -> None:
    """Nothing the host runs may load kernel modules or set the clock, root or not."""
    with step("drop capabilities"):
        for capability in (CAP_SYS_MODULE, CAP_SYS_TIME):
            if _libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"drop capability {capability}: {os.strerror(err)}")


def load_modules(params: dict[str, Any]) -> None:
    """systemd-modules-load's part: the host's modules-load.d modules count as loaded."""
    with step("modules-load"):
        failed = guest_module("kmod").boot(params.get("_machine_modules"))
        for name in failed:
            log(f"modules-load: failed to find module '{name}'")


def apply_sysctls() -> None:
    """systemd-sysctl's part: the host's sysctl.d, into its own copies of the keys."""
    with step("sysctl"):
        for binary in ("/usr/lib/systemd/systemd-sysctl", "/lib/systemd/systemd-sysctl"):
            if os.access(binary, os.X_OK):
                argv = [binary]
                break
        else:
            argv = ["sysctl", "--system", "--quiet"]
        proc = subprocess.run(argv, capture_output=True, text=True, env={"PATH": PATH})
        if proc.returncode != 0:  # as on a VM: logged, boot goes on
            log(f"{argv[0]} exited {proc.returncode}: {proc.stderr.strip()}")


def netplan_changed() -> bool:
    """Whether the guest changed its netplan files since cloud-init wrote them."""
    try:
        recorded = Path(CLOUD_NETPLAN_RECORD).read_text()
    except FileNotFoundError:
        return False
    return bool(recorded) and recorded != guest_module("netplan").config_record()


def configure_network(params: dict[str, Any]) -> None:
    """What netplan does on a VM: lo and eth0 up, the static address, the default route."""
    with step("network"):
        write_text(NIC_FILE, f"eth0 {params['mac']}\n", 0o644)
        # Announce the address on link-up so neighbours drop a stale MAC for this IP.
        Path("/proc/sys/net/ipv4/conf/all/arp_notify").write_text("1\n")
        if netplan_changed():
            run("network", ["ip", "-batch", "-"], input="link set lo up\nlink set eth0 up\n")
            proc = subprocess.run(["/usr/sbin/netplan", "apply"], capture_output=True,
                                  text=True, env={"PATH": PATH, "LANG": "C.UTF-8"})
            if proc.returncode != 0:  # a VM with a broken netplan boots unreachable
                log(f"netplan apply exited {proc.returncode}: {proc.stderr.strip()}")
            return
        batch = "\n".join([
            "link set lo up",
            f"addr add {params['address']} dev eth0",
            "link set eth0 up",
            f"route add default via {params['gateway']} dev eth0",
        ]) + "\n"
        run("network", ["ip", "-batch", "-"], input=batch)


def write_text(path: str, content: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Replace a file's content atomically with the given mode and owner."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.lab-tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as handle:
        handle.write(content)
    os.chown(tmp, uid, gid)
    os.chmod(tmp, mode)
    if target.is_symlink():
        target.unlink()
    os.replace(tmp, target)


def set_hostname(params: dict[str, Any]) -> None:
    """Every boot: the UTS hostname and /etc/hostname follow the VM's configuration."""
    with step("hostname"):
        socket.sethostname(params["hostname"])
        wanted = params["hostname"] + "\n"
        current = Path("/etc/hostname")
        if not current.is_file() or current.read_text() != wanted:
            write_text("/etc/hostname", wanted, 0o644)


def prepare_run() -> None:
    """Populate the fresh /run the way systemd's early boot would (sshd needs /run/sshd)."""
    with step("tmpfiles"):
        if shutil.which("systemd-tmpfiles", path=PATH):
            proc = subprocess.run(["systemd-tmpfiles", "--create", "--boot", "--prefix=/run"],
                                  capture_output=True, text=True, env={"PATH": PATH})
            if proc.returncode != 0:  # partial failures are normal outside systemd
                log(f"systemd-tmpfiles exited {proc.returncode}: {proc.stderr.strip()}")
            # --boot also creates /run/nologin ("System is booting up"), which
            # systemd-user-sessions removes once boot is over: so do we.
            with contextlib.suppress(FileNotFoundError):
                os.unlink("/run/nologin")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        os.makedirs("/run/lock", mode=0o1777, exist_ok=True)


def prepare_disk() -> None:
    """Once per disk: the base machine's enabled services are not this VM's.

    The machine has haproxy, keepalived, postgresql... enabled; a fresh VM of the
    product has none of them running. Disabling them here (whiteouts in the upper dir)
    makes the host start, at each boot, exactly what was enabled inside it.
    """
    if os.path.exists(DISK_MARKER):
        return
    with step("prepare disk"):
        for link in sorted(glob.glob(f"{WANTS_DIR}/*")):
            if os.path.basename(link) not in SSH_UNITS:
                os.unlink(link)
        write_text(DISK_MARKER, "base services disabled\n", 0o644)


def mount_data_disks(params: dict[str, Any]) -> None:
    """systemd's fstab mounts, for the host's data disks only: each /etc/fstab entry whose
    source (LABEL=, UUID= or the node) is one of this host's /dev/sdb... nodes is mounted,
    as at a VM's boot; an entry that fails is logged and the boot goes on (the product's
    entries are nofail). Other entries (the OS disk, network shares) are left alone."""
    nodes = [f"/dev/{disk['name']}" for disk in params.get("disks", []) if not disk.get("os")]
    if not nodes or not os.path.isfile("/etc/fstab"):
        return
    with step("fstab mounts"):
        entries = [fields for fields in map(str.split, Path("/etc/fstab").read_text()
                                            .splitlines())
                   if len(fields) >= 3 and not fields[0].startswith("#")]
        identities = {node: node for node in nodes}
        if any(fields[0].startswith(("LABEL=", "UUID=")) for fields in entries):
            for node in nodes:  # (only then: a fresh VM's fstab names no data disk)
                found = subprocess.run(["blkid", "-p", "-o", "export", node],
                                       capture_output=True, text=True, env={"PATH": PATH})
                for line in found.stdout.splitlines():
                    key, _, value = line.partition("=")
                    if key in ("LABEL", "UUID") and value:
                        identities[f"{key}={value}"] = node
        for fields in entries:
            if fields[0] not in identities:
                continue
            node, target, fstype = identities[fields[0]], fields[1], fields[2]
            options = fields[3] if len(fields) > 3 else "defaults"
            if "noauto" in options.split(",") or fstype == "swap":
                continue
            os.makedirs(target, exist_ok=True)
            proc = subprocess.run(["mount", "-t", fstype, "-o", options, node, target],
                                  capture_output=True, text=True, env={"PATH": PATH})
            if proc.returncode != 0:
                log(f"fstab: mount {fields[0]} on {target} failed: {proc.stderr.strip()}")
            else:
                log(f"fstab: mounted {fields[0]} ({node}) on {target}")


def enabled_units() -> list[str]:
    """Units enabled in this host (sshd excepted: PID 1 runs it)."""
    return sorted(name for name in os.listdir(WANTS_DIR) if name not in SSH_UNITS) \
        if os.path.isdir(WANTS_DIR) else []


def first_boot(params: dict[str, Any]) -> bool:
    """Whether this boot is the instance's first (cloud-init runs once per instance id)."""
    marker = Path(INSTANCE_ID_FILE)
    if marker.is_file() and marker.read_text().strip() == params["instance_id"]:
        log(f"instance {params['instance_id']} already initialised")
        return False
    log(f"first boot of instance {params['instance_id']}")
    return True


def cloud_init_local(params: dict[str, Any]) -> None:
    """cloud-init's local stage, before the network: identity, name resolution, netplan."""
    with step("cloud-init machine-id"):
        write_text("/etc/machine-id", os.urandom(16).hex() + "\n", 0o444)
    with step("cloud-init /etc/hosts"):
        write_text("/etc/hosts", hosts_file(params), 0o644)
    with step("cloud-init /etc/resolv.conf"):
        write_text("/etc/resolv.conf", resolv_conf(params), 0o644)
    with step("cloud-init netplan"):
        write_text(CLOUD_NETPLAN, netplan_yaml(params), 0o600)
        write_text(CLOUD_NETPLAN_RECORD, guest_module("netplan").config_record(), 0o600)


def cloud_init(params: dict[str, Any]) -> None:
    """cloud-init's network stage, before sshd starts (as cloud-init.service orders it):
    users, sudo, the VM's SSH host keys, write_files; then the instance is marked done."""
    for user in params["users"]:
        with step(f"cloud-init user {user['name']}"):
            create_user(user)
    sudoers = [u["name"] for u in params["users"] if u.get("sudo")]
    if sudoers:
        with step("cloud-init sudoers"):
            install_sudoers(sudoers)
    with step("cloud-init ssh host keys"):
        install_host_keys(params["host_keys"])
    for item in params["write_files"]:
        with step(f"cloud-init write_files {item['path']}"):
            write_guest_file(item)
    with step("cloud-init instance id"):
        write_text(INSTANCE_ID_FILE, params["instance_id"] + "\n", 0o644)


def hosts_file(params: dict[str, Any]) -> str:
    """/etc/hosts as cloud-init's Debian template writes it, plus the host's own address.

    The own address comes first so that resolving the hostname yields the routable
    address before 127.0.1.1 (clustered software picks the first one).
    """
    names = f"{params['fqdn']} {params['hostname']}" if params["fqdn"] != params["hostname"] \
        else params["hostname"]
    own = params["address"].split("/")[0]
    return "\n".join([
        "# Written on first boot by the lab's cloud-init (lab/host_init.py).",
        f"{own} {names}",
        f"127.0.1.1 {names}",
        "127.0.0.1 localhost",
        "::1 localhost ip6-localhost ip6-loopback",
        "ff02::1 ip6-allnodes",
        "ff02::2 ip6-allrouters",
    ]) + "\n"


def resolv_conf(params: dict[str, Any]) -> str:
    """Name servers from the VM's network config; the search domain from its FQDN."""
    lines = ["# Written on first boot by the lab's cloud-init (lab/host_init.py)."]
    domain = params["fqdn"].partition(".")[2]
    if domain:
        lines.append(f"search {domain}")
    lines += [f"nameserver {server}" for server in params["dns"]]
    return "\n".join(lines) + "\n"


def netplan_yaml(params: dict[str, Any]) -> str:
    """/etc/netplan/50-cloud-init.yaml as cloud-init renders a static v2 configuration."""
    domain = params["fqdn"].partition(".")[2]
    lines = [
        "# This file is generated from information provided by the datasource.  Changes",
        "# to it will not persist across an instance reboot.  To disable cloud-init's",
        "# network configuration capabilities, write a file",
        "# /etc/cloud/cloud.cfg.d/99-disable-network-config.cfg with the following:",
        "# network: {config: disabled}",
        "network:",
        "    ethernets:",
        "        eth0:",
        "            addresses:",
        f"            - {params['address']}",
        "            match:",
        f"                macaddress: {params['mac']}",
    ]
    if params["dns"] or domain:
        lines.append("            nameservers:")
        if params["dns"]:
            lines += ["                addresses:"] + \
                [f"                - {server}" for server in params["dns"]]
        if domain:
            lines += ["                search:", f"                - {domain}"]
    lines += [
        "            routes:",
        "            -   to: default",
        f"                via: {params['gateway']}",
        "            set-name: eth0",
        "    version: 2",
    ]
    return "\n".join(lines) + "\n"


def create_user(user: dict[str, Any]) -> None:
    """useradd (unless the base already has the user) and its authorized_keys."""
    name = user["name"]
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        run(f"cloud-init user {name}", ["useradd", "-m", "-s", user["shell"], name])
        entry = pwd.getpwnam(name)
    ssh_dir = Path(entry.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(ssh_dir, entry.pw_uid, entry.pw_gid)
    os.chmod(ssh_dir, 0o700)
    keys = "".join(key.strip() + "\n" for key in user["ssh_authorized_keys"])
    write_text(str(ssh_dir / "authorized_keys"), keys, 0o600, entry.pw_uid, entry.pw_gid)


def install_sudoers(names: list[str]) -> None:
    """Passwordless sudo, validated with visudo before it goes live."""
    content = "# Created by the lab's cloud-init (lab/host_init.py).\n" + "".join(
        f"{name} ALL=(ALL) NOPASSWD:ALL\n" for name in names)
    tmp = SUDOERS_FILE + ".lab-check"
    write_text(tmp, content, 0o440)
    try:
        run("cloud-init sudoers", ["visudo", "-cf", tmp])
    except BootError:
        os.unlink(tmp)
        raise
    os.replace(tmp, SUDOERS_FILE)


def install_host_keys(host_keys: list[list[str]]) -> None:
    """Exactly the VM's host keys: the base machine's keys must not leak into the host."""
    if not host_keys:
        raise ValueError("no SSH host keys given")
    for path in glob.glob("/etc/ssh/ssh_host_*"):
        os.unlink(path)
    for key_type, private, public in host_keys:
        if key_type not in ("rsa", "ecdsa", "ed25519"):
            raise ValueError(f"unsupported host key type {key_type!r}")
        base = f"/etc/ssh/ssh_host_{key_type}_key"
        write_text(base, private.strip() + "\n", 0o600)
        write_text(base + ".pub", public.strip() + "\n", 0o644)


def write_guest_file(item: dict[str, Any]) -> None:
    """cloud-init's write_files entry (after users exist, so their names can own files)."""
    user, _, group = item["owner"].partition(":")
    entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    if not group:
        gid = entry.pw_gid
    else:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    write_text(item["path"], item["content"], int(item["permissions"], 8), entry.pw_uid, gid)


def install_ssh_unit() -> None:
    """Every boot: the lab's ssh.service (restarting the stock unit would kill sshd)."""
    with step("ssh.service override"):
        unit = Path("/etc/systemd/system/ssh.service")
        if unit.is_symlink() or not unit.is_file() or unit.read_text() != SSH_UNIT:
            write_text(str(unit), SSH_UNIT, 0o644)
        alias = Path("/etc/systemd/system/sshd.service")
        if not alias.is_symlink() or os.readlink(alias) != "ssh.service":
            if alias.is_symlink() or alias.exists():
                alias.unlink()
            alias.symlink_to("ssh.service")


# Daemons that announce readiness with sd_notify only when their parent is PID 1 named
# systemd (keepalived's check_parent_systemd): under the lab's systemctl they never do,
# and a Type=notify start would wait out its timeout (about 3 minutes). Run as simple.
NOTIFY_ONLY_UNDER_SYSTEMD = ("keepalived",)
NOTIFY_DROPIN = """\
# Installed by the lab (lab/host_init.py): this daemon signals readiness only to a real
# systemd, which a lab host lacks; the lab starts it as Type=simple instead.
[Service]
Type=simple
"""


def install_notify_dropins() -> None:
    """Every boot: Type=simple drop-ins for NOTIFY_ONLY_UNDER_SYSTEMD."""
    with step("notify drop-ins"):
        for unit in NOTIFY_ONLY_UNDER_SYSTEMD:
            path = Path(f"/etc/systemd/system/{unit}.service.d/lab-type-simple.conf")
            if not path.is_file() or path.read_text() != NOTIFY_DROPIN:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text(str(path), NOTIFY_DROPIN, 0o644)


def mark_ssh_active() -> None:
    """Start ssh.service's placeholder and record it the way systemctl3 records a
    running simple unit, so `systemctl is-active ssh` says active as on a VM and
    reload works. (Running `systemctl start ssh` would cost half a second per boot and
    make sshd re-exec right after it starts listening.)
    """
    with step("ssh.service status"):
        placeholder = subprocess.Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL,
                                       env={"PATH": PATH})
        write_text("/run/ssh.service.status", f"MainPID={placeholder.pid}\n", 0o644)


# sock_diag (netlink) constants, from linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10


def listening() -> bool:
    """Whether some TCP socket listens in this network namespace (only sshd runs yet).

    Asked through sock_diag, which walks only the listening sockets; reading
    /proc/net/tcp walks the kernel's whole connection table, about 5 ms of CPU per read
    on a machine with much memory, and PID 1 asks every few milliseconds while sshd starts.
    """
    try:
        return any(_listening_in(family) for family in (socket.AF_INET, socket.AF_INET6))
    except OSError:  # a kernel without sock_diag
        return _listening_in_proc()


def _listening_in(family: int) -> bool:
    """One sock_diag dump of the TCP sockets of `family` in the LISTEN state."""
    # inet_diag_req_v2: family, protocol, ext, pad, states; then a zeroed inet_diag_sockid.
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN) \
        + bytes(48)
    header = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY,
                         NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
        diag.send(header + request)
        while True:
            data = diag.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == SOCK_DIAG_BY_FAMILY:
                    return True
                if kind == NLMSG_DONE:
                    return False
                if kind == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", data, offset + 16)
                    raise OSError(-error, f"sock_diag: {os.strerror(-error)}")
                offset += (length + 3) & ~3
            if not data:
                return False


def _listening_in_proc() -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                return True
    return False


def start_sshd() -> subprocess.Popen[bytes]:
    """sshd in the foreground, logging to the console; its children are ours to reap."""
    return subprocess.Popen(["/usr/sbin/sshd", "-D", "-e"], stdin=subprocess.DEVNULL,
                            env={"PATH": PATH, "LANG": "C.UTF-8"})


class Supervisor:
    """PID 1's duties once booted: reap, forward SIGHUP, keep sshd up, shut down on TERM."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.sshd: subprocess.Popen[bytes] | None = None
        self.restarts: list[float] = []

    def on_hup(self, signum: int, frame: object) -> None:
        """`kill -HUP 1` (the ssh.service override) makes sshd re-read its config."""
        if self.sshd is not None and self.sshd.returncode is None:
            log("SIGHUP: reloading sshd")
            os.kill(self.sshd.pid, signal.SIGHUP)

    def on_term(self, signum: int, frame: object) -> NoReturn:
        """Power-off request from hosts.py."""
        raise Shutdown()

    def start_units(self) -> None:
        """Like multi-user.target: start what was enabled in this host, in the background."""
        units = enabled_units()
        if units:
            log(f"starting enabled units: {' '.join(units)}")
            subprocess.Popen(["systemctl", "start", *units], stdin=subprocess.DEVNULL,
                             env={"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root"})

    def boot_sshd(self) -> None:
        """Start sshd and wait until it listens. Should it exit instead, its config test
        says why (run then only: it costs as much CPU as starting sshd)."""
        self.sshd = start_sshd()
        deadline = time.monotonic() + 10
        while not listening():
            if self.sshd.poll() is not None:
                run("sshd config test", ["/usr/sbin/sshd", "-t"])
                raise BootError("sshd", f"sshd exited {self.sshd.returncode} at start "
                                        "(see console.log)")
            if time.monotonic() > deadline:
                raise BootError("sshd", "sshd did not listen within 10 s")
            time.sleep(0.005)

    def loop(self) -> None:
        """Reap every child until told to shut down."""
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                signal.pause()
                continue
            if self.sshd is not None and pid == self.sshd.pid:
                self.sshd.returncode = os.waitstatus_to_exitcode(status)
                self._restart_sshd()

    def _restart_sshd(self) -> None:
        """Keep the host reachable, like Restart=on-failure, but give up on a crash loop."""
        assert self.sshd is not None
        log(f"sshd exited {self.sshd.returncode}")
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 60] + [now]
        if len(self.restarts) > 5:
            log("sshd keeps dying; not restarting it again")
            return
        time.sleep(1)
        self.sshd = start_sshd()
        log(f"sshd restarted as pid {self.sshd.pid}")

    def shutdown(self) -> None:
        """SIGTERM everything in the host, wait up to the grace period, then exit."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("shutting down")
        try:
            os.kill(-1, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.02)
        log("grace period over; the kernel kills what is left")


def announce(fd: int, message: dict[str, Any]) -> None:
    """Tell hosts.py how far the boot got (one JSON line; the pipe stays open)."""
    os.write(fd, (json.dumps(message) + "\n").encode())


def report(fd: int, message: dict[str, Any]) -> None:
    """Tell hosts.py how the boot ended (one JSON line), then let go of the pipe."""
    try:
        announce(fd, message)
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    """Boot the host described by the JSON file in argv[1]."""
    params = json.loads(Path(argv[1]).read_text())
    status_fd = int(params["status_fd"])
    os.set_inheritable(status_fd, False)
    supervisor = Supervisor(float(params.get("stop_grace", 5)))
    signal.signal(signal.SIGHUP, supervisor.on_hup)
    signal.signal(signal.SIGTERM, supervisor.on_term)
    signal.signal(signal.SIGINT, supervisor.on_term)
    try:
        log(f"booting {params['name']}")
        build_root(params)
        drop_capabilities()
        load_modules(params)
        apply_sysctls()
        set_hostname(params)
        prepare_run()
        prepare_disk()
        mount_data_disks(params)
        first = first_boot(params)
        if first:
            cloud_init_local(params)
        configure_network(params)
        # What VMware tools or the AHV guest agent do once the NIC has its address:
        # the hypervisor learns the guest's IP while the boot goes on (sshd comes later).
        announce(status_fd, {"network": True})
        if first:
            cloud_init(params)
        install_ssh_unit()
        install_notify_dropins()
        supervisor.boot_sshd()
        mark_ssh_active()
    except BootError as exc:
        log(f"boot failed: {exc}")
        report(status_fd, {"ok": False, "step": exc.step, "detail": exc.detail})
        return 1
    except Shutdown:
        log("stopped during boot")
        report(status_fd, {"ok": False, "step": "boot", "detail": "stopped during boot"})
        return 1
    assert supervisor.sshd is not None
    report(status_fd, {"ok": True, "sshd": supervisor.sshd.pid})
    log(f"up: sshd pid {supervisor.sshd.pid}")
    try:
        supervisor.start_units()
        supervisor.loop()
    except Shutdown:
        supervisor.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
