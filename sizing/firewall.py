"""Which ports each VM opens, and to whom: the input rules of its nftables ruleset.

Pure: derived from the spec and the inventory only, so the whole platform's exposure can
be read (and tested) without a host. Everything not listed here is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from sizing.inventory import VM, Inventory
from sizing.spec import PlatformSpec, ZoneName
from sizing.tiers import Cluster, Role

ANYWHERE = "0.0.0.0/0"

_LB_OF_CLUSTER = {Cluster.APPS: Role.LBLAN, Cluster.MIDDLEWARE: Role.LBLAN,
                  Cluster.DMZ: Role.LBDMZ}


@dataclass(frozen=True)
class Rule:
    """Accept ``protocol`` on ``ports`` (or a raw ip protocol) from ``sources``."""

    protocol: str  # tcp, udp, or vrrp
    ports: tuple[str, ...]  # "22", "2379-2381"; empty for vrrp
    sources: tuple[str, ...]  # CIDRs or addresses
    why: str


def _ips(vms: list[VM]) -> tuple[str, ...]:
    return tuple(str(vm.ip) for vm in vms)


def admin_sources(spec: PlatformSpec) -> tuple[str, ...]:
    """Where SSH and the admin UIs are reached from."""
    if spec.ssh.allowed_from:
        return tuple(str(net) for net in spec.ssh.allowed_from)
    return (str(spec.zones.lan.cidr),)


def input_rules(spec: PlatformSpec, inventory: Inventory, vm: VM) -> list[Rule]:
    """The input rules of one VM, SSH first."""
    admin = admin_sources(spec)
    zones = {name: str(zone.cidr) for name, zone in spec.zones.items()}
    rules = [Rule("tcp", ("22",), admin, "SSH from the admin networks")]
    if vm.cluster is not None:
        nodes = _ips([n for n in inventory.vms if n.cluster is vm.cluster])
        servers = _ips([n for n in inventory.vms if n.cluster is vm.cluster
                        and n.node == "server"])
        balancers = _ips(inventory.of_role(_LB_OF_CLUSTER[vm.cluster]))
        if vm.node == "server":
            rules += [
                Rule("tcp", ("6443",), admin + nodes + balancers, "Kubernetes API"),
                Rule("tcp", ("9345",), nodes + balancers, "RKE2 supervisor (node joins)"),
                Rule("tcp", ("2379-2381",), servers, "etcd between servers"),
            ]
        rules += [
            Rule("tcp", ("10250",), nodes, "kubelet, within the cluster"),
            Rule("udp", ("8472",), nodes, "Canal VXLAN, within the cluster"),
            Rule("tcp", ("9099",), nodes, "Canal health checks"),
            Rule("tcp", ("80", "443"), balancers, "ingress, from the cluster's load balancers"),
        ]
        return rules
    peers = tuple(str(p.ip) for p in inventory.of_role(vm.role) if p.name != vm.name)
    if vm.role in (Role.LBLAN, Role.LBDMZ, Role.LBINTEGRATION):
        clients = {
            Role.LBLAN: (zones[ZoneName.LAN], zones[ZoneName.DMZ], zones[ZoneName.INTEGRATION]),
            Role.LBDMZ: (ANYWHERE,),
            Role.LBINTEGRATION: (zones[ZoneName.INTEGRATION], zones[ZoneName.LAN]),
        }[vm.role]
        rules.append(Rule("tcp", ("80", "443"), clients, "the services behind the pair"))
        if vm.role is not Role.LBINTEGRATION:
            clusters = [c for c, lb in _LB_OF_CLUSTER.items() if lb is vm.role]
            nodes = _ips([n for n in inventory.vms if n.cluster in clusters])
            rules.append(Rule("tcp", ("6443", "9345"), admin + nodes,
                              "Kubernetes API and RKE2 supervisor of the clusters behind"))
        rules += [Rule("tcp", ("8404",), admin, "HAProxy stats page"),
                  Rule("vrrp", (), peers, "keepalived VRRP from the peer")]
    elif vm.role is Role.VAULT:
        rules += [Rule("tcp", ("8200",), (zones[ZoneName.LAN], zones[ZoneName.DMZ], *admin),
                       "Vault API for the clusters and the orchestrator")]
        if peers:
            rules.append(Rule("tcp", ("8201",), peers, "Vault raft cluster traffic"))
    elif vm.role is Role.GITOPS:
        rules += [Rule("tcp", ("5000",), (zones[ZoneName.LAN], zones[ZoneName.DMZ], *admin),
                       "private registry for every cluster node"),
                  Rule("tcp", ("3000",), (zones[ZoneName.LAN], zones[ZoneName.DMZ], *admin),
                       "Gogs for Argo CD and the admins"),
                  Rule("tcp", ("22",), (zones[ZoneName.LAN], zones[ZoneName.DMZ]),
                       "git over SSH to Gogs (Argo CD's deploy key; sshd lets only the "
                       "admins and git in)")]
    elif vm.role is Role.MONITORING:
        rules += [Rule("tcp", ("8080",), tuple(zones.values()),
                       "Coroot UI and the agents' data")]
    return rules


def forwards(vm: VM) -> bool:
    """Cluster nodes route pod traffic; nothing else forwards."""
    return vm.cluster is not None
