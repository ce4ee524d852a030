"""The load-balancer pairs without a host: what each serves, its VRRP side, the firewall it
needs, and configs that the real `haproxy -c` and `keepalived -t` of this machine accept."""

from __future__ import annotations

import shutil
import subprocess
from ipaddress import IPv4Address
from pathlib import Path
from typing import cast

import pytest

import sizing.load_balancing as lbm
from sizing.firewall import Rule, input_rules
from sizing.inventory import VM, Inventory, build_inventory
from sizing.load_balancing import (
    LB_ROLES,
    balancer,
    firewall_gaps,
    pair_nodes,
    pair_services,
)
from sizing.spec import PlatformSpec
from sizing.tiers import Cluster, Role
from tasks.hostops import File, HostOpError, HostSession, Packages, Service, Sysctl
from tasks.hostops.facts import Facts, FileState, ServiceState
from tasks.hostops.ops import plan_all
from tasks.load_balancers import (
    LbSecrets,
    check_running,
    haproxy_config,
    keepalived_config,
    lb_operations,
    node_interface,
)
from tasks.spec import read_spec
from tests.conftest import EXAMPLES, LAB_SPEC

STATS = "St4ts-pass word"
VRRP = "vR9p-x1z"
SECRETS = LbSecrets(stats_password=STATS, vrrp_password=VRRP)
SPECS = [LAB_SPEC, *EXAMPLES]


def _lab() -> tuple[PlatformSpec, Inventory]:
    spec = read_spec(LAB_SPEC)
    return spec, build_inventory(spec)


def _ips(inventory: Inventory, role: Role) -> set[IPv4Address]:
    return {vm.ip for vm in inventory.of_role(role)}


def _servers(services: lbm.PairServices, name: str) -> set[tuple[str, int]]:
    return {(str(s.address), s.port) for s in services.backend(name).servers}


def _routes(services: lbm.PairServices, frontend: str) -> dict[str, str]:
    found = next(f for f in services.frontends if f.name == frontend)
    return {route.pattern: route.backend for route in found.routes}


# -- the model ------------------------------------------------------------------------------

def test_lblan_backends_every_server_and_port() -> None:
    spec, inventory = _lab()
    services = pair_services(spec, inventory, Role.LBLAN)
    apps = {"10.231.0.29", "10.231.0.30", "10.231.0.31"}
    middleware = {"10.231.0.34", "10.231.0.35", "10.231.0.36"}
    for cluster, ips in (("apps", apps), ("middleware", middleware)):
        assert _servers(services, f"{cluster}-api") == {(ip, 6443) for ip in ips}
        assert _servers(services, f"{cluster}-supervisor") == {(ip, 9345) for ip in ips}
        # At 100 users the servers carry the workloads, hence the ingress.
        assert _servers(services, f"{cluster}-ingress-http") == {(ip, 80) for ip in ips}
        assert _servers(services, f"{cluster}-ingress-https") == {(ip, 443) for ip in ips}
        assert services.backend(f"{cluster}-api").check == "tls"
        assert services.backend(f"{cluster}-supervisor").check == "tls"
        assert services.backend(f"{cluster}-ingress-https").check == "tcp"
        assert services.backend(f"{cluster}-ingress-http").mode == "http"
    assert len(services.backends) == 8
    assert {(f.name, str(f.address), f.port, f.mode) for f in services.frontends} == {
        ("kubernetes-api", "10.231.0.10", 6443, "tcp"),
        ("rke2-supervisor", "10.231.0.10", 9345, "tcp"),
        ("ingress-http", "10.231.0.10", 80, "http"),
        ("ingress-https", "10.231.0.10", 443, "tcp")}


