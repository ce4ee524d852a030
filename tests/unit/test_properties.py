"""Property tests: for any valid spec and tier, names and IPs are unique and in range, and
growing the tier keeps every earlier VM where it was."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sizing.inventory import build_inventory
from sizing.spec import TIERS, PlatformSpec
from sizing.validate import parse_spec
from tests.conftest import LAB_SPEC

BASE: dict[str, Any] = yaml.safe_load(LAB_SPEC.read_text())


@st.composite
def specs(draw: st.DrawFn) -> PlatformSpec:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["name"] = draw(st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True))
    data["users"] = draw(st.sampled_from(TIERS))
    second_octets = draw(st.lists(st.integers(0, 255), min_size=3, max_size=3, unique=True))
    first_octet = draw(st.sampled_from([10, 172, 192]))
    for zone_name, octet in zip(("lan", "dmz", "integration"), second_octets, strict=True):
        prefix = draw(st.integers(20, 23))  # room for every override
        net = next(IPv4Network(f"{first_octet}.{octet}.0.0/16").subnets(new_prefix=prefix))
        start = draw(st.integers(16, 40))
        zone = data["zones"][zone_name]
        zone["cidr"] = str(net)
        zone["gateway"] = str(net.network_address + 1)
        zone["hosts"] = {"first": str(net.network_address + start),
                         "last": str(net.broadcast_address - 1)}
        lb = {"lan": "lblan", "dmz": "lbdmz", "integration": "lbintegration"}[zone_name]
        data["load_balancers"][lb] = {"vip": str(net.network_address + draw(st.integers(2, 15)))}
    overrides: dict[str, Any] = {}
    for role in ("apps-agent", "middleware-agent"):
        if draw(st.booleans()):
            overrides[role] = {"count": draw(st.integers(0, 100))}
    if draw(st.booleans()):
        overrides["apps-server"] = {"count": draw(st.sampled_from([1, 3, 5]))}
    data["overrides"] = overrides
    return parse_spec(yaml.safe_dump(data), "generated")


@settings(max_examples=150, deadline=None)
@given(specs())
def test_names_and_ips_unique_and_in_range(spec: PlatformSpec) -> None:
    inventory = build_inventory(spec)
    names = [vm.name for vm in inventory.vms]
    ips = [vm.ip for vm in inventory.vms]
    assert len(set(names)) == len(names)
    assert len(set(ips)) == len(ips)
    vips = {spec.load_balancers.lblan.vip, spec.load_balancers.lbdmz.vip,
            spec.load_balancers.lbintegration.vip}
    for vm in inventory.vms:
        zone = spec.zones.get(vm.zone)
        assert vm.ip in zone.hosts
        assert vm.ip in zone.cidr
        assert vm.ip not in vips and vm.ip != zone.gateway
        assert vm.ip not in (zone.cidr.network_address, zone.cidr.broadcast_address)
        assert len(vm.name) <= 63


@settings(max_examples=100, deadline=None)
@given(specs(), st.sampled_from(TIERS))
def test_growing_the_tier_keeps_every_earlier_vm(spec: PlatformSpec, other: int) -> None:
    low, high = sorted((spec.users, other))
    data = spec.model_dump(mode="json")
    small = build_inventory(parse_spec(yaml.safe_dump(data), "gen", users=low))
    large = {vm.name: vm for vm in build_inventory(parse_spec(yaml.safe_dump(data), "gen",
                                                                users=high)).vms}
    for vm in small.vms:
        grown = large[vm.name]
        assert (grown.ip, grown.role, grown.zone, grown.cluster, grown.fqdn) == (
            vm.ip, vm.role, vm.zone, vm.cluster, vm.fqdn)
        assert grown.vcpu >= vm.vcpu and grown.memory_gb >= vm.memory_gb
        assert all(b >= a for a, b in zip(vm.disks_gb, grown.disks_gb, strict=False))
