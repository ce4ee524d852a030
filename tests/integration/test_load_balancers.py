"""The LBLAN pair on the lab: HAProxy and keepalived applied over SSH to the two prepared
lab hosts, the VIP answering from the root namespace, traffic spread over two backends,
failover within 5 s, reload (never restart) on a change, validation before the live file,
and the stats page behind its password."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import cast

import httpx
import pytest

from blocks.ssh import SshIdentity
from lab.lab import Lab
from sizing.inventory import VM, build_inventory
from sizing.load_balancing import pair_nodes
from sizing.tiers import Role
from tasks import host_keys
from tasks.hostops import ConnectionPool, File, HostOpError, HostReport, HostTarget
from tasks.load_balancers import HAPROXY_CFG, LbSecrets, apply_load_balancer, lb_operations
from tasks.spec import read_spec
from tests.conftest import LAB_SPEC
from tests.labkit import prepared_lab

pytestmark = [pytest.mark.lab, pytest.mark.prefect,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

SPEC = read_spec(LAB_SPEC)
INVENTORY = build_inventory(SPEC)
LB1, LB2 = pair_nodes(INVENTORY, Role.LBLAN)
VIP = str(SPEC.load_balancers.lblan.vip)
WEB = (INVENTORY.by_name("lab-apps-server-01"), INVENTORY.by_name("lab-apps-server-02"))
SILENT = INVENTORY.by_name("lab-apps-server-03")  # no server on 80: its check fails
APPS_HOST = "portal.apps.lab.egov.example"  # any name under *.apps routes to RKE2-APPS
FAILOVER_DEADLINE = 5.0  # seconds: the functional requirement


def _new_secrets() -> LbSecrets:
    return LbSecrets(stats_password=secrets.token_urlsafe(18),
                     vrrp_password=secrets.token_hex(4))


# The pair's current passwords: test_reload_applies_new_passwords replaces them.
CURRENT = {"secrets": _new_secrets()}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with prepared_lab(vcsim_port=18990) as lab:
        yield lab


@pytest.fixture(scope="module")
def pool(lab: Lab) -> Iterator[ConnectionPool]:
    identity = cast(SshIdentity, SshIdentity.load(SPEC.ssh.identity_block))
    with ConnectionPool(identity) as pool:
        yield pool


def _ssh(lab: Lab, vm: VM, command: str, check: bool = True) -> str:
    known = lab.state_dir / "known_hosts"
    if not known.exists():
        known.write_text("".join(f"{v.ip} {host_keys.public_key(SPEC, v)}\n"
                                 for v in INVENTORY.vms))
    done = subprocess.run(
        ["ssh", "-i", str(lab.state_dir / "ssh" / "id_ed25519"), "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={known}", "-o", "ConnectTimeout=5",
         f"{SPEC.ssh.user}@{vm.ip}", command],
        capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert done.returncode == 0, f"{vm.name}: {command}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def web(lab: Lab) -> Iterator[None]:
    """A small HTTP server on port 80 of two APPS nodes, answering with its hostname."""
    for vm in WEB:
        _ssh(lab, vm, "sudo -n sh -c 'mkdir -p /run/lbtest-www && hostname > "
                      "/run/lbtest-www/index.html && cd /run/lbtest-www && "
                      f"(setsid python3 -m http.server 80 --bind {vm.ip} >/dev/null 2>&1 "
                      "</dev/null & echo $! > /run/lbtest-http.pid)'")
    try:
        for vm in WEB:
            _wait(partial(_listens, lab, vm, ":80 "), 10, f"{vm.name}:80")
        yield
    finally:
        for vm in WEB:
            _ssh(lab, vm, "sudo -n sh -c 'kill $(cat /run/lbtest-http.pid) && "
                          "rm -rf /run/lbtest-www /run/lbtest-http.pid'", check=False)


def _listens(lab: Lab, vm: VM, port: str) -> bool:
    """Whether something listens on ``port`` (as ":80 ") on the host."""
    return port in _ssh(lab, vm, "ss -Hltn")


def _wait(condition: Callable[[], bool], seconds: float, what: str) -> float:
    """Poll until `condition()` holds; the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            pytest.fail(f"{what}: not within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - started


def _holds_vip(pool: ConnectionPool, vm: VM) -> bool:
    """Whether `vm` has the VIP (over the pooled connection: fast enough to poll)."""
    connection = pool.connection(_target(vm))
    out = connection.run(f"ip -o -4 addr show to {VIP}/32", hide=True, in_stream=False).stdout
    return bool(out.strip())


def _target(vm: VM) -> HostTarget:
    return HostTarget(str(vm.ip), (str(host_keys.public_key(SPEC, vm)),), user=SPEC.ssh.user,
                      zone=vm.zone.value, name=vm.name)


def _client() -> httpx.Client:
    return httpx.Client(timeout=3.0, trust_env=False)


def _answers(count: int) -> Counter[str]:
    """Hostnames of the backends that answered `count` requests to the VIP."""
    seen: Counter[str] = Counter()
    with _client() as client:
        for _ in range(count):
            response = client.get(f"http://{VIP}/", headers={"Host": APPS_HOST,
                                                             "Connection": "close"})
            assert response.status_code == 200, response.text
            seen[response.text.strip()] += 1
    return seen


def _stats_status(node: VM, password: str) -> int:
    with _client() as client:
        return client.get(f"http://{node.ip}:8404/", auth=("admin", password)).status_code


def _server_states(node: VM) -> dict[str, str]:
    """apps-ingress-http's servers and their check state, from the stats CSV."""
    with _client() as client:
        csv = client.get(f"http://{node.ip}:8404/;csv",
                         auth=("admin", CURRENT["secrets"].stats_password)).text
    return {fields[1]: fields[17] for fields in (line.split(",") for line in csv.splitlines())
            if fields[0] == "apps-ingress-http" and fields[1].startswith("lab-")}


def _apply(pool: ConnectionPool, lb_secrets: LbSecrets) -> dict[str, HostReport]:
    """Both nodes at once, as the phase does."""
    with ThreadPoolExecutor(2) as executor:
        futures = {vm.name: executor.submit(apply_load_balancer, pool, SPEC, INVENTORY, vm,
                                            lb_secrets) for vm in (LB1, LB2)}
        return {name: future.result() for name, future in futures.items()}


def _apply_pair(pool: ConnectionPool, lb_secrets: LbSecrets) -> dict[str, list[str]]:
    reports = _apply(pool, lb_secrets)
    shown = repr(reports)
    assert lb_secrets.stats_password not in shown and lb_secrets.vrrp_password not in shown
    return {name: report.changed for name, report in reports.items()}


def test_vip_answers_and_spreads_traffic(lab: Lab, pool: ConnectionPool, web: None) -> None:
    started = time.monotonic()
    changed = _apply_pair(pool, CURRENT["secrets"])
    print(f"first apply of the pair: {time.monotonic() - started:.1f} s")
    for name in (LB1.name, LB2.name):
        assert {"file /etc/haproxy/haproxy.cfg", "service haproxy.service",
                "file /etc/keepalived/keepalived.conf", "service keepalived.service",
                "sysctl net.ipv4.ip_nonlocal_bind"} <= set(changed[name]), changed
    _wait(lambda: _holds_vip(pool, LB1) and not _holds_vip(pool, LB2), 10,
          "the VIP on the first node only")
    _wait(lambda: _server_states(LB1) == {WEB[0].name: "UP", WEB[1].name: "UP",
                                          SILENT.name: "DOWN"}, 20,
          "health checks: two servers up, the silent one down")
    seen = _answers(12)
    assert set(seen) == {WEB[0].name, WEB[1].name}
    assert min(seen.values()) >= 4, f"round robin over two backends: {dict(seen)}"


def test_second_apply_changes_nothing(pool: ConnectionPool) -> None:
    assert _apply_pair(pool, CURRENT["secrets"]) == {LB1.name: [], LB2.name: []}


def test_stats_page_needs_the_password(lab: Lab) -> None:
    password = CURRENT["secrets"].stats_password
    for node in (LB1, LB2):
        with _client() as client:
            assert client.get(f"http://{node.ip}:8404/").status_code == 401
        assert _stats_status(node, "not-the-password") == 401
        assert _stats_status(node, password) == 200


def test_reload_applies_new_passwords(lab: Lab, pool: ConnectionPool, web: None) -> None:
    """A changed config is applied by reload: same master processes, new config live."""
    def pids() -> dict[str, tuple[str, str]]:
        return {vm.name: (_ssh(lab, vm, "cat /run/haproxy.pid").strip(),
                          _ssh(lab, vm, "pgrep -o -x keepalived").strip())
                for vm in (LB1, LB2)}

    before = pids()
    old, new = CURRENT["secrets"], _new_secrets()
    reports = _apply(pool, new)
    CURRENT["secrets"] = new
    for report in reports.values():
        details = {result.op: result.detail for result in report.results}
        assert details["service haproxy.service"].startswith("reloaded")
        assert details["service keepalived.service"].startswith("reloaded")
        assert new.stats_password not in repr(report) and new.vrrp_password not in repr(report)
    assert pids() == before, "reloaded, not restarted"
    for node in (LB1, LB2):
        assert _stats_status(node, new.stats_password) == 200
        assert _stats_status(node, old.stats_password) == 401
    # Both keepalived run the new VRRP password: had one kept the old one, each would
    # ignore the other's adverts and the backup would take the VIP after about 3 s.
    time.sleep(4)
    assert _holds_vip(pool, LB1) and not _holds_vip(pool, LB2)
    assert set(_answers(4)) == {WEB[0].name, WEB[1].name}


def test_config_failing_haproxy_check_never_reaches_the_live_file(
        lab: Lab, pool: ConnectionPool) -> None:
    live = _ssh(lab, LB1, f"sudo -n sha256sum {HAPROXY_CFG}").split()[0]
    lb_secrets = CURRENT["secrets"]
    ops = []
    for op in lb_operations(SPEC, INVENTORY, LB1, lb_secrets):
        if isinstance(op, File) and op.path == HAPROXY_CFG:
            assert hashlib.sha256(op.content).hexdigest() == live
            broken = op.content + b"\nbackend broken\n    server s1 10.231.0.29:80 chekc\n"
            op = File(op.path, broken, group=op.group, mode=op.mode, validator=op.validator,
                      secret=True)
        ops.append(op)
    with pytest.raises(HostOpError) as caught:
        pool.session(_target(LB1)).run(ops)
    message = str(caught.value)
    assert LB1.name in message and "[ALERT]" in message, message
    assert "haproxy -c -f" in message and "the live file is untouched" in message
    assert lb_secrets.stats_password not in message
    assert _ssh(lab, LB1, f"sudo -n sha256sum {HAPROXY_CFG}").split()[0] == live
    assert _ssh(lab, LB1, "test ! -e /etc/haproxy/.haproxy.cfg.hostops-tmp && echo gone") \
        == "gone\n", "no candidate left behind"
    assert "service haproxy.service" not in [r.op for r in caught.value.results if r.changed]


def test_killing_the_master_haproxy_moves_the_vip(lab: Lab, pool: ConnectionPool,
                                                   web: None) -> None:
    assert _holds_vip(pool, LB1)
    started = time.monotonic()
    _ssh(lab, LB1, "sudo -n sh -c 'kill -9 $(pidof haproxy)'")
    try:
        waited = time.monotonic() - started
        deadline = FAILOVER_DEADLINE - waited
        moved = _wait(lambda: _holds_vip(pool, LB2) and not _holds_vip(pool, LB1), deadline,
                      f"the VIP on {LB2.name} within {FAILOVER_DEADLINE} s of the kill")
        print(f"VIP moved {waited + moved:.2f} s after the kill")
        assert not _ssh(lab, LB1, "pidof haproxy", check=False).strip()
        seen = _answers(6)
        assert set(seen) == {WEB[0].name, WEB[1].name}, "traffic continues through the backup"
    finally:
        _ssh(lab, LB1, "sudo -n systemctl start haproxy")
    # The first node is healthy again: it takes the VIP back (higher priority).
    _wait(lambda: _holds_vip(pool, LB1) and not _holds_vip(pool, LB2), 10,
          "the VIP back on the first node")
    assert _apply_pair(pool, CURRENT["secrets"]) == {LB1.name: [], LB2.name: []}
