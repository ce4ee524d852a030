"""Host operations without a host: the facts each operation asks for, the exact steps it
plans from given facts (none when they match), handlers, the scripts and their reports,
error quoting, secrets, and the SSH identity's key handling.

A few tests run the generated scripts with this machine's /bin/sh on a temporary
directory (`LocalSession`): the same scripts a host would get, no SSH involved.
"""

from __future__ import annotations

import base64
import getpass
import grp
import hashlib
import os
import pickle
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from pydantic import SecretStr

from blocks.ssh import (
    HostKeyMismatch,
    SshIdentity,
    fingerprint,
    parse_public_key,
    split_jump,
)
from tasks.hostops import (
    Command,
    DataDisk,
    Directory,
    File,
    Group,
    HostOpError,
    HostSession,
    Line,
    LineAbsent,
    Packages,
    PlanError,
    Service,
    Step,
    Sudoers,
    Sysctl,
    User,
    UserAbsent,
    plan_all,
)
from tasks.hostops import ops as ops_module
from tasks.hostops.facts import (
    BlockDevice,
    Facts,
    FileState,
    GroupState,
    Needs,
    ProbeError,
    ServiceState,
    UserState,
    parse_probe,
    probe_script,
)
from tasks.hostops.ops import Operation, Plan, PlanContext
from tasks.hostops.script import apply_script, parse_apply
from tasks.hostops.session import scrub

ROOT_FILE = FileState("file", "root", "root", 0o644, 6, hashlib.sha256(b"hello\n").hexdigest())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_state(content: bytes, *, owner: str = "root", group: str = "root",
               mode: int = 0o644) -> FileState:
    return FileState("file", owner, group, mode, len(content), sha(content), content)


def plan_one(op: Operation, facts: Facts, changed: set[str] | None = None) -> Plan:
    return op.plan(PlanContext(facts.copy(), changed=changed or set()))


def names(plan: Plan) -> list[str]:
    return [step.name for step in plan.steps]


# -- File ------------------------------------------------------------------------------


def test_file_absent_is_written_through_a_candidate() -> None:
    op = File("/etc/app/app.conf", "a=1\n", mode="0640", group="app")
    assert op.needs() == Needs(files={"/etc/app/app.conf"})
    plan = plan_one(op, Facts(files={"/etc/app/app.conf": None}))
    assert plan.changed and plan.detail == "created (4 bytes)"
    assert [(s.name, s.command) for s in plan.steps] == [
        ("write candidate", "[ -d /etc/app ] || mkdir -p -- /etc/app; rm -f -- "
                            "/etc/app/.app.conf.hostops-tmp; umask 077; "
                            "base64 -d > /etc/app/.app.conf.hostops-tmp"),
        ("set owner and mode", "chown root:app -- /etc/app/.app.conf.hostops-tmp && "
                               "chmod 0640 -- /etc/app/.app.conf.hostops-tmp"),
        ("replace", "mv -f -- /etc/app/.app.conf.hostops-tmp /etc/app/app.conf"),
    ]
    assert plan.steps[0].stdin == b"a=1\n"
    assert plan.cleanup == "rm -f -- /etc/app/.app.conf.hostops-tmp"


def test_file_with_validator_checks_the_candidate_and_backs_up_the_old_one() -> None:
    op = File("/etc/ssh/sshd_config.d/50-platform.conf", "PermitRootLogin no\n",
              validator="sshd -t -f {path}")
    facts = Facts(files={op.path: file_state(b"PermitRootLogin yes\n")})
    plan = plan_one(op, facts)
    tmp = "/etc/ssh/sshd_config.d/.50-platform.conf.hostops-tmp"
    assert names(plan) == ["write candidate", "set owner and mode", "validate", "backup",
                           "replace"]
    assert plan.steps[2].command == f"sshd -t -f {tmp}"
    backup = '/var/backups/hostops/etc/ssh/sshd_config.d/50-platform.conf."$HOSTOPS_TS"'
    assert plan.steps[3].command == (
        "mkdir -p -m 0700 /var/backups/hostops && "
        "mkdir -p -- /var/backups/hostops/etc/ssh/sshd_config.d && "
        f"{{ [ -e {backup} ] || cp -p -- /etc/ssh/sshd_config.d/50-platform.conf {backup}; }}")
    assert plan.detail == "content changed"
    assert "backup" not in names(plan_one(File(op.path, "x\n", backup=False), facts))


def test_validator_templates_quote_the_candidate() -> None:
    op = File("/etc/nftables.conf", "flush ruleset\n", validator="nft -c -f {path}")
    plan = plan_one(op, Facts(files={op.path: None}))
    assert "nft -c -f /etc/.nftables.conf.hostops-tmp" in plan.commands()
    odd = File("/etc/a b/c.conf", "x\n", validator="check {path} && check2 {path}")
    steps = plan_one(odd, Facts(files={odd.path: None})).steps
    assert steps[2].command == "check '/etc/a b/.c.conf.hostops-tmp' && " \
                               "check2 '/etc/a b/.c.conf.hostops-tmp'"


def test_validator_without_path_checks_in_place_and_rolls_back() -> None:
    op = File("/etc/netplan/60-platform.yaml", "network: {}\n", validator="netplan generate",
              mode="0600")
    existing = plan_one(op, Facts(files={op.path: file_state(b"old\n", mode=0o600)}))
    tmp = "/etc/netplan/.60-platform.yaml.hostops-tmp"
    assert names(existing) == ["write candidate", "set owner and mode", "backup",
                               "keep the live file for rollback", "replace",
                               "validate in place", "drop the rollback copy"]
    assert f"rm -f -- {tmp} {tmp}-old {tmp}-new; " in existing.steps[0].command  # stale ones
    assert existing.steps[3].command == f"ln -f -- /etc/netplan/60-platform.yaml {tmp}-old"
    assert existing.steps[5].command == "netplan generate"
    assert existing.cleanup == (f"rm -f -- {tmp}; if [ -e {tmp}-old ]; then mv -f -- {tmp}-old "
                                "/etc/netplan/60-platform.yaml; fi")
    new = plan_one(op, Facts(files={op.path: None}))
    assert names(new) == ["write candidate", "set owner and mode", "replace",
                          "validate in place", "drop the rollback marker"]
    assert new.steps[2].command == f"mv -f -- {tmp} /etc/netplan/60-platform.yaml && : > {tmp}-new"
    assert new.cleanup == (f"rm -f -- {tmp}; if [ -e {tmp}-new ]; then rm -f -- "
                           f"/etc/netplan/60-platform.yaml {tmp}-new; fi")


def test_file_matching_content_changes_only_attributes() -> None:
    op = File("/etc/x", "hello\n", owner="app", group="app", mode="0600")
    plan = plan_one(op, Facts(files={"/etc/x": ROOT_FILE}))
    assert [(s.name, s.command) for s in plan.steps] == [
        ("set owner", "chown app:app -- /etc/x"), ("set mode", "chmod 0600 -- /etc/x")]
    assert plan.detail == "owner root:root -> app:app, mode 0644 -> 0600"
    same = plan_one(File("/etc/x", "hello\n"), Facts(files={"/etc/x": ROOT_FILE}))
    assert not same.changed and same.steps == () and same.detail == "ok"


