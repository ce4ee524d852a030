#!/usr/bin/python3 -I
"""`netplan` inside a lab host: the real netplan, except that `apply` configures the
host's own NIC itself.

LAB STAND-IN, bind-mounted read-only over /usr/sbin/netplan (its script) in every lab host
by its PID 1 (lab/host_init.py). A lab host has no systemd-networkd to hand netplan's
output to, and the real `netplan apply` must not run there. So:

- every subcommand but `apply` and `try` is the real netplan (`netplan generate` validates
  for real and reports netplan's own errors; `get`, `set`, `info`, `ip` work as usual);
- `netplan apply` runs the real generator first (an invalid configuration fails exactly as
  it would, exit 78), reads the merged configuration with netplan's own library (every
  file of /{lib,etc,run}/netplan in netplan's order), finds the `ethernets` entry that
  matches the host's NIC the way netplan matches (by name or `match:` name glob,
  macaddress, driver "veth"; first by id when several match), and reconfigures that NIC in
  the host's network namespace: `set-name` (renames it), `mtu`, the addresses (flushed and
  re-added only if they differ), the routes (`routes:`, `gateway4`/`gateway6`; other
  routes on the NIC are removed), and `nameservers` (addresses, search) into
  /etc/resolv.conf, which systemd-resolved would serve on a VM. It fails with a message
  saying why when nothing matches the NIC or the entry has no static address (there is
  no DHCP server in the lab); keys it does not act on (e.g. `dhcp6: false`,
  `routing-policy`) are named on stderr. Other device types (bridges, bonds, vlans...)
  are not created;
- `netplan try` is refused (it needs a person at a terminal).

The host's NIC is found by the MAC address its PID 1 recorded in /run/lab-host/nic.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys

TYPE_CHECKING = False  # typing costs milliseconds at each boot, for annotations only
if TYPE_CHECKING:
    from typing import Any

NETPLAN_DIR = "/usr/share/netplan"
NIC_FILE = "/run/lab-host/nic"
CONFIG_DIRS = ("/lib/netplan", "/etc/netplan", "/run/netplan")
# Keys of an ethernets entry that this stand-in acts on or that change nothing here.
HANDLED = {"addresses", "routes", "gateway4", "gateway6", "nameservers", "mtu", "set-name",
           "match", "dhcp4", "dhcp6", "renderer", "optional", "critical",
           "link-local", "accept-ra", "wakeonlan"}


class ApplyError(Exception):
    """`netplan apply` cannot configure the NIC; the message says why."""


def config_files() -> list[str]:
    """The YAML files netplan reads, in its order (a later directory shadows a name)."""
    chosen: dict[str, str] = {}
    for directory in CONFIG_DIRS:
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                if name.endswith(".yaml"):
                    chosen[name] = os.path.join(directory, name)
    return [chosen[name] for name in sorted(chosen)]


def config_record() -> str:
    """The netplan configuration as one text (which files, what they hold), to tell
    later whether it changed. The text itself rather than a digest of it: PID 1 compares
    at every boot, and loading hashlib's OpenSSL costs 3 ms."""
    files = []
    for path in config_files():
        content = ""
        with contextlib.suppress(OSError), open(path, "rb") as handle:
            content = handle.read().decode(errors="surrogateescape")
        files.append([path, content])
    return json.dumps(files)


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ApplyError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def nic() -> tuple[str, str]:
    """(current name, MAC) of the host's NIC."""
    try:
        with open(NIC_FILE) as handle:
            mac = handle.read().split()[-1].lower()
    except (OSError, IndexError):
        raise ApplyError(f"{NIC_FILE} is missing: is this a lab host?") from None
    for link in json.loads(_ip("-j", "link", "show")):
        if str(link.get("address", "")).lower() == mac:
            return str(link["ifname"]), mac
    raise ApplyError(f"no interface has the NIC's MAC address {mac}")


def merged_config() -> tuple[dict[str, Any], Any]:
    """(the merged `network:` mapping, netplan's State) as netplan itself parses them."""
    sys.path.insert(0, NETPLAN_DIR)
    import yaml
    from netplan import libnetplan

    parser = libnetplan.Parser()
    parser.load_yaml_hierarchy("/")
    state = libnetplan.State()
    state.import_parser_results(parser)
    import tempfile

    with tempfile.TemporaryFile() as dump:
        state.dump_yaml(output_file=dump)
        dump.seek(0)
        data = yaml.safe_load(dump.read()) or {}
    return (data.get("network") or {}), state


def find_entry(name: str, mac: str) -> tuple[str, dict[str, Any]]:
    """The `ethernets` id and settings that netplan would apply to this NIC."""
    network, state = merged_config()
    ethernets = network.get("ethernets") or {}
    matching = sorted(def_id for def_id, netdef in state.ethernets.items()
                      if netdef.match_interface(itf_name=name, itf_driver="veth", itf_mac=mac))
    if not matching:
        raise ApplyError(f"no ethernets entry in {', '.join(config_files()) or 'no file'} "
                         f"matches this host's NIC {name} ({mac})")
    def_id = matching[0]
    return def_id, dict(ethernets.get(def_id) or {})


def _addresses(settings: dict[str, Any], def_id: str) -> list[str]:
    addresses = []
    for item in settings.get("addresses") or []:
        text = next(iter(item)) if isinstance(item, dict) else str(item)
        try:
            addresses.append(str(ipaddress.ip_interface(text)))
        except ValueError:
            raise ApplyError(f"{def_id}: invalid address {text!r}") from None
    if not addresses:
        why = " (dhcp is not available in the lab)" if settings.get("dhcp4") or \
            settings.get("dhcp6") else ""
        raise ApplyError(f"{def_id}: no static address to configure{why}")
    return addresses


