"""The lab with a Nutanix spec: the Prism Central stand-in as the hypervisor, and a VM made
through the project's NutanixHypervisor block boots a lab host reachable over SSH."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from blocks.hypervisor import VmWanted
from blocks.nutanix import NutanixHypervisor
from lab.lab import Lab, ssh_answers
from lab.prefect_stack import PrefectStack
from lab.ssh_keys import ensure_identity
from sizing.inventory import build_inventory
from sizing.spec import PlatformSpec
from tasks import host_keys
from tasks.cloud_init import render_cloud_init
from tasks.spec import read_spec
from tests.conftest import LAB_SPEC, exclusive_lab

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]


@pytest.fixture(scope="module")
def nutanix_spec(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, PlatformSpec]:
    data = yaml.safe_load(LAB_SPEC.read_text())
    data["hypervisor"] = {"kind": "nutanix", "block": "lab-prism", "concurrency": 4,
                          "nutanix": {"cluster": "AHV-LAB", "image": "debian-12-cloud"}}
    path = tmp_path_factory.mktemp("spec") / "nutanix.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path), read_spec(path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory,
        nutanix_spec: tuple[str, PlatformSpec]) -> Iterator[Lab]:
    state = tmp_path_factory.mktemp("lab-ntx") / "state"
    with exclusive_lab():  # first: a refusal leaves no setting behind
        os.environ["PLATFORM_LAB_PRISM_PORT"] = "19441"
        lab = Lab(nutanix_spec[0], nutanix_spec[1], state_dir=state,
                  prefect=PrefectStack(state_dir=state, port=4318))
        try:
            yield lab
        finally:
            lab.down()
            os.environ.pop("PLATFORM_LAB_PRISM_PORT", None)
            assert not state.exists()


def test_nutanix_vm_boots_a_reachable_host(lab: Lab, nutanix_spec: tuple[str, PlatformSpec],
                                           tmp_path: Path) -> None:
    done = lab.up(with_prefect=False)
    assert any("Nutanix Prism Central stand-in" in line for line in done)
    assert lab.up(with_prefect=False) == []
    spec = nutanix_spec[1]
    vm = build_inventory(spec).by_name("lab-monitoring-01")
    access = lab.nutanix.access()
    assert access is not None
    block = NutanixHypervisor(address=access.address, user=access.user,
                              password=SecretStr(access.password),
                              ca_bundle=access.ca_file.read_text())
    user_key = ensure_identity(tmp_path / "ssh")
    host_key = host_keys.generate()
    cloud_init = render_cloud_init(spec, vm, [(tmp_path / "ssh" / "id_ed25519.pub").read_text()],
                                   [host_key], instance_id="ntx-monitoring-1")
    assert spec.hypervisor.nutanix is not None
    session = block.open(spec.hypervisor.nutanix)
    try:
        assert session.preflight(["lab-lan", "lab-dmz", "lab-integration"]) == []
        result = session.ensure_vm(VmWanted(
            name=vm.name, vcpu=vm.vcpu, memory_gb=vm.memory_gb, disks_gb=vm.disks_gb,
            network="lab-lan", owner=spec.name, cloud_init=cloud_init), resize=False)
        assert result.action == "created"
        assert session.power_on(vm.name)
        started = time.monotonic()
        assert session.wait_for_ip(vm.name, str(vm.ip), timeout=15) == str(vm.ip)
        while not ssh_answers(str(vm.ip)) and time.monotonic() - started < 10:
            time.sleep(0.1)
        known = tmp_path / "known_hosts"
        known.write_text(f"{vm.ip} {host_key.public}\n")
        ssh = subprocess.run(
            ["ssh", "-i", str(user_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}",
             f"debian@{vm.ip}", "hostname"], capture_output=True, text=True, timeout=30,
            check=False)
        assert ssh.returncode == 0, ssh.stderr
        assert ssh.stdout.strip() == vm.name
        assert {"vm": vm.name, "power": "on", "ip": str(vm.ip), "host": "up",
                "ssh": "yes"} in lab.vm_rows()
        assert session.delete_vm(vm.name)
        deadline = time.monotonic() + 10
        while vm.name in lab.hosts.names() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert vm.name not in lab.hosts.names()
    finally:
        session.close()
