"""The shipped specs are valid, and every invalid spec of the corpus fails as documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sizing.spec import Portal, Product
from sizing.validate import SpecError, parse_spec
from tasks.spec import read_spec
from tests.conftest import EXAMPLES, LAB_SPEC, ROOT

INVALID = sorted((ROOT / "tests" / "data" / "invalid").glob("*.yaml"))


def test_corpus_is_large_enough() -> None:
    assert len(INVALID) >= 30


@pytest.mark.parametrize("path", [LAB_SPEC, *EXAMPLES], ids=lambda p: p.name)
def test_shipped_specs_are_valid(path: Path) -> None:
    spec = read_spec(path)
    assert spec.users in (100, 500, 1000, 10000)


def _expectations(path: Path) -> dict[str, str]:
    found = dict(re.findall(r"^# expect-([a-z]+): (.*)$", path.read_text(), re.MULTILINE))
    assert set(found) == {"path", "message", "line"}, f"{path.name} lacks expectations"
    return found


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_spec_fails_with_its_message(path: Path) -> None:
    expect = _expectations(path)
    with pytest.raises(SpecError) as caught:
        parse_spec(path.read_text(), source=path.name)
    matching = [p for p in caught.value.problems
                if p.dotted == expect["path"] and expect["message"] in p.message]
    got = [p.format(path.name) for p in caught.value.problems]
    assert matching, f"expected {expect}, got {got}"
    assert matching[0].line == int(expect["line"])
    # The rendered error names the file, the line and the path, as a person reads it.
    assert f"{path.name}:{expect['line']}: {expect['path']}: " in str(caught.value)


def test_all_problems_are_reported_at_once() -> None:
    text = LAB_SPEC.read_text().replace("users: 100", "users: 7").replace(
        "kind: vsphere", "kind: xen").replace("vlan: 300", "vlam: 300")
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "multi.yaml")
    paths = {p.dotted for p in caught.value.problems}
    assert {"users", "hypervisor.kind", "zones.integration.vlam"} <= paths
    assert "3 problems" in str(caught.value)


def test_users_override_is_checked() -> None:
    with pytest.raises(SpecError, match="--users 42 is not a tier"):
        parse_spec(LAB_SPEC.read_text(), "lab.yaml", users=42)
    assert parse_spec(LAB_SPEC.read_text(), "lab.yaml", users=10000).users == 10000


def test_defaults_follow_products() -> None:
    spec = read_spec(LAB_SPEC)
    assert spec.flowable is True
    assert spec.portals == list(Portal)
    gco_only = parse_spec(LAB_SPEC.read_text().replace("[eservices, gco]", "[gco]"), "gco")
    assert gco_only.products == [Product.GCO]
    assert gco_only.flowable is False
    assert gco_only.portals == []


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.yaml")):
        read_spec(tmp_path / "nope.yaml")


def test_lab_zones_stay_inside_the_lab_range() -> None:
    from ipaddress import IPv4Network

    spec = read_spec(LAB_SPEC)
    lab = IPv4Network("10.231.0.0/16")
    for _, zone in spec.zones.items():
        assert zone.cidr.subnet_of(lab)
