"""Phase 2 against the Ansible role it replaces (issue 5), on the tier-100 lab.

The same preparation twice, each from freshly booted lab hosts (phase 1 on vcsim):

1. phase 1; the Ansible playbook tests/bench/ansible/prepare.yml (ansible-core, forks =
   number of hosts, pipelining on, strict host key checking, facts gathered); the same
   playbook again, with nothing left to change; the end state of every host recorded;
2. every VM deleted, phase 1 again (same names, addresses and host keys, new disks); this
   project's `prepare_vms` flow (Prefect's flow overhead included: that is what users
   run); the flow again, with nothing left to change; the end state recorded.

`BENCH prepare-vs-ansible hosts=… ours_s=… ansible_s=… ratio=… rerun_ours_s=…
rerun_ansible_s=… rerun_ratio=…`: ratio = ours_s / ansible_s (target <= 0.5, first run
and no-change run alike). `BENCH prepare-vs-ansible-detail …`: what each tool changed
(Ansible's recap: changed tasks, handlers included; phase 2's table: changed operations,
one per sysctl key), phase 2's slowest host and the sum over hosts, the CPU time the
whole machine spent during each run (`*_cpu_s`), Ansible's fact gathering and apt task,
and whether both left every host in the same state: sha256 of the four files the issue
names, then `state_match` over everything observed (every managed file's sha256, owner
and mode; users and groups; the bootstrap login; hostname; kernel settings; modules;
services; the live nftables ruleset; /etc/fstab and the data disk's mount).
`BENCH prepare-vs-ansible-difference …` lines name any difference.

Both tools write the same bytes: every file the playbook copies is rendered here from
`tasks.prepare.host_operations`, the very operations phase 2 applies, and the bench
refuses to run if phase 2 has an operation or a file the playbook does not mirror.

Read the numbers knowing that the lab's 18 "VMs" share this machine's cores with the
controller: Ansible runs Python on the target for every task of every host, so in the lab
that work queues on the same cores (the runs are CPU-bound: compare `*_cpu_s` with the
wall time), where real VMs would each bring their own CPU. The lab's `systemctl` is also a
Python script (docker-systemctl-replacement), which Ansible's systemd_service module calls
two or three times per task.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from sizing.inventory import Inventory
from sizing.spec import PlatformSpec
from tests.bench.machine import machine_cpu_seconds, phase_table
from tests.conftest import LAB_SPEC

ANSIBLE_DIR = Path(__file__).resolve().parent / "ansible"
PLAYBOOK = ANSIBLE_DIR / "prepare.yml"
VCSIM_PORT = 18993  # the lab's Prefect: 4993 (tests/labkit.py)
RECAP_RE = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+"
                      r"failed=(\d+)\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)", re.M)
# The four files the issue names, compared one by one in the detail line.
COMPARED = ("/etc/ssh/sshd_config.d/50-platform-hardening.conf", "/etc/nftables.conf",
            "/etc/netplan/60-platform.yaml", "/etc/hosts")


# --- the Ansible project: same inputs, same bytes -------------------------------------------


# What mirrors each of phase 2's operations that is not a file: a task name of the playbook
# (Command: by its name, Service: by its unit, LineAbsent and Directory: by their path).
MIRRORS = {
    "command set the hostname": "name: Hostname (",
    "command drop cloud-init's netplan file": "name: No cloud-init netplan file",
    "command apply the network": "name: apply the network",
    "command swap off": "name: Swap off",
    "command load the RKE2 kernel modules": "name: RKE2 kernel modules now",
    "command remove the bootstrap user's sudo rule": "name: Bootstrap user's sudo rule",
    "command wait for the sessions of the bootstrap user to end":
        "name: Wait for the bootstrap user's sessions to end",
    "service chrony.service": "name: chrony enabled and running",
    "service ssh.service": "name: ssh enabled and running",
    "service nftables.service": "name: nftables enabled and running",
    "line absent /etc/fstab": "name: No swap in /etc/fstab",
    "directory /etc/cloud/cloud.cfg.d": "path: /etc/cloud/cloud.cfg.d",
    "group": "name: Admin group",
    "user": "name: Admin user",
    "user absent": "name: Bootstrap user",
    "packages": "name: Base packages",
    "data disk /srv/data": "name: Data disk formatted",
}


@dataclass(frozen=True)
class HostMirror:
    """What the playbook takes of phase 2's operations for one VM."""

    # Every file phase 2 writes (absolute path -> bytes); `authorized_keys` stands for the
    # admin user's ~/.ssh/authorized_keys.
    files: dict[str, bytes]
    # The settings of its data disk operation, on a VM that has one.
    data_disk: dict[str, Any] | None


