"""Phase 1 on Nutanix AHV: the real `provision_vms` flow, the real NutanixHypervisor block and
the official v4 SDKs, against the Prism Central stand-in (simulated) on loopback.

No lab bridges and no root: the stand-in runs in this process, and a small thread plays the
booting guests (see `BootingGuests`). The tests share one stand-in and one Prefect test
harness (started about 12 s) and run in file order: the first creates the inventory, the
others change it behind the flow's back.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import ntnx_prism_py_client as prism
import ntnx_vmm_py_client as vmm
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.Nic import Nic
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.NicNetworkInfo import NicNetworkInfo
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.SubnetReference import SubnetReference
from prefect import get_client
from prefect.blocks.system import Secret
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from prefect.testing.utilities import prefect_test_harness
from pydantic import SecretStr

from blocks.hypervisor import HypervisorError
from blocks.nutanix import NutanixHypervisor
from blocks.ssh import SshIdentity
from flows.provision import provision_vms
from lab.cloudinit import CloudInitError, host_config
from lab.nutanix import Cluster, Faults, GiB, Image, NutanixStandIn, Subnet
from lab.nutanix.tls import generate_ca
from sizing.inventory import build_inventory
from sizing.spec import NutanixPlacement
from tasks import host_keys
from tasks.cloud_init import render_cloud_init
from tasks.spec import read_spec
from tests.conftest import LAB_SPEC

pytestmark = [pytest.mark.prefect]

USER, PASSWORD = "admin", "Prism/4u-lab-Secret"
CLUSTER = Cluster("AHV-LAB-01", ext_id="0005f6b1-2b2e-4b1c-8d7c-0000000000a1",
                  memory_bytes=512 * GiB)
OTHER = Cluster("AHV-LAB-02", ext_id="0005f6b1-2b2e-4b1c-8d7c-0000000000a2")
IMAGE = Image("debian-12-genericcloud", 2 * GiB)
VM_CREATE = r"^POST /api/vmm/v4\.\d+/ahv/config/vms$"
VM_READ = r"^GET /api/vmm/v4\.\d+/ahv/config/vms/[0-9a-f-]{36}$"


class BootingGuests:
    """Stands in for the guests booting, NOT for Nutanix.

    Like the lab's watcher (lab.watcher), it reads each powered-on VM's cloud-init data (as
    the guest finds it on its config drive), applies it the way the lab does
    (lab.cloudinit.host_config), and reports the static IP of the metadata back through the
    stand-in's `report_guest()`, which Prism then shows as the NIC's learned IP. Prism
    itself is the stand-in; this thread only plays the guest OS.
    """

    def __init__(self, standin: NutanixStandIn) -> None:
        self.standin = standin
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="booting-guests", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for vm in self.standin.lab_vms():
                if vm.power_state != "ON" or not vm.nics or vm.nics[0].learned_ips:
                    continue
                if vm.user_data is None or vm.meta_data is None:
                    self._problem(f"{vm.name}: powered on without cloud-init data")
                    continue
                try:
                    config = host_config(vm.name, vm.meta_data, vm.user_data, bridge="")
                except CloudInitError as error:
                    self._problem(f"{vm.name}: {error}")
                    continue
                try:
                    self.standin.report_guest(vm.ext_id, {0: [str(config.address.ip)]},
                                              config.hostname)
                except (KeyError, ValueError):  # powered off or deleted meanwhile
                    continue

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)


@dataclass
class World:
    standin: NutanixStandIn
    guests: BootingGuests
    tmp: Path
    spec_path: str


def _spec_variant(directory: Path, name: str, **hypervisor: Any) -> str:
    """The lab spec on Nutanix; keyword arguments change `hypervisor`'s keys."""
    data = yaml.safe_load(LAB_SPEC.read_text())
    data["hypervisor"] = {"kind": "nutanix", "block": "lab-prism", "concurrency": 8,
                          "resize": True,
                          "nutanix": {"cluster": CLUSTER.name, "image": IMAGE.name}}
    data["hypervisor"].update(hypervisor)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _ssh_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()).decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("provision-nutanix")
    spec = read_spec(LAB_SPEC)
    subnets = [Subnet(zone.network, zone.vlan or 100, CLUSTER.ext_id)
               for _, zone in spec.zones.items()]
    # Subnet names repeat across clusters on Prism: the block must pick the cluster's own.
    subnets.append(Subnet(spec.zones.lan.network, 999, OTHER.ext_id))
    standin = NutanixStandIn(tmp / "nutanix.json", USER, PASSWORD, clusters=[CLUSTER, OTHER],
                             subnets=subnets, images=[IMAGE], task_seconds=0.2)
    standin.start()
    guests = BootingGuests(standin)
    guests.start()
    try:
        with prefect_test_harness(server_startup_timeout=60):
            NutanixHypervisor(address=f"127.0.0.1:{standin.port}", user=USER,
                              password=SecretStr(PASSWORD),
                              ca_bundle=standin.ca_file.read_text()).save("lab-prism")
            SshIdentity(user="platform", private_key=SecretStr(_ssh_key())).save("lab-ssh")
            yield World(standin, guests, tmp, _spec_variant(tmp, "platform"))
    finally:
        guests.stop()
        standin.stop()
    assert guests.problems == []