def test_lblan_routes_by_name() -> None:
    spec, inventory = _lab()
    services = pair_services(spec, inventory, Role.LBLAN)
    api = {"api.apps.lab.egov.example": "apps-api",
           "api.middleware.lab.egov.example": "middleware-api"}
    assert _routes(services, "kubernetes-api") == api
    assert _routes(services, "rke2-supervisor") == {
        name: backend.replace("-api", "-supervisor") for name, backend in api.items()}
    ingress = {"rancher.lab.egov.example": "middleware-ingress-{}",
               "*.apps.lab.egov.example": "apps-ingress-{}",
               "*.middleware.lab.egov.example": "middleware-ingress-{}"}
    assert _routes(services, "ingress-https") == {k: v.format("https") for k, v in ingress.items()}
    assert _routes(services, "ingress-http") == {k: v.format("http") for k, v in ingress.items()}
    https = next(f for f in services.frontends if f.name == "ingress-https")
    assert https.route_by == "sni" and https.default_backend is None
    assert next(f for f in services.frontends if f.name == "ingress-http").route_by == "host"
    assert https.routes[0].pattern == "rancher.lab.egov.example", "exact names come first"


def test_ingress_goes_to_agents_when_the_cluster_has_some() -> None:
    spec = read_spec(next(p for p in EXAMPLES if p.name == "vsphere.yaml"))
    inventory = build_inventory(spec)
    services = pair_services(spec, inventory, Role.LBLAN)
    agents = _ips(inventory, Role.APPS_AGENT)
    assert agents, "the 1000-user example has APPS agents"
    assert {s.address for s in services.backend("apps-ingress-https").servers} == agents
    assert {s.address for s in services.backend("apps-api").servers} == \
        _ips(inventory, Role.APPS_SERVER)


def test_lbdmz_and_lbintegration() -> None:
    spec, inventory = _lab()
    dmz = pair_services(spec, inventory, Role.LBDMZ)
    nodes = {"10.231.1.22", "10.231.1.23", "10.231.1.24"}
    assert {(f.port, f.default_backend, f.route_by) for f in dmz.frontends} == {
        (6443, "dmz-api", None), (9345, "dmz-supervisor", None),
        (80, "dmz-ingress-http", None), (443, "dmz-ingress-https", None)}
    for name, port in (("dmz-api", 6443), ("dmz-supervisor", 9345),
                       ("dmz-ingress-http", 80), ("dmz-ingress-https", 443)):
        assert _servers(dmz, name) == {(ip, port) for ip in nodes}
    assert all(f.address == IPv4Address("10.231.1.10") for f in dmz.frontends)

    integration = pair_services(spec, inventory, Role.LBINTEGRATION)
    assert _servers(integration, "api-gateway-http") == {("10.231.0.10", 80)}
    assert _servers(integration, "api-gateway-https") == {("10.231.0.10", 443)}
    assert _routes(integration, "api-gateway-https") == {
        "gateway.apps.lab.egov.example": "api-gateway-https"}
    assert _routes(integration, "api-gateway-http") == {
        "gateway.apps.lab.egov.example": "api-gateway-http"}
    assert {(str(f.address), f.port) for f in integration.frontends} == {
        ("10.231.2.10", 80), ("10.231.2.10", 443)}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.parent.name + "/" + p.name)
def test_vrrp_pairs(path: Path) -> None:
    spec = read_spec(path)
    inventory = build_inventory(spec)
    ids = set()
    for role in LB_ROLES:
        first, second = pair_nodes(inventory, role)
        a = balancer(spec, inventory, first).vrrp
        b = balancer(spec, inventory, second).vrrp
        assert a.virtual_router_id == b.virtual_router_id
        ids.add(a.virtual_router_id)
        assert a.priority > b.priority
        assert (a.initial_state, b.initial_state) == ("MASTER", "BACKUP")
        assert (a.source, a.peer) == (first.ip, second.ip)
        assert (b.source, b.peer) == (second.ip, first.ip)
        assert a.vip == b.vip == getattr(spec.load_balancers, role.value).vip
        assert a.check_url == f"http://{first.ip}:8404/healthz"
        # A dead HAProxy must move the VIP within 5 s: checks plus the peer's takeover.
        assert a.check_interval * a.check_fall + a.advert_interval <= 4
    assert len(ids) == 3, "each pair has its own virtual_router_id"


