"""The inventory: deterministic names and addresses, stable across tiers, with host groups."""

from __future__ import annotations

from ipaddress import IPv4Address

from sizing.inventory import addresses_needed, build_inventory, effective_size
from sizing.spec import PlatformSpec, ZoneName
from sizing.tiers import Role
from sizing.validate import parse_spec
from tests.conftest import LAB_SPEC


def _at(users: int) -> PlatformSpec:
    return parse_spec(LAB_SPEC.read_text(), "lab", users=users)


def test_lab_inventory_at_100_users(lab_spec: PlatformSpec) -> None:
    inventory = build_inventory(lab_spec)
    assert len(inventory.vms) == 18
    first = inventory.vms[0]
    assert (first.name, str(first.ip), first.zone) == ("lab-lblan-01", "10.231.0.20", ZoneName.LAN)
    assert inventory.by_name("lab-gitops-01").ip == IPv4Address("10.231.0.25")
    assert inventory.by_name("lab-dmz-server-03").ip == IPv4Address("10.231.1.24")
    assert inventory.by_name("lab-lbintegration-02").ip == IPv4Address("10.231.2.21")
    assert inventory.by_name("lab-vault-01").fqdn == "lab-vault-01.lab.egov.example"
    assert not inventory.of_role(Role.APPS_AGENT)


def test_groups_cover_what_later_phases_address(lab_spec: PlatformSpec) -> None:
    inv = build_inventory(_at(500))
    assert [vm.name for vm in inv.group("rke2_apps_servers")] == [
        "lab-apps-server-01", "lab-apps-server-02", "lab-apps-server-03"]
    assert len(inv.group("rke2_apps_agents")) == 3
    assert len(inv.group("load_balancers")) == 6
    assert {vm.role for vm in inv.group("infra")} == {
        Role.LBLAN, Role.LBDMZ, Role.LBINTEGRATION, Role.VAULT, Role.GITOPS, Role.MONITORING}
    assert len(inv.group("all")) == len(inv.vms)
    assert set(inv.groups["rke2_nodes"]) == set(inv.groups["rke2_servers"]) | set(
        inv.groups["rke2_agents"])


def test_tiers_only_add_vms() -> None:
    previous: dict[str, tuple[str, str]] = {}
    for users in (100, 500, 1000, 10000):
        current = {vm.name: (str(vm.ip), vm.role.value) for vm in build_inventory(_at(users)).vms}
        assert previous.items() <= current.items()
        previous = current
    assert len(previous) == 60


def test_overrides_apply_and_keep_addresses() -> None:
    text = LAB_SPEC.read_text() + "overrides:\n  apps-agent: {count: 4, vcpu: 12}\n"
    spec = parse_spec(text, "lab", users=500)
    size = effective_size(spec, Role.APPS_AGENT)
    assert (size.count, size.vcpu, size.memory_gb) == (4, 12, 16)
    agents = build_inventory(spec).of_role(Role.APPS_AGENT)
    assert [str(vm.ip) for vm in agents] == [f"10.231.0.{n}" for n in (39, 40, 41, 42)]


def test_addresses_needed_grows_with_the_tier() -> None:
    assert addresses_needed(_at(100))[ZoneName.LAN] == 17
    assert addresses_needed(_at(10000))[ZoneName.LAN] == 131
    assert addresses_needed(_at(10000))[ZoneName.DMZ] == 5
    assert addresses_needed(_at(10000))[ZoneName.INTEGRATION] == 2
