"""Phase 3 as a flow on the lab: Vault, registry, load balancers and Gogs after phases 1
and 2, each checked from outside the way its clients will use it; then a second run that
changes nothing, and no secret in any log line of either run."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter
from prefect.client.schemas.sorting import ArtifactSort

from blocks.gogs import GogsServer
from blocks.vault import VaultServer, ca_file
from flows.core_services import core_services
from lab.lab import Lab
from sizing.inventory import build_inventory
from sizing.load_balancing import STATS_PORT, STATS_USER
from tasks import gogs, host_keys
from tasks.spec import read_spec
from tasks.vault import kv_read
from tests.conftest import LAB_SPEC
from tests.labkit import prepared_lab

pytestmark = [pytest.mark.lab, pytest.mark.prefect,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

SPEC = read_spec(LAB_SPEC)
INVENTORY = build_inventory(SPEC)
GITOPS = INVENTORY.by_name("lab-gitops-01")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with prepared_lab(vcsim_port=18986) as lab:
        first = core_services(spec_path=str(LAB_SPEC), return_state=True)
        assert first.is_completed(), first.message
        yield lab


def _vault() -> Any:
    return cast(VaultServer, VaultServer.load(SPEC.vault.block)).client()


def _artifact(key: str) -> Any:
    async def latest() -> Any:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC, limit=1)
            return found[0]
    return asyncio.run(latest())


def _all_logs() -> str:
    async def read() -> str:
        messages: list[str] = []
        async with get_client() as client:
            while True:
                page = await client.read_logs(log_filter=LogFilter(), limit=200,
                                              offset=len(messages))
                messages += [log.message for log in page]
                if len(page) < 200:
                    return "\n".join(messages)
    return asyncio.run(read())


def test_second_run_changes_nothing(lab: Lab) -> None:
    table = json.loads(_artifact("phase-3-core-services").data)
    assert {row["service"] for row in table} >= {"vault", "vault-config", "registry", "gogs"}
    assert sum(1 for row in table if row["service"] == "load-balancer") == 6
    assert all(row["action"] == "changed" for row in table), table
    for key, rows in (("vault", 2), ("registry", 1), ("load-balancers", 6), ("gogs", 1)):
        assert len(json.loads(_artifact(f"phase-3-{key}").data)) == rows, key

    again = core_services(spec_path=str(LAB_SPEC))
    assert again.changed == 0 and again.unchanged == len(table)


def test_registry_serves_the_seeded_images_over_pki_tls(lab: Lab) -> None:
    block = cast(VaultServer, VaultServer.load(SPEC.vault.block))
    host, port = SPEC.artifacts.registry.split(":")
    context = ssl.create_default_context(cafile=ca_file(block.ca_certificate))
    with socket.create_connection((str(GITOPS.ip), int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        assert tls.version() is not None  # verified against the platform's root CA
    login = kv_read(_vault(), "registry/admin")
    assert login is not None
    url = f"https://{GITOPS.ip}:{port}/v2/_catalog"
    # By IP too: the certificate carries the VM's address.
    assert httpx.get(url, verify=context).status_code == 401
    catalog = httpx.get(url, verify=context,
                        auth=(login["username"], login["password"])).json()
    assert "lab/hello" in catalog["repositories"]


def test_load_balancer_stats_need_vaults_password(lab: Lab) -> None:
    vm = INVENTORY.by_name("lab-lblan-01")
    url = f"http://{vm.ip}:{STATS_PORT}/"
    assert httpx.get(url, timeout=10).status_code == 401
    secrets = kv_read(_vault(), "load-balancers/lblan")
    assert secrets is not None
    assert httpx.get(url, timeout=10,
                     auth=(STATS_USER, secrets["stats_password"])).status_code == 200
    vip = str(SPEC.load_balancers.lblan.vip)
    held = [name for name in ("lab-lblan-01", "lab-lblan-02")
            if _holds(lab, name, vip)]
    assert len(held) == 1, f"exactly one node of the pair holds the VIP, got {held}"


def _holds(lab: Lab, name: str, ip: str) -> bool:
    vm = INVENTORY.by_name(name)
    done = subprocess.run(["ip", "netns", "exec", lab.hosts.netns(vm.name), "ip", "-4",
                           "-o", "addr", "show"], capture_output=True, text=True, check=True)
    return f" {ip}/" in done.stdout


def test_gogs_org_repo_token_and_a_read_only_deploy_key(lab: Lab, tmp_path: Path) -> None:
    block = cast(GogsServer, GogsServer.load(gogs.block_name(SPEC)))
    assert block.whoami() == gogs.ADMIN_USER
    admin = kv_read(_vault(), gogs.KV_ADMIN)
    assert admin is not None and admin["token"] == block.token.get_secret_value()
    with block.client() as client:
        repo = client.call("GET", f"/repos/{gogs.ORG}/{gogs.REPO}")
        keys = client.call("GET", f"/repos/{gogs.ORG}/{gogs.REPO}/keys")
    assert repo["private"] is True
    assert [key["title"] for key in keys] == [gogs.DEPLOY_KEY_TITLE]

    # Argo CD's view: clone over SSH with the deploy key from Vault, host key verified.
    deploy = kv_read(_vault(), gogs.KV_DEPLOY_KEY)
    assert deploy is not None
    key_file = tmp_path / "deploy"
    key_file.write_text(deploy["private_key"])
    key_file.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_text(f"{GITOPS.ip} {host_keys.public_key(SPEC, GITOPS)}\n")
    env = {**os.environ, "GIT_SSH_COMMAND": (
        f"ssh -i {key_file} -o IdentitiesOnly=yes -o BatchMode=yes "
        f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={known}")}
    url = f"ssh://{gogs.RUN_USER}@{GITOPS.ip}/{gogs.ORG}/{gogs.REPO}.git"
    clone = subprocess.run(["git", "clone", url, str(tmp_path / "repo")], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert clone.returncode == 0, clone.stderr
    repo_dir = tmp_path / "repo"
    subprocess.run(["git", "-C", str(repo_dir), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "--allow-empty", "-m", "try"], check=True, capture_output=True)
    push = subprocess.run(["git", "-C", str(repo_dir), "push", "origin", "HEAD:main"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert push.returncode != 0 and "denied" in push.stderr.lower(), push.stderr


def test_no_secret_in_any_log(lab: Lab) -> None:
    vault = _vault()
    values: list[str] = []
    for path in ("registry/admin", gogs.KV_ADMIN, "load-balancers/lblan",
                 "load-balancers/lbdmz", "load-balancers/lbintegration"):
        data = kv_read(vault, path)
        assert data is not None, path
        values += [str(v) for k, v in data.items() if k not in ("user", "username")]
    block = cast(VaultServer, VaultServer.load(SPEC.vault.block))
    assert block.secret_id is not None
    values.append(block.secret_id.get_secret_value())
    logs = _all_logs()
    assert "Vault initialised" in logs  # the logs were read
    for value in values:
        assert value not in logs
        assert base64.b64encode(value.encode()).decode() not in logs
