"""Sizing by user tier: how many VMs of each role, and how big, for 100 to 10000 users.

Sizes never shrink from one tier to the next: raising the tier keeps every existing VM
(same name, same IP) and only grows or adds. That is why the 100-user cluster servers,
which also carry the workloads, stay as large when dedicated agents arrive at 500 users.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sizing.spec import ZoneName


class Role(StrEnum):
    """Every kind of VM the platform has. The value is the stem of the VM's name."""

    LBLAN = "lblan"
    VAULT = "vault"
    GITOPS = "gitops"
    MONITORING = "monitoring"
    APPS_SERVER = "apps-server"
    MIDDLEWARE_SERVER = "middleware-server"
    APPS_AGENT = "apps-agent"
    MIDDLEWARE_AGENT = "middleware-agent"
    LBDMZ = "lbdmz"
    DMZ_SERVER = "dmz-server"
    LBINTEGRATION = "lbintegration"


class Cluster(StrEnum):
    APPS = "apps"
    MIDDLEWARE = "middleware"
    DMZ = "dmz"


@dataclass(frozen=True)
class RoleInfo:
    """What never changes with the tier: where a role lives and how many it may ever have.

    ``capacity`` is the number of consecutive addresses the role reserves in its zone's
    host range. Reserving the maximum up front is what keeps every IP stable when the
    tier (or an override) adds VMs.
    """

    role: Role
    zone: ZoneName
    cluster: Cluster | None
    node: str | None  # "server" or "agent" for RKE2 nodes
    capacity: int
    fixed_count: int | None  # a count no override may change (pairs, quorum of 3, singletons)
    title: str


ROLES: tuple[RoleInfo, ...] = (
    # LAN zone, in address order.
    RoleInfo(Role.LBLAN, ZoneName.LAN, None, None, 2, 2, "HAProxy + keepalived, LAN pair"),
    RoleInfo(Role.VAULT, ZoneName.LAN, None, None, 3, 1, "HashiCorp Vault (raft)"),
    RoleInfo(Role.GITOPS, ZoneName.LAN, None, None, 2, 1, "Docker registry + Gogs"),
    RoleInfo(Role.MONITORING, ZoneName.LAN, None, None, 2, 1, "Coroot server"),
    RoleInfo(Role.APPS_SERVER, ZoneName.LAN, Cluster.APPS, "server", 5, None,
             "RKE2-APPS server (etcd, control plane)"),
    RoleInfo(Role.MIDDLEWARE_SERVER, ZoneName.LAN, Cluster.MIDDLEWARE, "server", 5, None,
             "RKE2-MIDDLEWARE server (etcd, control plane)"),
    RoleInfo(Role.APPS_AGENT, ZoneName.LAN, Cluster.APPS, "agent", 100, None,
             "RKE2-APPS agent (workloads)"),
    RoleInfo(Role.MIDDLEWARE_AGENT, ZoneName.LAN, Cluster.MIDDLEWARE, "agent", 100, None,
             "RKE2-MIDDLEWARE agent (workloads)"),
    # DMZ zone.
    RoleInfo(Role.LBDMZ, ZoneName.DMZ, None, None, 2, 2, "HAProxy + keepalived, DMZ pair"),
    RoleInfo(Role.DMZ_SERVER, ZoneName.DMZ, Cluster.DMZ, "server", 5, 3,
             "RKE2-DMZ node (server and workloads)"),
    # Integration zone.
    RoleInfo(Role.LBINTEGRATION, ZoneName.INTEGRATION, None, None, 2, 2,
             "HAProxy + keepalived, integration pair"),
)

ROLE_INFO: dict[Role, RoleInfo] = {info.role: info for info in ROLES}


@dataclass(frozen=True)
class Size:
    """Count and size of one role at one tier, with the reason for the numbers."""

    count: int
    vcpu: int
    memory_gb: int
    disks_gb: tuple[int, ...]  # first disk: OS; the others: data
    reason: str


