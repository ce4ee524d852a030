"""Vault (OpenBao's `bao` from the lab mirror) on the lab's VAULT VM: phase 3's first steps.

Phases 1 and 2 make and prepare the tier-100 VMs; then install, init, unseal, configure;
a restart seals Vault and the next run unseals it with the data kept; a second run changes
nothing; no secret shows in results or logs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any, cast

import hvac
import pytest
from cryptography import x509
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client

from blocks.vault import VaultServer, ca_file
from lab.lab import Lab
from sizing.inventory import build_inventory
from tasks import host_keys
from tasks.blocks import secret_mapping
from tasks.hostops import ConnectionPool, HostTarget
from tasks.prepare import ssh_pool
from tasks.spec import read_spec
from tasks.vault import (
    CERT_FILE,
    configure_vault,
    install_vault,
    kv_read,
    read_host_file,
    root_token_secret_name,
    unseal_secret_name,
    unseal_vault,
    vault_vm,
)
from tests.conftest import LAB_SPEC
from tests.labkit import prepared_lab

pytestmark = [pytest.mark.lab, pytest.mark.prefect,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

SPEC = read_spec(LAB_SPEC)
INVENTORY = build_inventory(SPEC)
VM = vault_vm(INVENTORY)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with prepared_lab(vcsim_port=18988) as lab:
        yield lab


@pytest.fixture
def pool(lab: Lab) -> Iterator[ConnectionPool]:
    with ssh_pool(SPEC) as pool:
        yield pool


def _target() -> HostTarget:
    key = host_keys.public_key(SPEC, VM)
    assert key is not None
    return HostTarget(str(VM.ip), (key,), user=SPEC.ssh.user, name=VM.name)


def _all_steps(pool: ConnectionPool) -> list[Any]:
    spec_dir = str(LAB_SPEC.parent)
    return [install_vault(SPEC, INVENTORY, pool),
            unseal_vault(SPEC, INVENTORY, pool, spec_dir=spec_dir),
            configure_vault(SPEC, INVENTORY, pool)]


def test_install_initialise_unseal_configure(lab: Lab, pool: ConnectionPool,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    install = install_vault(SPEC, INVENTORY, pool)
    assert "install vault" in str(install["changed"])
    unsealed = unseal_vault(SPEC, INVENTORY, pool, spec_dir=str(LAB_SPEC.parent))
    assert unsealed == {"initialised": True, "unsealed": True}
    keys = secret_mapping(cast(Secret, Secret.load(unseal_secret_name(SPEC))).get())
    assert keys["mode"] == "prefect" and len(keys["keys"]) == 5
    # Masked to whoever reads Prefect's blocks without asking for secrets (as the UI does).
    with get_client(sync_client=True) as client:
        masked = client.read_block_document_by_name(
            unseal_secret_name(SPEC), "secret", include_secrets=False)
    assert not any(share in str(masked.data) for share in keys["keys"])
    root_token = str(cast(Secret, Secret.load(root_token_secret_name(SPEC))).get())
    host_key_before = host_keys.load(SPEC, VM)
    other_key_before = host_keys.load(SPEC, INVENTORY.by_name("lab-gitops-01"))

    configured = configure_vault(SPEC, INVENTORY, pool)
    for item in ("mount platform", "PKI root CA", "PKI intermediate CA", "approle",
                 "block lab-vault", "TLS certificate", "17 SSH host keys moved to Vault",
                 "root token revoked"):
        assert item in str(configured["changed"]), item

    # The root token is gone from Prefect and revoked in Vault.
    with pytest.raises(ValueError):
        Secret.load(root_token_secret_name(SPEC))
    block = cast(VaultServer, VaultServer.load(SPEC.vault.block))
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=block.address, token=root_token,
                    verify=ca_file(block.ca_certificate)).auth.token.lookup_self()

    # The AppRole logs in; Vault's certificate now comes from the platform PKI.
    client = block.client()
    assert client.is_authenticated()
    chain = read_host_file(pool.session(_target()), CERT_FILE)
    assert chain is not None
    leaf = x509.load_pem_x509_certificates(chain.encode())[0]
    assert "intermediate CA" in leaf.issuer.rfc4514_string()

    # Host keys now live in Vault only, and are still found; the Vault VM's own stays in
    # Prefect (unsealing starts with SSH to it).
    other = INVENTORY.by_name("lab-gitops-01")
    assert host_keys.load_prefect(SPEC, other) is None
    assert kv_read(client, host_keys.vault_path(other)) is not None
    assert host_keys.load(SPEC, other) == other_key_before
    assert host_keys.load_prefect(SPEC, VM) == host_key_before
    # Phase 1's one listing finds every pair: the Vault VM's in Prefect, the rest in KV.
    assert host_keys.stored(SPEC, list(INVENTORY.vms)) == {vm.name for vm in INVENTORY.vms}

    # No secret in any result or log line.
    secret_id = block.secret_id.get_secret_value() if block.secret_id else "missing"
    text = " ".join(str(r) for r in (install, unsealed, configured)) + caplog.text
    for value in [root_token, secret_id, *keys["keys"]]:
        assert value not in text


def test_restart_seals_and_next_run_unseals_with_data_kept(lab: Lab,
                                                          pool: ConnectionPool) -> None:
    client = cast(VaultServer, VaultServer.load(SPEC.vault.block)).client()
    client.secrets.kv.v2.create_or_update_secret(path="test/kept", secret={"v": "42"},
                                                 mount_point="platform")
    session = pool.session(_target())
    status, _, err = session.execute("systemctl restart vault", step="restart vault")
    assert status == 0, err
    block = cast(VaultServer, VaultServer.load(SPEC.vault.block))
    probe = hvac.Client(url=block.address, verify=ca_file(block.ca_certificate))
    from tasks.vault import wait_until_serving

    assert wait_until_serving(probe, VM.name)["sealed"] is True
    assert unseal_vault(SPEC, INVENTORY, pool, spec_dir=str(LAB_SPEC.parent)) == \
        {"initialised": False, "unsealed": True}
    assert kv_read(block.client(), "test/kept") == {"v": "42"}


def test_second_run_changes_nothing(lab: Lab, pool: ConnectionPool) -> None:
    install, unsealed, configured = _all_steps(pool)
    assert install["changed"] == ""
    assert unsealed == {"initialised": False, "unsealed": False}
    assert configured["changed"] == ""
