"""What each load-balancer pair serves: HAProxy frontends and backends, and the keepalived
VRRP instance that floats the pair's VIP. Pure: derived from the spec and the inventory.

Three pairs, two nodes each (``lblan``, ``lbdmz``, ``lbintegration`` in the inventory):

- **LBLAN** fronts two clusters on one VIP, so it routes by name. TLS is never terminated
  (passthrough); the name is the TLS SNI of the client hello (``req_ssl_sni``) on 6443,
  9345 and 443, and the HTTP ``Host`` header on 80.
- **LBDMZ** fronts the DMZ cluster alone: plain TCP, no names needed.
- **LBINTEGRATION** is the integration zone's entry point: it passes only the internal API
  gateway's name (Gravitee LAN, phase 7) on to the LBLAN VIP, which routes it on to the
  APPS cluster like any other ``*.apps`` name.

Naming convention (DNS must resolve these names to the VIP of the pair in front):

====================================  ============================================  =========
name                                  what                                          VIP
====================================  ============================================  =========
``api.apps.<domain>``                 RKE2-APPS Kubernetes API (6443), supervisor   LBLAN
                                      (9345)
``api.middleware.<domain>``           RKE2-MIDDLEWARE API and supervisor            LBLAN
``*.apps.<domain>``                   ingress of RKE2-APPS (80, 443)                LBLAN
``*.middleware.<domain>``             ingress of RKE2-MIDDLEWARE (80, 443)          LBLAN
``<rancher.hostname>.<domain>``       Rancher (80, 443), on the cluster the spec's  LBLAN
                                      ``rancher.cluster`` names
``gateway.apps.<domain>``             the internal API gateway (Gravitee LAN)       LBLAN,
                                                                                    LBINTEGRATION
``api.dmz.<domain>``                  RKE2-DMZ API and supervisor (any name works)  LBDMZ
``*.dmz.<domain>``                    ingress of RKE2-DMZ (any name works)          LBDMZ
====================================  ============================================  =========

Consequences for later phases: the RKE2 servers' certificates carry their cluster's API
name (``tls-san``), agents and kubeconfigs use ``https://api.<cluster>.<domain>:9345`` /
``:6443`` (a client that connects by IP sends no SNI and LBLAN closes the connection), and
ingress hosts of a cluster live under its ``*.<cluster>.<domain>``. An exact name wins over
a wildcard.

The ingress backends are the nodes that carry workloads, where RKE2's ingress controller
runs: a cluster's agents when it has any (from the 500-user tier the servers are dedicated
to the control plane), else its servers. Health checks: the API and the supervisor get a
TLS handshake (more than an open port; an HTTP check of /readyz would need credentials
wherever anonymous access is off), ingress a TCP connect. The stats page listens on each
node's own address (not the VIP) so that both nodes can be read; its ``/healthz`` answers
without a password and is what keepalived's track script asks: a node whose HAProxy stops
answering drops to FAULT and its peer takes the VIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_network
from typing import Literal

from sizing.firewall import Rule, input_rules
from sizing.inventory import VM, Inventory
from sizing.spec import PlatformSpec
from sizing.tiers import Cluster, Role

LB_ROLES: tuple[Role, ...] = (Role.LBLAN, Role.LBDMZ, Role.LBINTEGRATION)

# The clusters behind each pair (LBINTEGRATION has none: it forwards to LBLAN).
CLUSTERS_OF: dict[Role, tuple[Cluster, ...]] = {
    Role.LBLAN: (Cluster.APPS, Cluster.MIDDLEWARE),
    Role.LBDMZ: (Cluster.DMZ,),
    Role.LBINTEGRATION: (),
}

# One VRRP router per pair. Unicast adverts go only to the peer, so these need not be
# unique beyond the pair; distinct ids keep the pairs apart in captures and logs.
VIRTUAL_ROUTER_IDS: dict[Role, int] = {Role.LBLAN: 51, Role.LBDMZ: 52, Role.LBINTEGRATION: 53}
PRIORITIES: tuple[int, int] = (150, 100)  # first node, second node
ADVERT_INTERVAL = 1  # seconds between VRRP adverts
# Track script timing: a check every second, FAULT after 2 failures, back after 2 passes.
# A dead HAProxy moves the VIP within about interval * fall + the peer's skew (< 1 s).
CHECK_INTERVAL = 1
CHECK_FALL = 2
CHECK_RISE = 2
VRRP_PASSWORD_MAX = 8  # keepalived's auth_type PASS keeps 8 characters (and -t fails beyond)

KUBE_API_PORT = 6443
SUPERVISOR_PORT = 9345
HTTP_PORT = 80
HTTPS_PORT = 443
STATS_PORT = 8404
STATS_USER = "admin"
HEALTH_URI = "/healthz"
# Each connection holds two 16 kB buffers and two file descriptors: 4000 per vCPU is 8000
# on the 2-vCPU, 4 GB nodes of the small tiers (about 256 MB of buffers at worst).
MAXCONN_PER_VCPU = 4_000
API_GATEWAY_LABEL = "gateway"  # gateway.apps.<domain>: Gravitee LAN's gateway (phase 7)

Mode = Literal["tcp", "http"]
Check = Literal["tcp", "tls"]


@dataclass(frozen=True)
class Server:
    """One backend server: a VM of the inventory or another pair's VIP."""

    name: str
    address: IPv4Address
    port: int