def _s(count: int, vcpu: int, memory_gb: int, disks: tuple[int, ...], reason: str) -> Size:
    return Size(count, vcpu, memory_gb, disks, reason)


_LB = ("HAProxy in TCP/SNI mode needs about 1 vCPU per 10k connections per second; "
       "two nodes for keepalived failover")
_VAULT = ("Vault serves secrets at pod start and certificate issuance, a light load; raft "
          "storage on its own SSD data disk, snapshots taken off the VM")
_GITOPS = ("registry holds every platform image (about 60 GB per release, two kept) "
           "plus Gogs' repositories; CPU follows the image pulls of node scale-out")
_DMZ = ("3 servers for an etcd quorum that survives one loss; they also run Gravitee DMZ "
        "and its ingress, whose load follows external traffic")

TIER_SIZES: dict[int, dict[Role, Size]] = {
    100: {
        Role.LBLAN: _s(2, 2, 4, (40,), _LB),
        Role.LBDMZ: _s(2, 2, 4, (40,), _LB),
        Role.LBINTEGRATION: _s(2, 2, 4, (40,), _LB),
        Role.VAULT: _s(1, 2, 4, (40, 20), _VAULT),
        Role.GITOPS: _s(1, 4, 8, (60, 300), _GITOPS),
        Role.MONITORING: _s(1, 4, 16, (60, 200),
                            "Coroot with ClickHouse and Prometheus: 16 GB keeps a week of "
                            "traces and metrics of about 60 nodes and pods in memory"),
        Role.APPS_SERVER: _s(3, 8, 16, (80, 100),
                             "three combined nodes: RKE2's server minimum (2 vCPU, 4 GB, etcd "
                             "on SSD) plus eServices, GCO and Gravitee LAN pods; data disk "
                             "for Longhorn replicas"),
        Role.MIDDLEWARE_SERVER: _s(3, 8, 32, (80, 200),
                                   "three combined nodes: RKE2 server plus Keycloak (2 GB "
                                   "per pod), Kafka (3 brokers, 4 GB heap each), MinIO, n8n, "
                                   "Flowable and Rancher; 200 GB for MinIO and Kafka logs"),
        Role.APPS_AGENT: _s(0, 8, 16, (80, 200), "none: servers carry the workloads"),
        Role.MIDDLEWARE_AGENT: _s(0, 8, 32, (80, 300), "none: servers carry the workloads"),
        Role.DMZ_SERVER: _s(3, 4, 8, (80,), _DMZ),
    },
    500: {
        Role.LBLAN: _s(2, 2, 4, (40,), _LB),
        Role.LBDMZ: _s(2, 2, 4, (40,), _LB),
        Role.LBINTEGRATION: _s(2, 2, 4, (40,), _LB),
        Role.VAULT: _s(1, 2, 4, (40, 20), _VAULT),
        Role.GITOPS: _s(1, 4, 8, (60, 300), _GITOPS),
        Role.MONITORING: _s(1, 8, 16, (60, 300),
                            "Coroot ingests about twice the series of the 100-user tier"),
        Role.APPS_SERVER: _s(3, 8, 16, (80, 100),
                             "from 500 users the control plane is tainted and dedicated; "
                             "kept at the 100-user size since VMs are never shrunk"),
        Role.MIDDLEWARE_SERVER: _s(3, 8, 32, (80, 200),
                                   "dedicated control plane; kept at the 100-user size"),
        Role.APPS_AGENT: _s(3, 8, 16, (80, 200),
                            "eServices portals (3 replicas each, 1 GB), GCO and Gravitee LAN "
                            "gateways spread over three failure domains"),
        Role.MIDDLEWARE_AGENT: _s(3, 8, 32, (80, 300),
                                  "one Kafka broker, one MinIO server and one Keycloak pod "
                                  "per agent; 300 GB for MinIO erasure sets and Kafka logs"),
        Role.DMZ_SERVER: _s(3, 4, 8, (80,), _DMZ),
    },
    1000: {
        Role.LBLAN: _s(2, 4, 8, (40,), _LB),
        Role.LBDMZ: _s(2, 4, 8, (40,), _LB),
        Role.LBINTEGRATION: _s(2, 2, 4, (40,), _LB),
        Role.VAULT: _s(1, 4, 8, (40, 20), _VAULT),
        Role.GITOPS: _s(1, 4, 8, (60, 300), _GITOPS),
        Role.MONITORING: _s(1, 8, 32, (60, 500),
                            "ClickHouse memory grows with the number of traced pods"),
        Role.APPS_SERVER: _s(3, 8, 16, (80, 100),
                             "RKE2's guide: up to 250 nodes need 4 vCPU, 16 GB per server"),
        Role.MIDDLEWARE_SERVER: _s(3, 8, 32, (80, 200),
                                   "kept at the 100-user size; more than the guide asks"),
        Role.APPS_AGENT: _s(6, 8, 32, (80, 200),
                            "portals and gateways scaled to 6 replicas; 32 GB for JVM heaps"),
        Role.MIDDLEWARE_AGENT: _s(4, 16, 32, (80, 500),
                                  "Kafka partitions and Keycloak sessions grow with users; "
                                  "a fourth agent keeps quorum workloads spread while one "
                                  "is drained"),
        Role.DMZ_SERVER: _s(3, 8, 16, (80,), _DMZ),
    },
    10000: {
        Role.LBLAN: _s(2, 8, 16, (40,), _LB),
        Role.LBDMZ: _s(2, 8, 16, (40,), _LB),
        Role.LBINTEGRATION: _s(2, 4, 8, (40,), _LB),
        Role.VAULT: _s(1, 4, 8, (40, 50), _VAULT),
        Role.GITOPS: _s(1, 8, 16, (60, 500), _GITOPS),
        Role.MONITORING: _s(1, 16, 64, (60, 1000),
                            "ClickHouse for about 400 nodes and pods; a month of data"),
        Role.APPS_SERVER: _s(3, 8, 32, (120, 100),
                             "RKE2's guide: up to 500 nodes need 8 vCPU, 32 GB per server; "
                             "larger OS disk for etcd's database"),
        Role.MIDDLEWARE_SERVER: _s(3, 8, 32, (120, 200),
                                   "RKE2's guide for up to 500 nodes; etcd stays at 3 members "
                                   "(more members make every write slower)"),
        Role.APPS_AGENT: _s(30, 16, 32, (80, 300),
                            "about 350 users per agent: portals, GCO and Gravitee LAN at 10+ "
                            "replicas each, with a third of the agents able to drain"),
        Role.MIDDLEWARE_AGENT: _s(12, 16, 64, (80, 1000),
                                  "Kafka with 6 brokers, MinIO with 2 pools of 4 servers, "
                                  "Keycloak with 6 pods and Infinispan caches"),
        Role.DMZ_SERVER: _s(3, 16, 32, (80,), _DMZ),
    },
}


def size_for(users: int, role: Role) -> Size:
    """The tier table's size of a role, before the spec's overrides."""
    return TIER_SIZES[users][role]


def tier_table_markdown() -> str:
    """The sizing table of the README: count x vCPU / RAM GB / disks GB per role and tier."""
    header = "| role | " + " | ".join(f"{users} users" for users in TIER_SIZES) + " |"
    lines = [header, "|---" * (len(TIER_SIZES) + 1) + "|"]
    for info in ROLES:
        cells = []
        for sizes in TIER_SIZES.values():
            size = sizes[info.role]
            disks = "+".join(str(d) for d in size.disks_gb)
            cells.append(f"{size.count} x {size.vcpu}/{size.memory_gb}/{disks}"
                         if size.count else "-")
        lines.append(f"| {info.role.value} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
