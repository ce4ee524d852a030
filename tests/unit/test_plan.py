"""The plan: what each phase will create, for the lab spec and its variants."""

from __future__ import annotations

from sizing.inventory import build_inventory
from sizing.plan import PHASES, build_plan, topology
from sizing.spec import PlatformSpec
from sizing.validate import parse_spec
from templates import render
from tests.conftest import LAB_SPEC


def _plan(spec: PlatformSpec) -> dict[int, list[tuple[str, str, str]]]:
    plan = build_plan(spec, build_inventory(spec))
    return {n: [(i.kind, i.name, i.target) for i in items] for n, items in plan.items()}


def test_nine_phases_in_the_seed_order() -> None:
    assert [p.key for p in PHASES] == [
        "provision_vms", "prepare_vms", "core_services", "kubernetes_clusters",
        "cluster_foundation", "middleware", "api_management", "security_monitoring",
        "applications"]
    assert [p.number for p in PHASES] == list(range(1, 10))


def test_lab_plan(lab_spec: PlatformSpec) -> None:
    plan = _plan(lab_spec)
    assert len(plan[1]) == 18 and all(kind == "vm" for kind, _, _ in plan[1])
    assert ("service", "vault", "lab-vault-01") in plan[3]
    assert ("service", "docker-registry", "lab-gitops-01") in plan[3]
    assert ("service", "gogs", "lab-gitops-01") in plan[3]
    assert sum(1 for _, name, _ in plan[3] if name.startswith("haproxy")) == 6
    assert ("application", "rancher", "rke2-middleware") in plan[4]
    clusters = [name for kind, name, _ in plan[4] if kind == "cluster"]
    assert clusters == ["rke2-apps", "rke2-middleware", "rke2-dmz"]
    longhorn = [target for _, name, target in plan[5] if name == "longhorn"]
    assert longhorn == ["rke2-apps", "rke2-middleware"]
    assert [name for _, name, _ in plan[6]] == ["minio", "keycloak", "kafka", "n8n", "flowable"]
    assert [name for _, name, _ in plan[9]] == [
        "eservices-front-office", "eservices-internal-front-office", "eservices-back-office",
        "gco"]


def test_gco_only_plan_has_no_flowable_nor_portals() -> None:
    spec = parse_spec(LAB_SPEC.read_text().replace("[eservices, gco]", "[gco]"), "gco")
    plan = _plan(spec)
    assert "flowable" not in [name for _, name, _ in plan[6]]
    assert [name for _, name, _ in plan[9]] == ["gco"]


def test_topology_diagram_names_every_vm(lab_spec: PlatformSpec) -> None:
    inventory = build_inventory(lab_spec)
    text = render("plan/topology.md.j2", **topology(lab_spec, inventory))
    assert text.startswith("# lab: topology for 100 concurrent users")
    assert "```mermaid\nflowchart LR" in text
    for vm in inventory.vms:
        assert f'["{vm.name}<br/>{vm.ip}"]' in text
    assert "vip_lbdmz --> rke2_dmz" in text
