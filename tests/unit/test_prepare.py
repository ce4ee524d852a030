"""Phase 2's plan for a host, without a host: files, users, kernel settings, firewall."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import tasks.prepare as prepare_module
from blocks.ssh import AuthenticationRefused, HostUnreachable, SshHostError, SshNotListening
from sizing.firewall import input_rules
from sizing.inventory import build_inventory
from sizing.spec import PlatformSpec
from sizing.validate import parse_spec
from tasks.hostops import HostTarget
from tasks.prepare import bootstrap_removal, first_session, host_operations
from tests.conftest import LAB_SPEC

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJx orchestrator"


def _ops(spec: PlatformSpec, name: str) -> dict[str, Any]:
    inventory = build_inventory(spec)
    return {op.id: op for op in host_operations(spec, inventory, inventory.by_name(name), KEY)}


def test_every_host_gets_user_network_time_and_hardening(lab_spec: PlatformSpec) -> None:
    ops = _ops(lab_spec, "lab-vault-01")
    user = next(op for op in ops.values() if type(op).__name__ == "User")
    assert user.name == "platform" and KEY in user.authorized_keys
    netplan = next(op for op in ops.values()
                   if getattr(op, "path", "") == "/etc/netplan/60-platform.yaml")
    text = netplan.content.decode()
    assert '"10.231.0.22/24"' in text and '"10.231.0.1"' in text
    assert netplan.validator == "netplan generate" and netplan.mode == 0o600
    sshd = next(op for op in ops.values() if getattr(op, "path", "").endswith(
        "50-platform-hardening.conf"))
    assert "PasswordAuthentication no" in sshd.content.decode()
    assert "AllowGroups platform-admins\n" in sshd.content.decode()  # the bootstrap login goes away
    assert sshd.validator == "sshd -t"
    nft = next(op for op in ops.values() if getattr(op, "path", "") == "/etc/nftables.conf")
    assert nft.validator == "nft -c -f {path}"
    assert "tcp dport { 8200 }" in nft.content.decode() and "policy drop" in nft.content.decode()
    assert "sysctl kernel.kptr_restrict" in ops
    assert "command swap off" not in ops, "only cluster nodes lose their swap"


def test_cluster_nodes_get_what_rke2_needs(lab_spec: PlatformSpec) -> None:
    ops = _ops(lab_spec, "lab-apps-server-01")
    assert {"command swap off", "command load the RKE2 kernel modules",
            "sysctl net.ipv4.ip_forward", "sysctl net.bridge.bridge-nf-call-iptables"} <= set(ops)
    nft = next(op for op in ops.values() if getattr(op, "path", "") == "/etc/nftables.conf")
    text = nft.content.decode()
    assert "tcp dport { 6443 }" in text and "tcp dport { 2379-2381 }" in text
    assert "10.231.0.20" in text, "the LAN load balancers reach the API"
    assert "policy accept;" in text.split("chain forward")[1]


def test_load_balancer_firewall(lab_spec: PlatformSpec) -> None:
    inventory = build_inventory(lab_spec)
    rules = input_rules(lab_spec, inventory, inventory.by_name("lab-lbdmz-01"))
    by_why = {rule.why: rule for rule in rules}
    assert by_why["the services behind the pair"].sources == ("0.0.0.0/0",)
    assert by_why["keepalived VRRP from the peer"].sources == ("10.231.1.21",)
    assert by_why["HAProxy stats page"].sources == (
        "10.231.0.0/24", "10.231.1.1/32", "10.231.2.1/32")


def test_bootstrap_login_kept_when_asked() -> None:
    spec = parse_spec(LAB_SPEC.read_text().replace("remove_bootstrap_user: true",
                                                   "remove_bootstrap_user: false"), "lab")
    assert bootstrap_removal(spec) == []
    sshd = next(op for op in _ops(spec, "lab-vault-01").values()
                if getattr(op, "path", "").endswith("50-platform-hardening.conf"))
    assert "AllowGroups platform-admins debian\n" in sshd.content.decode()


def test_only_gogs_host_lets_git_in_over_ssh(lab_spec: PlatformSpec) -> None:
    from tasks.gogs import RUN_USER

    def allow(vm: str) -> str:
        sshd = next(op for op in _ops(lab_spec, vm).values()
                    if getattr(op, "path", "").endswith("50-platform-hardening.conf"))
        return next(line for line in sshd.content.decode().splitlines()
                    if line.startswith("AllowGroups"))

    assert allow("lab-gitops-01") == f"AllowGroups platform-admins {RUN_USER}"
    assert allow("lab-vault-01") == "AllowGroups platform-admins"


def test_bootstrap_removal(lab_spec: PlatformSpec) -> None:
    ids = [op.id for op in bootstrap_removal(lab_spec)]
    assert ids == ["command wait for the sessions of debian to end", "user absent debian",
                   "command remove the bootstrap user's sudo rule"]


def test_data_disk_only_where_the_vm_has_one(lab_spec: PlatformSpec) -> None:
    from tasks.hostops import DataDisk

    def disks(vm: str) -> list[int]:
        return [op.size_gb for op in _ops(lab_spec, vm).values() if isinstance(op, DataDisk)]

    assert disks("lab-vault-01") == [20]
    assert disks("lab-gitops-01") == [300]
    assert disks("lab-lblan-01") == []


class _Pool:
    """A ConnectionPool stand-in: each session() call takes the next outcome."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.users: list[str | None] = []

    def session(self, target: Any) -> object:
        self.users.append(target.user)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class _Clock:
    """time.monotonic and time.sleep for tasks.prepare, without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _first(lab_spec: PlatformSpec, pool: _Pool, caplog: pytest.LogCaptureFixture,
           monkeypatch: pytest.MonkeyPatch) -> tuple[object, str]:
    monkeypatch.setattr(prepare_module, "time", _Clock())
    admin = HostTarget("10.231.0.22", ("k",), user="platform", name="lab-vault-01")
    bootstrap = HostTarget("10.231.0.22", ("k",), user="debian", name="lab-vault-01")
    with caplog.at_level(logging.INFO):
        return first_session(lab_spec, pool, admin, bootstrap,  # type: ignore[arg-type]
                             logging.getLogger("test"))


def _refused() -> SshNotListening:
    return SshNotListening("lab-vault-01", "SSH connect", "[Errno 111] Connection refused")


def test_phase_2_waits_while_sshd_is_not_up_yet(lab_spec: PlatformSpec,
                                                 caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pool = _Pool(_refused(), _refused(), AuthenticationRefused("lab-vault-01", "SSH auth", "no"),
                 "bootstrap session")
    assert _first(lab_spec, pool, caplog, monkeypatch) == ("bootstrap session", "debian")
    assert pool.users == ["platform", "platform", "platform", "debian"]
    waits = [r.getMessage() for r in caplog.records if "waiting for sshd" in r.getMessage()]
    assert waits == ["lab-vault-01: waiting for sshd ([Errno 111] Connection refused)"]


def test_phase_2_gives_up_on_sshd_after_the_boot_timeout(lab_spec: PlatformSpec,
                                                        caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pool = _Pool(*[_refused()] * 10_000)
    with pytest.raises(SshHostError) as caught:
        _first(lab_spec, pool, caplog, monkeypatch)
    assert not isinstance(caught.value, ConnectionError), "permanent: no retry waits again"
    assert f"within {lab_spec.hypervisor.boot_timeout} s" in str(caught.value)
    assert "lab-vault-01" in str(caught.value)


def test_phase_2_does_not_wait_for_an_unreachable_host(lab_spec: PlatformSpec,
                                                      caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pool = _Pool(HostUnreachable("lab-vault-01", "SSH connect", "no route to host"))
    with pytest.raises(HostUnreachable, match="no route"):
        _first(lab_spec, pool, caplog, monkeypatch)
    assert pool.users == ["platform"]
