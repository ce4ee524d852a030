"""Phase 2's work on one host: the admin user, static network, name, time, packages,
kernel settings and hardening, as host operations (tasks.hostops) applied in two round
trips, then the bootstrap login removed.

`host_operations` is pure: what a host should look like, computed from the spec and the
inventory. `prepare_host` is the task that makes it so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, cast

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.ssh import AuthenticationRefused, SshHostError, SshIdentity, SshNotListening
from sizing.firewall import forwards, input_rules
from sizing.inventory import VM, Inventory
from sizing.spec import PlatformSpec
from sizing.tiers import Role
from tasks import host_keys
from tasks.blocks import load_block
from tasks.hostops import (
    Command,
    ConnectionPool,
    DataDisk,
    Directory,
    File,
    Group,
    HostReport,
    HostSession,
    HostTarget,
    LineAbsent,
    Operation,
    Packages,
    Service,
    Sudoers,
    Sysctl,
    User,
    UserAbsent,
)
from tasks.retry import transient_only
from templates import render

Logger = logging.Logger | logging.LoggerAdapter[Any]

# Kernel hardening on every VM (CIS-style); the values RKE2 needs come on top for nodes.
HARDENING_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net.ipv4.conf.all.accept_redirects", "0"),
    ("net.ipv4.conf.default.accept_redirects", "0"),
    ("net.ipv4.conf.all.send_redirects", "0"),
    ("net.ipv4.conf.all.accept_source_route", "0"),
    ("net.ipv4.conf.all.log_martians", "1"),
    ("net.ipv4.icmp_echo_ignore_broadcasts", "1"),
    ("net.ipv4.tcp_syncookies", "1"),
    ("kernel.kptr_restrict", "2"),
    ("kernel.dmesg_restrict", "1"),
    ("kernel.unprivileged_bpf_disabled", "1"),
    ("fs.protected_hardlinks", "1"),
    ("fs.protected_symlinks", "1"),
    ("fs.suid_dumpable", "0"),
)
RKE2_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net.ipv4.ip_forward", "1"),
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.bridge.bridge-nf-call-ip6tables", "1"),
)
RKE2_MODULES = ("overlay", "br_netfilter")
# Service users that log in over SSH besides the admins: Gogs' `git` (phase 3, tasks.gogs)
# serves git over SSH to Argo CD's deploy key through a forced command.
SSH_SERVICE_GROUPS: dict[Role, tuple[str, ...]] = {Role.GITOPS: ("git",)}


def host_operations(spec: PlatformSpec, inventory: Inventory, vm: VM,
                    admin_key: str) -> list[Operation]:
    """Everything phase 2 ensures on one VM, in the order it is applied."""
    zone = spec.zones.get(vm.zone)
    ssh = spec.ssh
    ops: list[Operation] = []

    # The admin user, its key, and sudo for it alone.
    admin_group = Group(ssh.admin_group)
    ops += [admin_group,
            User(ssh.user, groups=(ssh.admin_group,), authorized_keys=[admin_key]),
            Sudoers("90-platform-admin", f"{ssh.user} ALL=(ALL:ALL) NOPASSWD: ALL\n")]

    ops.append(Packages(spec.base_packages))

    # The first data disk, if the VM has one: formatted once, mounted at /srv/data (by
    # label, nofail), where phase 3's services keep their state (sizing.storage).
    if len(vm.disks_gb) > 1:
        ops.append(DataDisk(vm.disks_gb[1]))

    # Name and resolution of every platform host.
    hostname = File("/etc/hostname", f"{vm.name}\n")
    ops += [hostname,
            Command(f"hostname {vm.name}", unless=f'test "$(hostname)" = {vm.name}',
                    name="set the hostname"),
            File("/etc/hosts", render("prepare/hosts.j2", hosts=inventory.vms))]

    # Static network; cloud-init no longer touches it after this.
    netplan = File("/etc/netplan/60-platform.yaml",
                   render("prepare/netplan.yaml.j2", vm=vm, zone=zone, domain=spec.domain),
                   mode="0600", validator="netplan generate")
    # cloud-init's first-boot file would merge with ours (addresses add up): ours replaces it.
    cloud_file = "/etc/netplan/50-cloud-init.yaml"
    drop_cloud = Command(f"rm -f {cloud_file}", unless=f"test ! -e {cloud_file}",
                         name="drop cloud-init's netplan file")
    ops += [Directory("/etc/cloud/cloud.cfg.d"),
            File("/etc/cloud/cloud.cfg.d/99-platform-network.cfg",
                 "# Managed by the platform orchestrator: the network is netplan's.\n"
                 "network: {config: disabled}\n"),
            netplan,
            drop_cloud,
            Command("netplan apply", on_change=[netplan, drop_cloud], name="apply the network")]

    chrony = File("/etc/chrony/chrony.conf", render("prepare/chrony.conf.j2", zone=zone))
    ops += [chrony, Service("chrony", restart_on=[chrony])]

    sysctls = list(HARDENING_SYSCTLS)
    if vm.cluster is not None:
        modules = File("/etc/modules-load.d/platform-rke2.conf",
                       "".join(f"{module}\n" for module in RKE2_MODULES))
        loaded = " && ".join(f"lsmod | grep -q '^{m} '" for m in RKE2_MODULES)
        ops += [Command("swapoff -a", unless='test -z "$(swapon --noheadings --show)"',
                        name="swap off"),
                LineAbsent("/etc/fstab", r"^[^#]\S*\s+\S+\s+swap\s"),
                modules,
                Command(" && ".join(f"modprobe {m}" for m in RKE2_MODULES), unless=loaded,
                        name="load the RKE2 kernel modules")]
        sysctls += list(RKE2_SYSCTLS)
    else:
        sysctls.append(("net.ipv4.conf.all.rp_filter", "1"))
    ops += [Sysctl(key, value) for key, value in sysctls]

    # SSH hardening: checked with the whole configuration before sshd reloads it.
    keep_bootstrap = ssh.bootstrap_user if ssh.bootstrap_user and \
        not ssh.remove_bootstrap_user else None
    sshd = File("/etc/ssh/sshd_config.d/50-platform-hardening.conf",
                render("prepare/sshd-hardening.conf.j2", admin_group=ssh.admin_group,
                       bootstrap_user=keep_bootstrap,
                       service_groups=SSH_SERVICE_GROUPS.get(vm.role, ())),
                validator="sshd -t")
    ops += [sshd, Service("ssh", reload_on=[sshd])]

    # The firewall last: only what the role needs, checked by nft before it loads.
    nft = File("/etc/nftables.conf",
               render("prepare/nftables.conf.j2", vm=vm, rules=input_rules(spec, inventory, vm),
                      forwards=forwards(vm)),
               mode="0700", validator="nft -c -f {path}")
    ops += [nft, Service("nftables", reload_on=[nft])]
    return ops


def bootstrap_removal(spec: PlatformSpec) -> list[Operation]:
    """Run as the admin user once the rest is in place."""
    user = spec.ssh.bootstrap_user
    if not user or not spec.ssh.remove_bootstrap_user:
        return []
    # Its SSH session has just been closed; sshd's processes for it may linger a moment.
    settle = (f"for i in $(seq 50); do pgrep -u {user} >/dev/null || exit 0; sleep 0.1; "
              f"done; echo 'processes of {user} still running' >&2; exit 1")
    return [Command(settle, unless=f"! pgrep -u {user} >/dev/null 2>&1",
                    name=f"wait for the sessions of {user} to end"),
            UserAbsent(user),
            Command("rm -f /etc/sudoers.d/90-cloud-init-users",
                    unless="test ! -e /etc/sudoers.d/90-cloud-init-users",
                    name="remove the bootstrap user's sudo rule")]


def ssh_pool(spec: PlatformSpec) -> ConnectionPool:
    """One SSH connection per host for the whole phase, with the spec's identity."""
    identity = cast(SshIdentity, load_block(SshIdentity, spec.ssh.identity_block))
    return ConnectionPool(identity)


