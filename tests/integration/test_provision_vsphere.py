"""Phase 1 on vSphere, against the lab's vcsim (real vSphere API) and its booting guests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import get_client
from prefect.blocks.system import Secret
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from pydantic import SecretStr
from pyVim.task import WaitForTask
from pyVmomi import vim

from blocks.hypervisor import OWNER_KEY, HypervisorError, TransientHypervisorError
from blocks.vsphere import VsphereHypervisor, VsphereSession
from flows.provision import provision_vms
from lab.lab import Lab
from lab.vcsim import all_of, connect
from sizing.inventory import build_inventory
from tasks import host_keys
from tasks.cloud_init import HostKey
from tasks.spec import read_spec
from tests.conftest import LAB_SPEC
from tests.labkit import lab_with_prefect

pytestmark = [pytest.mark.lab, pytest.mark.prefect,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]


class DroppingProxy:
    """A TCP proxy that closes the first ``drop`` connections at once (a flaky network)."""

    def __init__(self, target: tuple[str, int], drop: int) -> None:
        self.target, self.drop, self.dropped = target, drop, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.dropped < self.drop:
                self.dropped += 1
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # Clones take time, as on a real vCenter: the flow must wait on its tasks.
    with lab_with_prefect(LAB_SPEC, vcsim_port=18996,
                          vcsim_args=("-method-delay", "CloneVM_Task:200")) as lab:
        yield lab


def _spec_variant(tmp_path: Path, **changes: Any) -> str:
    data = yaml.safe_load(LAB_SPEC.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _vms(lab: Lab) -> dict[str, Any]:
    access = lab.vcsim.access()
    assert access is not None
    return {vm.name: vm for vm in all_of(connect(access), vim.VirtualMachine)
            if not vm.config.template}


def _artifact(key: str) -> Any:
    async def read() -> Any:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC)
            return found[0] if found else None
    return asyncio.run(read())


def test_missing_template_fails_before_any_vm(lab: Lab, tmp_path: Path) -> None:
    spec_path = _spec_variant(tmp_path, hypervisor__vsphere__template="ubuntu-9-template")
    before = set(_vms(lab))
    state = provision_vms(spec_path=spec_path, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "template 'ubuntu-9-template' not found in datacenter LabDC" in message
    assert "nothing was created" in message
    assert set(_vms(lab)) == before


def test_tier_100_provisioned_then_unchanged(lab: Lab) -> None:
    spec = read_spec(LAB_SPEC)
    inventory = build_inventory(spec)
    result = provision_vms(spec_path=str(LAB_SPEC))
    assert (result.created, result.changed, result.unchanged) == (18, 0, 0)

    vms = _vms(lab)
    for want in inventory.vms:
        vm = vms[want.name]
        hardware = vm.config.hardware
        assert hardware.numCPU == want.vcpu
        assert hardware.memoryMB == want.memory_gb * 1024
        disks = [d.capacityInKB // (1024 * 1024) for d in hardware.device
                 if isinstance(d, vim.vm.device.VirtualDisk)]
        assert tuple(disks) == want.disks_gb
        nics = [d for d in hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        assert len(nics) == 1
        assert [n.name for n in vm.network] == [spec.zones.get(want.zone).network]
        extra = {o.key: o.value for o in vm.config.extraConfig}
        assert extra[OWNER_KEY] == "lab"
        assert extra["guestinfo.userdata.encoding"] == "base64"
        assert vm.guest.ipAddress == str(want.ip)
        assert vm.runtime.powerState == "poweredOn"
        assert lab.hosts.booted(want.name)

    table = _artifact("phase-1-provision-vms")
    assert table is not None and '"created"' in table.data
    assert "BEGIN OPENSSH PRIVATE KEY" not in table.data

    # Each pair is a Secret block whose value Prefect treats as secret: read without
    # secrets it is obfuscated. A retried task that makes the pair again gets the stored one.
    vault = inventory.by_name("lab-vault-01")
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            host_keys.secret_name(spec, vault), "secret", include_secrets=False)
    assert "PRIVATE KEY" not in str(document.data)
    pair = host_keys.load_prefect(spec, vault)
    assert pair is not None and "BEGIN OPENSSH PRIVATE KEY" in pair.private
    assert host_keys.store(spec, vault, host_keys.generate()) == pair

    # The second run learns which VMs have a stored host key from one listing.
    assert host_keys.stored(spec, list(inventory.vms)) == {vm.name for vm in inventory.vms}
    assert host_keys.stored(spec, [inventory.by_name("lab-vault-01")]) == {"lab-vault-01"}
    again = provision_vms(spec_path=str(LAB_SPEC))
    assert (again.created, again.changed, again.unchanged) == (0, 0, 18)


def test_resized_behind_the_flows_back(lab: Lab, tmp_path: Path) -> None:
    vms = _vms(lab)
    small, large = vms["lab-vault-01"], vms["lab-gitops-01"]
    WaitForTask(small.ReconfigVM_Task(vim.vm.ConfigSpec(numCPUs=1)))
    WaitForTask(large.ReconfigVM_Task(vim.vm.ConfigSpec(memoryMB=64 * 1024)))

    no_resize = _spec_variant(tmp_path, hypervisor__resize=False)
    state = provision_vms(spec_path=no_resize, return_state=True)
    assert state.is_completed()
    table = _artifact("phase-1-provision-vms").data
    assert "vCPU 1 < 2: below the spec; set hypervisor.resize: true to fix" in table
    assert "memory GB 64 > 8: larger than the spec, left as is" in table
    assert small.config.hardware.numCPU == 1

    result = provision_vms(spec_path=str(LAB_SPEC))  # the lab spec says resize: true
    assert result.changed == 1 and result.unchanged == 17
    assert small.config.hardware.numCPU == 2
    assert large.config.hardware.memoryMB == 64 * 1024, "never shrunk"


def test_transient_faults_are_retried(lab: Lab, tmp_path: Path) -> None:
    access = lab.vcsim.access()
    assert access is not None
    host, port = access.address.rsplit(":", 1)
    proxy = DroppingProxy((host, int(port)), drop=2)
    try:
        VsphereHypervisor(address=f"127.0.0.1:{proxy.port}", user=access.user,
                          password=SecretStr(access.password),
                          ca_bundle=access.ca_file.read_text()).save("flaky-vcenter")
        spec_path = _spec_variant(tmp_path, hypervisor__block="flaky-vcenter")
        result = provision_vms(spec_path=spec_path)
        assert proxy.dropped == 2
        assert result.unchanged + result.changed == 18
    finally:
        proxy.close()


def _session(lab: Lab) -> VsphereSession:
    access = lab.vcsim.access()
    assert access is not None
    placement = read_spec(LAB_SPEC).hypervisor.vsphere
    assert placement is not None
    return VsphereHypervisor(address=access.address, user=access.user,
                             password=SecretStr(access.password),
                             ca_bundle=access.ca_file.read_text()).open(placement)


def test_an_expired_session_is_a_passing_fault(lab: Lab) -> None:
    """vCenter ends idle sessions (30 min by default): a session kept for the phase's next
    task may be gone; that is retried with a fresh login, not taken for a refusal."""
    session = _session(lab)
    try:
        manager = session.content.sessionManager
        assert manager is not None
        manager.Logout()
        with pytest.raises(TransientHypervisorError, match="NotAuthenticated"):
            session.find_vm("lab-vault-01")
    finally:
        session.close()


def test_bad_password_fails_at_once(lab: Lab, tmp_path: Path) -> None:
    access = lab.vcsim.access()
    assert access is not None
    VsphereHypervisor(address=access.address, user=access.user,
                      password=SecretStr("wrong-password"),
                      ca_bundle=access.ca_file.read_text()).save("wrong-vcenter")
    spec_path = _spec_variant(tmp_path, hypervisor__block="wrong-vcenter")
    state = provision_vms(spec_path=spec_path, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert f"refused the login of {access.user}" in message
    assert "wrong-password" not in message


def test_a_vm_destroyed_while_booting_is_named(lab: Lab) -> None:
    """Late in this file: it destroys a VM the earlier tests use."""
    waiting, other = _session(lab), _session(lab)
    try:
        assert waiting.find_vm("lab-vault-01") is not None
        assert other.delete_vm("lab-vault-01")
        with pytest.raises(HypervisorError, match=r"lab-vault-01 vanished .* while booting"):
            waiting.wait_for_ip("lab-vault-01", "10.231.0.22", timeout=5)
    finally:
        waiting.close()
        other.close()


def test_a_vm_whose_host_key_is_not_kept_is_deleted_again(
        lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new VM's pair is stored while vCenter clones it; a VM whose pair could not be
    kept is deleted before it ever boots, and one whose pair another try stored meanwhile
    is made again with that pair."""
    spec = read_spec(LAB_SPEC)
    vm = build_inventory(spec).by_name("lab-vault-01")
    provision_vms(spec_path=str(LAB_SPEC))  # the others exist, whatever ran before
    session = _session(lab)
    try:
        session.delete_vm(vm.name)
    finally:
        session.close()
    with contextlib.suppress(ValueError):
        Secret.delete(host_keys.secret_name(spec, vm))
    real_store = host_keys.store

    def refused(*args: Any) -> HostKey:
        raise RuntimeError("the Prefect API refused the secret (test)")

    monkeypatch.setattr(host_keys, "store", refused)
    state = provision_vms(spec_path=str(LAB_SPEC), return_state=True)
    assert state.is_failed()
    assert "lab-vault-01: the Prefect API refused the secret (test)" in str(
        state.result(raise_on_failure=False))
    assert vm.name not in _vms(lab)
    assert host_keys.load_prefect(spec, vm) is None

    other = host_keys.generate()
    calls: list[str] = []

    def stored_meanwhile(spec: Any, vm: Any, key: HostKey) -> HostKey:
        calls.append(vm.name)
        return real_store(spec, vm, other)  # as if an earlier try had stored its own pair

    monkeypatch.setattr(host_keys, "store", stored_meanwhile)
    result = provision_vms(spec_path=str(LAB_SPEC))
    assert (result.created, result.unchanged) == (1, 17)
    assert calls == [vm.name], "the retry uses the stored pair and stores nothing"
    extra = {o.key: o.value for o in _vms(lab)[vm.name].config.extraConfig}
    assert other.public in base64.b64decode(extra["guestinfo.userdata"]).decode()
    assert lab.hosts.booted(vm.name)