def test_file_refuses_a_directory_and_replaces_a_symlink() -> None:
    with pytest.raises(PlanError, match="/etc/x is a directory"):
        plan_one(File("/etc/x", "a"), Facts(files={"/etc/x": FileState("directory", "root",
                                                                         "root", 0o755)}))
    plan = plan_one(File("/etc/x", "a"), Facts(files={"/etc/x": FileState(
        "symlink", "root", "root", 0o777)}))
    assert plan.detail == "replaced a symlink with a file" and "backup" not in names(plan)


def test_secret_content_never_shows() -> None:
    op = File("/etc/app/token", "s3cr3t-token-value\n", mode="0600", secret=True)
    plan = plan_one(op, Facts(files={op.path: None}))
    rendered = " ".join(plan.commands()) + plan.detail + repr(op) + repr(plan.commands())
    assert "s3cr3t" not in rendered
    digest = sha(b"s3cr3t-token-value\n")
    assert plan.commands()[0].endswith(f"<<< [secret, 19 bytes, sha256 {digest}]")
    assert plan.secret == b"s3cr3t-token-value\n"
    said = "/etc/app/.token.hostops-tmp:1: syntax error near s3cr3t-token-value\n"
    assert scrub(said, plan.secret) == "/etc/app/.token.hostops-tmp:1: syntax error near " \
                                       "[secret]\n"


def test_paths_are_checked() -> None:
    for bad in ("relative", "/etc/x\n", "/etc/../x", "/etc/a\\b", "/etc/dir/"):
        with pytest.raises(ValueError, match="plain absolute path"):
            File(bad, "x")
    with pytest.raises(ValueError, match="file mode"):
        File("/etc/x", "x", mode="99999")


def test_directory() -> None:
    op = Directory("/srv/app", owner="app", mode="0750")
    assert plan_one(op, Facts(files={"/srv/app": None})).commands() == (
        "mkdir -p -- /srv/app && chown app:root -- /srv/app && chmod 0750 -- /srv/app",)
    there = FileState("directory", "app", "root", 0o750)
    assert not plan_one(op, Facts(files={"/srv/app": there})).changed
    with pytest.raises(PlanError, match="not a directory"):
        plan_one(op, Facts(files={"/srv/app": ROOT_FILE}))


# -- Line, LineAbsent ---------------------------------------------------------------------


def test_line_appends_replaces_and_dedupes() -> None:
    content = b"# sshd\nPermitRootLogin yes\nX11Forwarding no\nPermitRootLogin prohibit\n"
    facts = Facts(files={"/etc/ssh/sshd_config": file_state(content)})
    op = Line("/etc/ssh/sshd_config", "PermitRootLogin no", regexp=r"^#?PermitRootLogin\s")
    assert op.needs() == Needs(files={op.path}, contents={op.path})
    plan = plan_one(op, facts)
    assert plan.detail == "line 2 replaced, 1 duplicate(s) removed"
    write = next(s for s in plan.steps if s.name == "write candidate")
    assert write.stdin == b"# sshd\nPermitRootLogin no\nX11Forwarding no\n"
    guard = plan.steps[0]
    assert guard.name == "check unchanged since probe"
    assert guard.command.startswith('[ "$(sha256sum < /etc/ssh/sshd_config | cut -d" " -f1)" '
                                    f'= {sha(content)} ]')
    assert "backup" in names(plan)

    appended = plan_one(Line("/etc/ssh/sshd_config", "UseDNS no"), facts)
    assert appended.detail == "line appended"
    assert appended.steps[1].stdin == content + b"UseDNS no\n"

    done = Facts(files={"/etc/ssh/sshd_config": file_state(b"PermitRootLogin no\n")})
    assert not plan_one(op, done).changed
    assert not plan_one(Line("/etc/ssh/sshd_config", "PermitRootLogin no"), done).changed


def test_line_creates_a_missing_file_unless_told_not_to() -> None:
    op = Line("/etc/modules-load.d/platform.conf", "br_netfilter", mode="0600")
    plan = plan_one(op, Facts(files={op.path: None}))
    assert names(plan)[0] == "check unchanged since probe"
    assert plan.steps[0].command.startswith("[ ! -e /etc/modules-load.d/platform.conf ] ||")
    assert plan.steps[1].stdin == b"br_netfilter\n"
    assert "chmod 0600" in plan.steps[2].command
    absent = Line(op.path, "x", create=False)
    assert not plan_one(absent, Facts(files={op.path: None})).changed


def test_line_keeps_an_existing_files_owner_and_mode() -> None:
    facts = Facts(files={"/etc/x": file_state(b"a\n", owner="app", group="adm", mode=0o640)})
    plan = plan_one(Line("/etc/x", "b"), facts)
    assert "chown app:adm" in plan.steps[2].command and "chmod 0640" in plan.steps[2].command


def test_line_absent() -> None:
    facts = Facts(files={"/etc/fstab": file_state(b"/dev/a / ext4 0 1\n/swap none swap sw 0 0\n")})
    plan = plan_one(LineAbsent("/etc/fstab", r"\sswap\s"), facts)
    assert plan.detail == "1 line(s) removed"
    assert plan.steps[1].stdin == b"/dev/a / ext4 0 1\n"
    assert not plan_one(LineAbsent("/etc/fstab", "nothing"), facts).changed
    assert not plan_one(LineAbsent("/etc/none", "x"), Facts(files={"/etc/none": None})).changed


def test_two_edits_of_one_file_compose() -> None:
    facts = Facts(files={"/etc/sysctl.d/90-platform.conf": None},
                  sysctls={"net.ipv4.ip_forward": "0", "vm.swappiness": "60"})
    plans = plan_all([Sysctl("net.ipv4.ip_forward", 1), Sysctl("vm.swappiness", "10")], facts)
    writes = [s for p in plans for s in p.steps if s.name == "write candidate"]
    assert [w.stdin for w in writes] == [b"net.ipv4.ip_forward = 1\n",
                                         b"net.ipv4.ip_forward = 1\nvm.swappiness = 10\n"]
    guard = plans[1].steps[0].command
    assert sha(b"net.ipv4.ip_forward = 1\n") in guard  # what the first one will have written


# -- Sudoers, Packages, Group, User, UserAbsent ---------------------------------------------


def test_sudoers_is_checked_by_visudo() -> None:
    op = Sudoers("90-platform", "platform ALL=(ALL) NOPASSWD:ALL\n")
    assert op.id == "sudoers 90-platform" and op.path == "/etc/sudoers.d/90-platform"
    plan = plan_one(op, Facts(files={op.path: None}))
    assert plan.steps[1].command.endswith("chmod 0440 -- /etc/sudoers.d/.90-platform.hostops-tmp")
    assert plan.steps[2].command == "visudo -cf /etc/sudoers.d/.90-platform.hostops-tmp"
    for bad in ("90.platform", "x~", "a/b"):
        with pytest.raises(ValueError):
            Sudoers(bad, "")


def test_packages_install_only_the_missing_ones() -> None:
    op = Packages(["haproxy", "chrony", "haproxy"])
    assert op.needs() == Needs(packages={"haproxy", "chrony"})
    installed = Facts(packages={"haproxy": True, "chrony": True})
    assert not plan_one(op, installed).changed
    plan = plan_one(op, Facts(packages={"haproxy": True, "chrony": False}))
    assert plan.commands() == (
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
        "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold chrony",)
    assert plan.detail == "installed chrony"
    updated = plan_one(Packages(["chrony"], update=True), Facts(packages={"chrony": False}))
    assert names(updated) == ["apt-get update", "apt-get install"]
    with pytest.raises(ValueError):
        Packages(["bad name"])
    with pytest.raises(TypeError):
        Packages("haproxy")


