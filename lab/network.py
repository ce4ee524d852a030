"""The lab's network: one Linux bridge per spec zone, holding the zone's gateway address.

The orchestrator, in the root namespace, reaches every lab host's IP directly through the
bridges; hosts reach other zones through their gateway (the root namespace forwards between
lab bridges only). Nothing toward a lab address may leave the machine: an `unreachable`
route for the whole lab range goes in before any bridge and comes out last, and an nftables
table drops forwarding between lab bridges and anything else.

Each change is computed from the actual state, and the commands are plain data, so the
plan can be read (and tested) without touching the machine.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

from sizing.spec import PlatformSpec, ZoneName

LAB_RANGE = IPv4Network("10.231.0.0/16")
BRIDGE_PREFIX = "plab-"
NFT_TABLE = "platform_lab"
_BRIDGE_NAMES = {ZoneName.LAN: "plab-lan", ZoneName.DMZ: "plab-dmz",
                 ZoneName.INTEGRATION: "plab-int"}


class LabNetworkError(RuntimeError):
    """A network step failed; the message names the command and quotes its error."""


@dataclass(frozen=True)
class Bridge:
    zone: ZoneName
    name: str
    gateway: IPv4Interface  # the zone's gateway with the zone's prefix length


def bridges_for(spec: PlatformSpec) -> list[Bridge]:
    """The bridges the lab needs for a spec; refuses zones outside the lab range."""
    found = []
    for zone_name, zone in spec.zones.items():
        if not zone.cidr.subnet_of(LAB_RANGE):
            raise LabNetworkError(
                f"zone {zone_name.value} ({zone.cidr}) is outside the lab range {LAB_RANGE}; "
                "the lab only builds specs whose zones all lie inside it "
                "(see deployments/lab/platform.yaml)")
        found.append(Bridge(zone_name, _BRIDGE_NAMES[zone_name],
                            IPv4Interface(f"{zone.gateway}/{zone.cidr.prefixlen}")))
    return found


def bridge_for_address(spec: PlatformSpec, address: object) -> Bridge | None:
    for bridge in bridges_for(spec):
        if address in spec.zones.get(bridge.zone).cidr:
            return bridge
    return None


def _run(argv: list[str], input_text: str | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, input=input_text, check=False)
    if done.returncode != 0:
        raise LabNetworkError(f"lab network: `{' '.join(argv)}` failed ({done.returncode}): "
                              f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _links() -> dict[str, list[str]]:
    """Every link in the root namespace with its IPv4 addresses."""
    data = json.loads(_run(["ip", "-j", "addr", "show"]))
    return {link["ifname"]: [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                             if a.get("family") == "inet"] for link in data}


def _unreachable_present() -> bool:
    out = _run(["ip", "-j", "route", "show", "type", "unreachable"])
    return any(route.get("dst") == str(LAB_RANGE) for route in json.loads(out or "[]"))


def _ruleset(forwarding_was_on: bool) -> str:
    # With forwarding off before the lab, nothing else was forwarded: keep it that way.
    policy = "accept" if forwarding_was_on else "drop"
    return (f"table inet {NFT_TABLE} {{\n"
            f"  chain lab_forward {{\n"
            f"    type filter hook forward priority filter; policy {policy};\n"
            f'    iifname "{BRIDGE_PREFIX}*" oifname "{BRIDGE_PREFIX}*" accept\n'
            f'    iifname "{BRIDGE_PREFIX}*" drop\n'
            f'    oifname "{BRIDGE_PREFIX}*" drop\n'
            f"  }}\n}}\n")


def _nft_table_present() -> bool:
    return subprocess.run(["nft", "list", "table", "inet", NFT_TABLE], capture_output=True,
                          check=False).returncode == 0


def plan_up(spec: PlatformSpec, forwarding_was_on: bool) -> list[list[str]]:
    """The commands that bring the network to the spec's shape from what exists now."""
    commands: list[list[str]] = []
    if not _unreachable_present():
        commands.append(["ip", "route", "add", "unreachable", str(LAB_RANGE)])
    links = _links()
    for bridge in bridges_for(spec):
        if bridge.name not in links:
            commands.append(["ip", "link", "add", bridge.name, "type", "bridge"])
        if str(bridge.gateway) not in links.get(bridge.name, []):
            commands.append(["ip", "addr", "add", str(bridge.gateway), "dev", bridge.name])
        commands.append(["ip", "link", "set", bridge.name, "up"])
    if not _nft_table_present():
        commands.append(["nft", "-f", "-", _ruleset(forwarding_was_on)])
    return commands


OWNER_FILE = Path("/run/platform-lab.owner")
"""Which state directory's lab holds the machine's lab network: lab addresses and bridge
names are global, so one lab at a time."""


class LabNetwork:
    """Brings the lab's bridges, route and forwarding rules up and down; idempotent."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.resolve()
        self.state_file = state_dir / "network.json"

    def _claim(self) -> None:
        owner = OWNER_FILE.read_text().strip() if OWNER_FILE.exists() else ""
        if owner and owner != str(self.state_dir) and \
                any(name.startswith(BRIDGE_PREFIX) for name in _links()):
            raise LabNetworkError(
                f"another lab is up on this machine (state in {owner}); bring it down "
                f"first (PLATFORM_LAB_STATE={owner} platformctl lab down)")
        OWNER_FILE.write_text(f"{self.state_dir}\n")

    def up(self, spec: PlatformSpec) -> list[str]:
        self._claim()
        changes: list[str] = []
        state = self._state()
        if "ip_forward" not in state:
            state["ip_forward"] = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
            self._save(state)
        for command in plan_up(spec, state["ip_forward"] == "1"):
            if command[:2] == ["nft", "-f"]:
                _run(command[:3], input_text=command[3])
                changes.append(f"nftables table {NFT_TABLE}: forwarding only between lab "
                               "bridges")
            else:
                _run(command)
                if command[2] != "set":
                    changes.append(" ".join(command))
        if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "1":
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            changes.append("ip_forward on (between lab bridges only)")
        return changes

    def down(self) -> list[str]:
        changes: list[str] = []
        links = _links()
        for name in sorted(links):
            if name.startswith(BRIDGE_PREFIX):
                _run(["ip", "link", "del", name])
                changes.append(f"removed bridge {name}")
        if _nft_table_present():
            _run(["nft", "delete", "table", "inet", NFT_TABLE])
            changes.append(f"removed nftables table {NFT_TABLE}")
        state = self._state()
        previous = state.get("ip_forward")
        if previous is not None:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(f"{previous}\n")
            changes.append(f"ip_forward restored to {previous}")
        if _unreachable_present():  # last: nothing toward the lab range leaves meanwhile
            _run(["ip", "route", "del", "unreachable", str(LAB_RANGE)])
            changes.append(f"removed unreachable route {LAB_RANGE}")
        self.state_file.unlink(missing_ok=True)
        if OWNER_FILE.exists() and OWNER_FILE.read_text().strip() == str(self.state_dir):
            OWNER_FILE.unlink()
        return changes

    def bridges(self) -> dict[str, list[str]]:
        """The lab's bridges and their addresses."""
        return {n: a for n, a in _links().items() if n.startswith(BRIDGE_PREFIX)}

    def route_present(self) -> bool:
        return _unreachable_present()

    def _state(self) -> dict[str, str]:
        try:
            loaded: dict[str, str] = json.loads(self.state_file.read_text())
            return loaded
        except FileNotFoundError:
            return {}

    def _save(self, state: dict[str, str]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state))