# --- reading the stand-in through the SDK, as an operator would --------------------------------


def _client(module: Any, standin: NutanixStandIn) -> Any:
    config = module.Configuration()
    config.host, config.port = "127.0.0.1", standin.port
    config.username, config.password = USER, PASSWORD
    config.root_ca_certificate_file = str(standin.ca_file)
    config.max_retry_attempts, config.backoff_factor = 0, 0.01
    return module.ApiClient(configuration=config)


@dataclass
class Sdk:
    client: Any
    vms: Any
    tasks: Any

    def vm(self, name: str) -> tuple[Any, str]:
        [found] = self.vms.list_vms(_filter=f"name eq '{name}'").data
        read = self.vms.get_vm_by_id(found.ext_id)
        return read.data, self.client.get_etag(read)

    def run(self, reference: Any) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            task = self.tasks.get_task_by_id(reference.data.ext_id).data
            if str(task.status) in ("SUCCEEDED", "FAILED"):
                assert str(task.status) == "SUCCEEDED", task.error_messages
                return
            time.sleep(0.05)
        raise AssertionError("task did not end")


@pytest.fixture
def sdk(world: World) -> Sdk:
    client = _client(vmm, world.standin)
    return Sdk(client, vmm.VmApi(api_client=client),
               prism.TasksApi(api_client=_client(prism, world.standin)))


def _resize_behind_the_back(sdk: Sdk, name: str, *, sockets: int | None = None,
                            memory_gb: int | None = None) -> None:
    """What an operator does in Prism: shrinking needs the VM off, growing does not."""
    vm, etag = sdk.vm(name)
    shrink = (sockets or vm.num_sockets) < vm.num_sockets or \
        (memory_gb or 0) * GiB < (vm.memory_size_bytes if memory_gb else 0)
    was_on = str(vm.power_state) == "ON"
    if shrink and was_on:
        sdk.run(sdk.vms.power_off_vm(vm.ext_id, if_match=etag))
        vm, etag = sdk.vm(name)
    if sockets is not None:
        vm.num_sockets = sockets
    if memory_gb is not None:
        vm.memory_size_bytes = memory_gb * GiB
    sdk.run(sdk.vms.update_vm_by_id(vm.ext_id, vm, if_match=etag))
    if shrink and was_on:
        _, etag = sdk.vm(name)
        sdk.run(sdk.vms.power_on_vm(vm.ext_id, if_match=etag))


def _artifact(key: str) -> Any:
    async def read() -> Any:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC)
            return found[0] if found else None
    return asyncio.run(read())


def _named(world: World, name: str) -> list[Any]:
    return [vm for vm in world.standin.lab_vms() if vm.name == name]


# --- the scenarios -------------------------------------------------------------------------------


