"""Vault on the VAULT VM: installed over SSH, initialised exactly once, unsealed, then set
up as the platform's secret store and certificate authority.

Three steps, each a retryable task of phase 3:

1. `install_vault` (SSH): the binary from the mirror (sha256 checked), `vault.hcl` (raft
   storage, TLS listener), the systemd unit, a bootstrap certificate if the host has none
   yet, the service running.
2. `unseal_vault` (API): initialise if Vault never was (the unseal shares and the first
   root token go to Prefect Secret blocks before anything else happens; with
   `vault.unseal: operators` the shares are encrypted to the operators' PGP keys and the
   task waits for them to unseal), then unseal with the stored shares if sealed.
3. `configure_vault` (API, then SSH): KV v2 for the platform's secrets, the PKI (a root
   and an intermediate that issues every service certificate), the orchestrator's policy
   and AppRole (kept in the `VaultServer` block), the SSH host keys of phase 1 moved into
   KV, Vault's own listener certificate replaced by a PKI one, and finally the first root
   token revoked.

Every step reads what is there first and changes only the difference, so a second run
changes nothing. Secrets travel only between Vault, Prefect's encrypted blocks and the
hosts (as `File(secret=True)`): never in a task result, a log line or an error.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
import string
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hvac import exceptions as hvac_errors
from prefect import get_run_logger, task
from prefect.blocks.system import Secret
from prefect.cache_policies import NO_CACHE

from blocks.vault import VaultAuthError, VaultServer, VaultUnavailable, anonymous_client
from sizing.inventory import VM, Inventory
from sizing.spec import PlatformSpec
from sizing.storage import data_dir
from sizing.tiers import Role
from tasks import host_keys, pki
from tasks.artifacts import install_binary
from tasks.blocks import MissingBlock, load_block, secret_mapping, secret_text
from tasks.hostops import (
    Command,
    ConnectionPool,
    Directory,
    File,
    Group,
    HostSession,
    Operation,
    Service,
    User,
)
from tasks.retry import transient_only
from templates import render

if TYPE_CHECKING:
    import hvac

PORT = 8200
CLUSTER_PORT = 8201
BINARY = "/usr/local/bin/vault"
CONFIG = "/etc/vault.d/vault.hcl"
TLS_DIR = "/etc/vault.d/tls"
CERT_FILE = f"{TLS_DIR}/vault.crt"
KEY_FILE = f"{TLS_DIR}/vault.key"
DATA_DIR = data_dir("vault")  # raft, on the data disk (phase 2 mounts it)
UNIT = "/etc/systemd/system/vault.service"

KV_MOUNT = "platform"
APPROLE_MOUNT = "approle"
APPROLE_ROLE = "platform-orchestrator"
POLICY = "platform-orchestrator"
HOST_KEYS_PATH = "ssh-host-keys"
OPERATOR_WAIT_SECONDS = 3600.0

# What the orchestrator may do once the root token is gone: run every phase, not read
# Vault's own internals (no sys/raw, no root token creation, no seal).
ORCHESTRATOR_POLICY = """\
# Managed by the platform orchestrator (phase 3).
path "platform/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "pki/*" { capabilities = ["create", "read", "update", "list"] }
path "pki_int/*" { capabilities = ["create", "read", "update", "list"] }
path "sys/mounts" { capabilities = ["read"] }
path "sys/mounts/*" { capabilities = ["create", "read", "update", "list"] }
path "sys/auth" { capabilities = ["read"] }
path "sys/auth/*" { capabilities = ["create", "read", "update", "sudo"] }
path "auth/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "sys/policies/acl" { capabilities = ["list"] }
path "sys/policies/acl/*" { capabilities = ["create", "read", "update", "list"] }
path "sys/policy/*" { capabilities = ["create", "read", "update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
"""


def _logger() -> Any:
    """The run's logger (shown in the Prefect UI), or the module's outside a run."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


class VaultError(RuntimeError):
    """Vault is in a state phase 3 cannot continue from; the message says what to do."""


def unseal_secret_name(spec: PlatformSpec) -> str:
    return f"{spec.name}-vault-unseal-keys"


def root_token_secret_name(spec: PlatformSpec) -> str:
    return f"{spec.name}-vault-root-token"


def vault_vm(inventory: Inventory) -> VM:
    return inventory.of_role(Role.VAULT)[0]


def address(vm: VM) -> str:
    return f"https://{vm.ip}:{PORT}"


def server_names(spec: PlatformSpec, vm: VM) -> tuple[list[str], list[str]]:
    """DNS names and IP addresses Vault's certificate carries."""
    return [f"{vm.name}.{spec.domain}", f"vault.{spec.domain}"], [str(vm.ip)]


# ---------------------------------------------------------------- the host (SSH)


def host_operations(spec: PlatformSpec, vm: VM, tls: pki.TlsBundle | None) -> list[Operation]:
    """Vault's files and service on its VM; ``tls`` replaces the listener's certificate."""
    install = install_binary(spec, "vault", BINARY)
    ops: list[Operation] = [
        Group("vault", system=True),
        User("vault", group="vault", system=True, shell="/usr/sbin/nologin",
             home="/var/lib/vault"),
        Directory("/etc/vault.d", group="vault", mode="0750"),
        Directory(TLS_DIR, group="vault", mode="0750"),
        Directory("/var/lib/vault", owner="vault", group="vault", mode="0750"),
        Directory(DATA_DIR, owner="vault", group="vault", mode="0700"),
        install,
    ]
    tls_files: list[Operation] = []
    if tls is not None:
        tls_files = [File(CERT_FILE, tls.certificate, group="vault", mode="0644"),
                     File(KEY_FILE, tls.private_key, group="vault", mode="0640", secret=True,
                          backup=False)]
    config = File(CONFIG, render("vault/vault.hcl.j2", vm=vm, port=PORT,
                                 cluster_port=CLUSTER_PORT, cluster_name=f"{spec.name}-vault",
                                 data_dir=DATA_DIR, cert_file=CERT_FILE, key_file=KEY_FILE),
                  group="vault", mode="0640")
    unit = File(UNIT, render("vault/vault.service.j2", binary=BINARY, config=CONFIG))
    ops += [*tls_files, config, unit,
            Command("systemctl daemon-reload", on_change=[unit], name="reload systemd units"),
            Service("vault", restart_on=[install, config, unit], reload_on=tls_files)]
    return ops


def read_host_file(session: HostSession, path: str) -> str | None:
    """A public file of the host (a certificate), or None if it does not exist."""
    status, out, _ = session.execute(f"if [ -f {path} ]; then cat {path}; else exit 3; fi",
                                     step=f"read {path}")
    return out if status == 0 else None


def trust_anchor(chain_pem: str) -> str:
    """The last certificate of a host's chain file: the CA its clients trust."""
    chain = pki.split_pem(chain_pem)
    if not chain:
        raise VaultError("Vault's certificate file holds no certificate")
    from cryptography.hazmat.primitives import serialization

    return chain[-1].public_bytes(serialization.Encoding.PEM).decode()


@task(name="install-vault", retries=2, retry_delay_seconds=[5, 15],
      retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def install_vault(spec: PlatformSpec, inventory: Inventory,
                  pool: ConnectionPool) -> dict[str, object]:
    """The binary, configuration, unit and a certificate on the VAULT VM; Vault running."""
    started = time.monotonic()
    vm = vault_vm(inventory)
    session = pool.session(host_keys.admin_target(spec, vm))
    names, ips = server_names(spec, vm)
    tls = None
    if read_host_file(session, CERT_FILE) is None:
        tls = pki.bootstrap_certificate(names[0], names, ips)
    report = session.run(host_operations(spec, vm, tls))
    return {"service": "vault", "host": vm.name, "endpoint": address(vm),
            "version": spec.versions.vault, "changed": ", ".join(report.changed),
            "seconds": round(time.monotonic() - started, 2)}


# ---------------------------------------------------------------- initialise and unseal


def api_client(spec: PlatformSpec, vm: VM, pool: ConnectionPool) -> hvac.Client:
    """A client without a token that trusts the CA of the certificate on the host (read
    over SSH, whose host key phase 1 pinned)."""

    chain = read_host_file(pool.session(host_keys.admin_target(spec, vm)), CERT_FILE)
    if chain is None:
        raise VaultError(f"{vm.name}: {CERT_FILE} is missing; run install-vault first")
    return anonymous_client(address(vm), trust_anchor(chain))


def wait_until_serving(client: hvac.Client, name: str, timeout: float = 90.0) -> dict[str, Any]:
    """Vault's seal status once its API answers (a restart takes a few seconds)."""
    import requests

    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            status: dict[str, Any] = client.sys.read_seal_status()
            return status
        except requests.exceptions.SSLError as error:
            raise VaultError(f"{name}: Vault's certificate does not verify: {error}") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
            last = type(error).__name__
        if time.monotonic() > deadline:
            raise VaultUnavailable(f"{name}: Vault's API did not answer within {timeout:.0f} s "
                                   f"({last}); see `systemctl status vault` on the host")
        time.sleep(0.5)


def _save_secret(name: str, value: str | dict[str, Any], what: str) -> None:
    """Save a Prefect Secret, retrying: losing what Vault gave once would lose Vault."""
    for attempt in range(6):
        try:
            Secret(value=secret_text(value)).save(name, overwrite=True)
            return
        except Exception as error:  # the Prefect API: any failure is worth a retry here
            if attempt == 5:
                raise VaultError(
                    f"Vault was initialised but its {what} could not be saved to the Prefect "
                    f"Secret block {name!r}: {type(error).__name__}. They are lost: stop "
                    f"vault, empty {DATA_DIR} on the Vault VM, and run phase 3 again") from None
            time.sleep(2 ** attempt)


def _load_secret(name: str) -> Any | None:
    try:
        return cast(Secret, Secret.load(name)).get()
    except ValueError:
        return None


def armored_to_base64(armored: str) -> str:
    """An ASCII-armored PGP public key as Vault's `pgp_keys` wants it: base64 of the
    binary key (the armor's body without its checksum line)."""
    body: list[str] = []
    inside = started = False
    for line in armored.splitlines():
        line = line.strip()
        if line.startswith("-----BEGIN PGP PUBLIC KEY BLOCK"):
            inside = True
            continue
        if line.startswith("-----END PGP PUBLIC KEY BLOCK"):
            break
        if not inside:
            continue
        if not started:
            if not line:
                started = True  # headers end at the first empty line
            elif ":" not in line:
                started = True
                body.append(line)
            continue
        if line.startswith("="):
            continue
        body.append(line)
    data = "".join(body)
    if not data:
        raise VaultError("an operator PGP key is not an ASCII-armored public key block")
    base64.b64decode(data, validate=True)
    return data


def operator_keys(spec: PlatformSpec, spec_dir: Path) -> list[str]:
    keys = []
    for name in spec.vault.operator_pgp_keys:
        path = (spec_dir / name) if not Path(name).is_absolute() else Path(name)
        try:
            keys.append(armored_to_base64(path.read_text()))
        except OSError as error:
            raise VaultError(f"vault.operator_pgp_keys: {path}: {error.strerror}") from None
        except (VaultError, ValueError) as error:
            raise VaultError(f"vault.operator_pgp_keys: {path}: {error}") from None
    return keys


def initialise(client: hvac.Client, spec: PlatformSpec, spec_dir: Path) -> bool:
    """Initialise Vault if it never was; keep what it returns. True if it did."""
    logger = _logger()
    if client.sys.is_initialized():
        return False
    pgp = operator_keys(spec, spec_dir) if spec.vault.unseal == "operators" else None
    result = client.sys.initialize(secret_shares=spec.vault.shares,
                                   secret_threshold=spec.vault.threshold, pgp_keys=pgp)
    # Nothing happens before both are safe in Prefect's encrypted store.
    _save_secret(root_token_secret_name(spec), result["root_token"], "root token")
    _save_secret(unseal_secret_name(spec),
                 {"mode": spec.vault.unseal, "keys": list(result["keys_base64"])},
                 "unseal shares")
    if pgp:
        logger.info("Vault initialised: %d shares (threshold %d), each encrypted to one "
                    "operator's PGP key, in Prefect Secret %r (share i for key i of "
                    "vault.operator_pgp_keys)", spec.vault.shares, spec.vault.threshold,
                    unseal_secret_name(spec))
    else:
        logger.info("Vault initialised: %d shares (threshold %d) in Prefect Secret %r",
                    spec.vault.shares, spec.vault.threshold, unseal_secret_name(spec))
    return True


def unseal(client: hvac.Client, spec: PlatformSpec, name: str,
           wait_seconds: float = OPERATOR_WAIT_SECONDS) -> bool:
    """Unseal if sealed: with the stored shares, or by waiting for the operators."""
    logger = _logger()
    status = client.sys.read_seal_status()
    if not status["sealed"]:
        return False
    found = _load_secret(unseal_secret_name(spec))
    stored = secret_mapping(found) if found else None
    if spec.vault.unseal == "prefect":
        if not stored or stored.get("mode") != "prefect":
            raise VaultError(f"{name}: Vault is sealed and the Prefect Secret "
                             f"{unseal_secret_name(spec)!r} holds no usable shares")
        for key in stored["keys"][: spec.vault.threshold]:
            status = client.sys.submit_unseal_key(key)
        if status["sealed"]:
            raise VaultError(f"{name}: Vault is still sealed after {spec.vault.threshold} "
                             "stored shares: they belong to another initialisation")
        wait_until_active(client, name)
        logger.info("%s: Vault unsealed with the stored shares", name)
        return True
    deadline = time.monotonic() + wait_seconds
    progress = -1
    logger.info("%s: Vault is sealed; waiting up to %.0f min for %d operators to enter their "
                "shares (`vault operator unseal` against %s)", name, wait_seconds / 60,
                spec.vault.threshold, client.url)
    while status["sealed"]:
        if status["progress"] != progress:
            progress = status["progress"]
            logger.info("%s: %d of %d shares entered", name, progress, spec.vault.threshold)
        if time.monotonic() > deadline:
            raise VaultError(f"{name}: Vault is still sealed after {wait_seconds:.0f} s: "
                             f"{progress} of {spec.vault.threshold} shares entered")
        time.sleep(2.0)
        status = client.sys.read_seal_status()
    wait_until_active(client, name)
    logger.info("%s: the operators unsealed Vault", name)
    return True


def wait_until_active(client: hvac.Client, name: str, timeout: float = 60.0) -> None:
    """Unsealed is not yet serving: raft elects the node leader a moment later, and until
    then every request fails with "active cluster node not found"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.sys.read_leader_status().get("is_self"):
                return
        except (hvac_errors.VaultDown, hvac_errors.InternalServerError):
            pass  # still settling
        if time.monotonic() > deadline:
            raise VaultUnavailable(f"{name}: Vault is unsealed but no node became active "
                                   f"within {timeout:.0f} s")
        time.sleep(0.2)


@task(name="unseal-vault", retries=2, retry_delay_seconds=[5, 15],
      retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def unseal_vault(spec: PlatformSpec, inventory: Inventory, pool: ConnectionPool,
                 spec_dir: str, wait_seconds: float = OPERATOR_WAIT_SECONDS) -> dict[str, bool]:
    """Initialise Vault exactly once, and unseal it whenever it is sealed."""
    vm = vault_vm(inventory)
    client = api_client(spec, vm, pool)
    wait_until_serving(client, vm.name)
    initialised = initialise(client, spec, Path(spec_dir))
    unsealed = unseal(client, spec, vm.name, wait_seconds)
    return {"initialised": initialised, "unsealed": unsealed}


# ---------------------------------------------------------------- configure


def _root_client(spec: PlatformSpec, vm: VM, pool: ConnectionPool) -> tuple[hvac.Client, bool]:
    """A client logged in with the first root token if it still exists, else with the
    `VaultServer` block; the flag says whether it is the root token."""
    token = _load_secret(root_token_secret_name(spec))
    if token:
        client = api_client(spec, vm, pool)
        client.token = str(token)
        return client, True
    try:
        block = cast(VaultServer, load_block(VaultServer, spec.vault.block))
    except MissingBlock:
        raise VaultError(f"neither the root token (Prefect Secret "
                         f"{root_token_secret_name(spec)!r}) nor the VaultServer block "
                         f"{spec.vault.block!r} exists: phase 3 cannot log in to Vault. If "
                         "Vault was initialised elsewhere, create the block by hand") from None
    return block.client(), False


def _ensure_mount(client: hvac.Client, path: str, kind: str, options: dict[str, str],
                  config: dict[str, str], changes: list[str]) -> None:
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    found = mounts.get(f"{path}/")
    if found is None:
        client.sys.enable_secrets_engine(kind, path=path, options=options or None,
                                         config=config or None)
        changes.append(f"mount {path}")
        return
    if found["type"] != kind:
        raise VaultError(f"Vault's {path}/ is a {found['type']} engine, not {kind}; move it "
                         "away or pick another path")
    tuned = found.get("config", {})
    if config.get("max_lease_ttl") and \
            str(tuned.get("max_lease_ttl")) != str(_seconds(config["max_lease_ttl"])):
        client.sys.tune_mount_configuration(path=path, max_lease_ttl=config["max_lease_ttl"])
        changes.append(f"tune {path}")


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)h", duration)
    if not match:
        raise ValueError(f"durations here are in hours: {duration}")
    return int(match.group(1)) * 3600


def _ensure_pki(client: hvac.Client, spec: PlatformSpec, vm: VM, changes: list[str]) -> None:
    _ensure_mount(client, pki.PKI_ROOT_MOUNT, "pki", {}, {"max_lease_ttl": "87600h"}, changes)
    _ensure_mount(client, pki.PKI_MOUNT, "pki", {}, {"max_lease_ttl": "43800h"}, changes)
    if not client.secrets.pki.read_ca_certificate(mount_point=pki.PKI_ROOT_MOUNT).strip():
        client.secrets.pki.generate_root(
            type="internal", common_name=f"{spec.name} platform root CA",
            mount_point=pki.PKI_ROOT_MOUNT,
            extra_params={"ttl": "87600h", "key_type": "ec", "key_bits": 384,
                          "organization": spec.name, "issuer_name": "root"})
        changes.append("PKI root CA")
    if not client.secrets.pki.read_ca_certificate(mount_point=pki.PKI_MOUNT).strip():
        csr = client.secrets.pki.generate_intermediate(
            type="internal", common_name=f"{spec.name} platform intermediate CA",
            mount_point=pki.PKI_MOUNT,
            extra_params={"key_type": "ec", "key_bits": 256,
                          "organization": spec.name})["data"]["csr"]
        signed = client.secrets.pki.sign_intermediate(
            csr=csr, common_name=f"{spec.name} platform intermediate CA",
            mount_point=pki.PKI_ROOT_MOUNT,
            extra_params={"ttl": "43800h", "organization": spec.name})["data"]["certificate"]
        client.secrets.pki.set_signed_intermediate(certificate=signed,
                                                   mount_point=pki.PKI_MOUNT)
        changes.append("PKI intermediate CA")
    urls = {"issuing_certificates": [f"{address(vm)}/v1/{pki.PKI_MOUNT}/ca"],
            "crl_distribution_points": [f"{address(vm)}/v1/{pki.PKI_MOUNT}/crl"]}
    current = client.secrets.pki.read_urls(mount_point=pki.PKI_MOUNT)["data"]
    if any(sorted(current.get(k) or []) != v for k, v in urls.items()):
        client.secrets.pki.set_urls(urls, mount_point=pki.PKI_MOUNT)
        changes.append("PKI URLs")
    role = {"allowed_domains": [spec.domain], "allow_subdomains": True,
            "allow_bare_domains": True, "allow_localhost": False, "allow_ip_sans": True,
            "server_flag": True, "client_flag": False, "key_type": "ec", "key_bits": 256,
            "max_ttl": pki.SERVICE_TTL, "allowed_other_sans": [], "allow_any_name": False}
    try:
        existing = client.secrets.pki.read_role(pki.PKI_ROLE, mount_point=pki.PKI_MOUNT)["data"]
    except hvac_errors.InvalidPath:  # no such role yet
        existing = None
    if existing is None or any(_role_value(existing.get(k)) != _role_value(v)
                               for k, v in role.items() if k in existing):
        client.secrets.pki.create_or_update_role(pki.PKI_ROLE, extra_params=role,
                                                 mount_point=pki.PKI_MOUNT)
        changes.append(f"PKI role {pki.PKI_ROLE}")


def _role_value(value: Any) -> Any:
    if isinstance(value, list):
        return sorted(str(v) for v in value)
    if isinstance(value, str) and value.endswith("h") and value[:-1].isdigit():
        return int(value[:-1]) * 3600
    return value


def _ensure_policy(client: hvac.Client, changes: list[str]) -> None:
    try:
        current = client.sys.read_policy(POLICY)["data"]["rules"]
    except hvac_errors.InvalidPath:  # no such policy yet
        current = None
    if current != ORCHESTRATOR_POLICY:
        client.sys.create_or_update_policy(POLICY, ORCHESTRATOR_POLICY)
        changes.append(f"policy {POLICY}")


def _ensure_approle(client: hvac.Client, changes: list[str]) -> None:
    methods = client.sys.list_auth_methods()["data"]
    if f"{APPROLE_MOUNT}/" not in methods:
        client.sys.enable_auth_method("approle", path=APPROLE_MOUNT)
        changes.append("auth approle")
    wanted = {"token_policies": [POLICY], "token_ttl": 3600, "token_max_ttl": 14400,
              "secret_id_ttl": 0, "secret_id_num_uses": 0}
    try:
        current = client.auth.approle.read_role(APPROLE_ROLE, mount_point=APPROLE_MOUNT)["data"]
    except hvac_errors.InvalidPath:  # no such role yet
        current = None
    if current is None or any(_role_value(current.get(k)) != _role_value(v)
                              for k, v in wanted.items()):
        client.auth.approle.create_or_update_approle(
            APPROLE_ROLE, token_policies=[POLICY], token_ttl="1h", token_max_ttl="4h",
            secret_id_ttl="0", secret_id_num_uses=0, mount_point=APPROLE_MOUNT)
        changes.append(f"approle {APPROLE_ROLE}")


def _ensure_block(client: hvac.Client, spec: PlatformSpec, vm: VM, root_ca: str,
                  changes: list[str]) -> None:
    """The `VaultServer` block with a working AppRole login; a new secret id only if the
    block is missing, points elsewhere or no longer logs in."""
    try:
        block: VaultServer | None = cast(VaultServer, VaultServer.load(spec.vault.block))
    except ValueError:
        block = None
    if block is not None and block.address == address(vm) and \
            block.ca_certificate.strip() == root_ca.strip():
        try:
            block.client()
            return
        except VaultAuthError:
            pass  # stale credentials: make new ones below
    from pydantic import SecretStr

    role_id = client.auth.approle.read_role_id(APPROLE_ROLE,
                                               mount_point=APPROLE_MOUNT)["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id(
        APPROLE_ROLE, mount_point=APPROLE_MOUNT)["data"]["secret_id"]
    VaultServer(address=address(vm), ca_certificate=root_ca, role_id=SecretStr(role_id),
                secret_id=SecretStr(secret_id)).save(spec.vault.block, overwrite=True)
    changes.append(f"block {spec.vault.block}")


def kv_read(client: hvac.Client, path: str) -> dict[str, Any] | None:
    """The latest version of a KV v2 secret under the platform mount, or None."""
    import hvac as hvac_module

    try:
        data: dict[str, Any] = client.secrets.kv.v2.read_secret_version(
            path=path, mount_point=KV_MOUNT, raise_on_deleted_version=True)["data"]["data"]
    except hvac_module.exceptions.InvalidPath:
        return None
    return data


def kv_ensure(client: hvac.Client, path: str,
              make: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """A KV secret, created by ``make`` only if it does not exist (never overwritten);
    the flag says whether it was created. The value stays with the caller."""
    import hvac as hvac_module

    current = kv_read(client, path)
    if current is not None:
        return current, False
    value = make()
    try:
        client.secrets.kv.v2.create_or_update_secret(path=path, secret=value,
                                                     mount_point=KV_MOUNT, cas=0)
    except hvac_module.exceptions.InvalidRequest:
        # cas=0 lost a race: another task (the pair's other node) created it first.
        current = kv_read(client, path)
        if current is None:
            raise
        return current, False
    return value, True


def password(length: int = 32) -> str:
    """A random password of letters and digits (safe in any config file's syntax)."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _move_host_keys(client: hvac.Client, spec: PlatformSpec, inventory: Inventory,
                    changes: list[str]) -> None:
    """Phase 1's SSH host keys from Prefect Secret blocks into KV, then the blocks deleted
    (only once KV reads back the same pair). The Vault VM's own pair stays in Prefect:
    unsealing Vault after a restart starts with an SSH connection to it."""
    moved = 0
    for vm in inventory.vms:
        if vm.role is Role.VAULT:
            continue  # reaching a sealed Vault over SSH must not need Vault: its key stays
        key = host_keys.load_prefect(spec, vm)
        if key is None:
            continue
        path = host_keys.vault_path(vm)
        stored = kv_read(client, path)
        wanted = {"kind": key.kind, "private": key.private, "public": key.public}
        if stored is None:
            client.secrets.kv.v2.create_or_update_secret(path=path, secret=wanted,
                                                         mount_point=KV_MOUNT, cas=0)
            stored = kv_read(client, path)
        if stored != wanted:
            raise VaultError(f"{vm.name}: Vault holds another SSH host key at "
                             f"{KV_MOUNT}/{path} than Prefect's {host_keys.secret_name(spec, vm)}"
                             "; compare them with the host's own key before removing one")
        host_keys.delete_prefect(spec, vm)
        moved += 1
    if moved:
        changes.append(f"{moved} SSH host keys moved to Vault")


@task(name="configure-vault", retries=2, retry_delay_seconds=[5, 15],
      retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def configure_vault(spec: PlatformSpec, inventory: Inventory,
                    pool: ConnectionPool) -> dict[str, object]:
    """KV, PKI, policy, AppRole and block, host keys into KV, a PKI certificate for Vault
    itself, then the root token revoked."""
    logger = _logger()
    started = time.monotonic()
    vm = vault_vm(inventory)
    client, is_root = _root_client(spec, vm, pool)
    changes: list[str] = []
    _ensure_mount(client, KV_MOUNT, "kv", {"version": "2"}, {}, changes)
    _ensure_pki(client, spec, vm, changes)
    _ensure_policy(client, changes)
    _ensure_approle(client, changes)
    root_ca = pki.root_certificate(client)
    # Vault's own listener moves to a PKI certificate before anything relies on the CA.
    session = pool.session(host_keys.admin_target(spec, vm))
    names, ips = server_names(spec, vm)
    if not pki.is_current(read_host_file(session, CERT_FILE), root_ca, names, ips):
        bundle = pki.issue(client, root_ca, names[0], names, ips)
        tls = pki.TlsBundle(certificate=bundle.certificate + root_ca, ca=root_ca,
                            private_key=bundle.private_key)
        report = session.run(host_operations(spec, vm, tls))
        changes.append(f"TLS certificate ({', '.join(report.changed)})")
        _wait_for_certificate(vm, root_ca)
    _ensure_block(client, spec, vm, root_ca, changes)
    # From here on the orchestrator works as it will in every later run: with the block.
    service = cast(VaultServer, VaultServer.load(spec.vault.block)).client()
    _move_host_keys(service, spec, inventory, changes)

    if is_root:
        client.auth.token.revoke_self()
        Secret.delete(root_token_secret_name(spec))
        changes.append("root token revoked")
        logger.info("%s: the first root token is revoked; the orchestrator now logs in with "
                    "the AppRole in block %r", vm.name, spec.vault.block)
    return {"service": "vault-config", "host": vm.name, "endpoint": address(vm),
            "version": spec.versions.vault, "changed": ", ".join(changes),
            "seconds": round(time.monotonic() - started, 2)}


def _wait_for_certificate(vm: VM, root_ca: str, timeout: float = 30.0) -> None:
    """After the reload, Vault serves the new certificate: the platform CA verifies it."""
    import requests

    client = anonymous_client(address(vm), root_ca, timeout=10)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.sys.read_seal_status()
            return
        except requests.exceptions.RequestException as error:
            if time.monotonic() > deadline:
                raise VaultError(f"{vm.name}: after the certificate change Vault does not "
                                 f"verify with the platform CA: {error}") from None
            time.sleep(0.5)


_CLIENTS: dict[tuple[str, str], tuple[float, Any]] = {}
_CLIENTS_LOCK = threading.Lock()
_CLIENT_REUSE_SECONDS = 1200.0  # well inside the AppRole token's one-hour life


def service_client(spec: PlatformSpec) -> hvac.Client:
    """The orchestrator's Vault client for every later task (the phase-3 block), logged in
    once per flow run and block for twenty minutes rather than once per call."""
    from prefect.runtime import flow_run

    block = cast(VaultServer, load_block(VaultServer, spec.vault.block))
    run_id = flow_run.get_id()
    if run_id is None:
        return block.client()  # outside a flow run: nothing to share the login with
    key = (str(run_id), spec.vault.block)
    now = time.monotonic()
    with _CLIENTS_LOCK:
        cached = _CLIENTS.get(key)
        if cached is not None and now - cached[0] < _CLIENT_REUSE_SECONDS:
            return cached[1]
    client = block.client()
    with _CLIENTS_LOCK:
        if len(_CLIENTS) > 64:  # a long-lived worker: keep only recent runs
            _CLIENTS.clear()
        _CLIENTS[key] = (now, client)
    return client
