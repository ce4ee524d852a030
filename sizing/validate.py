"""Turning spec text into a validated :class:`PlatformSpec`, or into errors one can act on.

Every problem names the YAML path and line it is about, says what is wrong and what would
be right. All problems are collected and reported together, not one per attempt.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sizing.inventory import addresses_needed, vm_name
from sizing.spec import TIERS, PlatformSpec, Product, Zone, ZoneName
from sizing.tiers import ROLE_INFO, ROLES, Role

Path = tuple[str | int, ...]

LB_ZONES: dict[str, ZoneName] = {
    "lblan": ZoneName.LAN,
    "lbdmz": ZoneName.DMZ,
    "lbintegration": ZoneName.INTEGRATION,
}


@dataclass(frozen=True)
class SpecProblem:
    """One thing wrong with a spec, where it is and what to do about it."""

    path: Path
    message: str
    line: int | None = None

    @property
    def dotted(self) -> str:
        text = ""
        for part in self.path:
            text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
        return text or "(top level)"

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.dotted}: {self.message}"


class SpecError(ValueError):
    """The spec is invalid; ``problems`` lists every reason, each with path and line."""

    def __init__(self, source: str, problems: list[SpecProblem]) -> None:
        self.source = source
        self.problems = problems
        count = len(problems)
        lines = "\n".join(f"  {p.format(source)}" for p in problems)
        super().__init__(f"{source}: {count} problem{'s' if count != 1 else ''} in the "
                         f"platform spec:\n{lines}")


# --- YAML with positions -----------------------------------------------------------------

def _positions(node: yaml.Node, path: Path, out: dict[Path, int],
               problems: list[SpecProblem]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            child = (*path, name)
            if name in seen:
                problems.append(SpecProblem(
                    child, f"key {name!r} is given twice; keep one", key.start_mark.line + 1))
            seen.add(name)
            out[child] = key.start_mark.line + 1
            _positions(value, child, out, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            out[child] = item.start_mark.line + 1
            _positions(item, child, out, problems)


def _line(positions: dict[Path, int], path: Path) -> int | None:
    for end in range(len(path), 0, -1):
        if path[:end] in positions:
            return positions[path[:end]]
    return None


# --- pydantic errors, rewritten for people -------------------------------------------------

def _model_at(path: Path) -> type[BaseModel] | None:
    """The model class that holds the keys at ``path`` (to list the allowed keys)."""
    annotation: Any = PlatformSpec
    for part in path:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        else:
            return None
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _unwrap(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def _pydantic_message(error: Any) -> str:
    kind = error["type"]
    loc = tuple(error["loc"])
    given = error.get("input")
    if kind == "extra_forbidden":
        key = str(loc[-1])
        model = _model_at(loc[:-1])
        allowed = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key {key!r}{hint} Allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"required key {loc[-1]!r} is missing"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if kind in ("literal_error", "enum"):
        return f"{given!r} is not allowed here; use {error['ctx']['expected']}"
    if kind == "ip_v4_address":
        return f"{given!r} is not an IPv4 address; write it like 10.0.0.10"
    if kind == "ip_v4_network":
        return f"{given!r} is not an IPv4 network; write it like 10.0.0.0/24"
    if kind == "string_pattern_mismatch":
        return f"{given!r} {_PATTERN_HINTS.get(str(loc[-1]), 'has the wrong format')}"
    if kind in ("int_parsing", "int_type", "bool_parsing", "bool_type", "string_type",
                "list_type", "dict_type", "model_type"):
        return f"{given!r}: {error['msg'][0].lower()}{error['msg'][1:]}"
    if kind == "too_short":
        return (f"needs at least {error['ctx']['min_length']} item(s), got "
                f"{len(given) if isinstance(given, list | str) else given!r}")
    return f"{error['msg']} (got {given!r})"


_PATTERN_HINTS = {
    "mirror": "is not an http(s) URL; write it like http://mirror.example.org/platform",
    "apt_mirror": "is not an http(s) URL; write it like http://mirror.example.org/debian",
    "registry": "is not a registry address; write host[:port] like registry.example.org:5000",
    "user": "is not a valid Linux user name: lowercase letters, digits, '_' or '-', "
            "starting with a letter or '_', at most 32 characters",
    "bootstrap_user": "is not a valid Linux user name: lowercase letters, digits, '_' or "
                      "'-', starting with a letter or '_', at most 32 characters",
}


# --- rules that need the whole spec ----------------------------------------------------------

def _zone_address_problems(prefix: Path, zone: Zone, address: IPv4Address, what: str,
                           zone_name: str) -> list[SpecProblem]:
    net = zone.cidr
    if address not in net:
        return [SpecProblem(prefix, f"{what} {address} is outside zone {zone_name} ({net}); "
                                    f"pick an address inside {net}")]
    if net.prefixlen < 31 and address in (net.network_address, net.broadcast_address):
        kind = "network" if address == net.network_address else "broadcast"
        return [SpecProblem(prefix, f"{what} {address} is the {kind} address of {net}; pick a "
                                    f"host address between {net.network_address + 1} and "
                                    f"{net.broadcast_address - 1}")]
    return []


def semantic_problems(spec: PlatformSpec) -> list[SpecProblem]:
    """Cross-field rules, each reported at the path a person would edit."""
    problems: list[SpecProblem] = []
    add = problems.append

    hv = spec.hypervisor
    other = "nutanix" if hv.kind == "vsphere" else "vsphere"
    if getattr(hv, hv.kind) is None:
        add(SpecProblem(("hypervisor", hv.kind),
                        f"kind is {hv.kind} but the hypervisor.{hv.kind} placement section is "
                        f"missing; add it ({_PLACEMENT_KEYS[hv.kind]})"))
    if getattr(hv, other) is not None:
        add(SpecProblem(("hypervisor", other),
                        f"a {other} section is given but kind is {hv.kind}; remove it or set "
                        f"kind: {other}"))

    zones = spec.zones.items()
    for i, (name_a, zone_a) in enumerate(zones):
        for name_b, zone_b in zones[i + 1:]:
            if zone_a.cidr.overlaps(zone_b.cidr):
                add(SpecProblem(("zones", name_b.value, "cidr"),
                                f"{zone_b.cidr} overlaps zones.{name_a.value}.cidr "
                                f"({zone_a.cidr}); zones must not share addresses"))

    for name, zone in zones:
        base: Path = ("zones", name.value)
        problems += _zone_address_problems((*base, "gateway"), zone, zone.gateway,
                                           "gateway", name.value)
        hosts = zone.hosts
        if hosts.first > hosts.last:
            add(SpecProblem((*base, "hosts"),
                            f"first {hosts.first} comes after last {hosts.last}; swap them"))
            continue
        for end in ("first", "last"):
            problems += _zone_address_problems((*base, "hosts", end), zone,
                                               getattr(hosts, end), f"hosts.{end}", name.value)
        if zone.gateway in hosts:
            add(SpecProblem((*base, "gateway"),
                            f"gateway {zone.gateway} is inside the host range "
                            f"{hosts.first}-{hosts.last}, so a VM could get it; move the "
                            "gateway or the range"))

    vip_seen: dict[IPv4Address, str] = {}
    for lb, zone_name in LB_ZONES.items():
        vip = getattr(spec.load_balancers, lb).vip
        path: Path = ("load_balancers", lb, "vip")
        if vip in vip_seen:
            add(SpecProblem(path, f"VIP {vip} is already the VIP of {vip_seen[vip]}; every "
                                  "load-balancer pair needs its own VIP"))
            continue
        vip_seen[vip] = lb
        zone = spec.zones.get(zone_name)
        found = _zone_address_problems(path, zone, vip, "VIP", zone_name.value)
        problems += found
        if found:
            continue
        if vip == zone.gateway:
            add(SpecProblem(path, f"VIP {vip} is the gateway of zone {zone_name.value}; pick "
                                  "a free address outside the host range"))
        elif vip in zone.hosts:
            add(SpecProblem(path, f"VIP {vip} is inside the host range "
                                  f"{zone.hosts.first}-{zone.hosts.last} of zone "
                                  f"{zone_name.value}, so a VM could get it; pick an address "
                                  "outside the range"))

    if spec.ssh.remove_bootstrap_user and spec.ssh.bootstrap_user == spec.ssh.user:
        add(SpecProblem(("ssh", "bootstrap_user"),
                        f"the bootstrap user is the admin user {spec.ssh.user}, and "
                        "remove_bootstrap_user would delete it; use the template's own login "
                        "here, or set remove_bootstrap_user: false"))
    problems += _override_problems(spec)
    problems += _product_problems(spec)
    problems += _vault_problems(spec)

    if not any(p.path[:1] == ("overrides",) for p in problems):
        needed = addresses_needed(spec)
        for name, zone in zones:
            if zone.hosts.first > zone.hosts.last:
                continue
            have = zone.hosts.size()
            if needed[name] > have:
                add(SpecProblem(("zones", name.value, "hosts"),
                                f"the range {zone.hosts.first}-{zone.hosts.last} holds {have} "
                                f"addresses but the {spec.users}-user inventory needs "
                                f"{needed[name]} from its start; set last to at least "
                                f"{zone.hosts.first + needed[name] - 1}"))

    longest = max((vm_name(spec, info.role, 99) for info in ROLES), key=len)
    if len(longest) > 63:
        add(SpecProblem(("name",), f"VM names like {longest!r} would exceed the 63 characters "
                                   f"of a hostname; shorten name to at most "
                                   f"{63 - (len(longest) - len(spec.name))} characters"))
    return problems


_PLACEMENT_KEYS = {
    "vsphere": "datacenter, cluster, datastore, folder, template",
    "nutanix": "cluster, image",
}


def _override_problems(spec: PlatformSpec) -> list[SpecProblem]:
    problems: list[SpecProblem] = []
    roles = [r.value for r in Role]
    for key, override in spec.overrides.items():
        path: Path = ("overrides", key)
        if key not in roles:
            close = difflib.get_close_matches(key, roles, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(SpecProblem(path, f"unknown role {key!r}; {hint}roles: "
                                              + ", ".join(roles)))
            continue
        info = ROLE_INFO[Role(key)]
        count = override.count
        if count is None:
            continue
        if info.fixed_count is not None and count != info.fixed_count:
            problems.append(SpecProblem((*path, "count"),
                                        f"{key} always has {info.fixed_count} VM(s) "
                                        f"({info.title}); remove this count"))
        elif count > info.capacity:
            problems.append(SpecProblem((*path, "count"),
                                        f"{count} exceeds the {info.capacity} addresses "
                                        f"reserved for {key}; use at most {info.capacity}"))
        elif info.node == "server" and count not in (1, 3, 5):
            problems.append(SpecProblem((*path, "count"),
                                        f"{count} servers cannot keep an etcd quorum through "
                                        "a failure; use 3 (or 5, or 1 for a test bed)"))
    return problems


def _product_problems(spec: PlatformSpec) -> list[SpecProblem]:
    problems: list[SpecProblem] = []
    if Product.ESERVICES in spec.products:
        if spec.eservices and len(set(spec.eservices.portals)) != len(spec.eservices.portals):
            problems.append(SpecProblem(("eservices", "portals"),
                                        "a portal is listed twice; list each once"))
        return problems
    if spec.eservices is not None:
        problems.append(SpecProblem(("eservices",),
                                    "eServices portals are configured but 'eservices' is not "
                                    "in products; add it to products or remove this section"))
    if spec.middleware.flowable:
        problems.append(SpecProblem(("middleware", "flowable"),
                                    "Flowable serves only eServices, which is not in "
                                    "products; add eservices to products or set it to false"))
    return problems


def _vault_problems(spec: PlatformSpec) -> list[SpecProblem]:
    problems: list[SpecProblem] = []
    vault = spec.vault
    if vault.threshold > vault.shares:
        problems.append(SpecProblem(("vault", "threshold"),
                                    f"threshold {vault.threshold} is more than the "
                                    f"{vault.shares} shares; Vault could never be unsealed"))
    if vault.unseal == "operators" and len(vault.operator_pgp_keys) != vault.shares:
        problems.append(SpecProblem(("vault", "operator_pgp_keys"),
                                    f"unseal: operators needs one PGP public key per share "
                                    f"({vault.shares}), got {len(vault.operator_pgp_keys)}"))
    if vault.unseal == "prefect" and vault.operator_pgp_keys:
        problems.append(SpecProblem(("vault", "operator_pgp_keys"),
                                    "PGP keys are given but unseal is prefect; set unseal: "
                                    "operators or remove the keys"))
    return problems


# --- entry points ------------------------------------------------------------------------------

def parse_spec(text: str, source: str = "<spec>", users: int | None = None) -> PlatformSpec:
    """Validate spec text; ``users`` replaces the tier (``platformctl plan --users``).

    Raises :class:`SpecError` listing every problem.
    """
    problems: list[SpecProblem] = []
    positions: dict[Path, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(error, "problem", None) or str(error)
        raise SpecError(source, [SpecProblem((), f"not valid YAML: {reason}", line)]) from None
    if root is not None:
        _positions(root, (), positions, problems)
    if not isinstance(data, dict):
        raise SpecError(source, [SpecProblem((), "the spec must be a YAML mapping of keys "
                                                 "(name, domain, users, ...)", 1)])
    if users is not None:
        if users not in TIERS:
            raise SpecError(source, [SpecProblem(("users",), f"--users {users} is not a tier; "
                                                 f"use one of {', '.join(map(str, TIERS))}")])
        data["users"] = users
    try:
        spec = PlatformSpec.model_validate(data)
    except ValidationError as error:
        for item in error.errors():
            path = tuple(item["loc"])
            problems.append(SpecProblem(path, _pydantic_message(item), _line(positions, path)))
        raise SpecError(source, _sorted(problems)) from None
    problems += [SpecProblem(p.path, p.message, _line(positions, p.path))
                 for p in semantic_problems(spec)]
    if problems:
        raise SpecError(source, _sorted(problems))
    return spec


def validated(spec: PlatformSpec) -> PlatformSpec:
    """Check a spec built in code (tests, ``--users``) with the same rules as a file."""
    problems = semantic_problems(spec)
    if problems:
        raise SpecError("<spec>", problems)
    return spec


def _sorted(problems: list[SpecProblem]) -> list[SpecProblem]:
    return sorted(problems, key=lambda p: (p.line or 0, p.dotted))


__all__ = ["SpecError", "SpecProblem", "parse_spec", "semantic_problems", "validated"]