def test_missing_image_fails_before_any_vm(world: World) -> None:
    spec_path = _spec_variant(world.tmp, "missing-image",
                              nutanix={"cluster": CLUSTER.name, "image": "debian-13-missing"})
    state = provision_vms(spec_path=spec_path, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "image 'debian-13-missing' not found on Prism Central" in message
    assert f"(found: {IMAGE.name})" in message
    assert "nothing was created" in message
    assert world.standin.lab_vms() == []
    assert not [r for r in world.standin.requests if r.method == "POST"]


def test_tier_100_provisioned_then_unchanged(world: World, sdk: Sdk) -> None:
    spec = read_spec(world.spec_path)
    inventory = build_inventory(spec)
    started = time.monotonic()
    result = provision_vms(spec_path=world.spec_path)
    first_run = time.monotonic() - started
    assert (result.created, result.changed, result.unchanged) == (18, 0, 0)

    identity = cast(SshIdentity, SshIdentity.load("lab-ssh"))
    ours = {ext_id for ext_id, subnet in world.standin.store.subnets.items()
            if subnet["clusterExtId"] == CLUSTER.ext_id}
    lab = {vm.name: vm for vm in world.standin.lab_vms()}
    assert sorted(lab) == sorted(vm.name for vm in inventory.vms)
    for want in inventory.vms:
        vm = lab[want.name]
        zone = spec.zones.get(want.zone)
        assert (vm.cluster_name, vm.power_state) == (CLUSTER.name, "ON")
        assert vm.num_vcpus == want.vcpu
        assert vm.memory_bytes == want.memory_gb * GiB
        [nic] = vm.nics
        assert (nic.subnet_name, nic.vlan_id) == (zone.network, zone.vlan)
        assert nic.subnet_ext_id in ours
        assert nic.learned_ips == (str(want.ip),)
        key = host_keys.load(spec, want)
        assert key is not None
        expected = render_cloud_init(spec, want, [identity.public_key()], [key],
                                     instance_id=f"{spec.name}-{want.name}")
        assert vm.user_data == expected.userdata
        assert vm.meta_data == expected.metadata
        read, _ = sdk.vm(want.name)
        assert read.description.startswith("platform.owner=lab")
        assert (read.num_sockets, read.num_cores_per_socket) == (want.vcpu, 1)
        sizes = tuple(d.backing_info.disk_size_bytes // GiB for d in read.disks)
        assert sizes == want.disks_gb
        boot = read.disks[0].backing_info.data_source.reference.image_ext_id
        assert boot == IMAGE.ext_id
        assert read.guest_customization is None  # Prism never returns it

    table = _artifact("phase-1-provision-vms")
    assert table is not None and '"created"' in table.data
    assert "BEGIN OPENSSH PRIVATE KEY" not in table.data

    again = provision_vms(spec_path=world.spec_path)
    assert (again.created, again.changed, again.unchanged) == (0, 0, 18)
    print(f"\ntier 100 on the Nutanix stand-in: first run {first_run:.1f} s")


def test_resized_behind_the_flows_back(world: World, sdk: Sdk) -> None:
    _resize_behind_the_back(sdk, "lab-vault-01", sockets=1)
    _resize_behind_the_back(sdk, "lab-gitops-01", memory_gb=64)

    no_resize = _spec_variant(world.tmp, "no-resize", resize=False)
    state = provision_vms(spec_path=no_resize, return_state=True)
    assert state.is_completed()
    table = _artifact("phase-1-provision-vms").data
    assert "vCPU 1 < 2: below the spec; set hypervisor.resize: true to fix" in table
    assert "memory GB 64 > 8: larger than the spec, left as is" in table
    assert sdk.vm("lab-vault-01")[0].num_sockets == 1

    mark = len(world.standin.requests)
    result = provision_vms(spec_path=world.spec_path)  # resize: true
    assert (result.created, result.changed, result.unchanged) == (0, 1, 17)
    vault, _ = sdk.vm("lab-vault-01")
    assert (vault.num_sockets, str(vault.power_state)) == (2, "ON")
    assert sdk.vm("lab-gitops-01")[0].memory_size_bytes == 64 * GiB, "never shrunk"
    during = world.standin.requests[mark:]
    assert [r.path for r in during if r.method == "PUT"] == [
        f"/api/vmm/v4.3/ahv/config/vms/{vault.ext_id}"]
    assert not [r for r in during if "power-off" in r.path], "grown while running"


def test_disks_and_nic_below_the_spec(world: World, sdk: Sdk, tmp_path: Path) -> None:
    """Disks and NICs have calls of their own (the VM's PUT ignores them). Without resize
    each difference is reported; with it a disk too small is grown, a missing one added and
    the NIC put back on its zone's subnet, on the running VM; then nothing changes."""
    data = yaml.safe_load(Path(world.spec_path).read_text())
    data["overrides"] = {"vault": {"disks_gb": [40, 50, 10]}}
    bigger = tmp_path / "bigger-disks.yaml"
    bigger.write_text(yaml.safe_dump(data))
    data["hypervisor"]["resize"] = False
    report_only = tmp_path / "bigger-disks-report-only.yaml"
    report_only.write_text(yaml.safe_dump(data))
    # An operator moves the Vault VM's NIC to the DMZ subnet in Prism.
    dmz_subnet = _named(world, "lab-lbdmz-01")[0].nics[0].subnet_ext_id
    vault_subnet = _named(world, "lab-vault-01")[0].nics[0].subnet_ext_id
    vm, etag = sdk.vm("lab-vault-01")
    sdk.run(sdk.vms.update_nic_by_id(vm.ext_id, vm.nics[0].ext_id, Nic(
        network_info=NicNetworkInfo(subnet=SubnetReference(ext_id=dmz_subnet))),
        if_match=etag))

    result = provision_vms(spec_path=str(report_only))
    assert (result.created, result.changed, result.unchanged) == (0, 0, 18)
    table = _artifact("phase-1-provision-vms").data
    for item in ("disk 2 20 GB < 50 GB", "disk 3 missing (want 10 GB)",
                 f"network {read_spec(str(bigger)).zones.dmz.network} != "):
        assert f"{item}" in table and "set hypervisor.resize: true to fix" in table, item

    mark = len(world.standin.requests)
    result = provision_vms(spec_path=str(bigger))
    assert (result.created, result.changed, result.unchanged) == (0, 1, 17)
    vm, _ = sdk.vm("lab-vault-01")
    assert tuple(d.backing_info.disk_size_bytes // GiB for d in vm.disks) == (40, 50, 10)
    assert vm.nics[0].network_info.subnet.ext_id == vault_subnet
    assert str(vm.power_state) == "ON"
    during = [f"{r.method} {r.path}" for r in world.standin.requests[mark:]]
    base = f"/api/vmm/v4.3/ahv/config/vms/{vm.ext_id}"
    changes = [line for line in during if line.split()[0] in ("POST", "PUT", "DELETE")
               and "/prism/" not in line]
    assert changes == [f"PUT {base}/disks/{vm.disks[1].ext_id}", f"POST {base}/disks",
                       f"PUT {base}/nics/{vm.nics[0].ext_id}"], changes
    table = _artifact("phase-1-provision-vms").data
    assert "disk 2 of lab-vault-01 grown to 50 GB" in table
    assert "NIC moved to subnet" in table

    again = provision_vms(spec_path=str(bigger))
    assert (again.created, again.changed, again.unchanged) == (0, 0, 18)


def test_transient_faults_are_retried(world: World) -> None:
    standin = world.standin
    # Three 503 in a row outlast the SDK's own two retries: the preflight task retries.
    standin.set_faults(Faults(fail_first=3, path_pattern=r"^GET /api/clustermgmt/v4"))
    result = provision_vms(spec_path=world.spec_path)
    assert standin.faults.injected == [("fail", "GET /api/clustermgmt/v4.3/config/clusters")] * 3
    assert (result.created, result.changed, result.unchanged) == (0, 0, 18)

    # Cut connections while the VMs are read: each VM task retries.
    standin.set_faults(Faults(reset_first=3, path_pattern=VM_READ))
    before = len(standin.faults.injected)
    result = provision_vms(spec_path=world.spec_path)
    assert [a for a, _ in standin.faults.injected[before:]] == ["reset"] * 3
    assert (result.created, result.changed, result.unchanged) == (0, 0, 18)
    standin.set_faults(Faults())


def test_vm_deleted_behind_the_flows_back_is_made_again(world: World) -> None:
    placement = NutanixPlacement(cluster=CLUSTER.name, image=IMAGE.name)
    session = cast(NutanixHypervisor, NutanixHypervisor.load("lab-prism")).open(placement)
    try:
        [old] = _named(world, "lab-lbdmz-02")
        assert session.delete_vm("lab-lbdmz-02") is True  # powered off, then deleted
        assert _named(world, "lab-lbdmz-02") == []
        assert session.delete_vm("lab-lbdmz-02") is False
    finally:
        session.close()
    # The same cloud-init makes the same request id: Prism answers with the first create,
    # whose VM is gone; the block must ask again instead of trusting that answer.
    mark = len(world.standin.requests)
    result = provision_vms(spec_path=world.spec_path)
    assert (result.created, result.changed, result.unchanged) == (1, 0, 17)
    creates = [r for r in world.standin.requests[mark:] if re.match(VM_CREATE,
                                                                     f"{r.method} {r.path}")]
    assert len(creates) == 2, "the remembered answer, then a new request"
    [new] = _named(world, "lab-lbdmz-02")
    assert new.ext_id != old.ext_id and new.nics[0].learned_ips == ("10.231.1.21",)


def test_lost_create_answer_makes_one_vm(world: World) -> None:
    spec = read_spec(world.spec_path)
    vm = build_inventory(spec).by_name("lab-lbdmz-01")
    placement = NutanixPlacement(cluster=CLUSTER.name, image=IMAGE.name)
    session = cast(NutanixHypervisor, NutanixHypervisor.load("lab-prism")).open(placement)
    try:
        assert session.delete_vm(vm.name)
    finally:
        session.close()
    Secret.delete(host_keys.secret_name(spec, vm))  # a fresh VM with a fresh host key
    # Prism makes the VM, then the connection drops before its answer arrives.
    world.standin.set_faults(Faults(drop_first=1, path_pattern=VM_CREATE))
    mark = len(world.standin.requests)
    try:
        result = provision_vms(spec_path=world.spec_path)
    finally:
        world.standin.set_faults(Faults())
    assert [a for a, _ in world.standin.faults.injected][-1:] == ["drop"]
    assert (result.created, result.changed, result.unchanged) == (1, 0, 17)
    assert len(_named(world, vm.name)) == 1, "the repeated create made a second VM"
    creates = [r for r in world.standin.requests[mark:] if re.match(VM_CREATE,
                                                                     f"{r.method} {r.path}")]
    assert [r.fault for r in creates] == ["drop", None], "sent again with the same request id"


def test_wrong_password_fails_at_once(world: World) -> None:
    wrong = "Wrong-Pass-1234"
    NutanixHypervisor(address=f"127.0.0.1:{world.standin.port}", user=USER,
                      password=SecretStr(wrong),
                      ca_bundle=world.standin.ca_file.read_text()).save("wrong-prism")
    spec_path = _spec_variant(world.tmp, "wrong-password", block="wrong-prism")
    mark = len(world.standin.requests)
    state = provision_vms(spec_path=spec_path, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert f"Prism Central 127.0.0.1:{world.standin.port} refused the login of {USER}" in message
    assert wrong not in message and PASSWORD not in message
    rejected = [r for r in world.standin.requests[mark:] if r.auth == "rejected"]
    assert len(rejected) <= 2, "a refused login is not retried"


def test_untrusted_certificate_names_ca_bundle(world: World) -> None:
    generate_ca(world.tmp / "other-ca", "Some other CA")
    block = NutanixHypervisor(address=f"127.0.0.1:{world.standin.port}", user=USER,
                              password=SecretStr(PASSWORD),
                              ca_bundle=(world.tmp / "other-ca" / "nutanix-ca.pem").read_text())
    session = block.open(NutanixPlacement(cluster=CLUSTER.name, image=IMAGE.name))
    try:
        with pytest.raises(HypervisorError) as refused:
            session.preflight(["lab-lan"])
    finally:
        session.close()
    assert "TLS verification failed" in str(refused.value)
    assert "ca_bundle" in str(refused.value)