def test_group_and_user_created_in_one_run() -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK admin@example"
    ops = [Group("platform-admins"), User("admin", groups=["platform-admins"],
                                          authorized_keys=[key])]
    facts = Facts(groups={"platform-admins": None}, users={"admin": None})
    group, user = plan_all(ops, facts)
    assert group.commands() == ("groupadd platform-admins",)
    assert [(s.name, s.command) for s in user.steps[:2]] == [
        ("useradd", "useradd -s /bin/bash -m -d /home/admin -G platform-admins admin"),
        ("~/.ssh", "mkdir -p -- /home/admin/.ssh && chown admin: -- /home/admin/.ssh && "
                   "chmod 0700 -- /home/admin/.ssh"),
    ]
    write = user.steps[2]
    assert write.stdin == f"{key}\n".encode()
    assert "chown admin: -- /home/admin/.ssh/.authorized_keys.hostops-tmp && chmod 0600" in \
        user.steps[3].command
    assert user.detail == "created, authorized_keys: 1 key(s)"
    with pytest.raises(PlanError, match="group platform-admins does not exist"):
        plan_all(ops[1:], Facts(groups={"platform-admins": None}, users={"admin": None}))


def test_system_user_joins_its_existing_group() -> None:
    ops = [Group("vault", system=True),
           User("vault", group="vault", system=True, shell="/usr/sbin/nologin",
                home="/var/lib/vault")]
    _, user = plan_all(ops, Facts(groups={"vault": GroupState("vault", 998)},
                                  users={"vault": None}))
    assert user.commands() == (
        "useradd -s /usr/sbin/nologin -m -d /var/lib/vault -g vault -r vault",)
    moved = plan_all(ops[1:], Facts(groups={"vault": GroupState("vault", 998)},
                                    users={"vault": UserState("vault", 997, 997,
                                                              "/var/lib/vault",
                                                              "/usr/sbin/nologin")}))[0]
    assert moved.commands() == ("usermod -g vault vault",)
    with pytest.raises(PlanError, match="group vault does not exist"):
        plan_all(ops[1:], Facts(groups={"vault": None}, users={"vault": None}))


def _admin(keys: bytes | None, *, shell: str = "/bin/bash") -> UserState:
    ssh_dir = FileState("directory", "admin", "admin", 0o700)
    keys_file = file_state(keys, owner="admin", group="admin", mode=0o600) \
        if keys is not None else None
    return UserState("admin", 1001, 1001, "/home/admin", shell, ssh_dir, keys_file)


def test_user_changes_only_the_difference() -> None:
    key = "ssh-ed25519 AAAAkey1 admin"
    groups: dict[str, GroupState | None] = {"sudo": GroupState("sudo", 27, ("other",)),
                                            "admin": GroupState("admin", 1001)}
    facts = Facts(users={"admin": _admin(f"{key}\n".encode())}, groups=groups)
    op = User("admin", groups=["sudo", "admin"], authorized_keys=[key])
    plan = plan_one(op, facts)
    assert plan.commands() == ("usermod -a -G sudo admin",)  # primary group admin counts
    assert plan.detail == "added to sudo"
    member = Facts(users={"admin": _admin(f"{key}\n".encode())},
                   groups={"sudo": GroupState("sudo", 27, ("admin",)),
                           "admin": GroupState("admin", 1001)})
    assert not plan_one(op, member).changed
    shell = plan_one(User("admin", shell="/bin/sh"), Facts(users={"admin": _admin(None)}))
    assert shell.commands() == ("usermod -s /bin/sh admin",)  # keys unmanaged: untouched


def test_authorized_keys_exclusive_or_added() -> None:
    old = b"ssh-rsa AAAAold someone\n"
    facts = Facts(users={"admin": _admin(old)})
    exclusive = plan_one(User("admin", authorized_keys=["ssh-ed25519 AAAAnew admin"]), facts)
    assert exclusive.steps[0].stdin == b"ssh-ed25519 AAAAnew admin\n"
    added = plan_one(User("admin", authorized_keys=["ssh-ed25519 AAAAnew admin"],
                          exclusive_keys=False), facts)
    assert added.steps[0].stdin == old + b"ssh-ed25519 AAAAnew admin\n"
    same_key_new_comment = plan_one(User("admin", authorized_keys=["ssh-rsa AAAAold other"],
                                         exclusive_keys=False), facts)
    assert not same_key_new_comment.changed
    with pytest.raises(TypeError):
        User("admin", authorized_keys="ssh-ed25519 AAAA")


def test_user_absent() -> None:
    op = UserAbsent("debian")
    assert not plan_one(op, Facts(users={"debian": None})).changed
    plan = plan_one(op, Facts(users={"debian": _admin(None)}))
    assert plan.commands() == ("userdel -r debian || { rc=$?; [ $rc -eq 12 ] || exit $rc; }",)


# -- Sysctl ------------------------------------------------------------------------------


def test_sysctl_runtime_and_persisted() -> None:
    op = Sysctl("net.ipv4.ip_forward", 1)
    persisted = "/etc/sysctl.d/90-platform.conf"
    assert op.needs() == Needs(files={persisted}, contents={persisted},
                               sysctls={"net.ipv4.ip_forward"})
    both = plan_one(op, Facts(files={persisted: None}, sysctls={"net.ipv4.ip_forward": "0"}))
    assert names(both)[-1] == "sysctl -w"
    assert both.steps[-1].command == "sysctl -q -w net.ipv4.ip_forward=1"
    assert both.detail == f"{persisted} line appended, runtime 0 -> 1"
    ok = Facts(files={persisted: file_state(b"net.ipv4.ip_forward = 1\n")},
               sysctls={"net.ipv4.ip_forward": "1"})
    assert not plan_one(op, ok).changed
    runtime_only = Facts(files={persisted: file_state(b"net.ipv4.ip_forward = 1\n")},
                         sysctls={"net.ipv4.ip_forward": "0"})
    assert plan_one(op, runtime_only).commands() == ("sysctl -q -w net.ipv4.ip_forward=1",)
    ranges = Sysctl("net.ipv4.ip_local_port_range", "1024   65000")
    assert not plan_one(ranges, Facts(
        files={persisted: file_state(b"net.ipv4.ip_local_port_range = 1024 65000\n")},
        sysctls={"net.ipv4.ip_local_port_range": "1024 65000"})).changed
    missing = plan_one(Sysctl("net.bridge.bridge-nf-call-iptables", 1), Facts(
        files={persisted: None}, sysctls={"net.bridge.bridge-nf-call-iptables": None}))
    assert "runtime (absent) -> 1" in missing.detail


# -- Service handlers, Command guards ------------------------------------------------------


def _service_facts(**states: ServiceState) -> Facts:
    return Facts(files={"/etc/app.conf": ROOT_FILE,
                        "/etc/systemd/system/app.service": ROOT_FILE},
                 services={f"{name}.service": state for name, state in states.items()})


RUNNING = ServiceState("loaded", "enabled", "active")


