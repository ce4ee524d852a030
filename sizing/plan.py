"""The nine phases and, for a given spec, what each of them will create.

The plan is the contract between the spec and the phase flows: ``platformctl plan``
prints it, and every phase publishes its part of it as an artifact when run with
``plan_only``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sizing.inventory import Inventory
from sizing.spec import PlatformSpec, Product
from sizing.tiers import Cluster, Role


@dataclass(frozen=True)
class Phase:
    number: int
    key: str  # the phase flow's function name and the module's name stem
    flow_name: str  # the Prefect flow name (deployments are <flow_name>/<deployment>)
    title: str
    roles: tuple[str, ...]  # the Ansible roles it replaces


PHASES: tuple[Phase, ...] = (
    Phase(1, "provision_vms", "provision-vms", "VM provisioning",
          ("provisionnement-vms-infra", "provisionnement-vms-apps")),
    Phase(2, "prepare_vms", "prepare-vms", "VM preparation", ("prepare-vms",)),
    Phase(3, "core_services", "core-services", "Core services",
          ("install-docker-registry", "install-vault", "install-load-balancer",
           "install-gogs")),
    Phase(4, "kubernetes_clusters", "kubernetes-clusters", "Kubernetes clusters",
          ("install-rke2-apps", "install-rke2-middleware", "install-rke2-dmz",
           "install-rancher-server")),
    Phase(5, "cluster_foundation", "cluster-foundation", "Cluster foundation",
          ("install-argocd", "install-cert-manager", "install-longhorn",
           "setup-vault-injector")),
    Phase(6, "middleware", "middleware", "Middleware",
          ("install-minio", "install-keycloak", "install-kafka", "install-n8n",
           "install-flowable")),
    Phase(7, "api_management", "api-management", "API management",
          ("install-gravitee-lan", "install-gravitee-dmz")),
    Phase(8, "security_monitoring", "security-monitoring", "Security and monitoring",
          ("install-neuvector", "install-coroot")),
    Phase(9, "applications", "applications", "Business applications",
          ("install-eservices", "install-gco")),
)


@dataclass(frozen=True)
class PlanItem:
    """One thing a phase will create or ensure."""

    phase: int
    kind: str  # vm, host, service, cluster, node, application, route
    name: str
    target: str  # where it goes: a hypervisor, a host, a cluster, a load balancer
    detail: str = ""

    def row(self) -> dict[str, object]:
        return {"phase": self.phase, "kind": self.kind, "name": self.name,
                "target": self.target, "detail": self.detail}


def phase(number: int) -> Phase:
    return PHASES[number - 1]


def build_plan(spec: PlatformSpec, inventory: Inventory) -> dict[int, list[PlanItem]]:
    """What each phase will create, keyed by phase number (1 to 9, all present)."""
    builders = (_provision, _prepare, _core, _kubernetes, _foundation, _middleware,
                _api_management, _security, _applications)
    return {number: builder(spec, inventory)
            for number, builder in enumerate(builders, start=1)}


def _provision(spec: PlatformSpec, inv: Inventory) -> list[PlanItem]:
    target = f"{spec.hypervisor.kind}:{spec.hypervisor.block}"
    return [PlanItem(1, "vm", vm.name, target,
                     f"{vm.vcpu} vCPU, {vm.memory_gb} GB, disks {list(vm.disks_gb)} GB, "
                     f"{vm.zone.value} {vm.ip}")
            for vm in inv.vms]


def _prepare(spec: PlatformSpec, inv: Inventory) -> list[PlanItem]:
    return [PlanItem(2, "host", vm.fqdn, vm.name,
                     f"user {spec.ssh.user}, static {vm.ip}, hardening for {vm.role.value}")
            for vm in inv.vms]


def _core(spec: PlatformSpec, inv: Inventory) -> list[PlanItem]:
    vault = inv.of_role(Role.VAULT)[0]
    gitops = inv.of_role(Role.GITOPS)[0]
    items = [
        PlanItem(3, "service", "vault", vault.name,
                 f"Vault {spec.versions.vault}, {spec.vault.shares} shares, threshold "
                 f"{spec.vault.threshold}, PKI, AppRole"),
        PlanItem(3, "service", "docker-registry", gitops.name,
                 f"{spec.artifacts.registry}, TLS from Vault PKI, htpasswd"),
    ]
    for lb_role, vip in ((Role.LBLAN, spec.load_balancers.lblan.vip),
                         (Role.LBDMZ, spec.load_balancers.lbdmz.vip),
                         (Role.LBINTEGRATION, spec.load_balancers.lbintegration.vip)):
        for vm in inv.of_role(lb_role):
            items.append(PlanItem(3, "service", f"haproxy+keepalived {lb_role.value}", vm.name,
                                  f"VIP {vip}"))
    items.append(PlanItem(3, "service", "gogs", gitops.name,
                          f"Gogs {spec.versions.gogs}, organisation and GitOps repository"))
    return items


_SERVER = {Cluster.APPS: Role.APPS_SERVER, Cluster.MIDDLEWARE: Role.MIDDLEWARE_SERVER,
           Cluster.DMZ: Role.DMZ_SERVER}
_AGENT = {Cluster.APPS: Role.APPS_AGENT, Cluster.MIDDLEWARE: Role.MIDDLEWARE_AGENT}


def _kubernetes(spec: PlatformSpec, inv: Inventory) -> list[PlanItem]:
    items: list[PlanItem] = []
    for cluster in Cluster:
        servers = inv.of_role(_SERVER[cluster])
        agents = inv.of_role(_AGENT[cluster]) if cluster in _AGENT else []
        items.append(PlanItem(4, "cluster", f"rke2-{cluster.value}", servers[0].name,
                              f"RKE2 {spec.versions.rke2}, {len(servers)} servers, "
                              f"{len(agents)} agents"))
        items += [PlanItem(4, "node", vm.name, f"rke2-{cluster.value}", vm.node or "")
                  for vm in servers + agents]
    items.append(PlanItem(4, "application", "rancher", f"rke2-{spec.rancher.cluster}",
                          f"Rancher {spec.versions.rancher} managing all three clusters"))
    return items


def _foundation(spec: PlatformSpec, inv: Inventory) -> list[PlanItem]:
    items: list[PlanItem] = []
    v = spec.versions
    for cluster in Cluster:
        target = f"rke2-{cluster.value}"
        items.append(PlanItem(5, "application", "argocd", target, f"Argo CD {v.argocd}"))
        items.append(PlanItem(5, "application", "cert-manager", target,
                              f"cert-manager {v.cert_manager}, Vault PKI issuer"))
        if cluster is not Cluster.DMZ:
            items.append(PlanItem(5, "application", "longhorn", target,
                                  f"Longhorn {v.longhorn}"))
        items.append(PlanItem(5, "application", "vault-injector", target,
                              "Vault agent injector, kubernetes auth"))
    return items


def _middleware(spec: PlatformSpec, inv: Inventory) -> list[PlanItem]:
    v = spec.versions
    apps = [("minio", f"MinIO {v.minio}"), ("keycloak", f"Keycloak {v.keycloak}"),
            ("kafka", f"Kafka {v.kafka}"), ("n8n", f"n8n {v.n8n}")]
    if spec.flowable:
        apps.append(("flowable", f"Flowable {v.flowable}"))
    return [PlanItem(6, "application", name, "rke2-middleware", f"{detail} via Argo CD")
            for name, detail in apps]


def _api_management(spec: PlatformSpec, inv: Inventory) -> list[PlanItem]:
    v = spec.versions
    lan, dmz = spec.load_balancers.lblan.vip, spec.load_balancers.lbdmz.vip
    return [
        PlanItem(7, "application", "gravitee-lan", "rke2-apps",
                 f"Gravitee {v.gravitee}, reached via LBLAN {lan}"),
        PlanItem(7, "application", "gravitee-dmz", "rke2-dmz",
                 f"Gravitee {v.gravitee}, reached via LBDMZ {dmz}"),
        PlanItem(7, "route", "external-api", "lbdmz",
                 "LBDMZ -> Gravitee DMZ -> LBLAN -> backend APIs"),
    ]


def _security(spec: PlatformSpec, inv: Inventory) -> list[PlanItem]:
    v = spec.versions
    items = [PlanItem(8, "application", "neuvector", f"rke2-{c.value}",
                      f"NeuVector {v.neuvector}") for c in Cluster]
    monitoring = inv.of_role(Role.MONITORING)[0]
    items.append(PlanItem(8, "service", "coroot", monitoring.name, f"Coroot {v.coroot} server"))
    items += [PlanItem(8, "application", "coroot-agent", f"rke2-{c.value}", "node agent")
              for c in Cluster]
    items += [PlanItem(8, "service", "coroot-agent", vm.name, "host agent")
              for vm in inv.group("load_balancers")]
    return items


def _applications(spec: PlatformSpec, inv: Inventory) -> list[PlanItem]:
    items = [PlanItem(9, "application", f"eservices-{portal.value}", "rke2-apps",
                      "eServices portal via Argo CD") for portal in spec.portals]
    if Product.GCO in spec.products:
        items.append(PlanItem(9, "application", "gco", "rke2-apps", "GCO via Argo CD"))
    return items


def topology(spec: PlatformSpec, inv: Inventory) -> dict[str, object]:
    """The values of the topology diagram (templates/plan/topology.md.j2)."""

    def node_id(name: str) -> str:
        return name.replace("-", "_")

    lb_of_zone = {"lan": ("lblan", spec.load_balancers.lblan.vip),
                  "dmz": ("lbdmz", spec.load_balancers.lbdmz.vip),
                  "integration": ("lbintegration", spec.load_balancers.lbintegration.vip)}
    zones = []
    for zone_name, zone in spec.zones.items():
        vms = [vm for vm in inv.vms if vm.zone is zone_name]
        clusters = []
        for cluster in Cluster:
            members = [vm for vm in vms if vm.cluster is cluster]
            if members:
                clusters.append({
                    "id": f"rke2_{cluster.value}", "name": cluster.value,
                    "vms": [{"id": node_id(vm.name), "name": vm.name, "ip": str(vm.ip)}
                            for vm in members]})
        lb_name, vip = lb_of_zone[zone_name.value]
        zones.append({
            "name": zone_name.value, "cidr": str(zone.cidr),
            "load_balancers": [{"id": f"vip_{lb_name}", "name": lb_name, "vip": str(vip)}],
            "clusters": clusters,
            "vms": [{"id": node_id(vm.name), "name": vm.name, "ip": str(vm.ip)}
                    for vm in vms if vm.cluster is None],
        })
    edges = [{"source": "vip_lblan", "target": "rke2_apps"},
             {"source": "vip_lblan", "target": "rke2_middleware"},
             {"source": "vip_lbdmz", "target": "rke2_dmz"},
             {"source": "vip_lbintegration", "target": "vip_lblan"}]
    for vm in inv.group("load_balancers"):
        edges.append({"source": node_id(vm.name), "target": f"vip_{vm.role.value}"})
    return {"spec": spec, "zones": zones, "edges": edges, "totals": inv.totals()}
