"""Lab hosts (lab/hosts.py) as the product sees them: real SSH to a simulated VM per IP.

Needs root. A module fixture puts an `unreachable` route over the test range first (so
nothing toward a lab address that is not up leaves through the default route), then a
test bridge, and at the end proves that nothing it started is left: no network
namespace, no process, no mount, no veth.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time
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


def _mounts_mentioning(text: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if text in line]


def _bridge_ports() -> list[str]:
    return sorted(p.name for p in Path(f"/sys/class/net/{BRIDGE}/brif").iterdir())


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
            leftovers = {
                "netns": [n for n in _netns() if n.startswith(namespace_prefix)],
                "processes": _processes_mentioning(str(state_dir)),
                "mounts": _mounts_mentioning(str(state_dir)),
                "bridge ports": _bridge_ports() if Path(f"/sys/class/net/{BRIDGE}").exists()
                else [],
                "disks": hosts.names(),
            }
        finally:
            if Path(f"/sys/class/net/{BRIDGE}").exists():
                _ip("link", "del", BRIDGE)
            _ip("route", "del", "unreachable", GUARD_ROUTE)
    assert leftovers == {"netns": [], "processes": [], "mounts": [], "bridge ports": [],
                         "disks": []}


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