def test_a_vm_that_is_not_a_load_balancer_is_refused() -> None:
    spec, inventory = _lab()
    with pytest.raises(ValueError, match="lab-vault-01 is a vault VM, not a load balancer"):
        balancer(spec, inventory, inventory.by_name("lab-vault-01"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.parent.name + "/" + p.name)
def test_the_firewall_opens_what_the_balancers_need(path: Path) -> None:
    spec = read_spec(path)
    assert firewall_gaps(spec, build_inventory(spec)) == []


def test_a_firewall_gap_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    spec, inventory = _lab()
    real = input_rules

    def without_ingress(spec: PlatformSpec, inventory: Inventory, vm: VM) -> list[Rule]:
        rules = real(spec, inventory, vm)
        if vm.name == "lab-apps-server-02":
            return [r for r in rules if r.ports != ("80", "443")]
        if vm.role is Role.LBLAN:
            return [r for r in rules if r.protocol != "vrrp"]
        return rules

    monkeypatch.setattr(lbm, "input_rules", without_ingress)
    gaps = firewall_gaps(spec, inventory)
    assert ("lab-apps-server-02: tcp 80 is closed to lab-lblan-01 (backend apps-ingress-http "
            "of lblan)") in gaps
    assert "lab-lblan-02: VRRP from its peer lab-lblan-01 is not accepted" in gaps
    assert len(gaps) == 2 * 2 + 2  # ports 80 and 443 from both nodes, VRRP on both nodes


# -- secrets --------------------------------------------------------------------------------

def test_secrets_never_show() -> None:
    for text in (repr(SECRETS), str(SECRETS), f"{SECRETS}", repr([SECRETS])):
        assert STATS not in text and VRRP not in text
    assert repr(SECRETS) == "LbSecrets()"


@pytest.mark.parametrize(("stats", "vrrp", "rule"), [
    ("short", VRRP, "at least 8"),
    ("has'quote!", VRRP, "single quote"),
    ("new\nline-pass", VRRP, "printable"),
    (STATS, "ninechars", "1 to 8"),
    (STATS, "", "1 to 8"),
    (STATS, "a#b", "letters, digits"),
    (STATS, "a b", "letters, digits"),
])
def test_bad_passwords_are_refused_without_quoting_them(stats: str, vrrp: str,
                                                        rule: str) -> None:
    with pytest.raises(ValueError, match=rule) as caught:
        LbSecrets(stats_password=stats, vrrp_password=vrrp)
    message = str(caught.value)
    assert stats not in message and (not vrrp or vrrp not in message)


# -- operations -----------------------------------------------------------------------------

def test_operations_validate_and_reload_never_restart() -> None:
    spec, inventory = _lab()
    ops = lb_operations(spec, inventory, inventory.by_name("lab-lblan-02"), SECRETS)
    assert [op.id for op in ops] == [
        "packages haproxy keepalived curl", "sysctl net.ipv4.ip_nonlocal_bind",
        "file /etc/haproxy/haproxy.cfg", "service haproxy.service",
        "file /etc/keepalived/keepalived.conf", "service keepalived.service"]
    packages, sysctl, haproxy_cfg, haproxy, keepalived_conf, keepalived = ops
    assert isinstance(packages, Packages) and isinstance(sysctl, Sysctl)
    assert (sysctl.key, sysctl.value) == ("net.ipv4.ip_nonlocal_bind", "1")
    assert isinstance(haproxy_cfg, File) and isinstance(keepalived_conf, File)
    assert haproxy_cfg.validator == "haproxy -c -f {path}" and haproxy_cfg.secret
    assert (haproxy_cfg.group, haproxy_cfg.mode) == ("haproxy", 0o640)
    assert keepalived_conf.validator == "keepalived -t -f {path}" and keepalived_conf.secret
    assert keepalived_conf.mode == 0o600
    assert isinstance(haproxy, Service) and isinstance(keepalived, Service)
    assert haproxy.reload_on == (haproxy_cfg.id,) and haproxy.restart_on == ()
    assert keepalived.reload_on == (keepalived_conf.id,) and keepalived.restart_on == ()
    assert b"state BACKUP" in keepalived_conf.content and b"priority 100" in \
        keepalived_conf.content
    assert b"unicast_src_ip 10.231.0.21" in keepalived_conf.content


def test_plans_show_no_password() -> None:
    spec, inventory = _lab()
    ops = lb_operations(spec, inventory, inventory.by_name("lab-lblan-01"), SECRETS)
    old = FileState("file", "root", "root", 0o644, 3, "0" * 64)
    running = ServiceState("loaded", "enabled", "active")
    facts = Facts(files={"/etc/haproxy/haproxy.cfg": old, "/etc/keepalived/keepalived.conf": old,
                         "/etc/sysctl.d/60-load-balancer.conf": None},
                  packages={"haproxy": True, "keepalived": True, "curl": True},
                  services={"haproxy.service": running, "keepalived.service": running},
                  sysctls={"net.ipv4.ip_nonlocal_bind": "0"})
    plans = plan_all(ops, facts)
    assert plans[3].commands() == ("systemctl reload haproxy.service",)
    assert plans[5].commands() == ("systemctl reload keepalived.service",)
    shown = repr([(p.op, p.detail, p.commands()) for p in plans])
    assert "secret, " in shown
    assert STATS not in shown and VRRP not in shown


# -- the real tools -------------------------------------------------------------------------

INTERFACE = "eth0"
# keepalived -t wants the VRRP interface to exist (and not be a loopback): it runs in a
# network namespace of its own that has one, whatever this machine's NICs are called.
WITH_INTERFACE = ["unshare", "--net", "sh", "-c",
                  f'ip link add {INTERFACE} type veth peer name peer0 && exec "$@"', "sh"]


def _check(tmp_path: Path, name: str, text: str, argv: list[str]) -> None:
    path = tmp_path / name
    path.write_text(text)
    done = subprocess.run([*argv, str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(argv)} {name}:\n{done.stdout}{done.stderr}"


@pytest.mark.skipif(not (shutil.which("haproxy") and shutil.which("keepalived")),
                    reason="haproxy and keepalived are not installed")
@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.parent.name + "/" + p.name)
def test_rendered_configs_pass_the_real_tools(path: Path, tmp_path: Path) -> None:
    spec = read_spec(path)
    inventory = build_inventory(spec)
    # Printable, with the signs HAProxy would otherwise read: $ # " \ : and blanks.
    secrets = LbSecrets(stats_password='a $X#"\\:b c', vrrp_password="Ab1-_.+=")
    checked = 0
    for role in LB_ROLES:
        for vm in pair_nodes(inventory, role):
            lb = balancer(spec, inventory, vm)
            _check(tmp_path, f"{vm.name}.cfg", haproxy_config(lb, secrets),
                   ["haproxy", "-c", "-f"])
            _check(tmp_path, f"{vm.name}.conf", keepalived_config(lb, secrets, INTERFACE),
                   [*WITH_INTERFACE, "keepalived", "-t", "-f"])
            checked += 1
    assert checked == 6


@pytest.mark.skipif(not shutil.which("keepalived"), reason="keepalived is not installed")
def test_keepalived_refuses_a_long_password_and_a_missing_interface(tmp_path: Path) -> None:
    """Why LbSecrets caps the VRRP password and the task reads the interface from the host:
    `keepalived -t` fails on both."""
    spec, inventory = _lab()
    lb = balancer(spec, inventory, inventory.by_name("lab-lbdmz-01"))
    good = keepalived_config(lb, SECRETS, INTERFACE)
    for name, text, passes in (
            ("good", good, True),  # so a refusal below is keepalived's, not the harness's
            ("long", good.replace(f"auth_pass {VRRP}", "auth_pass abcdefghij"), False),
            ("noif", keepalived_config(lb, SECRETS, "nosuchnic0"), False)):
        path = tmp_path / f"{name}.conf"
        path.write_text(text)
        done = subprocess.run([*WITH_INTERFACE, "keepalived", "-t", "-f", str(path)],
                              capture_output=True, text=True, check=False)
        assert (done.returncode == 0) is passes, f"{name}: {done.stderr}"


def test_haproxy_routes_in_the_config() -> None:
    spec, inventory = _lab()
    text = haproxy_config(balancer(spec, inventory, inventory.by_name("lab-lblan-01")),
                          SECRETS)
    assert "use_backend apps-api if { req_ssl_sni -i api.apps.lab.egov.example }" in text
    assert ("use_backend middleware-ingress-https if { req_ssl_sni -i -m end "
            ".middleware.lab.egov.example }") in text
    assert ("use_backend apps-ingress-http if { req.hdr(host),field(1,:) -i -m end "
            ".apps.lab.egov.example }") in text
    assert "bind 10.231.0.20:8404" in text and f"stats auth admin:'{STATS}'" in text
    assert "server lab-apps-server-01 10.231.0.29:6443 check check-ssl verify none" in text
    assert "server lab-apps-server-01 10.231.0.29:80 check\n" in text
    assert Cluster.DMZ.value not in text.split("frontend stats")[1]


# -- the read-only round trips, run by a local shell with stand-in commands ---------------

class _LocalShell:
    """Runs a session's script with /bin/sh here; `bin_dir` holds stand-ins for the host's
    commands (systemctl, curl, journalctl, ip)."""

    host = "lab-lblan-01"

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir

    @classmethod
    def session(cls, bin_dir: Path) -> HostSession:
        return cast(HostSession, cls(bin_dir))

    def execute(self, script: str, *, step: str) -> tuple[int, str, str]:
        done = subprocess.run(["/bin/sh", "-s"], input=script, capture_output=True, text=True,
                              env={"PATH": f"{self.bin_dir}:/usr/bin:/bin"}, check=False)
        return done.returncode, done.stdout, done.stderr


def _stand_in(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize(("haproxy", "curl_rc", "healthy"), [
    ("active", 0, True), ("failed", 0, False), ("active", 7, False)])
def test_check_running(tmp_path: Path, haproxy: str, curl_rc: int, healthy: bool) -> None:
    _stand_in(tmp_path, "systemctl",
              f'[ "$2" = haproxy ] && echo {haproxy} || echo active')
    _stand_in(tmp_path, "curl", f"[ {curl_rc} = 0 ] || echo 'curl: (7) Failed to connect' "
                                f">&2; exit {curl_rc}")
    _stand_in(tmp_path, "journalctl", "echo 'haproxy[9]: [ALERT] Cannot raise FD limit'")
    spec, inventory = _lab()
    lb = balancer(spec, inventory, inventory.by_name("lab-lblan-01"))
    session = _LocalShell.session(tmp_path)
    if healthy:
        check_running(session, lb)
        return
    with pytest.raises(HostOpError) as caught:
        check_running(session, lb)
    message = str(caught.value)
    assert "lab-lblan-01" in message and "[ALERT] Cannot raise FD limit" in message
    assert f"haproxy {haproxy}, keepalived active" in message
    if curl_rc:
        assert "Failed to connect" in message


def test_node_interface(tmp_path: Path) -> None:
    _, inventory = _lab()
    vm = inventory.by_name("lab-lblan-01")
    _stand_in(tmp_path, "ip", '[ "$6" = 10.231.0.20/32 ] && echo "2: ens192@if7    inet '
                              '10.231.0.20/24 brd 10.231.0.255 scope global ens192"')
    assert node_interface(_LocalShell.session(tmp_path), vm) == "ens192"
    with pytest.raises(HostOpError, match=r"expected one interface holding 10\.231\.0\.21"):
        node_interface(_LocalShell.session(tmp_path), inventory.by_name("lab-lblan-02"))