def host_mirrors(spec: PlatformSpec, inventory: Inventory, admin_key: str,
                 ) -> dict[str, HostMirror]:
    """Per VM, what the playbook needs, from phase 2's own operations.

    Raises if phase 2 has an operation the playbook does not mirror (MIRRORS), or writes a
    file the playbook does not copy: the two stay the same preparation when phase 2 grows.
    """
    from tasks.hostops import (
        DataDisk,
        File,
        Group,
        LineAbsent,
        Packages,
        Sysctl,
        User,
        UserAbsent,
    )
    from tasks.prepare import bootstrap_removal, host_operations

    playbook = PLAYBOOK.read_text()
    out: dict[str, HostMirror] = {}
    for vm in inventory.vms:
        files: dict[str, bytes] = {}
        data_disk: dict[str, Any] | None = None
        sysctl_lines: dict[str, list[str]] = {}
        for op in [*host_operations(spec, inventory, vm, admin_key), *bootstrap_removal(spec)]:
            if isinstance(op, File):  # Sudoers too
                files[op.path] = op.content
                continue
            if isinstance(op, Sysctl):
                # Phase 2 appends one line per key to a file that a fresh host lacks.
                sysctl_lines.setdefault(op.persist_file, []).append(f"{op.key} = {op.value}\n")
                continue
            if isinstance(op, User):
                files["authorized_keys"] = "".join(
                    f"{key}\n" for key in dict.fromkeys(op.authorized_keys or ())).encode()
                key = "user"
            elif isinstance(op, UserAbsent):
                key = "user absent"
            elif isinstance(op, Group | Packages):
                key = op.id.split()[0]
            elif isinstance(op, LineAbsent):
                key = f"line absent {op.path}"
            elif isinstance(op, DataDisk):
                data_disk = {"size_gb": op.size_gb, "mount": op.mount, "label": op.label,
                             "fstype": op.fstype, "fstab_line": op.fstab_line}
                key = op.id
            else:
                key = op.id.replace(f" {spec.ssh.bootstrap_user} ", " the bootstrap user ")
            if key not in MIRRORS or MIRRORS[key] not in playbook:
                raise RuntimeError(f"phase 2 has an operation {PLAYBOOK.name} lacks: {op!r}")
        for path, lines in sysctl_lines.items():
            files[path] = "".join(lines).encode()
        for path in files:
            if f"{{{{ host_files }}}}{'/' if path == 'authorized_keys' else ''}{path}" \
                    not in playbook:
                raise RuntimeError(f"phase 2 writes {path}; {PLAYBOOK.name} does not copy it")
        out[vm.name] = HostMirror(files, data_disk)
    return out