def test_service_restarts_only_when_its_config_changed() -> None:
    config = File("/etc/app.conf", "hello\n")
    service = Service("app", restart_on=[config])
    assert service.needs() == Needs(services={"app.service"})
    same = plan_all([config, service], _service_facts(app=RUNNING))
    assert [p.changed for p in same] == [False, False]
    changed = plan_all([File("/etc/app.conf", "v2\n"), service], _service_facts(app=RUNNING))
    assert changed[1].commands() == ("systemctl restart app.service",)
    assert changed[1].detail == "restarted (file /etc/app.conf changed)"


def test_service_reloads_and_restart_wins() -> None:
    config = File("/etc/app.conf", "v2\n")
    unit_file = File("/etc/systemd/system/app.service", "[Service]\n")
    reload_only = plan_all([config, Service("app", reload_on=[config])],
                           _service_facts(app=RUNNING))
    assert reload_only[1].commands() == ("systemctl reload app.service",)
    both = plan_all([config, unit_file,
                     Service("app", restart_on=[unit_file], reload_on=[config])],
                    _service_facts(app=RUNNING))
    assert both[2].commands() == ("systemctl daemon-reload", "systemctl restart app.service")


def test_service_started_now_is_not_restarted_again() -> None:
    config = File("/etc/app.conf", "v2\n")
    plans = plan_all([config, Service("app", restart_on=[config])],
                     _service_facts(app=ServiceState("loaded", "disabled", "inactive")))
    assert plans[1].commands() == ("systemctl enable --now app.service",)
    assert plans[1].detail == "enabled and started"
    started = plan_all([config, Service("app", restart_on=[config])],
                       _service_facts(app=ServiceState("loaded", "enabled", "failed")))
    assert started[1].commands() == ("systemctl start app.service",)


def test_service_enable_stop_disable_and_unknown_units() -> None:
    facts = _service_facts(app=RUNNING)
    assert plan_one(Service("app", enabled=False, running=False), facts).commands() == (
        "systemctl disable app.service", "systemctl stop app.service")
    assert not plan_one(Service("app", enabled=None, running=None), facts).changed
    static = _service_facts(app=ServiceState("loaded", "static", "active"))
    assert not plan_one(Service("app"), static).changed
    unknown = _service_facts(app=ServiceState("not-found", "", "inactive"))
    assert plan_one(Service("app"), unknown).commands() == ("systemctl enable --now app.service",)
    assert Service("chrony.timer").unit == "chrony.timer"


def test_daemon_reload_once_after_unit_files_change() -> None:
    unit_file = File("/etc/systemd/system/app.service", "[Service]\nExecStart=/bin/true\n")
    plans = plan_all([unit_file, Service("app"), Service("other")],
                     _service_facts(app=RUNNING, other=RUNNING))
    assert plans[1].commands() == ("systemctl daemon-reload",)
    assert plans[1].detail == "units reloaded"
    assert not plans[2].changed


def test_handlers_must_refer_to_earlier_operations() -> None:
    config = File("/etc/app.conf", "x")
    with pytest.raises(ValueError, match="not an operation listed before it"):
        plan_all([Service("app", restart_on=[config]), config], _service_facts(app=RUNNING))
    with pytest.raises(ValueError, match="two operations with the id"):
        plan_all([config, File("/etc/app.conf", "y")], _service_facts())


def test_command_guards() -> None:
    with pytest.raises(ValueError, match="needs a guard"):
        Command("netplan apply")
    unless = Command("modprobe br_netfilter", unless="grep -q ^br_netfilter /proc/modules")
    assert unless.needs() == Needs(checks={"grep -q ^br_netfilter /proc/modules"})
    assert not plan_one(unless, Facts(checks={"grep -q ^br_netfilter /proc/modules": True})).changed
    ran = plan_one(unless, Facts(checks={"grep -q ^br_netfilter /proc/modules": False}))
    assert ran.commands() == ("modprobe br_netfilter",) and ran.detail == "ran (check failed)"
    creates = Command("make-ca", creates="/etc/ca.pem")
    assert not plan_one(creates, Facts(files={"/etc/ca.pem": ROOT_FILE})).changed
    assert plan_one(creates, Facts(files={"/etc/ca.pem": None})).changed
    netplan = File("/etc/netplan/60.yaml", "network: {}\n")
    apply = Command("netplan apply", on_change=[netplan])
    assert not plan_all([netplan, apply], Facts(files={netplan.path: file_state(
        b"network: {}\n")}))[1].changed
    plans = plan_all([netplan, apply], Facts(files={netplan.path: None}))
    assert plans[1].detail == "ran (file /etc/netplan/60.yaml changed)"


# -- facts: the probe script and its report ---------------------------------------------------


def test_probe_script_batches_per_kind() -> None:
    needs = Needs.union(op.needs() for op in [
        File("/etc/b", "x"), File("/etc/a", "y"), Line("/etc/c", "z"),
        Packages(["haproxy", "chrony"]), User("admin", groups=["sudo"]), Service("ssh"),
        Service("haproxy"), Sysctl("net.ipv4.ip_forward", 1), Command("x", unless="test -e /x"),
    ])
    script = probe_script(needs)
    assert script.startswith("{\nexec </dev/null\n") and script.endswith("exit 0\n}\n")
    assert "stat --printf='%n\\t%F\\t%U\\t%G\\t%a\\t%s\\n' -- /etc/a /etc/b /etc/c " \
           "/etc/sysctl.d/90-platform.conf 2>/dev/null" in script
    assert script.count("stat --printf=") == 2  # files, and each user's ~/.ssh
    assert script.count("dpkg-query") == 1 and "-- chrony haproxy" in script
    assert "systemctl show -p Id -p LoadState -p UnitFileState -p ActiveState -- " \
           "haproxy.service ssh.service" in script
    assert "sysctl -- net.ipv4.ip_forward" in script
    assert "getent passwd admin" in script and "getent group sudo" in script
    assert "if ( test -e /x\n) >/dev/null 2>&1" in script
    assert probe_script(Needs()).count("\n") == 6  # nothing asked, nothing probed


def _report(*lines: str) -> str:
    return "\n".join([*lines, "hostops\tend-probe", ""])