def _routes(settings: dict[str, Any]) -> list[dict[str, Any]]:
    routes = []
    for key, family in (("gateway4", 4), ("gateway6", 6)):
        if settings.get(key):
            routes.append({"to": "default", "via": str(settings[key]), "family": family})
    for route in settings.get("routes") or []:
        to = str(route.get("to", "default"))
        if to in ("0.0.0.0/0", "::/0"):
            to = "default"
        family = 6 if ":" in str(route.get("via", "")) or ":" in to else 4
        routes.append({"to": to, "via": route.get("via"), "metric": route.get("metric"),
                       "on-link": route.get("on-link"), "table": route.get("table"),
                       "family": family})
    return routes


def _route_key(to: str, via: str | None, metric: Any, table: Any) -> tuple[str, str, int, int]:
    if to != "default":
        to = str(ipaddress.ip_network(to, strict=False))
    number = 254 if table in (None, "", "main") else int(table)
    return (to, str(via or ""), int(metric or 0), number)


def configure(name: str, def_id: str, settings: dict[str, Any]) -> str:
    """Reconfigure the NIC; its name afterwards."""
    addresses = _addresses(settings, def_id)
    routes = _routes(settings)
    ignored = sorted(set(settings) - HANDLED)
    if ignored:
        print(f"netplan apply (lab host): {def_id}: not acted on: {', '.join(ignored)}",
              file=sys.stderr)
    new_name = str(settings.get("set-name") or name)
    if new_name != name:
        _ip("link", "set", "dev", name, "down")
        _ip("link", "set", "dev", name, "name", new_name)
        name = new_name
    if settings.get("mtu"):
        _ip("link", "set", "dev", name, "mtu", str(settings["mtu"]))
    _ip("link", "set", "dev", name, "up")

    current = sorted(f"{a['local']}/{a['prefixlen']}"
                     for link in json.loads(_ip("-j", "addr", "show", "dev", name))
                     for a in link.get("addr_info", []) if a.get("scope") == "global")
    if current != sorted(str(ipaddress.ip_interface(a)) for a in addresses):
        _ip("addr", "flush", "dev", name, "scope", "global")
        for address in addresses:
            _ip("addr", "add", address, "dev", name)

    wanted = {}
    for route in routes:
        key = _route_key(route["to"], route.get("via"), route.get("metric"), route.get("table"))
        wanted[key] = route
    for family in ("-4", "-6"):
        for table in {str(k[3]) for k in wanted} | {"main"}:
            for route in json.loads(_ip("-j", family, "route", "show", "dev", name,
                                        "table", table)):
                if route.get("protocol") == "kernel" or route.get("dst", "").startswith("fe80"):
                    continue
                key = _route_key(route["dst"], route.get("gateway"), route.get("metric"),
                                 table)
                if key not in wanted:
                    args = [family, "route", "del", route["dst"], "dev", name, "table", table]
                    if route.get("gateway"):
                        args += ["via", route["gateway"]]
                    if route.get("metric"):
                        args += ["metric", str(route["metric"])]
                    _ip(*args)
    for (to, via, metric, number), route in wanted.items():
        args = [f"-{route['family']}", "route", "replace", to]
        if via:
            args += ["via", via]
        args += ["dev", name, "metric", str(metric), "table", str(number)]
        if route.get("on-link"):
            args.append("onlink")
        _ip(*args)

    nameservers = settings.get("nameservers") or {}
    if nameservers.get("addresses") or nameservers.get("search"):
        write_resolv_conf([str(a) for a in nameservers.get("addresses") or []],
                          [str(s) for s in nameservers.get("search") or []])
    return name


def write_resolv_conf(servers: list[str], search: list[str]) -> None:
    lines = ["# Written by netplan apply (lab host: systemd-resolved's part, "
             "lab/guest/netplan.py)."]
    if search:
        lines.append("search " + " ".join(search))
    lines += [f"nameserver {server}" for server in servers]
    tmp = "/etc/.resolv.conf.netplan-tmp"
    with open(tmp, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, "/etc/resolv.conf")


def generate() -> int:
    """The real generator, as the real `netplan apply` runs it first."""
    sys.path.insert(0, NETPLAN_DIR)
    from netplan.cli import utils

    return subprocess.call([utils.get_generator_path()])


def apply(args: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in args):
        return passthrough(["netplan", "apply", *args])
    if os.geteuid() != 0:
        print("netplan apply: this command needs root", file=sys.stderr)
        return 1
    if generate() != 0:
        return os.EX_CONFIG
    try:
        name, mac = nic()
        def_id, settings = find_entry(name, mac)
        configure(name, def_id, settings)
    except ApplyError as exc:
        print(f"netplan apply (lab host): {exc}", file=sys.stderr)
        return 1
    return 0


def passthrough(argv: list[str]) -> int:
    """The real netplan command line."""
    sys.path.insert(0, NETPLAN_DIR)
    from netplan import Netplan

    sys.argv = ["/usr/sbin/netplan", *argv[1:]]
    Netplan().main()
    return 0


def main(argv: list[str]) -> int:
    command = next((arg for arg in argv[1:] if not arg.startswith("-")), None)
    if command == "apply":
        index = argv.index("apply")
        return apply(argv[index + 1:])
    if command == "try":
        print("netplan try: not available in a lab host (use netplan apply)", file=sys.stderr)
        return 1
    return passthrough(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
