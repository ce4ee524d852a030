"""Phase 3's load balancers: HAProxy and keepalived on each node of the LBLAN, LBDMZ and
LBINTEGRATION pairs, as host operations (tasks.hostops).

`lb_operations` is pure: what a node should look like, from the spec, the inventory
(sizing.load_balancing says what each pair serves) and the two passwords. Both configs are
checked by the real tool on the host (`haproxy -c`, `keepalived -t`) before they replace the
live file, and a changed config is applied by reload, never by restart: HAProxy's master
re-executes with the new config and hands the listening sockets over (no connection is
refused meanwhile); keepalived re-reads its file on SIGHUP and keeps the VIP where it is.

`apply_load_balancer` applies them to one node over SSH, then checks that both services
run and HAProxy answers (a config can pass `haproxy -c` and still fail to start). The
passwords are arguments only (the caller reads them from Vault); they never appear in
results, logs or errors.
"""

from __future__ import annotations

import re
import secrets as secrets_module
import time
from dataclasses import dataclass, field

from prefect import task
from prefect.cache_policies import NO_CACHE

from sizing.inventory import VM, Inventory
from sizing.load_balancing import (
    VRRP_PASSWORD_MAX,
    Balancer,
    balancer,
    pair_role,
    vip_of,
)
from sizing.spec import PlatformSpec
from tasks import host_keys
from tasks.hostops import (
    ConnectionPool,
    File,
    HostOpError,
    HostReport,
    HostSession,
    Operation,
    Packages,
    Service,
    Sysctl,
)
from tasks.retry import transient_only
from tasks.vault import kv_ensure, password, service_client
from templates import render

HAPROXY_CFG = "/etc/haproxy/haproxy.cfg"
KEEPALIVED_CONF = "/etc/keepalived/keepalived.conf"
SYSCTL_FILE = "/etc/sysctl.d/60-load-balancer.conf"
# curl: keepalived's track script asks HAProxy's health URI with it.
PACKAGES = ("haproxy", "keepalived", "curl")

# The stats password sits between single quotes in haproxy.cfg, read literally by HAProxy:
# anything printable but the quote itself.
_STATS_PASSWORD = re.compile(r"[\x20-\x26\x28-\x7e]+")
# keepalived's parser splits on blanks, starts comments at # and !, and gives $, @, ~ and
# quotes meanings of their own: letters, digits and a few safe signs only.
_VRRP_PASSWORD = re.compile(r"[A-Za-z0-9_.+=/-]+")
_INTERFACE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")


@dataclass(frozen=True)
class LbSecrets:
    """The pair's passwords, from Vault. Never shown: repr and str name the fields only."""

    stats_password: str = field(repr=False)
    vrrp_password: str = field(repr=False)

    def __post_init__(self) -> None:
        # The messages describe the rule, never the value.
        if len(self.stats_password) < 8 or not _STATS_PASSWORD.fullmatch(self.stats_password):
            raise ValueError("the HAProxy stats password must be at least 8 printable ASCII "
                             "characters without a single quote (')")
        if not 1 <= len(self.vrrp_password) <= VRRP_PASSWORD_MAX or \
                not _VRRP_PASSWORD.fullmatch(self.vrrp_password):
            raise ValueError(f"the VRRP password must be 1 to {VRRP_PASSWORD_MAX} characters "
                             "(keepalived's PASS authentication keeps no more, and "
                             "`keepalived -t` refuses a longer one) of letters, digits and "
                             "- _ . + = /")


def haproxy_config(lb: Balancer, secrets: LbSecrets) -> str:
    return render("load_balancers/haproxy.cfg.j2", lb=lb,
                  stats_password=secrets.stats_password)


def keepalived_config(lb: Balancer, secrets: LbSecrets, interface: str) -> str:
    if not _INTERFACE.fullmatch(interface):
        raise ValueError(f"{lb.vm.name}: {interface!r} is not a network interface name")
    return render("load_balancers/keepalived.conf.j2", lb=lb, interface=interface,
                  vrrp_password=secrets.vrrp_password)


