"""Phase 3's registry plan for the GITOPS VM, without a host: files, secrets, seeding."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import bcrypt
import pytest
import yaml

from lab.tls import issue
from sizing.images import Image
from sizing.inventory import build_inventory
from sizing.spec import PlatformSpec
from tasks.hostops import Command, Directory, File, Service
from tasks.hostops.facts import Facts, FileState, ServiceState
from tasks.hostops.ops import Operation, Plan, plan_all
from tasks.registry import (
    CERT_FILE,
    CONFIG_FILE,
    HTPASSWD_FILE,
    KEY_FILE,
    SEED_AUTH_FILE,
    RegistryCredentials,
    RegistryTls,
    htpasswd_entry,
    registry_operations,
    seed_operations,
)

PASSWORD = "Tr0ub4dor&3-registry-secret"
CREDS = RegistryCredentials("platform-seed", PASSWORD)
IMAGES = [Image("lab/hello", "1.0", "sha256:" + "1" * 64),
          Image("lab/tools/netcheck", "0.1", "sha256:" + "2" * 64)]
HOST = "lab-gitops-01.lab.egov.example"


def _tls(directory: Path, names: list[str]) -> RegistryTls:
    cert, key = issue(directory, "registry", names)
    return RegistryTls(cert.read_text(), key.read_text(), (directory / "lab-ca.pem").read_text())


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> RegistryTls:
    return _tls(tmp_path_factory.mktemp("tls"), [HOST, "10.231.0.21"])


def _ops(spec: PlatformSpec, tls: RegistryTls,
         creds: RegistryCredentials = CREDS) -> list[Operation]:
    inventory = build_inventory(spec)
    return registry_operations(spec, inventory.by_name("lab-gitops-01"), tls, creds) + \
        seed_operations(spec, IMAGES, SEED_AUTH_FILE)


def _fresh_host(ops: list[Operation]) -> Facts:
    """Facts of a host that has nothing yet: no file, package, service; every check fails."""
    facts = Facts()
    for op in ops:
        needs = op.needs()
        facts.files.update({path: None for path in needs.files | needs.contents})
        facts.packages.update({name: False for name in needs.packages})
        facts.checks.update({check: False for check in needs.checks})
    return facts


def _done_host(ops: list[Operation]) -> Facts:
    """Facts of a host where every operation of `ops` already holds."""
    facts = _fresh_host(ops)
    for op in ops:
        if isinstance(op, File):
            facts.files[op.path] = FileState("file", op.owner, op.group, op.mode,
                                             len(op.content),
                                             hashlib.sha256(op.content).hexdigest())
        elif isinstance(op, Directory):
            facts.files[op.path] = FileState("directory", op.owner, op.group, op.mode)
        elif isinstance(op, Service):
            facts.services[op.unit] = ServiceState("loaded", "enabled", "active")
    facts.packages = {name: True for name in facts.packages}
    facts.checks = {check: True for check in facts.checks}
    return facts


def _rendered(plans: list[Plan]) -> str:
    return "\n".join(f"{plan.op} {plan.detail} {' '.join(plan.commands())}" for plan in plans)


# --- the credentials -------------------------------------------------------------------------

def test_htpasswd_is_bcrypt_and_the_same_for_the_same_login() -> None:
    line = htpasswd_entry(CREDS)
    user, _, hashed = line.rstrip("\n").partition(":")
    assert user == "platform-seed" and line.endswith("\n") and line.count("\n") == 1
    assert hashed.startswith("$2b$10$") and len(hashed) == 60
    assert bcrypt.checkpw(PASSWORD.encode(), hashed.encode())
    assert not bcrypt.checkpw(b"wrong password", hashed.encode())
    assert htpasswd_entry(RegistryCredentials("platform-seed", PASSWORD)) == line
    other_password = htpasswd_entry(RegistryCredentials("platform-seed", PASSWORD + "x"))
    other_user = htpasswd_entry(RegistryCredentials("someone-else", PASSWORD))
    assert len({line.split(":")[1][:29], other_password.split(":")[1][:29],
                other_user.split(":")[1][:29]}) == 3, "the salt depends on user and password"
    assert PASSWORD not in line


@pytest.mark.parametrize(("user", "password", "cause"), [
    ("", PASSWORD, "not empty"),
    ("a:b", PASSWORD, "no colon"),
    ("seed", "", "the password is empty"),
    ("seed", "x" * 73, "longer than 72 bytes"),
    ("seed", "line\nbreak-secret", "line break"),
])
def test_bad_credentials_are_refused_without_quoting_the_password(
        user: str, password: str, cause: str) -> None:
    with pytest.raises(ValueError, match=cause) as caught:
        RegistryCredentials(user, password)
    if password:
        assert password not in str(caught.value)


def test_reprs_hide_the_secrets(tls: RegistryTls) -> None:
    assert PASSWORD not in repr(CREDS) and "platform-seed" in repr(CREDS)
    assert PASSWORD not in str(CREDS)
    body = tls.key_pem.splitlines()[1]
    assert body not in repr(tls) and body not in str(tls)


def test_certificate_must_name_the_registry_and_match_its_key(
        lab_spec: PlatformSpec, tls: RegistryTls, tmp_path: Path) -> None:
    wrong_name = _tls(tmp_path / "a", ["registry.elsewhere.example"])
    with pytest.raises(ValueError, match=f"does not name {HOST}"):
        _ops(lab_spec, wrong_name)
    other = _tls(tmp_path / "b", [HOST])
    with pytest.raises(ValueError, match="key does not belong") as caught:
        _ops(lab_spec, RegistryTls(tls.cert_pem, other.key_pem, tls.ca_pem))
    assert other.key_pem.splitlines()[1] not in str(caught.value)
    with pytest.raises(ValueError, match="not a PEM private key"):
        RegistryTls(tls.cert_pem, "secret-but-not-pem", tls.ca_pem)


def test_only_on_the_gitops_vm_and_port_5000(lab_spec: PlatformSpec, tls: RegistryTls) -> None:
    inventory = build_inventory(lab_spec)
    with pytest.raises(ValueError, match="lab-vault-01 is a vault VM"):
        registry_operations(lab_spec, inventory.by_name("lab-vault-01"), tls, CREDS)
    moved = lab_spec.model_copy(update={"artifacts": lab_spec.artifacts.model_copy(
        update={"registry": f"{HOST}:5443"})})
    with pytest.raises(ValueError, match=f"write {HOST}:5000"):
        registry_operations(moved, inventory.by_name("lab-gitops-01"), tls, CREDS)


# --- the operations --------------------------------------------------------------------------

def test_files_modes_and_secrets(lab_spec: PlatformSpec, tls: RegistryTls) -> None:
    ops = {op.id: op for op in _ops(lab_spec, tls)}
    files = {op.path: op for op in ops.values() if isinstance(op, File)}
    key, htpasswd, auth = files[KEY_FILE], files[HTPASSWD_FILE], files[SEED_AUTH_FILE]
    assert (key.secret, key.owner, key.group, key.mode) == (True, "root", "docker-registry",
                                                            0o640)
    assert (htpasswd.secret, htpasswd.group, htpasswd.mode) == (True, "docker-registry", 0o640)
    assert (auth.secret, auth.owner, auth.mode) == (True, "root", 0o600)
    assert not files[CERT_FILE].secret and not files[CONFIG_FILE].secret
    token = json.loads(auth.content)["auths"]["lab-gitops-01.lab.egov.example:5000"]["auth"]
    assert base64.b64decode(token).decode() == f"platform-seed:{PASSWORD}"
    assert files[f"/etc/docker/certs.d/{HOST}:5000/ca.crt"].content == tls.ca_pem.encode()

    config = yaml.safe_load(files[CONFIG_FILE].content)
    assert config["http"]["addr"] == ":5000"
    assert config["http"]["tls"] == {"certificate": CERT_FILE, "key": KEY_FILE}
    assert config["auth"]["htpasswd"]["path"] == HTPASSWD_FILE
    assert config["storage"]["filesystem"]["rootdirectory"] == "/srv/data/registry"
    assert config["storage"]["delete"] == {"enabled": False}

    service = ops["service docker-registry.service"]
    assert isinstance(service, Service)
    assert set(service.restart_on) == {f"file {p}" for p in (CONFIG_FILE, CERT_FILE, KEY_FILE,
                                                             HTPASSWD_FILE)}
    assert service.reload_on == (), "the registry has no reload"
    assert "packages docker-registry skopeo" in ops


def test_no_secret_in_any_rendered_step(lab_spec: PlatformSpec, tls: RegistryTls) -> None:
    ops = _ops(lab_spec, tls)
    plans = plan_all(ops, _fresh_host(ops))
    text = _rendered(plans) + "".join(repr(op) for op in ops)
    token = base64.b64encode(f"platform-seed:{PASSWORD}".encode()).decode()
    hashed = htpasswd_entry(CREDS).split(":", 1)[1].strip()
    key_lines = [line for line in tls.key_pem.splitlines() if "-----" not in line]
    for secret in (PASSWORD, token, hashed, *key_lines):
        assert secret not in text
    assert "secret, " in text, "secret files show as sizes and sha256 only"
    for plan in plans:
        for step in plan.steps:
            if step.stdin is not None and (PASSWORD.encode() in step.stdin or
                                           b"PRIVATE KEY" in step.stdin):
                assert step.secret, f"{plan.op}: secret content in a step not marked secret"


def test_fresh_host_then_nothing_to_change(lab_spec: PlatformSpec, tls: RegistryTls) -> None:
    ops = _ops(lab_spec, tls)
    first = plan_all(ops, _fresh_host(ops))
    changed = {plan.op for plan in first if plan.changed}
    assert {"packages docker-registry skopeo", f"file {KEY_FILE}", f"file {HTPASSWD_FILE}",
            "service docker-registry.service", "command wait for the registry",
            "command seed lab/hello:1.0", "command seed lab/tools/netcheck:0.1"} <= changed
    # The same login again: the same htpasswd bytes, so a second run writes nothing.
    again = _ops(lab_spec, tls, RegistryCredentials("platform-seed", PASSWORD))
    assert [plan.op for plan in plan_all(again, _done_host(ops)) if plan.changed] == []
    # A new password rewrites the secrets and restarts the registry, nothing else.
    rotated = _ops(lab_spec, tls, RegistryCredentials("platform-seed", PASSWORD + "-2"))
    plans = plan_all(rotated, _done_host(ops))
    assert [plan.op for plan in plans if plan.changed] == [
        f"file {HTPASSWD_FILE}", f"file {SEED_AUTH_FILE}", "service docker-registry.service",
        "command wait for the registry"]
    service = next(plan for plan in plans if plan.op == "service docker-registry.service")
    assert service.commands() == ("systemctl restart docker-registry.service",)


def test_seeding_one_command_per_image(lab_spec: PlatformSpec) -> None:
    ops = seed_operations(lab_spec, IMAGES, SEED_AUTH_FILE)
    assert [op.id for op in ops] == ["command seed lab/hello:1.0",
                                     "command seed lab/tools/netcheck:0.1"]
    seed = ops[1]
    assert isinstance(seed, Command) and seed.unless is not None
    command, unless = seed.command, seed.unless
    mirror = "http://10.231.0.1:8080"
    assert f"{mirror}/SHA256SUMS" in command
    assert f"{mirror}/images/lab/tools/netcheck/0.1.oci.tar" in command
    assert "sha256sum --quiet --strict -c want" in command
    assert f'[ "$got" = {IMAGES[1].digest} ]' in command, "the pinned digest is checked first"
    assert "skopeo copy --quiet --preserve-digests --authfile " \
           "/etc/docker/registry/seed-auth.json" in command
    assert command.endswith(f"docker://{HOST}:5000/lab/tools/netcheck:0.1")
    assert "trap 'rm -rf -- \"$tmp\"' EXIT" in command, "the download is removed"
    assert "--dest-cert-dir /etc/docker/certs.d/" in command
    assert unless.startswith('[ "$(skopeo inspect --no-tags --format \'{{.Digest}}\' '
                             "--authfile /etc/docker/registry/seed-auth.json --cert-dir ")
    assert unless.endswith(f'/lab/tools/netcheck:0.1)" = {IMAGES[1].digest} ]')
    assert "--creds" not in command + unless and "-u " not in command + unless
