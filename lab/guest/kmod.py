#!/usr/bin/python3 -I
"""`modprobe` and `lsmod` inside a lab host: modules are loaded per host, never for real.

LAB STAND-IN, bind-mounted read-only over /usr/sbin/modprobe, lsmod (/usr/bin, and
/usr/sbin if there) and /usr/lib/systemd/systemd-modules-load in every lab host by its
PID 1 (lab/host_init.py), which also drops CAP_SYS_MODULE from the host's processes:
nothing in a lab host can load a module into the machine's kernel, which every host shares
(br_netfilter there would send the lab's bridged traffic through iptables). The kernel
still autoloads what the host's own actions need (e.g. `ip link add type vxlan`), as it
would for the machine.

The host's loaded modules are /run/lab-host/modules, in /proc/modules' format: at boot a
copy of the machine's /proc/modules (if its kernel has modules at all), plus the modules
listed in the host's modules-load.d (as systemd-modules-load would load them), plus
whatever `modprobe` loads; running /lib/systemd/systemd-modules-load loads modules-load.d
again, as systemd's does (the lab's systemctl does not start systemd-modules-load.service
though: it misreads the unit's `|` conditions). Where the kernel has /proc/modules, the
host sees that file there; `lsmod` (this script) lists it anywhere. So
`lsmod | grep -qw ^br_netfilter` is the way to check that a module is loaded, on a VM and
in a lab host alike.

A module is available (modprobe succeeds) when the machine has it: `modinfo` finds it
(kmod installed and /lib/modules/$(uname -r) present), the running kernel has it
(/sys/module/NAME, modules.builtin), or, for kernels without /lib/modules such as the
lab's build machine, /proc/config.gz builds it (CONFIG below knows the usual
networking and storage modules). Otherwise modprobe fails as kmod does:
"modprobe: FATAL: Module NAME not found in directory /lib/modules/RELEASE".
Differences from a VM: modules built into the kernel also show in lsmod once loaded;
module parameters are accepted and ignored; sizes read 0.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys

STATE = "/run/lab-host/modules"
REAL_KMOD = "/usr/bin/kmod"
# Module name -> kernel config symbol, for kernels without /lib/modules.
CONFIG = {
    "br_netfilter": "BRIDGE_NETFILTER", "bridge": "BRIDGE", "overlay": "OVERLAY_FS",
    "veth": "VETH", "vxlan": "VXLAN", "8021q": "VLAN_8021Q", "bonding": "BONDING",
    "tun": "TUN", "ipip": "NET_IPIP", "wireguard": "WIREGUARD", "dummy": "DUMMY",
    "macvlan": "MACVLAN", "ipvlan": "IPVLAN", "geneve": "GENEVE",
    "nf_conntrack": "NF_CONNTRACK", "nf_nat": "NF_NAT", "nf_tables": "NF_TABLES",
    "nft_chain_nat": "NFT_NAT", "nf_reject_ipv4": "NF_REJECT_IPV4",
    "nf_defrag_ipv4": "NF_DEFRAG_IPV4", "nf_defrag_ipv6": "NF_DEFRAG_IPV6",
    "x_tables": "NETFILTER_XTABLES", "ip_tables": "IP_NF_IPTABLES",
    "ip6_tables": "IP6_NF_IPTABLES", "iptable_filter": "IP_NF_FILTER",
    "iptable_nat": "IP_NF_NAT", "iptable_mangle": "IP_NF_MANGLE",
    "iptable_raw": "IP_NF_RAW", "ip6table_filter": "IP6_NF_FILTER",
    "ip6table_nat": "IP6_NF_NAT", "ip6table_mangle": "IP6_NF_MANGLE",
    "xt_conntrack": "NETFILTER_XT_MATCH_CONNTRACK", "xt_comment": "NETFILTER_XT_MATCH_COMMENT",
    "xt_mark": "NETFILTER_XT_MARK", "xt_multiport": "NETFILTER_XT_MATCH_MULTIPORT",
    "xt_addrtype": "NETFILTER_XT_MATCH_ADDRTYPE", "xt_statistic": "NETFILTER_XT_MATCH_STATISTIC",
    "xt_set": "NETFILTER_XT_SET", "xt_nat": "NETFILTER_XT_NAT",
    "xt_MASQUERADE": "NETFILTER_XT_TARGET_MASQUERADE",
    "xt_REDIRECT": "NETFILTER_XT_TARGET_REDIRECT", "ip_set": "IP_SET",
    "ip_vs": "IP_VS", "ip_vs_rr": "IP_VS_RR", "ip_vs_wrr": "IP_VS_WRR", "ip_vs_sh": "IP_VS_SH",
    "sctp": "IP_SCTP", "nfs": "NFS_FS", "nfsd": "NFSD", "fuse": "FUSE_FS",
    "loop": "BLK_DEV_LOOP", "dm_mod": "BLK_DEV_DM", "dm_thin_pool": "DM_THIN_PROVISIONING",
    "dm_crypt": "DM_CRYPT", "iscsi_tcp": "ISCSI_TCP", "nbd": "BLK_DEV_NBD",
    "rbd": "BLK_DEV_RBD", "ceph": "CEPH_FS", "ext4": "EXT4_FS", "xfs": "XFS_FS",
    "btrfs": "BTRFS_FS", "squashfs": "SQUASHFS", "vfio": "VFIO", "vhost_net": "VHOST_NET",
    "tls": "TLS", "sch_htb": "NET_SCH_HTB", "cls_bpf": "NET_CLS_BPF",
}


def normalise(name: str) -> str:
    """kmod treats '-' and '_' in module names alike."""
    return name.replace("-", "_")


def release() -> str:
    return os.uname().release


def loaded() -> list[str]:
    """The host's /proc/modules lines."""
    try:
        with open(STATE) as handle:
            return [line for line in handle.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def is_loaded(name: str) -> bool:
    return any(line.split()[0] == normalise(name) for line in loaded())


def _write(lines: list[str]) -> None:
    # In place: /proc/modules may be a bind mount of this very file.
    os.makedirs(os.path.dirname(STATE), exist_ok=True)
    with open(STATE, "w") as handle:
        handle.write("".join(line + "\n" for line in lines))


def _kernel_config() -> dict[str, str]:
    try:
        with gzip.open("/proc/config.gz", "rt") as handle:
            text = handle.read()
    except OSError:
        return {}
    config = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            config[key[7:]] = value
    return config


def _in_modules_files(name: str) -> bool:
    base = f"/lib/modules/{release()}"
    for listing in ("modules.builtin", "modules.dep"):
        try:
            with open(f"{base}/{listing}") as handle:
                for line in handle:
                    path = line.split(":", 1)[0].strip()
                    stem = os.path.basename(path).split(".ko", 1)[0]
                    if stem and normalise(stem) == name:
                        return True
        except OSError:
            continue
    return False


def available(name: str) -> str | None:
    """The module's real name if the machine has it, else None."""
    wanted = normalise(name)
    modinfo = shutil.which("modinfo")
    if modinfo and os.path.isdir(f"/lib/modules/{release()}"):
        proc = subprocess.run([modinfo, "-F", "name", name], capture_output=True, text=True)
        names = proc.stdout.split()
        if proc.returncode == 0 and names:
            return normalise(names[0])
    if os.path.isdir(f"/sys/module/{wanted}") or _in_modules_files(wanted):
        return wanted
    symbol = CONFIG.get(wanted)
    if symbol and _kernel_config().get(symbol) in ("y", "m"):
        return wanted
    return None


def load(names: list[str], quiet: bool = False, dry_run: bool = False,
         first_time: bool = False) -> int:
    """Load modules into the host's list; kmod's messages and exit status on failure."""
    status = 0
    for name in names:
        real = available(name) if not is_loaded(name) else normalise(name)
        if real is None:
            if not quiet:
                print(f"modprobe: FATAL: Module {name} not found in directory "
                      f"/lib/modules/{release()}", file=sys.stderr)
            status = 1
            continue
        if is_loaded(real):
            if first_time:
                print(f"modprobe: ERROR: could not insert '{real}': Module already in "
                      "kernel", file=sys.stderr)
                status = 1
            continue
        if os.geteuid() != 0:
            print(f"modprobe: ERROR: could not insert '{real}': Operation not permitted",
                  file=sys.stderr)
            status = 1
        elif not dry_run:
            _write([*loaded(), f"{real} 0 0 - Live 0x0000000000000000"])
    return status


def unload(names: list[str], quiet: bool = False, dry_run: bool = False) -> int:
    status = 0
    for name in names:
        if not is_loaded(name):
            if not quiet:
                print(f"modprobe: FATAL: Module {normalise(name)} is not in kernel.",
                      file=sys.stderr)
            status = 1
            continue
        if os.geteuid() != 0:
            print(f"modprobe: ERROR: could not remove '{normalise(name)}': Operation not "
                  "permitted", file=sys.stderr)
            status = 1
        elif not dry_run:
            _write([line for line in loaded() if line.split()[0] != normalise(name)])
    return status


def modules_load_d() -> list[str]:
    """Module names from modules-load.d, the way systemd-modules-load reads them."""
    chosen: dict[str, str] = {}
    for directory in ("/usr/lib/modules-load.d", "/usr/local/lib/modules-load.d",
                      "/run/modules-load.d", "/etc/modules-load.d"):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in names:
            if entry.endswith(".conf"):
                chosen[entry] = f"{directory}/{entry}"  # later directories win
    modules = []
    for entry in sorted(chosen):
        try:
            with open(chosen[entry]) as handle:
                for line in handle:
                    line = line.strip()
                    if line and not line.startswith(("#", ";")):
                        modules.append(line)
        except OSError:
            continue
    return modules


def boot(machine_modules: str | None) -> list[str]:
    """At boot: the machine's modules, then modules-load.d; the names that failed."""
    lines = machine_modules.splitlines() if machine_modules else []
    _write([line for line in lines if line.strip()])
    failed = []
    for name in modules_load_d():
        if load([name], quiet=True) != 0:
            failed.append(name)
    return failed


def systemd_modules_load(args: list[str]) -> int:
    """systemd-modules-load [CONFIG...]: load what modules-load.d lists."""
    names = modules_load_d()
    if args:
        names = []
        for path in args:
            try:
                with open(path) as handle:
                    names += [line.strip() for line in handle
                              if line.strip() and not line.strip().startswith(("#", ";"))]
            except OSError as exc:
                print(f"Failed to open {path}: {exc.strerror}", file=sys.stderr)
                return 1
    status = 0
    for name in names:
        if load([name], quiet=True) != 0:
            print(f"Failed to find module '{name}'", file=sys.stderr)
            status = 1
    return status


def _real(argv0: str, args: list[str]) -> int:
    """Hand over to the real kmod (help, version, configuration queries)."""
    if not os.access(REAL_KMOD, os.X_OK):
        print(f"{argv0}: this option needs kmod, which is not installed", file=sys.stderr)
        return 1
    os.execv(REAL_KMOD, [argv0, *args])
    return 1


def modprobe(args: list[str]) -> int:
    flags = {"all": False, "remove": False, "quiet": False, "dry_run": False,
             "first_time": False}
    rest: list[str] = []
    queries = ("-c", "--showconfig", "--show-config", "-D", "--show-depends", "-R",
               "--resolve-alias", "-V", "--version", "-h", "--help", "--dump-modversions",
               "--show-modversions", "--show-exports")
    short = {"a": "all", "r": "remove", "q": "quiet", "n": "dry_run"}
    ignored_with_value = {"-C", "--config", "-d", "--dirname", "-S", "--set-version"}
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            rest.extend(args[index:])
            break
        if arg in queries or arg.split("=", 1)[0] in queries:
            return _real("modprobe", args)
        if arg in ignored_with_value:
            index += 1
            continue
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            if name in ("all", "remove", "quiet", "dry-run", "show", "first-time"):
                flags[{"dry-run": "dry_run", "show": "dry_run",
                       "first-time": "first_time"}.get(name, name)] = True
            continue  # --verbose, --force, --ignore-install, --use-blacklist...
        if arg.startswith("-") and len(arg) > 1:
            for letter in arg[1:]:
                if letter in short:
                    flags[short[letter]] = True
            continue
        rest.append(arg)
    if not rest:
        print("modprobe: ERROR: missing parameters. See -h.", file=sys.stderr)
        return 1
    names = rest if flags["all"] or flags["remove"] else rest[:1]  # then module parameters
    if flags["remove"]:
        return unload(names, flags["quiet"], flags["dry_run"])
    return load(names, flags["quiet"], flags["dry_run"], flags["first_time"])


def lsmod(args: list[str]) -> int:
    if args:
        return _real("lsmod", args)
    print("Module                  Size  Used by")
    for line in loaded():
        fields = line.split()
        name, size, used = fields[0], fields[1], fields[2]
        holders = fields[3].rstrip(",") if len(fields) > 3 and fields[3] != "-" else ""
        print(f"{name:<19} {size:>8}  {used}" + (f" {holders}" if holders else ""))
    return 0


def main(argv: list[str]) -> int:
    command = os.path.basename(argv[0])
    if command == "lsmod":
        return lsmod(argv[1:])
    if command == "systemd-modules-load":
        return systemd_modules_load(argv[1:])
    return modprobe(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