def lb_operations(spec: PlatformSpec, inventory: Inventory, vm: VM, secrets: LbSecrets, *,
                  interface: str = "eth0") -> list[Operation]:
    """Everything phase 3 ensures on one load-balancer node, in the order it is applied.

    `interface`: the NIC that holds the node's address and gets the VIP. The spec does not
    name it (phase 2's netplan matches `e*`) and `keepalived -t` refuses a name the host
    lacks, so `apply_load_balancer` reads it from the host first.
    """
    lb = balancer(spec, inventory, vm)
    # The backup node's HAProxy binds the VIP it does not hold yet.
    nonlocal_bind = Sysctl("net.ipv4.ip_nonlocal_bind", 1, persist_file=SYSCTL_FILE)
    haproxy_cfg = File(HAPROXY_CFG, haproxy_config(lb, secrets), group="haproxy", mode="0640",
                       validator="haproxy -c -f {path}", secret=True)
    keepalived_conf = File(KEEPALIVED_CONF, keepalived_config(lb, secrets, interface),
                           mode="0600", validator="keepalived -t -f {path}", secret=True)
    # HAProxy first: keepalived's track script needs it before the node claims the VIP.
    return [Packages(PACKAGES),
            nonlocal_bind,
            haproxy_cfg,
            Service("haproxy", reload_on=[haproxy_cfg]),
            keepalived_conf,
            Service("keepalived", reload_on=[keepalived_conf])]


def node_interface(session: HostSession, vm: VM) -> str:
    """The name of the NIC that holds the VM's address (one read-only round trip)."""
    status, out, err = session.execute(f"ip -o -4 addr show to {vm.ip}/32\n",
                                       step="find the network interface")
    names = {line.split()[1].split("@")[0] for line in out.splitlines() if len(line.split()) > 1}
    if status != 0 or len(names) != 1:
        said = (err or out).strip() or "no output"
        raise HostOpError(session.host, "find the network interface",
                          f"expected one interface holding {vm.ip}, `ip addr` said: {said}")
    return names.pop()


def check_running(session: HostSession, lb: Balancer) -> None:
    """Both services active and HAProxy answering its health URI, or HostOpError quoting
    what is wrong: a config can pass `haproxy -c` and still fail to start (a limit, an
    address in use)."""
    health = lb.stats.health_url
    script = (
        "h=$(systemctl is-active haproxy); k=$(systemctl is-active keepalived)\n"
        'if [ "$h $k" = "active active" ] && '
        f"c=$(curl -fsS -o /dev/null -m 5 {health} 2>&1); then echo healthy; else\n"
        f'  echo "haproxy $h, keepalived $k, {health}: ${{c:-not asked}}"\n'
        "  journalctl -u haproxy -u keepalived -n 10 --no-pager -q 2>/dev/null\n"
        "fi\n")
    _, out, err = session.execute(script, step="check haproxy and keepalived")
    if out.strip() != "healthy":
        said = out.strip() or err.strip() or "no output"
        raise HostOpError(session.host, "check haproxy and keepalived",
                          f"not running as it should after the apply: {said}")


def apply_load_balancer(pool: ConnectionPool, spec: PlatformSpec, inventory: Inventory,
                        vm: VM, secrets: LbSecrets, *, dry_run: bool = False) -> HostReport:
    """Ensure HAProxy and keepalived on one load-balancer node, as the admin user, the
    host verified with the key phase 1 stored for it; then check that both run. Round
    trips: the NIC's name, the probe, the apply (only when something changes), the check
    (not in a dry run). Raises HostOpError naming the host on any failure."""
    lb = balancer(spec, inventory, vm)  # refuses a VM that is not a load balancer, first
    session = pool.session(host_keys.admin_target(spec, vm))
    interface = node_interface(session, vm)
    report = session.run(lb_operations(spec, inventory, vm, secrets, interface=interface),
                         dry_run=dry_run)
    if not dry_run:
        check_running(session, lb)
    return report


def kv_path(vm: VM) -> str:
    """Where a pair's two passwords live in Vault's KV mount."""
    return f"load-balancers/{pair_role(vm).value}"


def _new_secrets() -> dict[str, str]:
    return {"stats_password": password(24),
            "vrrp_password": secrets_module.token_hex(VRRP_PASSWORD_MAX // 2)}


@task(name="ensure-load-balancer", task_run_name="ensure-load-balancer-{vm_name}", retries=2,
      retry_delay_seconds=[5, 15], retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def ensure_load_balancer(spec: PlatformSpec, inventory: Inventory, vm_name: str,
                         pool: ConnectionPool) -> dict[str, object]:
    """One node of a pair, with the pair's passwords from Vault (made on first use)."""
    started = time.monotonic()
    vm = inventory.by_name(vm_name)
    stored, _ = kv_ensure(service_client(spec), kv_path(vm), _new_secrets)
    report = apply_load_balancer(pool, spec, inventory, vm,
                                 LbSecrets(stats_password=str(stored["stats_password"]),
                                           vrrp_password=str(stored["vrrp_password"])))
    role = pair_role(vm)
    return {"service": "load-balancer", "host": vm.name,
            "endpoint": f"{vip_of(spec, role)} ({role.value})",
            "version": "haproxy + keepalived", "changed": ", ".join(report.changed),
            "seconds": round(time.monotonic() - started, 2)}