def test_parse_probe() -> None:
    needs = Needs(files={"/etc/a", "/etc/missing", "/etc/d"}, contents={"/etc/c"},
                  packages={"haproxy", "gone", "never"}, users={"admin", "ghost"},
                  groups={"sudo", "nogroup-here"}, services={"ssh.service", "nope.service"},
                  sysctls={"net.ipv4.ip_forward", "kernel.nope"}, checks={"true", "false"})
    keys = base64.b64encode(b"ssh-ed25519 AAAA admin\n").decode()
    output = _report(
        "noise from a login script",
        "hostops\tbegin\tstat",
        "/etc/a\tregular file\troot\troot\t644\t6",
        "/etc/c\tregular empty file\tapp\tadm\t640\t0",
        "/etc/d\tdirectory\troot\troot\t755\t4096",
        "hostops\tend\tstat",
        "hostops\tbegin\tsha256",
        f"{sha(b'hello' + bytes([10]))}  /etc/a",
        f"{sha(b'')}  /etc/c",
        "hostops\tend\tsha256",
        "hostops\tcontent\t/etc/c\t",
        "hostops\tbegin\tpackages",
        "haproxy\tii ", "gone\trc ",
        "hostops\tend\tpackages",
        "hostops\tpasswd\tadmin\t1001\t1001\t/home/admin\t/bin/bash",
        "hostops\tustat\tadmin\t/home/admin/.ssh\tdirectory\tadmin\tadmin\t700\t4096",
        "hostops\tustat\tadmin\t/home/admin/.ssh/authorized_keys\tregular file\tadmin\tadmin"
        "\t600\t23",
        f"hostops\tkeys\tadmin\t{keys}",
        "hostops\tbegin\tgroup", "sudo:x:27:admin,other", "hostops\tend\tgroup",
        "hostops\tbegin\tservices",
        "Id=nope.service", "LoadState=not-found", "ActiveState=inactive", "UnitFileState=",
        "", "Id=ssh.service", "LoadState=loaded", "ActiveState=active", "UnitFileState=enabled",
        "hostops\tend\tservices",
        "hostops\tbegin\tsysctl", "net.ipv4.ip_forward = 1", "hostops\tend\tsysctl",
        "hostops\tcheck\t0\t1", "hostops\tcheck\t1\t0",
    )
    facts = parse_probe(output, needs)
    assert facts.files == {
        "/etc/a": FileState("file", "root", "root", 0o644, 6, sha(b"hello\n")),
        "/etc/c": FileState("file", "app", "adm", 0o640, 0, sha(b""), b""),
        "/etc/d": FileState("directory", "root", "root", 0o755, 4096),
        "/etc/missing": None,
    }
    assert facts.packages == {"haproxy": True, "gone": False, "never": False}
    admin = facts.users["admin"]
    assert admin is not None and admin.home == "/home/admin" and admin.gid == 1001
    assert admin.keys_file is not None and admin.keys_file.content == b"ssh-ed25519 AAAA admin\n"
    assert admin.ssh_dir == FileState("directory", "admin", "admin", 0o700, 4096)
    assert facts.users["ghost"] is None
    assert facts.groups == {"sudo": GroupState("sudo", 27, ("admin", "other")),
                            "nogroup-here": None}
    assert facts.services == {"nope.service": ServiceState("not-found", "", "inactive"),
                              "ssh.service": ServiceState("loaded", "enabled", "active")}
    assert facts.sysctls == {"net.ipv4.ip_forward": "1", "kernel.nope": None}
    assert facts.checks == {"false": False, "true": True}  # sorted: false=0, true=1


def test_parse_probe_refuses_incomplete_reports() -> None:
    with pytest.raises(ProbeError, match="incomplete"):
        parse_probe("hostops\tbegin\tstat\n", Needs(files={"/x"}))
    with pytest.raises(ProbeError, match="systemctl show answered 1 units for 2"):
        parse_probe(_report("hostops\tbegin\tservices", "Id=a.service", "LoadState=loaded",
                            "hostops\tend\tservices"),
                    Needs(services={"a.service", "b.service"}))


# -- the apply script and its report ----------------------------------------------------------


def test_apply_script_runs_changed_operations_only() -> None:
    plans = [Plan("file /etc/ok"),
             Plan("file /etc/x", (Step("write candidate", "base64 -d > /etc/.x", b"hi\n"),
                                  Step("replace", "mv -f -- /etc/.x /etc/x")),
                  "created", "rm -f -- /etc/.x"),
             Plan("service x", (Step("restart", "systemctl restart x.service"),))]
    script = apply_script(plans)
    assert "# 0:" not in script and "# 1: file /etc/x\n" in script
    assert "_c='rm -f -- /etc/.x'\n" in script
    assert ("_o=$( { base64 -d > /etc/.x\n} 2>&1 <<'HOSTOPS_DATA'\naGkK\nHOSTOPS_DATA\n) "
            "|| _fail 1 0 $?\n") in script
    assert "_o=$( { mv -f -- /etc/.x /etc/x\n} 2>&1 ) || _fail 1 1 $?\n" in script
    assert "printf 'hostops\\tdone\\t1\\n'" in script and "done\\t0" not in script
    assert "_c=''\n_o=$( { systemctl restart x.service\n} 2>&1 ) || _fail 2 0 $?" in script


def test_parse_apply() -> None:
    said = base64.b64encode(b"line 2: Bad configuration option: Foo\n").decode()
    report = parse_apply(f"hostops\tdone\t1\nhostops\tfail\t3\t2\t255\t{said}\n"
                         "hostops\tend-apply\n")
    assert report.done == (1,) and report.complete
    assert report.failure is not None and (report.failure.op_index, report.failure.step_index,
                                           report.failure.status) == (3, 2, 255)
    assert report.failure.output == "line 2: Bad configuration option: Foo\n"
    assert not parse_apply("hostops\tdone\t1\n").complete


# -- sessions, run against this machine's /bin/sh ---------------------------------------------