def write_ansible_project(run_dir: Path, spec: PlatformSpec, inventory: Inventory,
                          mirrors: dict[str, HostMirror], known_hosts: Iterable[str],
                          private_key: Path) -> Path:
    """The inventory, per-host files, known_hosts and ansible.cfg; returns ansible.cfg."""
    from tasks.prepare import RKE2_MODULES

    for sub in ("files", "tmp", "cp", "home"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    for host, mirror in mirrors.items():
        for path, content in mirror.files.items():
            target = run_dir / "files" / host / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    (run_dir / "known_hosts").write_text("".join(f"{line}\n" for line in known_hosts))
    hosts: dict[str, dict[str, Any]] = {
        vm.name: {"ansible_host": str(vm.ip), "cluster_node": vm.cluster is not None,
                  "host_files": str(run_dir / "files" / vm.name),
                  **({"data_disk": mirrors[vm.name].data_disk}
                     if mirrors[vm.name].data_disk else {})}
        for vm in inventory.vms}
    assert spec.ssh.bootstrap_user and spec.ssh.remove_bootstrap_user, \
        "the playbook's second play removes the bootstrap user, as the lab spec asks"
    group_vars = {"admin_user": spec.ssh.user, "admin_group": spec.ssh.admin_group,
                  "bootstrap_user": spec.ssh.bootstrap_user,
                  "base_packages": list(spec.base_packages),
                  "rke2_modules": list(RKE2_MODULES),
                  "ansible_ssh_private_key_file": str(private_key)}
    (run_dir / "inventory.yml").write_text(
        yaml.safe_dump({"all": {"hosts": hosts, "vars": group_vars}}, sort_keys=False))
    template = jinja2.Template((ANSIBLE_DIR / "ansible.cfg.j2").read_text(),
                               undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    config = run_dir / "ansible.cfg"
    config.write_text(template.render(run_dir=run_dir, forks=len(hosts),
                                      known_hosts=run_dir / "known_hosts"))
    return config


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP of ansible-playbook's default output: host -> ok, changed, failed..."""
    names = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
    return {match[1]: dict(zip(names, map(int, match.groups()[1:]), strict=True))
            for match in RECAP_RE.finditer(output)}


def task_seconds(timed_log: str) -> dict[str, float]:
    """Seconds per task (from its start to the next one's), from Ansible's log_path, which
    stamps every line; tasks of the same name (facts in both plays) add up."""
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?\| "
                        r"(?:TASK|RUNNING HANDLER|PLAY RECAP|PLAY) \[?([^\]*]*)", timed_log, re.M)
    out: dict[str, float] = {}
    previous: tuple[float, str] | None = None
    for stamp, name in stamps:
        moment = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + \
            int(stamp[20:]) / 1000
        if previous is not None and previous[1] != name:
            out[previous[1]] = out.get(previous[1], 0.0) + moment - previous[0]
        if previous is None or previous[1] != name:
            previous = (moment, name.strip())
    return out


def changed_hosts(recap: dict[str, dict[str, int]]) -> int:
    return sum(1 for row in recap.values() if row["changed"])


def run_ansible(config: Path, log: Path, *extra: str,
                ) -> tuple[float, float, dict[str, dict[str, int]], dict[str, float]]:
    """ansible-playbook, timed from the command to its exit; (seconds, machine CPU seconds,
    recap, seconds per task)."""
    run_dir = config.parent
    timed = log.with_suffix(".timed.log")
    env = dict(os.environ, ANSIBLE_CONFIG=str(config), ANSIBLE_HOME=str(run_dir / "home"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOG_PATH=str(timed))
    env.pop("SSH_AUTH_SOCK", None)
    command = [str(Path(sys.executable).parent / "ansible-playbook"), str(PLAYBOOK), *extra]
    cpu = machine_cpu_seconds()
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                              cwd=run_dir, check=False)
    seconds = time.monotonic() - started
    cpu = machine_cpu_seconds() - cpu
    _stop_ssh_masters(run_dir / "cp")
    text = log.read_text()
    recap = parse_recap(text)
    if done.returncode != 0:
        # Each failed task with its host and message, then the recap.
        failures = "\n".join(line for line in text.splitlines()
                             if line.startswith(("fatal: ", "failed: ")))
        raise RuntimeError(f"ansible-playbook exited {done.returncode}:\n{failures[-6000:]}\n"
                           f"{text[text.rfind('PLAY RECAP'):]}")
    return seconds, cpu, recap, task_seconds(timed.read_text())


def _stop_ssh_masters(control_dir: Path) -> None:
    """Close ControlPersist masters, so that no run inherits the previous run's logins."""
    for socket in control_dir.iterdir():
        subprocess.run(["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "placeholder"],
                       capture_output=True, check=False, timeout=10)


# --- this project's phase 2 ------------------------------------------------------------------


def run_ours(spec_path: str) -> tuple[float, float, Any, list[dict[str, Any]]]:
    """The phase-2 flow, timed from the call to its return; (seconds, machine CPU seconds,
    PhaseResult, its table's rows)."""
    from flows.prepare import prepare_vms

    cpu = machine_cpu_seconds()
    started = time.monotonic()
    result = prepare_vms(spec_path=spec_path)
    seconds = time.monotonic() - started
    cpu = machine_cpu_seconds() - cpu
    return seconds, cpu, result, phase_table("phase-2-prepare-vms")


# --- the hosts ---------------------------------------------------------------------------------


def fresh_hosts(lab: Any, spec: PlatformSpec, spec_path: str, expected: int) -> None:
    """Delete every VM (and so its lab host and disk), then phase 1 again."""
    from flows.provision import provision_vms
    from tests.labkit import delete_all_vms

    delete_all_vms(lab, spec)
    created = provision_vms(spec_path=spec_path).created
    if created != expected:
        raise RuntimeError(f"phase 1 created {created} VMs, not {expected}")


def host_state(spec: PlatformSpec, inventory: Inventory, mirrors: dict[str, HostMirror],
               key: Path, known_hosts: Path) -> dict[str, dict[str, str]]:
    """Per host: sha256 of each compared file, and one digest of everything else observed
    (owners and modes, users, hostname, kernel settings, modules, services, live ruleset,
    /etc/fstab and the data disk's mount)."""
    from sizing.storage import DATA_MOUNT
    from tasks.prepare import HARDENING_SYSCTLS, RKE2_SYSCTLS

    home = f"/home/{spec.ssh.user}"
    keys = " ".join(sorted({k for k, _ in (*HARDENING_SYSCTLS, *RKE2_SYSCTLS)}
                           | {"net.ipv4.conf.all.rp_filter"}))

    def probe(name: str) -> dict[str, str]:
        vm = inventory.by_name(name)
        paths = sorted(p if p != "authorized_keys" else f"{home}/.ssh/authorized_keys"
                       for p in mirrors[name].files)
        listed = " ".join(paths)
        script = (
            f"cd / && sha256sum {listed} && stat -c '%n %U:%G %a' {listed} {home}/.ssh "
            "/etc/cloud/cloud.cfg.d && id platform && "
            f"{{ getent passwd {spec.ssh.bootstrap_user} || echo no bootstrap user; }} && "
            "{ test -e /etc/sudoers.d/90-cloud-init-users && echo bootstrap sudo left "
            "|| echo bootstrap sudo gone; }; hostname; cat /etc/hostname; "
            f"sysctl {keys} 2>&1; grep -c swap /etc/fstab; grep -v '^#' /etc/fstab; "
            f"findmnt -n -o TARGET,FSTYPE,LABEL {DATA_MOUNT} || echo no data disk mounted; "
            "lsmod | grep -E '^(overlay|br_netfilter) ' | cut -d' ' -f1 | sort; "
            "systemctl is-active chrony ssh nftables; systemctl is-enabled chrony ssh nftables;"
            " nft list ruleset | sha256sum")
        done = subprocess.run(
            ["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
             "-o", "ConnectTimeout=10", f"{spec.ssh.user}@{vm.ip}", "sudo -n sh -s"],
            input=script, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: reading its state failed: {done.stderr.strip()}")
        state = {"all": done.stdout}
        for line in done.stdout.splitlines():
            digest, _, path = line.partition("  ")
            if path in COMPARED:
                state[path] = digest
        return state

    with ThreadPoolExecutor(max_workers=len(inventory.vms)) as pool:
        names = [vm.name for vm in inventory.vms]
        return dict(zip(names, pool.map(probe, names), strict=True))


def compare(theirs: dict[str, dict[str, str]], ours: dict[str, dict[str, str]]) -> str:
    """`<file>=<hosts equal>/<hosts>` for each compared file, then `state=` for everything."""
    hosts = sorted(ours)
    parts = []
    for path in COMPARED:
        same = sum(1 for h in hosts if ours[h].get(path) and ours[h].get(path) ==
                   theirs[h].get(path))
        parts.append(f"{Path(path).name}={same}/{len(hosts)}")
    matching = [h for h in hosts if ours[h]["all"] == theirs[h]["all"]]
    parts.append(f"state_match={len(matching)}/{len(hosts)}")
    return " ".join(parts)


def state_differences(theirs: dict[str, dict[str, str]],
                      ours: dict[str, dict[str, str]]) -> list[str]:
    out = []
    for host in sorted(ours):
        a, b = theirs[host]["all"].splitlines(), ours[host]["all"].splitlines()
        for line in sorted(set(a) ^ set(b)):
            out.append(f"{host}: {'ansible' if line in a else 'ours'} only: {line}")
    return out


# --- the benchmark -------------------------------------------------------------------------------


def main() -> None:
    import ansible  # the dev extra's pinned ansible-core

    from sizing.inventory import build_inventory
    from tasks import host_keys
    from tasks.blocks import load_block
    from tasks.spec import read_spec
    from tests.labkit import lab_with_prefect

    if shutil.which("ssh") is None:
        raise RuntimeError("the OpenSSH client (ssh) is needed to run Ansible")
    spec_path = str(LAB_SPEC)
    spec = read_spec(spec_path)
    inventory = build_inventory(spec)
    count = len(inventory.vms)
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp, \
            lab_with_prefect(spec_path, vcsim_port=VCSIM_PORT) as lab:
        from blocks.ssh import SshIdentity

        key = lab.state_dir / "ssh" / "id_ed25519"
        admin_key = load_block(SshIdentity, spec.ssh.identity_block).public_key()
        # Before any host is made: refused when phase 2 has what the playbook lacks.
        mirrors = host_mirrors(spec, inventory, admin_key)
        run_dir = Path(tmp) / "ansible"
        known_hosts = run_dir / "known_hosts"

        # Round 1: Ansible on fresh hosts, then with nothing to change.
        fresh_hosts(lab, spec, spec_path, count)
        known = [f"{vm.ip} {host_keys.public_key(spec, vm)}" for vm in inventory.vms]
        config = write_ansible_project(run_dir, spec, inventory, mirrors, known, key)
        ansible_s, ansible_cpu, recap, tasks = run_ansible(config, run_dir / "first.log")
        rerun_ansible_s, rerun_ansible_cpu, rerecap, retasks = run_ansible(
            config, run_dir / "rerun.log", "-e", f"prepare_login={spec.ssh.user}")
        theirs = host_state(spec, inventory, mirrors, key, known_hosts)

        # Round 2: phase 2 on fresh hosts (same names, addresses and host keys).
        fresh_hosts(lab, spec, spec_path, count)
        ours_s, ours_cpu, result, table = run_ours(spec_path)
        rerun_ours_s, rerun_ours_cpu, again, retable = run_ours(spec_path)
        ours = host_state(spec, inventory, mirrors, key, known_hosts)

    print(f"BENCH prepare-vs-ansible hosts={count} ours_s={ours_s:.2f} "
          f"ansible_s={ansible_s:.2f} ratio={ours_s / ansible_s:.2f} "
          f"rerun_ours_s={rerun_ours_s:.2f} rerun_ansible_s={rerun_ansible_s:.2f} "
          f"rerun_ratio={rerun_ours_s / rerun_ansible_s:.2f}", flush=True)
    seconds = [float(row["seconds"]) for row in table if row["seconds"] is not None]
    reseconds = [float(row["seconds"]) for row in retable if row["seconds"] is not None]
    print("BENCH prepare-vs-ansible-detail "
          f"ansible_core={ansible.__version__} forks={count} "
          f"ansible_changed_hosts={changed_hosts(recap)} "
          f"ansible_changed_tasks={sum(r['changed'] for r in recap.values())} "
          f"ansible_rerun_changed_hosts={changed_hosts(rerecap)} "
          f"ansible_rerun_changed_tasks={sum(r['changed'] for r in rerecap.values())} "
          f"ours_changed_hosts={result.changed} "
          f"ours_changed_ops={sum(int(row['changed'] or 0) for row in table)} "
          f"ours_rerun_changed_hosts={again.changed} "
          f"ours_rerun_changed_ops={sum(int(row['changed'] or 0) for row in retable)} "
          f"ours_host_max_s={max(seconds):.2f} ours_host_sum_s={sum(seconds):.2f} "
          f"rerun_ours_host_max_s={max(reseconds):.2f} "
          f"ours_cpu_s={ours_cpu:.1f} ansible_cpu_s={ansible_cpu:.1f} "
          f"rerun_ours_cpu_s={rerun_ours_cpu:.1f} rerun_ansible_cpu_s={rerun_ansible_cpu:.1f} "
          f"ansible_facts_s={tasks.get('Gathering Facts', 0.0):.2f} "
          f"rerun_ansible_facts_s={retasks.get('Gathering Facts', 0.0):.2f} "
          f"ansible_packages_s={tasks.get('Base packages', 0.0):.2f} "
          + compare(theirs, ours), flush=True)
    for line in state_differences(theirs, ours)[:20]:
        print(f"BENCH prepare-vs-ansible-difference {line}", flush=True)


if __name__ == "__main__":
    main()