def first_session(spec: PlatformSpec, pool: ConnectionPool, as_admin: HostTarget,
                  bootstrap: HostTarget, logger: Logger) -> tuple[HostSession, str]:
    """The admin's session, else (first run) the template's login; and who logged in.

    Phase 1 ends when a new VM reports its IP, and the VM's sshd starts moments later
    (after cloud-init's users and host keys): while the port refuses connections, wait,
    up to `hypervisor.boot_timeout`. Any other failure is raised at once.
    """
    deadline = time.monotonic() + spec.hypervisor.boot_timeout
    waited = False
    while True:
        try:
            try:
                return pool.session(as_admin), spec.ssh.user
            except AuthenticationRefused:
                if not spec.ssh.bootstrap_user:
                    raise
                # First run: only the template's login exists yet.
                return pool.session(bootstrap), spec.ssh.bootstrap_user
        except SshNotListening as error:
            if time.monotonic() > deadline:
                raise SshHostError(as_admin.label, "SSH connect",
                                   f"sshd did not accept connections within "
                                   f"{spec.hypervisor.boot_timeout} s ({error.cause})") from None
            if not waited:
                logger.info("%s: waiting for sshd (%s)", as_admin.label, error.cause)
                waited = True
            time.sleep(0.2)


@task(name="prepare-host", task_run_name="prepare-host-{vm_name}", retries=2,
      retry_delay_seconds=[5, 15], retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def prepare_host(spec: PlatformSpec, inventory: Inventory, vm_name: str,
                 pool: ConnectionPool) -> dict[str, object]:
    """Ensure one VM is prepared; returns its table row (changed and unchanged items)."""
    logger = get_run_logger()
    started = time.monotonic()
    vm = inventory.by_name(vm_name)
    as_admin = host_keys.admin_target(spec, vm)
    bootstrap = replace(as_admin, user=spec.ssh.bootstrap_user)
    admin_key = cast(SshIdentity, load_block(SshIdentity, spec.ssh.identity_block)).public_key()
    ops = host_operations(spec, inventory, vm, admin_key)
    reports: list[HostReport] = []
    session, login = first_session(spec, pool, as_admin, bootstrap, logger)
    reports.append(session.run(ops))
    cleanup = bootstrap_removal(spec)
    if cleanup:
        if login != spec.ssh.user:
            pool.drop(bootstrap)  # its user is about to go
        reports.append(pool.session(as_admin).run(cleanup))
    changed = [op for report in reports for op in report.changed]
    unchanged = [op for report in reports for op in report.unchanged]
    if changed:
        logger.info("%s: changed %s", vm.name, ", ".join(changed))
    return {"host": vm.name, "ip": str(vm.ip), "login": login,
            "action": "changed" if changed else "unchanged",
            "changed": len(changed), "unchanged": len(unchanged),
            "changed_items": ", ".join(changed),
            "seconds": round(time.monotonic() - started, 2)}