class LocalSession(HostSession):
    """A HostSession whose scripts run here, under /bin/sh, instead of over SSH."""

    def __init__(self, host: str = "local-test") -> None:
        super().__init__(SimpleNamespace(host=host, user="root"), host=host)
        self.scripts: list[str] = []
        self.fake: tuple[int, str, str] | None = None

    def execute(self, script: str, *, step: str) -> tuple[int, str, str]:
        self.round_trips += 1
        self.scripts.append(script)
        if self.fake is not None:
            return self.fake
        proc = subprocess.run(["/bin/sh", "-s"], input=script, capture_output=True, text=True,
                              timeout=60)
        return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def me(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Owner names that chown accepts without root, and backups kept in tmp_path."""
    monkeypatch.setattr(ops_module, "BACKUP_DIR", str(tmp_path / "backups"))
    return {"owner": getpass.getuser(), "group": grp.getgrgid(os.getgid()).gr_name}


def test_local_run_changes_then_reports_nothing(tmp_path: Path, me: dict[str, Any]) -> None:
    ops = [Directory(f"{tmp_path}/etc", **me, mode="0750"),
           File(f"{tmp_path}/etc/app.conf", "a = 1\n", **me, mode="0600"),
           Line(f"{tmp_path}/etc/lines.conf", "b = 2", regexp=r"^b\s*=", **me),
           Command(f"touch {tmp_path}/marker", creates=f"{tmp_path}/marker"),
           Command(f"echo ran >> {tmp_path}/handler", on_change=[f"file {tmp_path}/etc/app.conf"])]
    session = LocalSession()
    first = session.run(ops)
    assert first.changed == [op.id for op in ops] and first.round_trips == 2
    assert (tmp_path / "etc/app.conf").read_text() == "a = 1\n"
    assert oct((tmp_path / "etc/app.conf").stat().st_mode & 0o7777) == "0o600"
    assert (tmp_path / "handler").read_text() == "ran\n"
    second = session.run(ops)
    assert second.changed == [] and second.round_trips == 1
    assert not (tmp_path / "backups").exists()

    (tmp_path / "etc/app.conf").write_text("edited by hand\n")
    (tmp_path / "etc/lines.conf").write_text("b = 3\nc = 4\n")
    third = session.run(ops)
    assert third.changed == [ops[1].id, ops[2].id, ops[4].id]
    assert (tmp_path / "etc/lines.conf").read_text() == "b = 2\nc = 4\n"
    backups = sorted(p.name for p in (tmp_path / "backups" / str(tmp_path)[1:] / "etc").iterdir())
    assert [name.split(".conf.")[0] for name in backups] == ["app", "lines"]
    assert not list((tmp_path / "etc").glob(".*hostops-tmp*"))


def test_local_dry_run_changes_nothing(tmp_path: Path, me: dict[str, Any]) -> None:
    session = LocalSession()
    report = session.run([File(f"{tmp_path}/x", "x\n", **me)], dry_run=True)
    assert report.dry_run and report.changed == [f"file {tmp_path}/x"]
    assert report.results[0].commands[-1] == f"mv -f -- {tmp_path}/.x.hostops-tmp {tmp_path}/x"
    assert report.round_trips == 1 and not (tmp_path / "x").exists()


def test_local_validator_failure_leaves_the_live_file(tmp_path: Path,
                                                      me: dict[str, Any]) -> None:
    live = tmp_path / "app.conf"
    live.write_text("good\n")
    session = LocalSession("app-01")
    ops = [File(f"{tmp_path}/first", "1\n", **me),
           File(str(live), "bad\n", **me,
                validator="grep -q good {path} || { echo \"{path}: line 1: not good\"; exit 3; }"),
           File(f"{tmp_path}/after", "2\n", **me)]
    with pytest.raises(HostOpError) as caught:
        session.run(ops)
    error = caught.value
    assert error.host == "app-01" and error.step == f"file {live}: validate"
    assert f"{tmp_path}/.app.conf.hostops-tmp: line 1: not good" in error.cause
    assert "exit 3" in error.cause and "the live file is untouched" in error.cause
    assert str(error).startswith(f"app-01: file {live}: validate failed: ")
    assert live.read_text() == "good\n"
    assert not (tmp_path / ".app.conf.hostops-tmp").exists()  # cleaned up
    assert not (tmp_path / "after").exists()
    assert [(r.op, r.changed, r.detail) for r in error.results] == [
        (f"file {tmp_path}/first", True, "created (2 bytes)"),
        (f"file {live}", False, "failed at validate"),
        (f"file {tmp_path}/after", False, "not run (an earlier step failed)")]
    assert pickle.loads(pickle.dumps(error)).results == error.results


def test_local_in_place_validator_puts_the_old_file_back(tmp_path: Path,
                                                         me: dict[str, Any]) -> None:
    live = tmp_path / "net.yaml"
    live.write_text("good\n")
    check = f"grep -q good {live}"
    with pytest.raises(HostOpError, match="the previous file was put back"):
        LocalSession().run([File(str(live), "bad\n", **me, validator=check)])
    assert live.read_text() == "good\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backups", "net.yaml"]
    new = tmp_path / "new.yaml"
    with pytest.raises(HostOpError):
        LocalSession().run([File(str(new), "bad\n", **me, validator=f"grep -q good {new}")])
    assert not new.exists()
    LocalSession().run([File(str(live), "good too\n", **me, validator=check)])
    assert live.read_text() == "good too\n"
    assert not list(tmp_path.glob(".*"))


def test_local_line_refuses_a_file_changed_since_the_probe(tmp_path: Path,
                                                           me: dict[str, Any]) -> None:
    path = tmp_path / "x.conf"
    path.write_text("a\n")
    session = LocalSession()
    plans = session.plan([Line(str(path), "b")])
    path.write_text("changed meanwhile\n")
    with pytest.raises(HostOpError, match="changed since it was probed"):
        session._apply(plans)
    assert path.read_text() == "changed meanwhile\n"
    # A file that appears meanwhile is not the in-place rollback's to remove.
    new = tmp_path / "new.conf"
    plans = session.plan([Line(str(new), "b", validator=f"grep -q b {new}")])
    new.write_text("someone else's\n")
    with pytest.raises(HostOpError, match="appeared since it was probed"):
        session._apply(plans)
    assert new.read_text() == "someone else's\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.conf", "x.conf"]


def test_errors_name_disk_full_sudo_and_broken_scripts(tmp_path: Path) -> None:
    session = LocalSession("db-01")
    said = base64.b64encode(b"base64: write error: No space left on device\n").decode()
    session.fake = (1, f"hostops\tfail\t0\t0\t1\t{said}\nhostops\tend-apply\n", "")
    session.execute = _after_probe(session)  # type: ignore[method-assign]
    with pytest.raises(HostOpError) as caught:
        session.run([File(f"{tmp_path}/big", "x" * 100, secret=True)])
    assert caught.value.disk_full and caught.value.step == f"file {tmp_path}/big: write candidate"
    assert caught.value.cause.startswith("disk full (No space left on device): ")
    assert "xxxxxxxx" not in str(caught.value)

    sudo = LocalSession("db-02")
    sudo.fake = (1, "", "sudo: a password is required\n")
    with pytest.raises(HostOpError) as caught:
        sudo.run([File(f"{tmp_path}/x", "x")])
    assert (caught.value.host, caught.value.step) == ("db-02", "sudo")
    assert "sudo: a password is required" in caught.value.cause

    broken = LocalSession("db-03")
    broken.fake = (137, "hostops\tbegin\tstat\n", "Killed")
    with pytest.raises(HostOpError, match=r"db-03: probe failed: .*incomplete.*exit 137.*Killed"):
        broken.run([File(f"{tmp_path}/x", "x")])


def _after_probe(session: LocalSession) -> Any:
    """Run the probe for real, then answer the apply with the session's fake output."""
    fake = session.fake
    session.fake = None
    real = LocalSession.execute

    def execute(script: str, *, step: str) -> tuple[int, str, str]:
        if step == "apply":
            session.fake = fake
        return real(session, script, step=step)
    return execute


def test_plan_errors_name_the_host(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(HostOpError, match=f"local-test: plan failed: {tmp_path}/d is a directory"):
        LocalSession().run([File(f"{tmp_path}/d", "x")])


# -- the SSH identity ----------------------------------------------------------------------


def _ed25519(passphrase: bytes | None = None) -> tuple[str, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                encryption).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public


def test_identity_loads_ed25519_rsa_and_passphrases() -> None:
    private, public = _ed25519()
    identity = SshIdentity(user="platform", private_key=SecretStr(private))
    assert identity.pkey().get_name() == "ssh-ed25519"
    assert identity.public_key() == public
    locked, locked_public = _ed25519(b"correct horse")
    with_pass = SshIdentity(user="platform", private_key=SecretStr(locked),
                            passphrase=SecretStr("correct horse"))
    assert with_pass.public_key() == locked_public and with_pass.pkey().can_sign()
    with pytest.raises(ValueError, match="platform: the private key cannot be read"):
        SshIdentity(user="platform", private_key=SecretStr(locked)).pkey()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for fmt in (serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.PrivateFormat.OpenSSH):
        text = rsa_key.private_bytes(serialization.Encoding.PEM, fmt,
                                     serialization.NoEncryption()).decode()
        assert SshIdentity(user="u", private_key=SecretStr(text)).pkey().get_name() == "ssh-rsa"
    assert "PRIVATE" not in repr(identity)


def test_fingerprints_match_ssh_keygen(tmp_path: Path) -> None:
    _, public = _ed25519()
    key = parse_public_key(f"10.0.0.5 {public}")  # a known_hosts line works too
    (tmp_path / "k.pub").write_text(public + "\n")
    proc = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], capture_output=True,
                          text=True, check=False)
    if proc.returncode == 0:
        assert fingerprint(key) == f"ssh-ed25519 {proc.stdout.split()[1]}"
    assert fingerprint(key).startswith("ssh-ed25519 SHA256:")
    with pytest.raises(ValueError, match="not an OpenSSH public key"):
        parse_public_key("hello")


