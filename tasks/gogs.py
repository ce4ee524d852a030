"""Gogs on the GITOPS VM: the git server Argo CD reads the platform's desired state from.

Installed over SSH like any binary of the mirror (in the lab the mirror serves a
simulated Gogs, see lab/gogs), served over HTTPS with a certificate from Vault's PKI, git
over SSH through the host's OpenSSH (deploy keys). Then, through its API: the admin's
token (kept in Vault and in the `GogsServer` block), the organisation, the GitOps
repository that phases 5 to 9 fill, and a read-only deploy key for Argo CD whose private
half stays in Vault.
"""

from __future__ import annotations

import time
from typing import cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from blocks.gogs import GogsError, GogsServer
from sizing.inventory import VM, Inventory
from sizing.spec import PlatformSpec
from sizing.storage import data_dir
from sizing.tiers import Role
from tasks import pki
from tasks.artifacts import install_binary
from tasks.host_keys import admin_target
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
from tasks.vault import KV_MOUNT, kv_ensure, password, read_host_file, service_client
from templates import render

PORT = 3000
BINARY = "/usr/local/bin/gogs"
CONFIG_DIR = "/etc/gogs"
CONFIG = f"{CONFIG_DIR}/app.ini"
CERT_FILE = f"{CONFIG_DIR}/tls/gogs.crt"
KEY_FILE = f"{CONFIG_DIR}/tls/gogs.key"
DATA_DIR = data_dir("gogs")  # repositories and database, on the data disk
RUN_USER = "git"
HOME = "/home/git"
UNIT = "/etc/systemd/system/gogs.service"

ADMIN_USER = "platform-admin"
ORG = "platform"
REPO = "gitops"
DEPLOY_KEY_TITLE = "argocd-read-only"
KV_ADMIN = "gogs/admin"
KV_DEPLOY_KEY = "gogs/argocd-deploy-key"


def gitops_vm(inventory: Inventory) -> VM:
    return inventory.of_role(Role.GITOPS)[0]


def block_name(spec: PlatformSpec) -> str:
    return f"{spec.name}-gogs"


def api_url(vm: VM) -> str:
    """What the orchestrator talks to (the VM's address is in the certificate)."""
    return f"https://{vm.ip}:{PORT}"


def names(spec: PlatformSpec, vm: VM) -> tuple[list[str], list[str]]:
    return [f"{vm.name}.{spec.domain}", f"gogs.{spec.domain}"], [str(vm.ip)]


def host_operations(spec: PlatformSpec, vm: VM, secret_key: str,
                    tls: pki.TlsBundle | None) -> list[Operation]:
    """Gogs' user, files and service on the GITOPS VM; ``tls`` replaces its certificate."""
    install = install_binary(spec, "gogs", BINARY)
    ops: list[Operation] = [
        Group(RUN_USER, system=True),
        # A real shell: sshd runs the deploy keys' forced command through it.
        User(RUN_USER, group=RUN_USER, system=True, shell="/bin/bash", home=HOME),
        Directory(CONFIG_DIR, group=RUN_USER, mode="0750"),
        Directory(f"{CONFIG_DIR}/tls", group=RUN_USER, mode="0750"),
        Directory(DATA_DIR, owner=RUN_USER, group=RUN_USER, mode="0750"),
        *[Directory(f"{DATA_DIR}/{sub}", owner=RUN_USER, group=RUN_USER, mode="0750")
          for sub in ("repositories", "data", "log")],
        install,
    ]
    tls_files: list[Operation] = []
    if tls is not None:
        tls_files = [File(CERT_FILE, tls.certificate, group=RUN_USER, mode="0644"),
                     File(KEY_FILE, tls.private_key, group=RUN_USER, mode="0640",
                          secret=True, backup=False)]
    config = File(CONFIG, render("gogs/app.ini.j2", vm=vm, spec_name=spec.name,
                                 run_user=RUN_USER, domain=f"{vm.name}.{spec.domain}",
                                 port=PORT,
                                 root_url=f"https://{vm.name}.{spec.domain}:{PORT}/",
                                 cert_file=CERT_FILE, key_file=KEY_FILE,
                                 ssh_domain=f"{vm.name}.{spec.domain}", data_dir=DATA_DIR,
                                 secret_key=secret_key,
                                 webhook_allowlist=f"*.{spec.domain}"),
                  group=RUN_USER, mode="0640", secret=True)
    unit = File(UNIT, render("gogs/gogs.service.j2", run_user=RUN_USER, data_dir=DATA_DIR,
                             binary=BINARY, config=CONFIG, home=HOME))
    ops += [*tls_files, config, unit,
            Command("systemctl daemon-reload", on_change=[unit], name="reload systemd units"),
            Service("gogs", restart_on=[install, config, unit, *tls_files])]
    return ops


