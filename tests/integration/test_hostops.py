"""Host operations (tasks/hostops) against real SSH hosts: lab hosts on a test bridge.

Needs root. Like tests/integration/test_lab_hosts.py, a module fixture puts an
`unreachable` route over the test range, then its own bridge (`plabt1`, 10.231.252.0/24,
so that both files can run at once) and boots three lab hosts, each with its own SSH host
key and the test's login key; at the end nothing of it is left. The hosts' systemd is the
lab's systemctl replacement; apt has no route out, so only packages of the base image can
be "installed".
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from ipaddress import IPv4Interface
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import SecretStr

from blocks.ssh import (
    AuthenticationRefused,
    HostKeyMismatch,
    HostUnreachable,
    SshIdentity,
    fingerprint,
    parse_public_key,
)
from lab.hosts import GuestUser, HostConfig, LabHosts
from tasks.hostops import (
    Command,
    ConnectionPool,
    Directory,
    File,
    Group,
    HostOpError,
    HostReport,
    HostTarget,
    Line,
    Operation,
    Packages,
    Service,
    Sudoers,
    Sysctl,
    User,
    run_many,
)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="lab hosts need root"),
]

BRIDGE = "plabt1"
GATEWAY = IPv4Interface("10.231.252.1/24")
GUARD_ROUTE = "10.231.252.0/23"
DOMAIN = "plabh.test"
USER = "ops"  # cloud-init's bootstrap user, passwordless sudo
NOSUDO = "nosudo"
DROPIN = "/etc/ssh/sshd_config.d/50-plabh.conf"
SSHD_DROPIN = "PasswordAuthentication no\nPermitRootLogin no\nX11Forwarding no\n"
ECHO_UNIT = "/etc/systemd/system/plabh-echo.service"
ECHO_CONF = "/etc/plabh/echo.conf"


def _keypair() -> tuple[str, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)


@dataclass
class Lab:
    hosts: LabHosts
    configs: list[HostConfig]
    identity: SshIdentity
    user_public: str
    pool: ConnectionPool

    def target(self, config: HostConfig, **changes: object) -> HostTarget:
        target = HostTarget(str(config.address.ip), (config.host_keys[0][2],), name=config.name)
        return replace(target, **changes)  # type: ignore[arg-type]

    def sh(self, config: HostConfig, command: str) -> str:
        """Run a command as root inside the host, not over SSH (to look behind its back)."""
        proc = self.hosts.exec(config.name, ["sh", "-c", command])
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        return proc.stdout

    def run(self, config: HostConfig, ops: list[Operation]) -> HostReport:
        return self.pool.session(self.target(config)).run(ops)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        pytest.fail(f"{BRIDGE} exists: another run is using it or left it (ip link del {BRIDGE})")
    state_dir = tmp_path_factory.mktemp("hostops-state")
    private, public = _keypair()
    identity = SshIdentity(user=USER, private_key=SecretStr(private), connect_timeout=5)
    configs = []
    for index in range(3):
        name = f"plabh-{index + 1}"
        host_private, host_public = _keypair()
        users = (GuestUser(USER, (public,)),) + (
            (GuestUser(NOSUDO, (public,), sudo=False),) if index == 0 else ())
        configs.append(HostConfig(
            name=name, instance_id=f"i-{name}", hostname=name, fqdn=f"{name}.{DOMAIN}",
            address=IPv4Interface(f"10.231.252.{10 + index}/24"), gateway=GATEWAY.ip,
            dns=(GATEWAY.ip,), bridge=BRIDGE, users=users,
            host_keys=(("ed25519", host_private, host_public),)))
    hosts = LabHosts(state_dir, stop_grace=2)
    _ip("route", "add", "unreachable", GUARD_ROUTE)
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", str(GATEWAY), "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        with ThreadPoolExecutor(max_workers=3) as pool:
            assert all(pool.map(hosts.boot, configs))
        with ConnectionPool(identity) as connections:
            yield Lab(hosts, configs, identity, public, connections)
    finally:
        try:
            hosts.delete_all()
            leftovers = {"disks": hosts.names(),
                         "netns": [n for n in subprocess.run(
                             ["ip", "netns", "list"], capture_output=True, text=True
                         ).stdout.split() if n.startswith(hosts.netns("x")[:-1])]}
        finally:
            if Path(f"/sys/class/net/{BRIDGE}").exists():
                _ip("link", "del", BRIDGE)
            _ip("route", "del", "unreachable", GUARD_ROUTE)
    assert leftovers == {"disks": [], "netns": []}


def _netplan(config: HostConfig) -> str:
    return (f"network:\n  version: 2\n  ethernets:\n    eth0:\n"
            f"      addresses: [{config.address}]\n"
            f"      routes: [{{to: default, via: {config.gateway}}}]\n"
            f"      nameservers: {{addresses: [{config.gateway}], search: [{DOMAIN}]}}\n")


def _phase_like_ops(lab: Lab, config: HostConfig) -> list[Operation]:
    """About what phase 2 does to a host: fifteen operations of every kind."""
    sshd_main = Line("/etc/ssh/sshd_config", "UseDNS no", regexp=r"^#?UseDNS\s",
                     validator="sshd -t -f {path}")
    dropin = File(DROPIN, SSHD_DROPIN, validator="sshd -t -f {path}")
    unit = File(ECHO_UNIT, "[Unit]\nDescription=plabh echo\n[Service]\n"
                           "ExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n")
    echo_conf = File(ECHO_CONF, "greeting = hello\n")
    netplan = File("/etc/netplan/60-plabh.yaml", _netplan(config), mode="0600",
                   validator="netplan generate")
    return [
        Packages(["haproxy", "openssh-server", "sudo"]),
        Group("platform-admins"),
        User("platform", groups=["platform-admins"], authorized_keys=[lab.user_public]),
        Sudoers("90-platform", "platform ALL=(ALL) NOPASSWD:ALL\n"),
        Directory("/etc/plabh", mode="0750"),
        File("/etc/plabh/token", "s3cr3t-value-of-the-test\n", mode="0600", secret=True),
        echo_conf,
        unit,
        Service("plabh-echo", restart_on=[unit, echo_conf]),
        sshd_main,
        dropin,
        Service("ssh", reload_on=[sshd_main, dropin]),
        Sysctl("net.ipv4.ip_forward", 1),
        Sysctl("net.ipv4.conf.all.rp_filter", 1),
        netplan,
        Command("touch /var/lib/plabh-initialised", creates="/var/lib/plabh-initialised"),
    ]


# 1 ---------------------------------------------------------------------------------------


def _reports(outcomes: dict[str, HostReport | Exception]) -> dict[str, HostReport]:
    """Every host's report; a host that failed fails the test with its error."""
    for label, outcome in outcomes.items():
        assert isinstance(outcome, HostReport), f"{label}: {outcome}"
    return {label: outcome for label, outcome in outcomes.items()
            if isinstance(outcome, HostReport)}