def test_host_key_mismatch_names_the_host_and_both_fingerprints() -> None:
    error = HostKeyMismatch("10.0.0.5", "ssh-ed25519 SHA256:got", ["ssh-ed25519 SHA256:want"])
    assert str(error) == ("10.0.0.5: host key verification failed: the host presented "
                          "ssh-ed25519 SHA256:got, expected ssh-ed25519 SHA256:want; connection "
                          "refused (a changed or unknown host key)")
    assert "expected none" in str(HostKeyMismatch("h", "x", []))
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_connection_trusts_only_the_given_keys() -> None:
    private, _ = _ed25519()
    _, host_public = _ed25519()
    identity = SshIdentity(user="platform", private_key=SecretStr(private), connect_timeout=3)
    connection = identity.connection("10.0.0.5", [host_public], port=2222)
    client = connection.client
    assert list(client.get_host_keys().keys()) == ["[10.0.0.5]:2222"]
    assert len(client._system_host_keys.keys()) == 0
    assert connection.connect_kwargs["look_for_keys"] is False
    assert connection.connect_kwargs["allow_agent"] is False
    assert connection.connect_timeout == 3 and connection.user == "platform"
    with pytest.raises(HostKeyMismatch, match=r"10\.0\.0\.5: .*presented ssh-ed25519 SHA256:") \
            as caught:
        client._policy.missing_host_key(client, "[10.0.0.5]:2222", parse_public_key(host_public))
    assert caught.value.host == "10.0.0.5"
    assert caught.value.expected == (fingerprint(parse_public_key(host_public)),)


def test_split_jump() -> None:
    assert split_jump("ops@bastion.example:2222") == ("ops", "bastion.example", 2222)
    assert split_jump("bastion") == (None, "bastion", 22)


def test_require_all_lists_every_failed_host() -> None:
    from tasks.hostops import HostReport, HostsFailed, HostUnreachable, require_all

    ok = HostReport("app-01", (), False, 0.1, 1)
    assert require_all({"app-01": ok}) == {"app-01": ok}
    with pytest.raises(HostsFailed) as caught:
        require_all({"app-01": ok,
                     "db-01": HostOpError("db-01", "file /etc/x: validate", "bad"),
                     "lb-01": HostUnreachable("lb-01", "SSH connect", "no route")})
    assert str(caught.value) == ("2 host(s) failed:\n- db-01: file /etc/x: validate failed: bad\n"
                                 "- lb-01: SSH connect failed: no route")
    assert sorted(caught.value.errors) == ["db-01", "lb-01"]


# -- DataDisk ---------------------------------------------------------------------------------

GIB = 2**30
FSTAB = b"# /etc/fstab\nUUID=abc / ext4 errors=remount-ro 0 1\n"
OS_DISK = BlockDevice("sda", "/dev/sda", 40 * GIB, "disk", children=(
    BlockDevice("sda1", "/dev/sda1", 40 * GIB - 2**20, "part", "ext4", None, "/"),))


def _disk_facts(*devices: BlockDevice, fstab: bytes = FSTAB, empty: bool = True) -> Facts:
    op = DataDisk(20)
    return Facts(files={"/etc/fstab": file_state(fstab)}, block_devices=(OS_DISK, *devices),
                 checks={op.empty_check: empty})


def test_data_disk_probes_lsblk_once_with_the_other_facts() -> None:
    needs = Needs.union(op.needs() for op in [DataDisk(20), File("/etc/a", "x")])
    script = probe_script(needs)
    assert needs.block_devices and script.count("lsblk -J -b -o "
                                                "NAME,PATH,SIZE,TYPE,FSTYPE,LABEL,MOUNTPOINT") == 1
    assert "lsblk" not in probe_script(Needs(files={"/etc/a"}))
    lsblk = ('{"blockdevices": [{"name": "sda", "path": "/dev/sda", "size": 42949672960, '
             '"type": "disk", "fstype": null, "label": null, "mountpoint": null, "children": ['
             '{"name": "sda1", "path": "/dev/sda1", "size": "42948624384", "type": "part", '
             '"fstype": "ext4", "label": "", "mountpoint": "/"}]},'
             '{"name": "sdb", "path": "/dev/sdb", "size": 21474836480, "type": "disk", '
             '"fstype": "ext4", "label": "platform-data", "mountpoints": [null, "/srv/data"]}]}')
    facts = parse_probe(_report("hostops\tbegin\tlsblk", *lsblk.replace("},", "},\n").split("\n"),
                                "hostops\tend\tlsblk"), Needs(block_devices=True))
    assert facts.block_devices is not None
    sda, sdb = facts.block_devices
    assert sda.children[0] == BlockDevice("sda1", "/dev/sda1", 42948624384, "part", "ext4",
                                          None, "/")
    assert sdb == BlockDevice("sdb", "/dev/sdb", 20 * GIB, "disk", "ext4", "platform-data",
                              "/srv/data")
    with pytest.raises(ProbeError, match="unreadable lsblk output"):
        parse_probe(_report("hostops\tbegin\tlsblk", "lsblk: command not found",
                            "hostops\tend\tlsblk"), Needs(block_devices=True))


def test_data_disk_formats_the_one_empty_disk_of_the_size() -> None:
    empty = BlockDevice("sdb", "/dev/sdb", 20 * GIB, "disk")
    other = BlockDevice("sdc", "/dev/sdc", 30 * GIB, "disk")
    plan = plan_one(DataDisk(20), _disk_facts(empty, other))
    assert names(plan)[0] == "format" and names(plan)[-1] == "mount"
    fmt = plan.steps[0].command
    assert fmt.endswith("mkfs.ext4 -q -L platform-data /dev/sdb")
    # Re-checked on the host in the same step, before mkfs.
    for check in ("[ -b /dev/sdb ]", "blockdev --getsize64 /dev/sdb", f'= {20 * GIB} ]',
                  "wipefs -n /dev/sdb", "blkid -p /dev/sdb", "findmnt -rn -S /dev/sdb"):
        assert check in fmt.split("mkfs")[0], check
    line = next(step for step in plan.steps if step.stdin is not None)
    assert line.stdin == FSTAB + b"LABEL=platform-data /srv/data ext4 defaults,nofail 0 2\n"
    assert names(plan)[-2:] == ["daemon-reload", "mount"]
    assert "mount -t ext4 -o defaults,nofail -- /dev/sdb /srv/data" in plan.steps[-1].command
    assert "! mountpoint -q -- /srv/data" in plan.steps[-1].command
    assert plan.detail == ("/dev/sdb formatted ext4 platform-data, /etc/fstab line appended, "
                           "mounted at /srv/data")