def _ensure_admin(session: HostSession, url: str, ca: str, admin: dict[str, str],
                  vm: VM) -> bool:
    """The admin user, created with Gogs' CLI (on the host) the first time."""
    if GogsServer.password_works(url, admin["user"], admin["password"], ca):
        return False
    # The password travels inside the script on SSH's standard input, never as an argument
    # on the orchestrator's side; results and errors below never quote the script.
    script = (f"cd {DATA_DIR} && sudo -u {RUN_USER} -H {BINARY} admin create-user "
              f"--name {admin['user']} --password '{admin['password']}' "
              f"--email {admin['user']}@{vm.name} --admin --config {CONFIG}")
    status, out, err = session.execute(script, step="create the Gogs admin")
    if status != 0:
        message = (err or out).replace(admin["password"], "********").strip()
        raise RuntimeError(f"{vm.name}: `gogs admin create-user {admin['user']}` failed "
                           f"({status}): {message}. If the user exists with another "
                           f"password, reset it or remove {KV_MOUNT}/{KV_ADMIN} from Vault")
    return True


def deploy_key_pair() -> dict[str, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return {"private_key": private, "public_key": f"{public} argocd"}


@task(name="ensure-gogs", retries=2, retry_delay_seconds=[5, 15],
      retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def ensure_gogs(spec: PlatformSpec, inventory: Inventory,
                pool: ConnectionPool) -> dict[str, object]:
    """Gogs installed and running, its admin, token, organisation, GitOps repository and
    Argo CD's deploy key; a table row of what changed."""
    logger = get_run_logger()
    started = time.monotonic()
    vm = gitops_vm(inventory)
    vault = service_client(spec)
    admin, _ = kv_ensure(vault, KV_ADMIN, lambda: {"user": ADMIN_USER,
                                                   "password": password(),
                                                   "secret_key": password(40)})
    session = pool.session(admin_target(spec, vm))
    dns, ips = names(spec, vm)
    ca = pki.root_certificate(vault)
    tls = pki.renewal(vault, ca, read_host_file(session, CERT_FILE), dns[0], dns, ips)
    report = session.run(host_operations(spec, vm, admin["secret_key"], tls))
    changes = list(report.changed)
    url = api_url(vm)
    try:
        GogsServer.wait_until_serving(url, ca)
    except ConnectionError as error:
        raise ConnectionError(f"{vm.name}: {error}; see `systemctl status gogs` on the "
                              "host") from None
    if _ensure_admin(session, url, ca, admin, vm):
        changes.append(f"admin {ADMIN_USER}")

    gogs = _block(spec, url, ca, admin, vault, changes)
    if gogs.ensure_org(ORG, f"{spec.name} platform"):
        changes.append(f"org {ORG}")
    if gogs.ensure_repo(ORG, REPO, private=True,
                        description="Desired state of the platform, read by Argo CD"):
        changes.append(f"repo {ORG}/{REPO}")
    key, _ = kv_ensure(vault, KV_DEPLOY_KEY, deploy_key_pair)
    if gogs.ensure_deploy_key(ORG, REPO, DEPLOY_KEY_TITLE, key["public_key"]):
        changes.append(f"deploy key {DEPLOY_KEY_TITLE}")
    if changes:
        logger.info("%s: Gogs changed: %s", vm.name, ", ".join(changes))
    return {"service": "gogs", "host": vm.name, "endpoint": url,
            "version": spec.versions.gogs, "changed": ", ".join(changes),
            "seconds": round(time.monotonic() - started, 2)}


def _block(spec: PlatformSpec, url: str, ca: str, admin: dict[str, str], vault: object,
           changes: list[str]) -> GogsServer:
    """The `GogsServer` block with a working token: the one in Vault if it still works,
    else a new one (stored in Vault first, then in the block)."""
    import hvac

    client = cast(hvac.Client, vault)
    token = admin.get("token")
    if token:
        candidate = GogsServer(url=url, admin_user=admin["user"], token=SecretStr(token),
                               ca_bundle=ca)
        try:
            candidate.whoami()
        except GogsError as error:
            if error.status != 401:
                raise  # 5xx and the like: retried by the task, no new token for them
            token = None
    if not token:
        token = GogsServer.create_token(url, admin["user"], admin["password"],
                                        f"platform-orchestrator-{int(time.time())}",
                                        ca_bundle=ca).get_secret_value()
        client.secrets.kv.v2.create_or_update_secret(
            path=KV_ADMIN, secret={**admin, "token": token}, mount_point=KV_MOUNT)
        changes.append("API token")
    block = GogsServer(url=url, admin_user=admin["user"], token=SecretStr(token), ca_bundle=ca)
    try:
        saved: GogsServer | None = cast(GogsServer, GogsServer.load(block_name(spec)))
    except ValueError:
        saved = None
    if saved is None or saved.url != url or saved.ca_bundle != ca or \
            saved.token.get_secret_value() != token:
        block.save(block_name(spec), overwrite=True)
        changes.append(f"block {block_name(spec)}")
    return block
