"""Lab hosts (lab/hosts.py) as the product sees them: real SSH to a simulated VM per IP.

Needs root. A module fixture puts an `unreachable` route over the test range first (so
nothing toward a lab address that is not up leaves through the default route), then a
test bridge, and at the end proves that nothing it started is left: no network
namespace, no process, no mount, no veth; and that nothing the hosts did changed the
machine's shared kernel: its global sysctls, swap and modules are as they were.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from fabric import Config, Connection

from lab.guest.procsys import Tree, parse_integers
from lab.hosts import GuestFile, GuestUser, HostConfig, LabHostError, LabHosts

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="lab hosts need root"),
]

BRIDGE = "plabt0"
GATEWAY = IPv4Interface("10.231.254.1/24")
GUARD_ROUTE = "10.231.254.0/23"
DOMAIN = "plabt.test"
USER = "ops"


def _keypair() -> tuple[str, str]:
    """A fresh ed25519 key: (OpenSSH private key text, public key line)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)


@dataclass
class Lab:
    """The test bridge, a LabHosts on a temporary state dir and the test's SSH keys."""

    hosts: LabHosts
    state_dir: Path
    work: Path
    user_key: Path
    user_public: str

    def config(self, name: str, last_octet: int, **changes: object) -> HostConfig:
        """A VM's cloud-init configuration with its own fresh ed25519 host key."""
        private, public = _keypair()
        config = HostConfig(
            name=name, instance_id=f"i-{name}", hostname=name, fqdn=f"{name}.{DOMAIN}",
            address=IPv4Interface(f"10.231.254.{last_octet}/24"), gateway=GATEWAY.ip,
            dns=(GATEWAY.ip,), bridge=BRIDGE,
            users=(GuestUser(USER, (self.user_public,)),),
            host_keys=(("ed25519", private, public),))
        return replace(config, **changes)  # type: ignore[arg-type]

    def known_hosts(self, config: HostConfig) -> Path:
        """A known_hosts file holding only the host key injected into this VM."""
        path = self.work / f"known_hosts-{config.name}"
        path.write_text(f"{config.address.ip} {config.host_keys[0][2]}\n")
        return path

    def ssh(self, config: HostConfig, command: str, input: bytes | None = None,
            port: int = 22, user: str = USER,
            timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
        """OpenSSH's client with strict host key checking against the injected key only."""
        return subprocess.run(
            ["ssh", "-F", "/dev/null", "-p", str(port), "-i", str(self.user_key),
             "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=yes",
             "-o", f"UserKnownHostsFile={self.known_hosts(config)}",
             "-o", "ConnectTimeout=3", f"{user}@{config.address.ip}", command],
            input=input, capture_output=True, timeout=timeout)

    def sudo(self, config: HostConfig, command: str, input: bytes | None = None) -> str:
        """Run a command as root over SSH (passwordless sudo) and insist it works."""
        proc = self.ssh(config, f"sudo -n sh -c {_quote(command)}", input=input)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        return proc.stdout.decode()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _fork_servers(lab: Lab) -> list[int]:
    """Pids of the fork servers of the lab's LabHosts (lab/host_forkserver.py)."""
    return [int(line.split(":")[0]) for line in _processes_mentioning(str(lab.state_dir))
            if "host_forkserver.py" in line]


def _mounts_mentioning(text: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if text in line]


def _bridge_ports() -> list[str]:
    return sorted(p.name for p in Path(f"/sys/class/net/{BRIDGE}/brif").iterdir())


# Writable keys that change by themselves (the kernel lowers the perf sample rate, pids).
VOLATILE_SYSCTLS = {"kernel/perf_event_max_sample_rate", "kernel/tainted", "kernel/ns_last_pid"}


def _machine_state() -> dict[str, object]:
    """What is global in the shared kernel, read from the root namespaces: the writable
    sysctls outside net/, the active swap areas, the loaded modules."""
    sysctls: dict[str, str] = {}
    for top in ("kernel", "vm", "fs", "dev", "user", "abi", "debug"):
        for dirpath, dirnames, filenames in os.walk(f"/proc/sys/{top}"):
            if dirpath == "/proc/sys/fs/binfmt_misc":
                dirnames[:] = []
                continue
            for name in filenames:
                path = Path(dirpath, name)
                key = str(path.relative_to("/proc/sys"))
                try:
                    mode = path.stat().st_mode
                    if key not in VOLATILE_SYSCTLS and mode & 0o600 == 0o600:
                        sysctls[key] = path.read_text()
                except OSError:
                    continue
    modules = Path("/proc/modules")
    return {
        "sysctls": sysctls,
        "swap areas": [line.split()[0] for line in
                       Path("/proc/swaps").read_text().splitlines()[1:]],
        "/proc/modules": sorted(line.split()[0] for line in
                                modules.read_text().splitlines()) if modules.exists() else None,
        "/sys/module": sorted(os.listdir("/sys/module")),
    }


def _changes(before: dict[str, object], after: dict[str, object]) -> list[str]:
    """What differs between two _machine_state() snapshots, named."""
    changed = []
    for what, old in before.items():
        new = after[what]
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
                        for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
        elif old != new:
            changed.append(f"{what}: {old!r} -> {new!r}")
    return changed


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Guard route, test bridge and lab hosts; all of it gone afterwards, checked."""
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        pytest.fail(f"{BRIDGE} exists: another run is using it or left it (ip link del {BRIDGE})")
    state_dir = tmp_path_factory.mktemp("lab-hosts-state")
    work = tmp_path_factory.mktemp("lab-hosts-work")
    private, public = _keypair()
    user_key = work / "id_ed25519"
    user_key.write_text(private)
    user_key.chmod(0o600)
    machine_before = _machine_state()
    _ip("route", "add", "unreachable", GUARD_ROUTE)
    hosts = LabHosts(state_dir, stop_grace=2)
    namespace_prefix = hosts.netns("x")[:-1]
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", str(GATEWAY), "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        yield Lab(hosts, state_dir, work, user_key, public)
    finally:
        try:
            hosts.delete_all()
            hosts.close()
            leftovers = {
                "netns": [n for n in _netns() if n.startswith(namespace_prefix)],
                "processes": _processes_mentioning(str(state_dir)),
                "mounts": _mounts_mentioning(str(state_dir)),
                "bridge ports": _bridge_ports() if Path(f"/sys/class/net/{BRIDGE}").exists()
                else [],
                "disks": hosts.names(),
                "machine changes": _changes(machine_before, _machine_state()),
            }
        finally:
            if Path(f"/sys/class/net/{BRIDGE}").exists():
                _ip("link", "del", BRIDGE)
            _ip("route", "del", "unreachable", GUARD_ROUTE)
    assert leftovers == {"netns": [], "processes": [], "mounts": [], "bridge ports": [],
                         "disks": [], "machine changes": []}


def _wait_for_ssh(lab: Lab, config: HostConfig, started: float, within: float) -> float:
    """Seconds from `started` until `ssh hostname` succeeds; fails after `within`."""
    while True:
        proc = lab.ssh(config, "hostname", timeout=5)
        if proc.returncode == 0:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            pytest.fail(f"no SSH to {config.name} within {within} s: {proc.stderr.decode()}")
        time.sleep(0.1)


def _port_open(address: IPv4Address, port: int = 22, timeout: float = 2) -> bool:
    try:
        with socket.create_connection((str(address), port), timeout=timeout):
            return True
    except OSError:
        return False


# 1 ---------------------------------------------------------------------------------


def test_boot_then_ssh_with_the_injected_keys_only(lab: Lab) -> None:
    config = lab.config("plabt-ssh", 10)
    started = time.monotonic()
    assert lab.hosts.boot(config) is True
    assert _wait_for_ssh(lab, config, started, within=5) < 5

    proc = lab.ssh(config, "hostname; hostname -f; sudo -n true && echo sudo-ok")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["plabt-ssh", f"plabt-ssh.{DOMAIN}", "sudo-ok"]

    # Strict checking means something only if a wrong key is refused: the machine's own
    # host key (what every host would share without injection) must not be accepted.
    machine_key = Path("/etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
    wrong = lab.work / "known_hosts-machine"
    wrong.write_text(f"{config.address.ip} {machine_key[0]} {machine_key[1]}\n")
    refused = subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", str(lab.user_key), "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={wrong}", f"{USER}@{config.address.ip}", "true"],
        capture_output=True, text=True, timeout=20)
    assert refused.returncode == 255 and "host key" in refused.stderr.lower(), refused.stderr
    listed = lab.hosts.exec(config.name, ["sh", "-c", "ls /etc/ssh/ssh_host_*"]).stdout.split()
    assert listed == ["/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ed25519_key.pub"]

    # Fabric (paramiko) with RejectPolicy against the same single-key known_hosts.
    connection = Connection(
        str(config.address.ip), user=USER,
        config=Config(overrides={"load_ssh_configs": False}),
        connect_kwargs={"key_filename": str(lab.user_key), "look_for_keys": False,
                        "allow_agent": False})
    connection.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    connection.client.load_host_keys(str(lab.known_hosts(config)))
    try:
        assert connection.run("hostname", hide=True, in_stream=False).stdout.strip() \
            == "plabt-ssh"
        assert connection.run("sudo -n true", hide=True, in_stream=False).ok
    finally:
        connection.close()


# 2 ---------------------------------------------------------------------------------


TINY_PACKAGE = "plabt-tiny"
UNIT = """\
[Unit]
Description=A test service of the lab-host tests
[Service]
ExecStart=/bin/sleep 1000
[Install]
WantedBy=multi-user.target
"""


def _tiny_deb(work: Path) -> Path:
    """A one-file Debian package built with dpkg-deb."""
    root = work / "deb"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {TINY_PACKAGE}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: Lab tests <lab@example.invalid>\nDescription: lab-host test package\n")
    (root / "usr/share" / TINY_PACKAGE).mkdir(parents=True)
    (root / "usr/share" / TINY_PACKAGE / "hello").write_text("hello\n")
    deb = work / f"{TINY_PACKAGE}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def test_changes_inside_stay_inside(lab: Lab) -> None:
    config = lab.config("plabt-cow", 11)
    assert lab.hosts.boot(config)
    lab.sudo(config, "useradd -m plabtuser")
    lab.sudo(config, "echo inside > /etc/plabt-marker")
    lab.sudo(config, "mkdir -p /usr/local/share/plabt && echo inside > "
                     "/usr/local/share/plabt/marker")
    lab.sudo(config, f"cat > /tmp/{TINY_PACKAGE}.deb", input=_tiny_deb(lab.work).read_bytes())
    lab.sudo(config, f"dpkg -i /tmp/{TINY_PACKAGE}.deb")
    lab.sudo(config, "cat > /etc/systemd/system/plabt-sleep.service", input=UNIT.encode())
    lab.sudo(config, "systemctl enable --now plabt-sleep")
    lab.sudo(config, "systemctl restart haproxy")  # Debian's unit (Type=notify)

    # New SSH sessions: the service outlived the one that started it.
    assert lab.ssh(config, "systemctl is-active plabt-sleep haproxy").stdout.decode().split() \
        == ["active", "active"]
    inside = lab.sudo(config, f"getent passwd plabtuser; cat /etc/plabt-marker "
                              f"/usr/local/share/plabt/marker; dpkg -s {TINY_PACKAGE} | "
                              "grep Status; pgrep -x sleep; pgrep -x haproxy")
    assert "plabtuser:" in inside and "install ok installed" in inside
    assert inside.count("inside") == 2

    # What is global in the kernel stays the machine's (more in section 5).
    real = _machine_state()
    lab.sudo(config, "sysctl -w kernel.dmesg_restrict=1 vm.overcommit_memory=1 && "
                     "modprobe br_netfilter && swapoff -a && echo 1 > /proc/sys/vm/drop_caches")
    assert lab.sudo(config, "sysctl -n kernel.dmesg_restrict vm.overcommit_memory; "
                            "lsmod | grep -cw ^br_netfilter").split() == ["1", "1", "1"]
    assert _changes(real, _machine_state()) == []

    # The machine itself is untouched.
    with pytest.raises(KeyError):
        pwd.getpwnam("plabtuser")
    assert not Path("/etc/plabt-marker").exists()
    assert not Path("/usr/local/share/plabt").exists()
    assert not Path("/etc/systemd/system/plabt-sleep.service").exists()
    assert subprocess.run(["dpkg", "-s", TINY_PACKAGE], capture_output=True).returncode != 0


def test_ssh_reload_rereads_the_config_and_restart_keeps_ssh(lab: Lab) -> None:
    config = lab.config("plabt-hup", 12)
    assert lab.hosts.boot(config)
    assert lab.ssh(config, "systemctl is-active ssh").stdout.decode().strip() == "active"
    lab.sudo(config, "printf 'Port 22\\nPort 2222\\n' > /etc/ssh/sshd_config.d/90-plabt.conf")
    lab.sudo(config, "systemctl reload ssh")
    deadline = time.monotonic() + 5
    while not _port_open(config.address.ip, 2222) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab.ssh(config, "hostname", port=2222).returncode == 0
    lab.sudo(config, "systemctl restart ssh")
    time.sleep(0.3)
    assert lab.ssh(config, "hostname").returncode == 0
    # A broken config is refused by the unit and sshd keeps serving the old one.
    lab.sudo(config, "echo 'NoSuchOption yes' > /etc/ssh/sshd_config.d/91-broken.conf")
    assert lab.ssh(config, "sudo -n systemctl reload ssh").returncode != 0
    assert lab.ssh(config, "hostname").returncode == 0


# 3 ---------------------------------------------------------------------------------


def test_stop_keeps_the_disk_and_cloud_init_runs_once(lab: Lab) -> None:
    config = lab.config("plabt-disk", 13, users=(
        GuestUser(USER, (lab.user_public,)),
        GuestUser("extra", (lab.user_public,), sudo=False, shell="/bin/sh"),
    ), write_files=(GuestFile("/etc/plabt/from-cloud-init", "seeded\n", "0640", "extra:root"),))
    assert lab.hosts.boot(config)
    seeded = lab.hosts.exec(config.name, ["stat", "-c", "%a %U %G", "/etc/plabt/from-cloud-init"])
    assert seeded.stdout.split() == ["640", "extra", "root"]
    lab.sudo(config, "echo kept > /etc/plabt-kept && userdel -r extra && "
                     "echo seeded-then-changed > /etc/plabt/from-cloud-init")
    assert _processes_mentioning(str(lab.hosts.host_dir(config.name)))  # PID 1 among them

    assert lab.hosts.stop(config.name) is True
    assert not lab.hosts.is_running(config.name)
    assert _processes_mentioning(str(lab.hosts.host_dir(config.name))) == []
    assert lab.hosts.netns(config.name) not in _netns()
    assert not _port_open(config.address.ip)
    assert lab.ssh(config, "true").returncode == 255
    assert config.name in lab.hosts.names()

    assert lab.hosts.boot(config) is True
    after = lab.sudo(config, "cat /etc/plabt-kept /etc/plabt/from-cloud-init; "
                             "getent passwd extra || echo no-extra")
    assert after.split() == ["kept", "seeded-then-changed", "no-extra"]

    assert lab.hosts.delete(config.name) is True
    assert not lab.hosts.host_dir(config.name).exists()
    assert lab.hosts.netns(config.name) not in _netns()
    assert config.name not in lab.hosts.names()
    assert lab.hosts.delete(config.name) is False


def test_a_new_instance_id_reruns_cloud_init(lab: Lab) -> None:
    config = lab.config("plabt-reinit", 14)
    assert lab.hosts.boot(config)
    lab.sudo(config, f"userdel -r {USER} >/dev/null 2>&1 || true; echo gone")
    lab.hosts.stop(config.name)
    assert lab.hosts.boot(replace(config, instance_id="i-plabt-reinit-2"))
    assert lab.ssh(config, "id -un").stdout.decode().strip() == USER
    lab.hosts.delete(config.name)


# 4 ---------------------------------------------------------------------------------


def test_the_network_is_announced_before_the_boot_ends(lab: Lab) -> None:
    """Where VMware tools report the guest IP: the address is up, sshd may still come."""
    config = lab.config("plabt-net", 16)
    seen: list[str] = []

    def network_up() -> None:
        shown = subprocess.run(["ip", "-n", lab.hosts.netns(config.name), "-4", "-o",
                                "addr", "show", "dev", "eth0"],
                               capture_output=True, text=True, check=True).stdout
        seen.append(shown)

    assert lab.hosts.boot(config, on_network=network_up) is True
    assert len(seen) == 1, "announced once per boot"
    assert f" {config.address} " in seen[0], seen
    assert lab.hosts.booted(config.name)  # boot() returned: sshd listens
    assert lab.hosts.boot(config, on_network=network_up) is False
    assert len(seen) == 1, "a host that runs is not booted, nor announced, again"
    lab.hosts.delete(config.name)


def test_boot_stop_delete_are_idempotent(lab: Lab) -> None:
    config = lab.config("plabt-idem", 15)
    assert lab.hosts.boot(config) is True
    assert lab.hosts.boot(config) is False
    assert lab.hosts.is_running(config.name)
    assert lab.hosts.stop(config.name) is True
    assert lab.hosts.stop(config.name) is False
    assert lab.hosts.delete(config.name) is True
    assert lab.hosts.delete(config.name) is False
    assert lab.hosts.stop(config.name) is False


def test_failures_name_the_host_and_the_step_and_leave_nothing(lab: Lab) -> None:
    no_bridge = lab.config("plabt-fail", 16, bridge="plabt-missing")
    with pytest.raises(LabHostError, match=r"plabt-fail: prerequisites failed: bridge "
                                           r"plabt-missing does not exist"):
        lab.hosts.boot(no_bridge)

    bad_owner = lab.config("plabt-fail", 16, write_files=(
        GuestFile("/etc/plabt-x", "x\n", owner="nosuchuser:root"),))
    with pytest.raises(LabHostError) as caught:
        lab.hosts.boot(bad_owner)
    assert caught.value.host == "plabt-fail"
    assert caught.value.step == "cloud-init write_files /etc/plabt-x"
    assert "nosuchuser" in caught.value.detail
    assert not lab.hosts.is_running("plabt-fail")
    assert lab.hosts.netns("plabt-fail") not in _netns()
    assert _processes_mentioning(str(lab.hosts.host_dir("plabt-fail"))) == []
    lab.hosts.delete("plabt-fail")


def test_a_broken_sshd_config_fails_the_boot_with_sshds_complaint(lab: Lab) -> None:
    config = lab.config("plabt-badssh", 17, write_files=(
        GuestFile("/etc/ssh/sshd_config.d/99-plabt.conf", "NoSuchOption yes\n"),))
    with pytest.raises(LabHostError) as caught:
        lab.hosts.boot(config)
    assert caught.value.step == "sshd config test"
    assert "99-plabt.conf" in caught.value.detail
    assert "Bad configuration option: NoSuchOption" in caught.value.detail
    assert not lab.hosts.is_running(config.name)
    assert _processes_mentioning(str(lab.hosts.host_dir(config.name))) == []
    lab.hosts.delete(config.name)


def test_host_processes_are_named_after_the_host_and_survive_the_fork_server(
        lab: Lab) -> None:
    """PID 1 and its launcher are forks of lab/host_forkserver.py: ps names them by the
    host's params.json; a fork server that died is replaced at the next boot, and the
    hosts it had started stay up."""
    first, second = lab.config("plabt-fork-1", 18), lab.config("plabt-fork-2", 19)
    assert lab.hosts.boot(first)
    params = str(lab.hosts.host_dir(first.name) / "params.json")
    titles = sorted(line.split(": ", 1)[1].strip() for line in _processes_mentioning(params))
    assert titles == [f"lab-host-init {params}", f"lab-host-launcher {params}"]
    servers = _fork_servers(lab)
    assert len(servers) == 1
    os.kill(servers[0], signal.SIGKILL)
    assert lab.hosts.boot(second)
    assert _port_open(first.address.ip) and _port_open(second.address.ip)
    assert len(_fork_servers(lab)) == 1 and _fork_servers(lab) != servers
    lab.hosts.close()
    deadline = time.monotonic() + 5
    while _fork_servers(lab) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fork_servers(lab) == []
    assert lab.hosts.is_running(first.name) and lab.hosts.is_running(second.name)
    assert lab.hosts.delete(first.name) and lab.hosts.delete(second.name)


def test_twenty_hosts_boot_in_parallel(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    configs = [lab.config(f"plabt-many-{i:02d}", 100 + i) for i in range(20)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=20) as pool:
        assert all(pool.map(lab.hosts.boot, configs))
    parallel = time.monotonic() - started
    assert all(_port_open(c.address.ip) for c in configs)
    assert lab.ssh(configs[-1], "hostname").stdout.decode().strip() == configs[-1].hostname
    with capsys.disabled():
        print(f"\n20 hosts booted in parallel in {parallel:.2f} s")
    assert {c.name for c in configs} <= set(lab.hosts.stop_all())
    assert not any(lab.hosts.is_running(c.name) for c in configs)


# 5 ---------------------------------------------------------------------------------
# The kernel is the machine's: what is global in it is per host inside (lab/guest/).


def _real_sysctl(key: str) -> str:
    """A sysctl as the machine has it (this process sits in the root namespaces)."""
    return Path("/proc/sys", key.replace(".", "/")).read_text().strip()


def _other(current: str, choices: tuple[str, str]) -> str:
    """A value different from the current one."""
    return choices[1] if current == choices[0] else choices[0]


def test_global_sysctls_are_per_host_and_refused_like_the_kernel(lab: Lab) -> None:
    config = lab.config("plabt-sysctl", 17)
    assert lab.hosts.boot(config)
    keys = ("kernel.kptr_restrict", "fs.protected_symlinks", "vm.swappiness")
    real = {key: _real_sysctl(key) for key in keys}
    wanted = {"kernel.kptr_restrict": _other(real["kernel.kptr_restrict"], ("2", "1")),
              "fs.protected_symlinks": _other(real["fs.protected_symlinks"], ("0", "1")),
              "vm.swappiness": _other(real["vm.swappiness"], ("13", "14"))}
    out = lab.sudo(config, "sysctl -w " + " ".join(f"{k}={v}" for k, v in wanted.items()))
    assert out.splitlines() == [f"{key} = {value}" for key, value in wanted.items()]
    assert lab.sudo(config, "sysctl -n " + " ".join(keys)).split() == list(wanted.values())
    assert lab.ssh(config, "cat /proc/sys/vm/swappiness").stdout.decode().strip() \
        == wanted["vm.swappiness"]
    assert {key: _real_sysctl(key) for key in keys} == real

    # What the kernel refuses is refused, with its error, and the value stays.
    for bad in ("kernel.kptr_restrict=abc", "kernel.kptr_restrict=3", "vm.swappiness=201",
                "fs.protected_symlinks=1x"):
        proc = lab.ssh(config, f"sudo -n sysctl -w {bad}")
        key = bad.split("=")[0]
        assert proc.returncode != 0, bad
        assert f'sysctl: setting key "{key}": Invalid argument' in proc.stderr.decode()
    assert lab.sudo(config, "sysctl -n kernel.kptr_restrict").strip() \
        == wanted["kernel.kptr_restrict"]
    denied = lab.ssh(config, "echo 0 > /proc/sys/kernel/kptr_restrict")
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr

    # sysctl --system and -p: global keys, keys only the initial network namespace has,
    # a key of Debian's kernel, and a namespaced net key (the host's own, for real).
    settings = {"kernel.dmesg_restrict": "1", "vm.max_map_count": "262144",
                "fs.suid_dumpable": "0", "net.core.bpf_jit_harden": "2",
                "kernel.yama.ptrace_scope": "1", "net.ipv4.ip_forward": "1"}
    machine = {key: _real_sysctl(key) for key in settings
               if Path("/proc/sys", key.replace(".", "/")).exists()}
    lab.sudo(config, "cat > /etc/sysctl.d/90-plabt.conf", input="".join(
        f"{key} = {value}\n" for key, value in settings.items()).encode())
    assert "* Applying /etc/sysctl.d/90-plabt.conf ..." in lab.sudo(config, "sysctl --system")
    assert lab.sudo(config, "sysctl -n " + " ".join(settings)).split() \
        == list(settings.values())
    lab.sudo(config, "sysctl -q -p /etc/sysctl.d/90-plabt.conf")
    assert {key: _real_sysctl(key) for key in machine} == machine
    lab.hosts.delete(config.name)


def test_modprobe_loads_into_the_host_only(lab: Lab) -> None:
    config = lab.config("plabt-kmod", 18)
    assert lab.hosts.boot(config)
    lab.sudo(config, "modprobe br_netfilter && modprobe overlay")
    assert lab.ssh(config, "lsmod | grep -qw ^br_netfilter").returncode == 0  # as a user
    listed = [line.split()[0] for line in lab.sudo(config, "lsmod").splitlines()[1:]]
    assert {"br_netfilter", "overlay"} <= set(listed)
    assert lab.sudo(config, "modprobe -r overlay; lsmod | grep -cw ^overlay || true").strip() \
        == "0"

    unknown = lab.ssh(config, "sudo -n modprobe plabt_no_such_module")
    assert unknown.returncode == 1
    assert unknown.stderr.decode() == ("modprobe: FATAL: Module plabt_no_such_module not "
                                       f"found in directory /lib/modules/{os.uname().release}\n")
    # Nothing in a host can load a module for real, nor set the clock.
    bounding = int(lab.sudo(config, "grep CapBnd /proc/self/status").split()[1], 16)
    assert not bounding & (1 << 16) and not bounding & (1 << 25)  # CAP_SYS_MODULE, _TIME
    if Path("/proc/modules").exists():  # and the fixture compares /sys/module
        assert "br_netfilter " not in Path("/proc/modules").read_text()
    lab.hosts.delete(config.name)


def test_sysctl_d_and_modules_load_d_apply_at_each_boot(lab: Lab) -> None:
    config = lab.config("plabt-bootcfg", 19)
    assert lab.hosts.boot(config)
    persisted = _other(_real_sysctl("kernel.kptr_restrict"), ("1", "2"))
    transient = _other(_real_sysctl("vm.swappiness"), ("21", "22"))
    lab.sudo(config, f"echo 'kernel.kptr_restrict = {persisted}' > /etc/sysctl.d/90-plabt.conf"
                     " && echo br_netfilter > /etc/modules-load.d/plabt.conf"
                     f" && sysctl -q -w vm.swappiness={transient} && modprobe overlay")
    assert lab.hosts.stop(config.name)
    assert lab.hosts.boot(config)
    after = lab.sudo(config, "sysctl -n kernel.kptr_restrict vm.swappiness; lsmod").split("\n")
    assert after[:2] == [persisted, _real_sysctl("vm.swappiness")]
    modules = [line.split()[0] for line in after[3:] if line]
    assert "br_netfilter" in modules and "overlay" not in modules
    assert _real_sysctl("kernel.kptr_restrict") != persisted
    lab.hosts.delete(config.name)


def test_chronyd_runs_with_its_unit_but_never_steers_the_clock(lab: Lab) -> None:
    config = lab.config("plabt-chrony", 20)
    assert lab.hosts.boot(config)
    lab.sudo(config, "systemctl enable --now chrony")  # Debian's unit
    deadline = time.monotonic() + 10
    while not (running := lab.sudo(config, "pgrep -a chronyd || true").splitlines()):
        assert time.monotonic() < deadline, "chronyd did not start"
        time.sleep(0.2)
    assert all(" -x " in f"{line} " for line in running), running
    assert lab.sudo(config, "systemctl is-active chrony").strip() == "active"
    assert "Leap status" in lab.sudo(config, "chronyc -n tracking")
    refused = lab.ssh(config, "sudo -n date -s @0")
    assert refused.returncode != 0 and b"Operation not permitted" in refused.stderr
    assert time.time() > 1.7e9
    lab.hosts.delete(config.name)


def test_swapoff_and_swapon_leave_the_machines_swap_alone(lab: Lab) -> None:
    config = lab.config("plabt-swap", 21)
    assert lab.hosts.boot(config)
    # A swap area the machine uses (the host sees /var/tmp through its overlay).
    swapfile = Path(f"/var/tmp/plabt-swap-{os.getpid()}")
    active = False
    try:
        with swapfile.open("wb") as handle:
            handle.truncate(16 << 20)
        swapfile.chmod(0o600)
        subprocess.run(["mkswap", str(swapfile)], check=True, capture_output=True)
        active = subprocess.run(["swapon", str(swapfile)], capture_output=True).returncode == 0
        machine = _machine_state()["swap areas"]
        assert isinstance(machine, list) and (str(swapfile) in machine) is active

        # util-linux's swapoff -a also tries the swap entries of fstab: give it one.
        lab.sudo(config, f"echo '{swapfile} none swap sw 0 0' >> /etc/fstab")
        assert lab.sudo(config, "swapon --show") == ""
        lab.sudo(config, "swapoff -a")
        off = lab.ssh(config, f"sudo -n swapoff {swapfile}")
        assert off.returncode == 4
        assert off.stderr.decode() == f"swapoff: {swapfile}: swapoff failed: Invalid argument\n"
        on = lab.ssh(config, "sudo -n swapon -a")
        assert on.returncode == 255 and b"Operation not permitted" in on.stderr
        assert lab.sudo(config, "swapon --show; tail -n +2 /proc/swaps") == ""
        assert _machine_state()["swap areas"] == machine
    finally:
        if active:
            subprocess.run(["swapoff", str(swapfile)], check=True)
        swapfile.unlink(missing_ok=True)
        lab.hosts.delete(config.name)


def _wait_port(address: IPv4Address, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _port_open(address, timeout=0.5):
            return True
        time.sleep(0.1)
    return False


def test_netplan_apply_moves_the_address_and_generate_validates(lab: Lab) -> None:
    config = lab.config("plabt-netplan", 22)
    moved = replace(config, address=IPv4Interface("10.231.254.23/24"))
    assert lab.hosts.boot(config)
    assert "- 10.231.254.22/24" in lab.sudo(config, "cat /etc/netplan/50-cloud-init.yaml")

    # netplan's own validation, through apply too; nothing changes.
    broken = "network:\n  version: 2\n  ethernets:\n    eth0:\n      addresses: [10.0.0.1]\n"
    lab.sudo(config, "umask 077 && cat > /etc/netplan/70-broken.yaml", input=broken.encode())
    generate = lab.ssh(config, "sudo -n netplan generate")
    assert generate.returncode == 1
    assert b"/etc/netplan/70-broken.yaml:5:18: Error in network definition: address " \
           b"'10.0.0.1' is missing /prefixlength" in generate.stderr
    assert lab.ssh(config, "sudo -n netplan apply").returncode == 78
    lab.sudo(config, "rm /etc/netplan/70-broken.yaml")
    dhcp = "network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n"
    lab.sudo(config, "mv /etc/netplan/50-cloud-init.yaml /root/ && umask 077 && "
                     "cat > /etc/netplan/60-plabt.yaml", input=dhcp.encode())
    refused = lab.ssh(config, "sudo -n netplan apply")
    assert refused.returncode == 1 and b"no static address" in refused.stderr

    # Another address in the same subnet, matched by name as netplan matches.
    lab.sudo(config, "umask 077 && cat > /etc/netplan/60-plabt.yaml", input=(
        "network:\n  version: 2\n  ethernets:\n    lan:\n      match: {name: 'eth*'}\n"
        "      set-name: eth0\n      addresses: [10.231.254.23/24]\n"
        f"      routes: [{{to: default, via: {GATEWAY.ip}}}]\n"
        f"      nameservers: {{addresses: [10.231.254.53], search: [{DOMAIN}, other.test]}}\n"
    ).encode())
    assert lab.sudo(config, "netplan generate 2>&1") == ""
    lab.sudo(config, "setsid -f sh -c 'sleep 0.3; netplan apply >/root/apply.log 2>&1; "
                     "echo $? >/root/apply.rc' </dev/null >/dev/null 2>&1")
    assert _wait_port(moved.address.ip, within=10)
    assert not _port_open(config.address.ip, timeout=1)
    assert lab.sudo(moved, "cat /root/apply.rc /root/apply.log").split() == ["0"]
    assert lab.sudo(moved, "ip -4 -br addr show dev eth0").split()[2:] == ["10.231.254.23/24"]
    assert lab.sudo(moved, "ip route show default").split()[:5] == \
        ["default", "via", str(GATEWAY.ip), "dev", "eth0"]
    resolv = lab.sudo(moved, "cat /etc/resolv.conf").splitlines()
    assert f"search {DOMAIN} other.test" in resolv and "nameserver 10.231.254.53" in resolv

    # The guest's netplan outlives a reboot: cloud-init does not run again.
    assert lab.hosts.stop(config.name)
    assert lab.hosts.boot(config)
    assert _wait_port(moved.address.ip, within=10)
    assert lab.sudo(moved, "ip -4 -br addr show dev eth0").split()[2:] == ["10.231.254.23/24"]
    assert not _port_open(config.address.ip, timeout=1)
    lab.hosts.delete(config.name)


def test_procsys_tree_follows_the_kernel_rules(tmp_path: Path) -> None:
    """The stand-in's rules without FUSE: a fake /proc/sys without br_netfilter."""
    root = tmp_path / "sys"
    (root / "kernel").mkdir(parents=True)
    (root / "net" / "core").mkdir(parents=True)
    (root / "kernel" / "kptr_restrict").write_text("0\n")
    (root / "kernel" / "printk").write_text("4\t4\t1\t7\n")
    (root / "kernel" / "core_pattern").write_text("core\n")
    (root / "kernel" / "hostname").write_text("machine\n")  # UTS: never copied
    (root / "kernel" / "osrelease").write_text("6.1\n")
    (root / "kernel" / "osrelease").chmod(0o444)
    modules = tmp_path / "modules"
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _check_tree(Tree(fd, {"net/core/bpf_jit_harden": (0o100600, "0\n")}, str(modules)),
                    root, modules)
    finally:
        os.close(fd)


def _check_tree(tree: Tree, root: Path, modules: Path) -> None:
    # A global key is copied when first looked up, and from then on is the host's own.
    assert "kernel/printk" not in tree.keys
    (root / "kernel" / "core_pattern").write_text("core.%p\n")
    assert tree.stat("kernel/core_pattern") is not None
    (root / "kernel" / "core_pattern").write_text("changed on the machine\n")
    assert tree.keys["kernel/core_pattern"].value == b"core.%p\n"
    assert tree.key("kernel/hostname") is None and tree.key("kernel/osrelease") is None
    assert "kernel/hostname" not in tree.keys and "kernel/osrelease" not in tree.keys
    assert tree.keys["net/core/bpf_jit_harden"].value == b"0\n"
    assert tree.key("kernel/yama/ptrace_scope") is not None  # Debian's kernel has it
    boot_id = uuid.UUID(tree.keys["kernel/random/boot_id"].value.decode().strip())
    assert boot_id.version == 4 and boot_id.variant == uuid.RFC_4122

    printk = tree.key("kernel/printk")
    assert printk is not None
    printk.write(b"3 0x4\n", 0)
    assert printk.value == b"3\t4\t1\t7\n"
    kptr = tree.key("kernel/kptr_restrict")
    assert kptr is not None
    for bad in (b"abc\n", b"3\n", b"1x\n", b"\n"):
        with pytest.raises(OSError) as caught:
            kptr.write(bad, 0)
        assert caught.value.errno == 22
    tree.keys["kernel/core_pattern"].write(b"|/bin/false %p\nignored", 0)
    assert tree.keys["kernel/core_pattern"].value == b"|/bin/false %p\n"
    assert parse_integers(b" -1\t010 0x10\n") == [-1, 8, 16]

    # net.bridge.* appears once the host's modprobe has "loaded" br_netfilter.
    assert tree.stat("net/bridge") is None
    modules.write_text("br_netfilter 0 0 - Live 0x0000000000000000\n")
    assert tree.stat("net/bridge") is not None
    assert ("bridge-nf-call-iptables", False) in tree.listdir("net/bridge")
    assert tree.keys["net/bridge/bridge-nf-call-iptables"].value == b"1\n"


LISTENING_PROBE = """
import importlib.util, socket, sys
spec = importlib.util.spec_from_file_location("host_init", sys.argv[1])
init = importlib.util.module_from_spec(spec)
spec.loader.exec_module(init)
def both():
    return init.listening(), init._listening_in_proc()
seen = [both()]
v6 = socket.socket(socket.AF_INET6)
v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
v6.bind(("::", 2222))
v6.listen()
seen.append(both())
v6.close()
v4 = socket.socket()
v4.bind(("0.0.0.0", 22))
seen.append(both())
v4.listen()
seen.append(both())
print(seen)
"""


def test_pid1_sees_a_listener_in_its_own_namespace_only() -> None:
    """PID 1 reports ready once sshd listens (lab/host_init.py `listening`): asked through
    sock_diag, it agrees with /proc/net at each step: nothing in a fresh namespace (the
    machine's own listeners are not its business), an IPv6-only listener, a socket bound
    but not listening, an IPv4 listener."""
    probe = subprocess.run(
        ["unshare", "--net", "/usr/bin/python3", "-I", "-S", "-c", LISTENING_PROBE,
         str(Path(__file__).parents[2] / "lab" / "host_init.py")],
        capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str(
        [(False, False), (True, True), (False, False), (True, True)])


ARENA_PROBE = """
import ctypes, sys, threading
sys.path.insert(0, sys.argv[1])
from lab.guest import procsys
if sys.argv[2] == "single":
    procsys.single_malloc_arena()
def churn():
    blocks = [ctypes.create_string_buffer(200_000) for _ in range(50)]
    del blocks
thread = threading.Thread(target=churn)
thread.start()
thread.join()
libc = ctypes.CDLL(None)
libc.fdopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fflush.argtypes = [ctypes.c_void_p]
stdout = libc.fdopen(1, b"w")
libc.malloc_info(0, stdout)
libc.fflush(stdout)
"""


@pytest.mark.parametrize(("mode", "heaps"), [("default", 2), ("single", 1)])
def test_procsys_server_thread_allocates_from_the_main_arena(mode: str, heaps: int) -> None:
    """A thread of its own arena makes glibc open /proc/sys/vm/overcommit_memory when it
    shrinks that arena; the /proc/sys server thread would wait for itself (lab/guest/
    procsys.py `single_malloc_arena`). With it, a thread's allocations stay in the main
    arena: glibc's malloc_info lists one heap, against two without (the control)."""
    probe = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", ARENA_PROBE,
                            str(Path(__file__).parents[2]), mode],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.count("<heap nr=") == heaps