def test_data_disk_refuses_every_doubtful_disk_and_names_them() -> None:
    refused = [
        BlockDevice("sdb", "/dev/sdb", 20 * GIB, "disk", "xfs", "backup"),
        BlockDevice("sdc", "/dev/sdc", 20 * GIB, "disk", children=(
            BlockDevice("sdc1", "/dev/sdc1", 20 * GIB - 2**20, "part"),)),
        BlockDevice("sdd", "/dev/sdd", 20 * GIB, "disk", mountpoint="/mnt"),
        BlockDevice("sde", "/dev/sde", 21 * GIB, "disk"),
        BlockDevice("sdf", "/dev/sdf", 20 * GIB - 512, "disk"),
        BlockDevice("loop0", "/dev/loop0", 20 * GIB, "loop"),
        BlockDevice("sdg", "/dev/sdg", 20 * GIB, "disk", "LVM2_member"),
    ]
    with pytest.raises(PlanError) as caught:
        plan_one(DataDisk(20), _disk_facts(*refused))
    message = str(caught.value)
    assert message.startswith("no disk can be the 20 GiB data disk for /srv/data")
    for expected in ("/dev/sda (40 GiB, 1 partition(s) or volume(s)): has partitions",
                     "/dev/sdb (20 GiB, xfs 'backup'): carries a xfs signature",
                     "/dev/sdc (20 GiB, 1 partition(s) or volume(s)): has partitions",
                     "/dev/sdd (20 GiB, mounted at /mnt): mounted at /mnt",
                     f"/dev/sde (21 GiB): size {21 * GIB} bytes, not 20 GiB",
                     f"/dev/sdf ({20 * GIB - 512} bytes): size",
                     "/dev/loop0 (20 GiB, loop): not a whole disk (type loop)",
                     "carries a LVM2_member signature"):
        assert expected in message, expected
    two = [BlockDevice("sdb", "/dev/sdb", 20 * GIB, "disk"),
           BlockDevice("sdc", "/dev/sdc", 20 * GIB, "disk")]
    with pytest.raises(PlanError, match=r"2 disks \(/dev/sdb, /dev/sdc\) can be the 20 GiB"):
        plan_one(DataDisk(20), _disk_facts(*two))


def test_data_disk_reuses_its_labelled_disk_and_never_formats_it() -> None:
    labelled = BlockDevice("sdc", "/dev/sdc", 25 * GIB, "disk", "ext4", "platform-data")
    blank = BlockDevice("sdb", "/dev/sdb", 20 * GIB, "disk")
    plan = plan_one(DataDisk(20), _disk_facts(blank, labelled))  # grown: still the one
    assert "format" not in names(plan) and names(plan)[-1] == "mount"
    assert "-- /dev/sdc /srv/data" in plan.steps[-1].command
    fstab = FSTAB + b"LABEL=platform-data /srv/data ext4 defaults,nofail 0 2\n"
    mounted = BlockDevice("sdc", "/dev/sdc", 25 * GIB, "disk", "ext4", "platform-data",
                          "/srv/data")
    done = plan_one(DataDisk(20), _disk_facts(blank, mounted, fstab=fstab, empty=False))
    assert not done.changed and done.detail == "ok (/dev/sdc)"
    # An old entry for the mount point is replaced, not duplicated.
    old = FSTAB + b"/dev/sdb /srv/data ext4 defaults 0 2\n"
    fixed = plan_one(DataDisk(20), _disk_facts(mounted, fstab=old))
    assert names(fixed) and "mount" not in names(fixed)
    assert [s.stdin for s in fixed.steps if s.stdin] == [fstab]
    with pytest.raises(PlanError, match="carries the label platform-data but is not ext4"):
        plan_one(DataDisk(20), _disk_facts(BlockDevice("sdb", "/dev/sdb", 20 * GIB, "disk",
                                                       "xfs", "platform-data")))
    with pytest.raises(PlanError, match="several devices carry the label platform-data"):
        plan_one(DataDisk(20), _disk_facts(labelled, BlockDevice(
            "sdd", "/dev/sdd", 20 * GIB, "disk", "ext4", "platform-data")))
    with pytest.raises(PlanError, match="mounted elsewhere than /srv/data"):
        plan_one(DataDisk(20), _disk_facts(BlockDevice(
            "sdb", "/dev/sdb", 20 * GIB, "disk", "ext4", "platform-data", "/mnt")))
    with pytest.raises(PlanError, match="/srv/data is already the mount point of /dev/sdd"):
        plan_one(DataDisk(20), _disk_facts(blank, BlockDevice(
            "sdd", "/dev/sdd", 5 * GIB, "disk", "ext4", None, "/srv/data")))
    with pytest.raises(PlanError, match="/srv/data is not empty"):
        plan_one(DataDisk(20), _disk_facts(labelled, empty=False))


def test_data_disk_second_plan_in_a_run_sees_the_first() -> None:
    facts = _disk_facts(BlockDevice("sdb", "/dev/sdb", 20 * GIB, "disk"))
    plans = plan_all([DataDisk(20), Directory("/srv/data/vault")],
                     Facts(files={**facts.files, "/srv/data/vault": None},
                           block_devices=facts.block_devices, checks=facts.checks))
    assert plans[0].changed and plans[1].changed
    ctx = PlanContext(facts.copy())
    DataDisk(20).plan(ctx)
    again = DataDisk(20).plan(ctx)  # the working copy now has it formatted and mounted
    assert not again.changed


def test_data_disk_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="disk size"):
        DataDisk(0)
    with pytest.raises(ValueError, match="label"):
        DataDisk(20, label="a label much too long")
    with pytest.raises(ValueError, match="nofail"):
        DataDisk(20, options="defaults")
    with pytest.raises(ValueError, match="cannot be mounted at /"):
        DataDisk(20, mount="/")
    with pytest.raises(KeyError):
        plan_one(DataDisk(20), Facts(files={"/etc/fstab": file_state(FSTAB)}))


def _format_step_on(tmp_path: Path, *, size: int, wipefs: str, blkid_rc: int,
                    mounted: bool) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The format step run by /bin/sh with every tool a stub in an otherwise empty PATH:
    the real blockdev/wipefs/blkid/mkfs cannot be reached, so no disk can be touched."""
    # A block device node of its own in /dev (loop 0's numbers), removed right after;
    # every tool that could open it is a stub, so it is only ever tested with `[ -b ]`.
    device = f"/dev/platform-test-{os.getpid()}-{tmp_path.name}"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "mkfs.log"
    stubs = {"blockdev": f"echo {size}", "wipefs": f"printf '%s' '{wipefs}'",
             "blkid": f"exit {blkid_rc}", "findmnt": "exit 0" if mounted else "exit 1",
             "mkfs.ext4": f'echo "$@" >> {log}'}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    op = DataDisk(20)
    disk = BlockDevice(os.path.basename(device), device, 20 * GIB, "disk")
    command = op._format(disk)
    os.mknod(device, 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    try:
        proc = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                              env={"PATH": str(bin_dir)}, check=False)
    finally:
        os.unlink(device)
    return proc, log


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_data_disk_format_step_checks_again_before_mkfs(tmp_path: Path) -> None:
    ok, log = _format_step_on(tmp_path / "ok", size=20 * GIB, wipefs="", blkid_rc=2,
                              mounted=False)
    assert ok.returncode == 0 and log.read_text().startswith("-q -L platform-data /dev/")
    cases = {
        "size": dict(size=21 * GIB, wipefs="", blkid_rc=2, mounted=False),
        "wipefs": dict(size=20 * GIB, wipefs="DEVICE OFFSET TYPE\nsdb 0x438 ext4", blkid_rc=2,
                       mounted=False),
        "blkid": dict(size=20 * GIB, wipefs="", blkid_rc=0, mounted=False),
        "mounted": dict(size=20 * GIB, wipefs="", blkid_rc=2, mounted=True),
    }
    messages = {"size": f"its size is {21 * GIB} bytes", "wipefs": "wipefs -n finds a signature",
                "blkid": "blkid -p finds something", "mounted": "it is mounted"}
    for name, kwargs in cases.items():
        proc, log = _format_step_on(tmp_path / name, **kwargs)  # type: ignore[arg-type]
        assert proc.returncode != 0, name
        assert "not formatting it" in proc.stdout and messages[name] in proc.stdout, proc.stdout
        assert not log.exists(), f"{name}: mkfs ran"