@dataclass(frozen=True)
class Backend:
    name: str
    mode: Mode
    servers: tuple[Server, ...]
    check: Check  # "tls": a TLS handshake; "tcp": a connect
    balance: str
    why: str


@dataclass(frozen=True)
class Route:
    """Send the names matching ``pattern`` to ``backend``; ``*.x.y`` matches any name
    ending in ``.x.y``, anything else the name exactly (case-insensitive)."""

    pattern: str
    backend: str

    @property
    def wildcard(self) -> bool:
        return self.pattern.startswith("*.")

    @property
    def match(self) -> str:
        """What the name is compared with: the suffix for a wildcard, else the name."""
        return self.pattern[1:] if self.wildcard else self.pattern


@dataclass(frozen=True)
class Frontend:
    """A listener on the VIP. ``route_by`` "sni" reads the TLS client hello, "host" the
    HTTP Host header; ``routes`` are tried in order (exact names first), then
    ``default_backend``; with neither matching the connection is closed (503 in HTTP)."""

    name: str
    address: IPv4Address
    port: int
    mode: Mode
    route_by: Literal["sni", "host"] | None
    routes: tuple[Route, ...]
    default_backend: str | None
    why: str


@dataclass(frozen=True)
class Stats:
    """HAProxy's stats page on the node's own address, behind a password."""

    address: IPv4Address
    port: int = STATS_PORT
    user: str = STATS_USER
    health_uri: str = HEALTH_URI

    @property
    def health_url(self) -> str:
        return f"http://{self.address}:{self.port}{self.health_uri}"


@dataclass(frozen=True)
class Vrrp:
    """The pair's keepalived VRRP instance as one node runs it."""

    instance: str
    virtual_router_id: int
    priority: int
    initial_state: Literal["MASTER", "BACKUP"]
    source: IPv4Address  # unicast_src_ip: this node
    peer: IPv4Address  # unicast_peer: the other node
    vip: IPv4Address
    advert_interval: int
    check_url: str  # the track script's target: this node's HAProxy health URI
    check_interval: int
    check_fall: int
    check_rise: int