def test_every_operation_changes_once_then_nothing(lab: Lab,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    work = [(lab.target(config), _phase_like_ops(lab, config)) for config in lab.configs]
    started = time.monotonic()
    first = _reports(run_many(lab.pool, work))
    first_s = time.monotonic() - started
    for report in first.values():
        assert report.unchanged == ["packages haproxy openssh-server sudo"], report.results
        assert report.round_trips == 2
    started = time.monotonic()
    second = _reports(run_many(lab.pool, work))
    second_s = time.monotonic() - started
    for report in second.values():
        assert report.changed == [], report.results
        assert report.round_trips == 1
    dry = _reports(run_many(lab.pool, work, dry_run=True))
    assert all(report.changed == [] for report in dry.values())

    host = lab.configs[0]
    assert lab.sh(host, "stat -c '%a %U %G' /etc/plabh/token /etc/sudoers.d/90-platform "
                        "/etc/netplan/60-plabh.yaml /home/platform/.ssh/authorized_keys"
                  ).split("\n")[:4] == ["600 root root", "440 root root", "600 root root",
                                        "600 platform platform"]
    assert lab.sh(host, "id -nG platform").split() == ["platform", "platform-admins"]
    assert lab.sh(host, "sysctl -n net.ipv4.conf.all.rp_filter").strip() == "1"
    assert lab.sh(host, "cat /etc/sysctl.d/90-platform.conf") == (
        "net.ipv4.ip_forward = 1\nnet.ipv4.conf.all.rp_filter = 1\n")
    assert lab.sh(host, "grep -n UseDNS /etc/ssh/sshd_config").count("UseDNS") == 1
    assert lab.sh(host, "systemctl is-active plabh-echo ssh").split() == ["active", "active"]
    assert lab.sh(host, "ls -A /etc/plabh /etc/ssh/sshd_config.d /etc/netplan").count(
        "hostops") == 0
    # The new user logs in with its key, and its sudo works.
    platform = lab.pool.session(lab.target(host, user="platform"))
    assert platform.shell == "sudo -n /bin/sh -s"
    assert platform.execute("id -un", step="check")[1] == "root\n"
    token = next(r for r in first[host.name].results if r.op == "file /etc/plabh/token")
    assert "s3cr3t" not in repr(token)

    ops_per_host = len(work[0][1])
    with capsys.disabled():
        print(f"\nhostops: {ops_per_host} operations on {len(work)} hosts in parallel: first run "
              f"{first_s:.2f} s, no-change run {second_s:.2f} s; round trips per host: "
              f"first {[r.round_trips for r in first.values()]}, "
              f"then {[r.round_trips for r in second.values()]}")


# 2 ---------------------------------------------------------------------------------------


def test_a_hand_edited_sshd_dropin_is_put_back(lab: Lab) -> None:
    host = lab.configs[1]
    dropin = File(DROPIN, SSHD_DROPIN, validator="sshd -t -f {path}")
    ops: list[Operation] = [dropin, Service("ssh", reload_on=[dropin])]
    lab.run(host, ops)
    lab.sh(host, f"echo 'PasswordAuthentication yes' > {DROPIN}")
    report = lab.run(host, ops)
    assert [(r.op, r.changed, r.detail) for r in report.results] == [
        (f"file {DROPIN}", True, "content changed"),
        ("service ssh.service", True, f"reloaded (file {DROPIN} changed)")]
    assert lab.sh(host, f"cat {DROPIN}") == SSHD_DROPIN
    backups = lab.sh(host, "cat /var/backups/hostops/etc/ssh/sshd_config.d/50-plabh.conf.*")
    assert "PasswordAuthentication yes" in backups
    assert lab.run(host, ops).changed == []


# 3 ---------------------------------------------------------------------------------------


def test_a_dropin_failing_sshd_t_leaves_the_live_file(lab: Lab) -> None:
    host = lab.configs[2]
    good = File(DROPIN, SSHD_DROPIN, validator="sshd -t -f {path}")
    lab.run(host, [good])
    before = lab.sh(host, f"sha256sum {DROPIN}")
    bad = File(DROPIN, SSHD_DROPIN + "NoSuchOption yes\n", validator="sshd -t -f {path}")
    with pytest.raises(HostOpError) as caught:
        lab.run(host, [bad, Service("ssh", reload_on=[bad])])
    error = caught.value
    assert error.host == host.name and error.step == f"file {DROPIN}: validate"
    assert "Bad configuration option: NoSuchOption" in error.cause
    assert "the live file is untouched" in error.cause
    assert str(error).startswith(f"{host.name}: file {DROPIN}: validate failed: the validator "
                                 "`sshd -t -f /etc/ssh/sshd_config.d/.50-plabh.conf.hostops-tmp`")
    assert [r.detail for r in error.results] == ["failed at validate",
                                                  "not run (an earlier step failed)"]
    assert lab.sh(host, f"sha256sum {DROPIN}") == before
    assert "hostops" not in lab.sh(host, "ls -A /etc/ssh/sshd_config.d")
    assert lab.run(host, [good]).changed == []  # and SSH still works

    # A validator that can only check in place (netplan reads /etc/netplan/*): rolled back.
    netplan = "/etc/netplan/60-plabh.yaml"
    lab.run(host, [File(netplan, _netplan(host), mode="0600", validator="netplan generate")])
    kept = lab.sh(host, f"cat {netplan}")
    broken = _netplan(host).replace(str(host.address), "10.231.252.300/24")
    with pytest.raises(HostOpError) as caught:
        lab.run(host, [File(netplan, broken, mode="0600", validator="netplan generate")])
    assert "the previous file was put back" in caught.value.cause
    assert "10.231.252.300" in caught.value.cause  # netplan's complaint, quoted
    assert lab.sh(host, f"cat {netplan}") == kept
    assert "hostops" not in lab.sh(host, "ls -A /etc/netplan")


# 4 ---------------------------------------------------------------------------------------


def test_a_changed_or_unknown_host_key_is_refused(lab: Lab) -> None:
    host, other = lab.configs[0], lab.configs[1]
    presented = fingerprint(parse_public_key(host.host_keys[0][2]))
    expected = fingerprint(parse_public_key(other.host_keys[0][2]))
    pool = ConnectionPool(lab.identity)
    with pytest.raises(HostKeyMismatch) as caught:
        pool.session(lab.target(host, known_host_keys=(other.host_keys[0][2],)))
    error = caught.value
    assert error.host == str(host.address.ip)
    assert (error.presented, error.expected) == (presented, (expected,))
    assert presented in str(error) and expected in str(error)
    assert presented.startswith("ssh-ed25519 SHA256:")
    keygen = subprocess.run(["ssh-keygen", "-lf", "-"], input=host.host_keys[0][2],
                            capture_output=True, text=True, check=True).stdout.split()[1]
    assert presented == f"ssh-ed25519 {keygen}"
    with pytest.raises(HostKeyMismatch, match="expected none"):
        lab.identity.connect(str(host.address.ip), [])
    pool.close()


def test_unreachable_hosts_and_refused_keys_are_named(lab: Lab) -> None:
    host = lab.configs[0]
    with pytest.raises(HostUnreachable) as unreachable:
        lab.identity.connect("10.231.252.99", [host.host_keys[0][2]])
    assert unreachable.value.host == "10.231.252.99"
    assert isinstance(unreachable.value, ConnectionError)
    stranger, _ = _keypair()
    other = SshIdentity(user=USER, private_key=SecretStr(stranger))
    with pytest.raises(AuthenticationRefused) as refused:
        other.connect(str(host.address.ip), [host.host_keys[0][2]])
    assert f"{USER}@{host.address.ip}:22 refused the key ssh-ed25519 SHA256:" in str(refused.value)
    with pytest.raises(HostOpError) as caught:
        lab.pool.session(lab.target(host, user=NOSUDO)).run([File("/etc/plabh-x", "x")])
    assert (caught.value.host, caught.value.step) == (host.name, "sudo")
    assert "password is required" in caught.value.cause


# 5 ---------------------------------------------------------------------------------------


def test_sudoers_is_validated_by_visudo(lab: Lab) -> None:
    host = lab.configs[1]
    with pytest.raises(HostOpError) as caught:
        lab.run(host, [Sudoers("91-broken", "platform ALL=(ALL NOPASSWD: ALL\n")])
    assert caught.value.step == "sudoers 91-broken: validate"
    assert "syntax error" in caught.value.cause
    assert lab.sh(host, "ls /etc/sudoers.d").split().count("91-broken") == 0
    report = lab.run(host, [User(USER, authorized_keys=[lab.user_public]),
                            Sudoers("91-ops", f"{USER} ALL=(ALL) NOPASSWD: /usr/bin/true\n")])
    assert report.changed == ["sudoers 91-ops"]
    assert "NOPASSWD: /usr/bin/true" in lab.sh(host, f"sudo -l -U {USER}")


# 6 ---------------------------------------------------------------------------------------


def _main_pid(lab: Lab, host: HostConfig) -> str:
    return lab.sh(host, "systemctl show -p MainPID plabh-restart").strip()


def test_a_service_restarts_only_when_its_config_changed(lab: Lab) -> None:
    host = lab.configs[2]

    def ops(greeting: str, other: str = "x") -> list[Operation]:
        unit = File("/etc/systemd/system/plabh-restart.service",
                    "[Service]\nExecStart=/bin/sleep infinity\n"
                    "[Install]\nWantedBy=multi-user.target\n")
        config = File("/etc/plabh-restart.conf", f"greeting = {greeting}\n")
        unrelated = File("/etc/plabh-unrelated.conf", f"{other}\n")
        return [unit, config, unrelated, Service("plabh-restart", restart_on=[unit, config])]

    first = lab.run(host, ops("hello"))
    assert first.results[-1].detail == "enabled and started"
    pid = _main_pid(lab, host)
    assert pid.startswith("MainPID=") and pid != "MainPID="
    assert lab.run(host, ops("hello")).changed == []
    assert _main_pid(lab, host) == pid
    unrelated = lab.run(host, ops("hello", other="y"))
    assert unrelated.changed == ["file /etc/plabh-unrelated.conf"]
    assert _main_pid(lab, host) == pid
    changed = lab.run(host, ops("bonjour", other="y"))
    assert changed.changed == ["file /etc/plabh-restart.conf", "service plabh-restart.service"]
    assert changed.results[-1].detail == "restarted (file /etc/plabh-restart.conf changed)"
    assert _main_pid(lab, host) not in (pid, "MainPID=")


# 7 ---------------------------------------------------------------------------------------


def test_packages_installed_are_a_no_op_and_missing_ones_a_clear_error(lab: Lab) -> None:
    host = lab.configs[0]
    report = lab.run(host, [Packages(["haproxy"])])
    assert report.changed == [] and report.round_trips == 1
    assert report.results[0].detail == "installed"
    with pytest.raises(HostOpError) as caught:
        lab.run(host, [Packages(["haproxy", "plabh-no-such-package"])])
    error = caught.value
    assert error.host == host.name
    assert error.step == "packages haproxy plabh-no-such-package: apt-get install"
    assert "Unable to locate package plabh-no-such-package" in error.cause
    assert "apt-get install -y -q --no-install-recommends" in error.cause
    assert "haproxy plabh" not in error.cause.split("exited")[0]  # only the missing one


def test_a_full_disk_is_named(lab: Lab) -> None:
    host = lab.configs[1]
    lab.sh(host, "mkdir -p /srv/full && mount -t tmpfs -o size=64k plabh-full /srv/full")
    try:
        with pytest.raises(HostOpError) as caught:
            lab.run(host, [File("/srv/full/big.bin", b"\0" * 512 * 1024, secret=True)])
        error = caught.value
        assert error.disk_full and error.host == host.name
        assert error.step == "file /srv/full/big.bin: write candidate"
        assert error.cause.startswith("disk full (No space left on device)")
        assert lab.sh(host, "ls -A /srv/full") == ""  # the partial candidate is gone
    finally:
        lab.sh(host, "umount /srv/full")


def test_connections_are_reused(lab: Lab) -> None:
    host = lab.configs[0]
    first = lab.pool.connection(lab.target(host))
    assert lab.pool.connection(lab.target(host)) is first
    transport = first.transport
    lab.run(host, [Command("true", unless="true")])
    assert first.transport is transport and transport.is_active()


@pytest.fixture
def bastion(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A jump host: a throwaway sshd in the root namespace on the bridge's address, port
    2222, root login with the test's key. (Lab hosts could jump through each other, but
    when the lab is up its nftables forward chain drops bridged traffic between ports of
    bridges that are not its own.) Yields (user@host:port, its host key line, its log)."""
    host_private, host_public = _keypair()
    (tmp_path / "host_key").write_text(host_private)
    (tmp_path / "host_key").chmod(0o600)
    config = tmp_path / "sshd_config"
    config.write_text(
        f"Port 2222\nListenAddress {GATEWAY.ip}\nHostKey {tmp_path}/host_key\n"
        f"PidFile {tmp_path}/sshd.pid\nAuthorizedKeysFile {tmp_path}/authorized_keys\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "AllowTcpForwarding yes\nLogLevel DEBUG1\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd_log = tmp_path / "sshd.log"
    authorized_keys = tmp_path / "authorized_keys"
    with sshd_log.open("w") as log:
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 5
        while True:
            probe = subprocess.run(["ss", "-ltn", f"src {GATEWAY.ip}:2222"],
                                   capture_output=True, text=True)
            if "2222" in probe.stdout:
                break
            assert sshd.poll() is None and time.monotonic() < deadline, sshd_log.read_text()
            time.sleep(0.05)
        yield f"root@{GATEWAY.ip}:2222", host_public, authorized_keys
    finally:
        sshd.terminate()
        sshd.wait(timeout=10)


def test_a_zone_jump_host_is_used_and_verified(lab: Lab, bastion: tuple[str, str, Path]) -> None:
    spec, jump_key, authorized = bastion
    authorized.write_text(lab.user_public + "\n")
    target = lab.configs[1]
    identity = lab.identity.model_copy(update={"jump_hosts": {"dmz": spec}})
    jump_host = str(GATEWAY.ip)
    with ConnectionPool(identity, jump_host_keys={jump_host: [jump_key]}) as pool:
        connection = pool.connection(lab.target(target, zone="dmz"))
        assert connection.gateway is not None
        assert (connection.gateway.host, connection.gateway.port) == (jump_host, 2222)
        report = pool.session(lab.target(target, zone="dmz")).run(
            [Command("true", unless="true")])
        assert report.round_trips == 1
        # Both hosts of the zone would share the one jump connection.
        assert pool._jump("dmz") is connection.gateway
    log = (authorized.parent / "sshd.log").read_text()
    assert f"target {target.address.ip} port 22" in log  # direct-tcpip through the bastion
    with ConnectionPool(identity) as pool, pytest.raises(HostKeyMismatch) as caught:
        pool.connection(lab.target(target, zone="dmz"))
    assert caught.value.host == jump_host and "expected none" in str(caught.value)
