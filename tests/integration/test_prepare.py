"""Phase 2 on the lab: the tier-100 inventory made by phase 1, then prepared over SSH."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
from prefect import get_client
from prefect.blocks.system import Secret
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

from flows.prepare import prepare_vms
from flows.provision import provision_vms
from lab.lab import Lab
from sizing.inventory import build_inventory
from tasks import host_keys
from tasks.blocks import secret_text
from tasks.prepare import first_session, ssh_pool
from tasks.spec import read_spec
from tests.conftest import LAB_SPEC
from tests.labkit import lab_with_prefect, ssh

pytestmark = [pytest.mark.lab, pytest.mark.prefect,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

SPEC = read_spec(LAB_SPEC)
INVENTORY = build_inventory(SPEC)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_with_prefect(LAB_SPEC, vcsim_port=18994) as lab:
        assert provision_vms(spec_path=str(LAB_SPEC)).created == 18
        yield lab


def _ssh(lab: Lab, vm_name: str, command: str,
         user: str = "platform") -> subprocess.CompletedProcess[str]:
    return ssh(lab, SPEC, vm_name, command, user=user)


def _table() -> str:
    async def latest() -> Any:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["phase-2-prepare-vms"])),
                sort=ArtifactSort.CREATED_DESC, limit=1)
            return found[0].data
    return str(asyncio.run(latest()))


def test_full_phase_then_nothing_to_change(lab: Lab) -> None:
    first = prepare_vms(spec_path=str(LAB_SPEC))
    assert (first.changed, first.unchanged) == (18, 0)
    out = _ssh(lab, "lab-lblan-01", "hostname; id -nG; sudo -n nft list ruleset | head -3; "
                                    "cat /etc/hostname")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "lab-lblan-01" and "platform-admins" in lines[1]
    assert "table inet platform" in out.stdout
    assert _ssh(lab, "lab-lblan-01", "true", user="debian").returncode != 0, \
        "the bootstrap login is gone"

    again = prepare_vms(spec_path=str(LAB_SPEC))
    assert (again.changed, again.unchanged) == (0, 18)


def test_hand_edited_sshd_dropin_is_put_back(lab: Lab) -> None:
    dropin = "/etc/ssh/sshd_config.d/50-platform-hardening.conf"
    edit = _ssh(lab, "lab-gitops-01", "sudo -n sed -i 's/PasswordAuthentication no/"
                                      f"PasswordAuthentication yes/' {dropin}")
    assert edit.returncode == 0, edit.stderr
    result = prepare_vms(spec_path=str(LAB_SPEC))
    assert (result.changed, result.unchanged) == (1, 17)
    assert "file /etc/ssh/sshd_config.d/50-platform-hardening.conf" in _table()
    assert "PasswordAuthentication no" in _ssh(lab, "lab-gitops-01", f"cat {dropin}").stdout


def test_failed_validator_keeps_the_live_file_and_names_the_host(lab: Lab) -> None:
    dropin = "/etc/ssh/sshd_config.d/50-platform-hardening.conf"
    # Break sshd's main configuration: the drop-in, checked with it, cannot pass `sshd -t`.
    _ssh(lab, "lab-monitoring-01", f"sudo -n sed -i 's/MaxAuthTries 3/MaxAuthTries 4/' {dropin}"
         " && echo 'NoSuchOption yes' | sudo -n tee -a /etc/ssh/sshd_config >/dev/null")
    before = _ssh(lab, "lab-monitoring-01", f"cat {dropin}").stdout
    state = prepare_vms(spec_path=str(LAB_SPEC), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "1 of 18 hosts failed" in message and "lab-monitoring-01" in message
    assert "NoSuchOption" in message, "the validator's own output is quoted"
    assert _ssh(lab, "lab-monitoring-01", f"cat {dropin}").stdout == before
    _ssh(lab, "lab-monitoring-01", "sudo -n sed -i '/NoSuchOption/d' /etc/ssh/sshd_config")
    assert prepare_vms(spec_path=str(LAB_SPEC)).changed == 1


def test_the_first_connection_waits_for_a_restarting_sshd(
        lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    """sshd down for a moment (the host's PID 1 starts it again after 1 s, as systemd would;
    a fresh VM's sshd likewise comes after its IP): phase 2 waits instead of failing."""
    vm = INVENTORY.by_name("lab-gitops-01")
    admin = host_keys.admin_target(SPEC, vm)
    bootstrap = replace(admin, user=SPEC.ssh.bootstrap_user)
    assert lab.hosts.exec(vm.name, ["pkill", "-x", "sshd"]).returncode == 0
    with ssh_pool(SPEC) as pool, caplog.at_level(logging.INFO):
        session, login = first_session(SPEC, pool, admin, bootstrap, logging.getLogger("t"))
        assert login == SPEC.ssh.user
        ran = session.connection.run("hostname", hide=True, in_stream=False)
        assert ran.stdout.strip() == vm.name
    assert any(f"{vm.name}: waiting for sshd" in r.getMessage() for r in caplog.records)


def test_changed_host_key_is_refused(lab: Lab, tmp_path: Path) -> None:
    vm = INVENTORY.by_name("lab-vault-01")
    name = host_keys.secret_name(SPEC, vm)
    original = cast(Secret, Secret.load(name)).get()
    other = host_keys.generate()
    Secret(value=secret_text({"kind": other.kind, "private": other.private,
                              "public": other.public})).save(name, overwrite=True)
    try:
        state = prepare_vms(spec_path=str(LAB_SPEC), return_state=True)
        assert state.is_failed()
        message = str(state.result(raise_on_failure=False))
        assert "lab-vault-01" in message and "SHA256:" in message
    finally:
        Secret(value=original).save(name, overwrite=True)