@dataclass(frozen=True)
class PairServices:
    """What a pair serves on its VIP (the same on both nodes)."""

    role: Role
    vip: IPv4Address
    frontends: tuple[Frontend, ...]
    backends: tuple[Backend, ...]

    def backend(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(f"{self.role.value}: no backend named {name!r}")


@dataclass(frozen=True)
class Balancer:
    """Everything one load-balancer node runs: the pair's services, its stats page, its
    side of the VRRP instance, its connection limit."""

    vm: VM
    services: PairServices
    stats: Stats
    vrrp: Vrrp
    maxconn: int


# -- names --------------------------------------------------------------------------------

def api_hostname(spec: PlatformSpec, cluster: Cluster) -> str:
    """The Kubernetes API and RKE2 supervisor name of a cluster."""
    return f"api.{cluster.value}.{spec.domain}"


def ingress_pattern(spec: PlatformSpec, cluster: Cluster) -> str:
    """The wildcard under which a cluster's ingress hosts live."""
    return f"*.{cluster.value}.{spec.domain}"


def rancher_hostname(spec: PlatformSpec) -> str:
    return f"{spec.rancher.hostname}.{spec.domain}"


def api_gateway_hostname(spec: PlatformSpec) -> str:
    """The internal API gateway (Gravitee LAN on RKE2-APPS), reached through LBLAN."""
    return f"{API_GATEWAY_LABEL}.{Cluster.APPS.value}.{spec.domain}"


# -- the inventory side ---------------------------------------------------------------------

def pair_role(vm: VM) -> Role:
    if vm.role not in LB_ROLES:
        raise ValueError(f"{vm.name} is a {vm.role.value} VM, not a load balancer "
                         f"(roles {', '.join(r.value for r in LB_ROLES)})")
    return vm.role


def pair_nodes(inventory: Inventory, role: Role) -> tuple[VM, VM]:
    """The two nodes of a pair, first node first."""
    nodes = sorted(inventory.of_role(role), key=lambda vm: vm.index)
    if len(nodes) != 2:
        raise ValueError(f"the {role.value} pair needs exactly 2 VMs, the inventory has "
                         f"{len(nodes)}")
    return nodes[0], nodes[1]


def vip_of(spec: PlatformSpec, role: Role) -> IPv4Address:
    vip: IPv4Address = getattr(spec.load_balancers, role.value).vip
    return vip


def servers_of(inventory: Inventory, cluster: Cluster) -> list[VM]:
    return [vm for vm in inventory.vms if vm.cluster is cluster and vm.node == "server"]


def ingress_nodes(inventory: Inventory, cluster: Cluster) -> list[VM]:
    """The nodes carrying workloads (and the ingress controller): agents if any, else
    servers."""
    agents = [vm for vm in inventory.vms if vm.cluster is cluster and vm.node == "agent"]
    return agents or servers_of(inventory, cluster)


def _servers(vms: list[VM], port: int) -> tuple[Server, ...]:
    return tuple(Server(vm.name, vm.ip, port) for vm in vms)


# -- the pairs ------------------------------------------------------------------------------

def _cluster_backends(inventory: Inventory, cluster: Cluster, *,
                      http_mode: Mode) -> list[Backend]:
    servers = servers_of(inventory, cluster)
    if not servers:
        raise ValueError(f"cluster {cluster.value} has no server in the inventory")
    nodes = ingress_nodes(inventory, cluster)
    name = cluster.value
    return [
        Backend(f"{name}-api", "tcp", _servers(servers, KUBE_API_PORT), "tls", "leastconn",
                f"RKE2-{name.upper()} Kubernetes API on its servers"),
        Backend(f"{name}-supervisor", "tcp", _servers(servers, SUPERVISOR_PORT), "tls",
                "leastconn", f"RKE2-{name.upper()} supervisor (node registration)"),
        Backend(f"{name}-ingress-http", http_mode, _servers(nodes, HTTP_PORT), "tcp",
                "roundrobin", f"RKE2-{name.upper()} ingress, HTTP"),
        Backend(f"{name}-ingress-https", "tcp", _servers(nodes, HTTPS_PORT), "tcp",
                "leastconn", f"RKE2-{name.upper()} ingress, HTTPS passthrough"),
    ]


def _lblan(spec: PlatformSpec, inventory: Inventory, vip: IPv4Address) -> PairServices:
    clusters = CLUSTERS_OF[Role.LBLAN]
    backends: list[Backend] = []
    for cluster in clusters:
        backends += _cluster_backends(inventory, cluster, http_mode="http")
    rancher = Cluster(spec.rancher.cluster)

    def api(kind: str) -> tuple[Route, ...]:
        return tuple(Route(api_hostname(spec, c), f"{c.value}-{kind}") for c in clusters)

    def ingress(kind: str) -> tuple[Route, ...]:
        exact = Route(rancher_hostname(spec), f"{rancher.value}-ingress-{kind}")
        return (exact, *(Route(ingress_pattern(spec, c), f"{c.value}-ingress-{kind}")
                         for c in clusters))

    frontends = (
        Frontend("kubernetes-api", vip, KUBE_API_PORT, "tcp", "sni", api("api"), None,
                 "the clusters' Kubernetes APIs, by SNI"),
        Frontend("rke2-supervisor", vip, SUPERVISOR_PORT, "tcp", "sni",
                 api("supervisor"), None, "the clusters' RKE2 supervisors, by SNI"),
        Frontend("ingress-http", vip, HTTP_PORT, "http", "host", ingress("http"), None,
                 "the clusters' ingress, HTTP, by Host header"),
        Frontend("ingress-https", vip, HTTPS_PORT, "tcp", "sni", ingress("https"), None,
                 "the clusters' ingress, HTTPS passthrough, by SNI"),
    )
    return PairServices(Role.LBLAN, vip, frontends, tuple(backends))


def _lbdmz(inventory: Inventory, vip: IPv4Address) -> PairServices:
    (cluster,) = CLUSTERS_OF[Role.LBDMZ]
    backends = _cluster_backends(inventory, cluster, http_mode="tcp")
    name = cluster.value
    frontends = (
        Frontend("kubernetes-api", vip, KUBE_API_PORT, "tcp", None, (), f"{name}-api",
                 "the DMZ cluster's Kubernetes API"),
        Frontend("rke2-supervisor", vip, SUPERVISOR_PORT, "tcp", None, (),
                 f"{name}-supervisor", "the DMZ cluster's RKE2 supervisor"),
        Frontend("ingress-http", vip, HTTP_PORT, "tcp", None, (), f"{name}-ingress-http",
                 "the DMZ cluster's ingress, HTTP"),
        Frontend("ingress-https", vip, HTTPS_PORT, "tcp", None, (), f"{name}-ingress-https",
                 "the DMZ cluster's ingress, HTTPS passthrough"),
    )
    return PairServices(Role.LBDMZ, vip, frontends, tuple(backends))


def _lbintegration(spec: PlatformSpec, vip: IPv4Address) -> PairServices:
    lan_vip = vip_of(spec, Role.LBLAN)
    gateway = api_gateway_hostname(spec)
    backends = (
        Backend("api-gateway-http", "http", (Server("lblan-vip", lan_vip, HTTP_PORT),), "tcp",
                "roundrobin", "the internal API gateway through the LBLAN VIP, HTTP"),
        Backend("api-gateway-https", "tcp", (Server("lblan-vip", lan_vip, HTTPS_PORT),), "tcp",
                "leastconn", "the internal API gateway through the LBLAN VIP, HTTPS "
                             "passthrough"),
    )
    frontends = (
        Frontend("api-gateway-http", vip, HTTP_PORT, "http", "host",
                 (Route(gateway, "api-gateway-http"),), None,
                 "the integration zone's entry point: the API gateway's name only, HTTP"),
        Frontend("api-gateway-https", vip, HTTPS_PORT, "tcp", "sni",
                 (Route(gateway, "api-gateway-https"),), None,
                 "the integration zone's entry point: the API gateway's name only, HTTPS"),
    )
    return PairServices(Role.LBINTEGRATION, vip, frontends, backends)


def pair_services(spec: PlatformSpec, inventory: Inventory, role: Role) -> PairServices:
    """The frontends and backends of one pair."""
    if role not in LB_ROLES:
        raise ValueError(f"{role.value} is not a load-balancer pair")
    vip = vip_of(spec, role)
    if role is Role.LBLAN:
        return _lblan(spec, inventory, vip)
    if role is Role.LBDMZ:
        return _lbdmz(inventory, vip)
    return _lbintegration(spec, vip)


def vrrp_instance(spec: PlatformSpec, inventory: Inventory, vm: VM) -> Vrrp:
    """This node's side of its pair's VRRP instance."""
    role = pair_role(vm)
    first, second = pair_nodes(inventory, role)
    is_first = vm.name == first.name
    peer = second if is_first else first
    return Vrrp(
        instance=role.value.upper(),
        virtual_router_id=VIRTUAL_ROUTER_IDS[role],
        priority=PRIORITIES[0] if is_first else PRIORITIES[1],
        initial_state="MASTER" if is_first else "BACKUP",
        source=vm.ip,
        peer=peer.ip,
        vip=vip_of(spec, role),
        advert_interval=ADVERT_INTERVAL,
        check_url=Stats(vm.ip).health_url,
        check_interval=CHECK_INTERVAL,
        check_fall=CHECK_FALL,
        check_rise=CHECK_RISE,
    )


def balancer(spec: PlatformSpec, inventory: Inventory, vm: VM) -> Balancer:
    """Everything one load-balancer VM runs."""
    role = pair_role(vm)
    return Balancer(vm=vm, services=pair_services(spec, inventory, role), stats=Stats(vm.ip),
                    vrrp=vrrp_instance(spec, inventory, vm),
                    maxconn=MAXCONN_PER_VCPU * vm.vcpu)


# -- the firewall, checked ---------------------------------------------------------------

def _accepts(rules: list[Rule], port: int, source: IPv4Address) -> bool:
    """Whether some TCP rule lets ``source`` in on ``port``."""
    return any(rule.protocol == "tcp" and any(_in_range(port, p) for p in rule.ports)
               and any(source in _net(s) for s in rule.sources) for rule in rules)


def _opens(rules: list[Rule], port: int) -> bool:
    return any(rule.protocol == "tcp" and any(_in_range(port, p) for p in rule.ports)
               for rule in rules)


def _in_range(port: int, spec: str) -> bool:
    low, _, high = spec.partition("-")
    return int(low) <= port <= int(high or low)


def _net(source: str) -> IPv4Network:
    network = ip_network(source, strict=False)
    assert isinstance(network, IPv4Network)
    return network


def firewall_gaps(spec: PlatformSpec, inventory: Inventory) -> list[str]:
    """What the load balancers need that sizing.firewall does not open; empty when the two
    agree. Checks: each pair's frontend ports on its own nodes (API and supervisor from the
    cluster's nodes, which join through the VIP), the stats port from the admin networks,
    VRRP from the peer, and every backend server's port from both nodes of the pair."""
    rules = {vm.name: input_rules(spec, inventory, vm) for vm in inventory.vms}
    by_ip = {vm.ip: vm for vm in inventory.vms}
    gaps: list[str] = []
    for role in LB_ROLES:
        services = pair_services(spec, inventory, role)
        nodes = pair_nodes(inventory, role)
        cluster_nodes = [vm for vm in inventory.vms if vm.cluster in CLUSTERS_OF[role]]
        for node in nodes:
            own = rules[node.name]
            for frontend in services.frontends:
                if not _opens(own, frontend.port):
                    gaps.append(f"{node.name}: tcp {frontend.port} ({frontend.name}) is not "
                                "open to anyone")
                if frontend.port in (KUBE_API_PORT, SUPERVISOR_PORT):
                    gaps += [f"{node.name}: tcp {frontend.port} ({frontend.name}) is closed "
                             f"to cluster node {client.name}" for client in cluster_nodes
                             if not _accepts(own, frontend.port, client.ip)]
            if not _opens(own, STATS_PORT):
                gaps.append(f"{node.name}: tcp {STATS_PORT} (stats page) is not open")
            peer = nodes[1] if node is nodes[0] else nodes[0]
            if not any(r.protocol == "vrrp" and str(peer.ip) in r.sources for r in own):
                gaps.append(f"{node.name}: VRRP from its peer {peer.name} is not accepted")
            for backend in services.backends:
                for server in backend.servers:
                    target = by_ip.get(server.address)
                    targets = [target] if target is not None else [
                        vm for r in LB_ROLES if vip_of(spec, r) == server.address
                        for vm in pair_nodes(inventory, r)]
                    gaps += [f"{vm.name}: tcp {server.port} is closed to {node.name} "
                             f"(backend {backend.name} of {role.value})" for vm in targets
                             if not _accepts(rules[vm.name], server.port, node.ip)]
    return gaps
