"""The Nutanix Prism Central stand-in, driven by the real Nutanix v4 SDKs over HTTPS.

Each test starts its own stand-in on loopback and stops it. The SDK clients are the
official ones, configured the way the project configures them (host, port, credentials,
certificate verification against the stand-in's CA), so what passes here is what the SDKs
send and understand: the version check, the session cookie, ETags, tasks and error bodies.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ntnx_clustermgmt_py_client as clu
import ntnx_networking_py_client as net
import ntnx_prism_py_client as prism
import ntnx_vmm_py_client as vmm
import pytest
import urllib3
from ntnx_vmm_py_client.models.common.v1.config.IPv4Address import IPv4Address
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.CloudInit import CloudInit
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.ClusterReference import ClusterReference
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.DataSource import DataSource
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.Disk import Disk
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.DiskAddress import DiskAddress
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.GuestCustomizationParams import (
    GuestCustomizationParams,
)
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.ImageReference import ImageReference
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.Ipv4Config import Ipv4Config
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.Nic import Nic
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.NicNetworkInfo import NicNetworkInfo
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.SubnetReference import SubnetReference
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.Userdata import Userdata
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.Vm import Vm
from ntnx_vmm_py_client.models.vmm.v4.ahv.config.VmDisk import VmDisk

from lab.nutanix import Cluster, Faults, GiB, Image, NutanixStandIn, Subnet
from lab.nutanix.source import NutanixSource
from lab.nutanix.tls import generate_ca

USER, PASSWORD = "admin", "Nutanix/4u-lab"
CLUSTER = Cluster("AHV-LAB-01", ext_id="0005f6b1-2b2e-4b1c-8d7c-000000000001",
                  memory_bytes=64 * GiB, storage_bytes=500 * GiB)
OTHER = Cluster("AHV-LAB-02", ext_id="0005f6b1-2b2e-4b1c-8d7c-000000000002")
LAN = Subnet("egov-lan", 150, CLUSTER.ext_id, ext_id="6a1c2f3e-0000-4000-8000-000000000150")
DMZ = Subnet("egov-dmz", 160, CLUSTER.ext_id, ext_id="6a1c2f3e-0000-4000-8000-000000000160")
IMAGE = Image("ubuntu-2404-cloudimg", 3 * GiB, ext_id="9e2d7c1a-0000-4000-8000-000000002404")
USER_DATA = "#cloud-config\nhostname: ntx-gitops\n"
META_DATA = "instance-id: ntx-gitops\nlocal-hostname: ntx-gitops\n"
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELED")


@dataclass
class Clients:
    """One ApiClient per namespace, as the project's NutanixHypervisor block holds them."""

    vmm: Any
    prism: Any
    net: Any
    clu: Any

    @property
    def vms(self) -> Any:
        return vmm.VmApi(api_client=self.vmm)

    @property
    def tasks(self) -> Any:
        return prism.TasksApi(api_client=self.prism)


def _configure(module: Any, standin: NutanixStandIn, *, password: str = PASSWORD,
               ca: Path | None = None, retries: int = 0) -> Any:
    config = module.Configuration()
    config.host = "127.0.0.1"
    config.port = standin.port
    config.username = USER
    config.password = password
    config.verify_ssl = True
    config.root_ca_certificate_file = str(ca or standin.ca_file)
    config.max_retry_attempts = retries
    config.backoff_factor = 0.01
    return module.ApiClient(configuration=config)


def clients(standin: NutanixStandIn, **options: Any) -> Clients:
    return Clients(*(_configure(m, standin, **options) for m in (vmm, prism, net, clu)))


class _RepairSdkLogCalls(logging.Filter):
    """The SDKs log `logger.error("text", error)` without a %s (version negotiation).

    Outside pytest, logging prints "--- Logging error ---" and goes on; pytest's log capture
    raises TypeError instead, which would hide the real error. Add the missing %s.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and "%" not in str(record.msg):
            record.msg = f"{record.msg}: " + " ".join(["%s"] * len(record.args))
        return True


@pytest.fixture(autouse=True)
def repaired_sdk_logging() -> Iterator[None]:
    repair = _RepairSdkLogCalls()
    loggers = [logging.getLogger(f"{m.__name__}.api_client") for m in (vmm, prism, net, clu)]
    for logger in loggers:
        logger.addFilter(repair)
    yield
    for logger in loggers:
        logger.removeFilter(repair)


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[NutanixStandIn]:
    server = NutanixStandIn(tmp_path / "nutanix.json", USER, PASSWORD,
                            clusters=[CLUSTER, OTHER], subnets=[LAN, DMZ], images=[IMAGE],
                            task_seconds=0.4)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def api(standin: NutanixStandIn) -> Clients:
    return clients(standin)


def tls(standin: NutanixStandIn) -> ssl.SSLContext:
    """An SSL context trusting the stand-in's CA (for plain httpx calls)."""
    return ssl.create_default_context(cafile=str(standin.ca_file))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def vm_body(name: str, *, memory: int = 4 * GiB, data_disk: int = 20 * GiB,
            image: str = IMAGE.ext_id, cluster: str = CLUSTER.ext_id) -> Any:
    """A VM the way phase 1 builds one: image boot disk, data disk, one NIC, cloud-init."""
    return Vm(
        name=name, num_sockets=2, num_cores_per_socket=1, memory_size_bytes=memory,
        cluster=ClusterReference(ext_id=cluster),
        disks=[Disk(disk_address=DiskAddress(bus_type="SCSI", index=0),
                    backing_info=VmDisk(data_source=DataSource(
                        reference=ImageReference(image_ext_id=image)))),
               Disk(disk_address=DiskAddress(bus_type="SCSI", index=1),
                    backing_info=VmDisk(disk_size_bytes=data_disk))],
        nics=[Nic(network_info=NicNetworkInfo(
            subnet=SubnetReference(ext_id=LAN.ext_id),
            ipv4_config=Ipv4Config(should_assign_ip=False,
                                   ip_address=IPv4Address(value="10.50.0.21"))))],
        guest_customization=GuestCustomizationParams(config=CloudInit(
            cloud_init_script=Userdata(value=b64(USER_DATA)), metadata=b64(META_DATA))))


def wait_task(api: Clients, task_id: str, timeout: float = 10.0) -> tuple[Any, list[str]]:
    """Poll a task to its end; return it and every status seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = api.tasks.get_task_by_id(task_id).data
        status = str(task.status)
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in TERMINAL:
            return task, seen
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} did not end: {seen}")


def create_vm(api: Clients, body: Any) -> tuple[Any, list[str]]:
    reference = api.vms.create_vm(body=body)
    assert type(reference.data).__name__ == "TaskReference"
    return wait_task(api, reference.data.ext_id)


def error_of(error: Any) -> dict[str, Any]:
    """The first AppMessage of a v4 error body, or the SchemaValidationError."""
    data = json.loads(error.body)["data"]
    assert data["$objectType"].endswith(".v4.error.ErrorResponse")
    found = data["error"]
    return found[0] if isinstance(found, list) else found


def test_version_check_comes_first_then_the_session_cookie(standin: NutanixStandIn,
                                                           api: Clients) -> None:
    found = clu.ClustersApi(api_client=api.clu).list_clusters()
    assert api.clu.get_negotiated_version() == "v4.3"
    first, second = standin.requests[:2]
    assert (first.method, first.path, first.auth) == (
        "OPTIONS", "/api/clustermgmt/unversioned/info", "basic")
    assert (second.method, second.path, second.auth) == (
        "GET", "/api/clustermgmt/v4.3/config/clusters", "cookie")
    # Prism Central lists itself among the clusters; it cannot run VMs.
    functions = {c.name: [str(f) for f in c.config.cluster_function] for c in found.data}
    assert functions == {"AHV-LAB-01": ["AOS"], "AHV-LAB-02": ["AOS"],
                         "prism-central": ["PRISM_CENTRAL"]}
    assert found.metadata.total_available_results == 3
    for module, client, version in ((net, api.net, "v4.4"), (prism, api.prism, "v4.4"),
                                    (vmm, api.vmm, "v4.3")):
        client.negotiate_version(["basicAuthScheme"])
        assert client.get_negotiated_version() == version, module


def test_lists_clusters_subnets_and_images_by_name(api: Clients) -> None:
    clusters = clu.ClustersApi(api_client=api.clu).list_clusters(_filter="name eq 'AHV-LAB-02'")
    assert [(c.name, c.ext_id) for c in clusters.data] == [(OTHER.name, OTHER.ext_id)]
    subnets = net.SubnetsApi(api_client=api.net).list_subnets(_filter="name eq 'egov-dmz'")
    assert [(s.name, s.ext_id, s.network_id, s.cluster_reference, str(s.subnet_type))
            for s in subnets.data] == [("egov-dmz", DMZ.ext_id, 160, CLUSTER.ext_id, "VLAN")]
    images = vmm.ImagesApi(api_client=api.vmm).list_images(
        _filter="name eq 'ubuntu-2404-cloudimg'")
    assert [(i.name, i.ext_id, i.size_bytes) for i in images.data] == [
        (IMAGE.name, IMAGE.ext_id, 3 * GiB)]
    containers = clu.StorageContainersApi(api_client=api.clu).list_storage_containers(
        _filter=f"clusterExtId eq '{CLUSTER.ext_id}'")
    [container] = containers.data
    assert container.max_capacity_bytes == 500 * GiB
    none = vmm.ImagesApi(api_client=api.vmm).list_images(_filter="name eq 'windows'")
    assert none.data is None and none.metadata.total_available_results == 0


def test_vm_lifecycle_with_tasks_etags_and_power(standin: NutanixStandIn, api: Clients) -> None:
    task, seen = create_vm(api, vm_body("ntx-gitops"))
    assert seen[-1] == "SUCCEEDED" and "RUNNING" in seen[:-1], seen
    assert task.progress_percentage == 100 and task.completed_time is not None
    [entity] = task.entities_affected
    assert entity.rel == "vmm:ahv:config:vm"
    vm_id = entity.ext_id

    read = api.vms.get_vm_by_id(vm_id)
    etag = api.vmm.get_etag(read)
    vm = read.data
    assert etag and type(vm).__name__ == "Vm"
    assert (vm.name, str(vm.power_state), vm.cluster.ext_id) == ("ntx-gitops", "OFF",
                                                                 CLUSTER.ext_id)
    assert [(d.disk_address.index, d.backing_info.disk_size_bytes) for d in vm.disks] == [
        (0, 3 * GiB), (1, 20 * GiB)]
    assert vm.disks[0].backing_info.data_source.reference.image_ext_id == IMAGE.ext_id
    assert vm.nics[0].network_info.subnet.ext_id == LAN.ext_id
    assert vm.nics[0].backing_info.mac_address.startswith("50:6b:8d:")
    assert vm.guest_customization is None  # Prism does not return cloud-init data

    [lab] = standin.lab_vms()
    assert (lab.name, lab.power_state, lab.user_data, lab.meta_data) == (
        "ntx-gitops", "OFF", USER_DATA, META_DATA)
    assert (lab.nics[0].subnet_name, lab.nics[0].vlan_id, lab.nics[0].requested_ip) == (
        "egov-lan", 150, "10.50.0.21")

    with pytest.raises(vmm.rest.ApiException) as missing:
        api.vms.power_on_vm(vm_id)
    assert missing.value.status == 428
    assert error_of(missing.value)["errorGroup"] == "MISSING_ETAG_HEADER"

    power = api.vms.power_on_vm(vm_id, if_match=etag)
    task, _ = wait_task(api, power.data.ext_id)
    assert str(task.status) == "SUCCEEDED"
    assert [e.ext_id for e in task.entities_affected] == [vm_id]
    read = api.vms.get_vm_by_id(vm_id)
    assert str(read.data.power_state) == "ON" and read.data.host is not None
    assert api.vmm.get_etag(read) != etag  # every change gives a new ETag
    assert standin.lab_vms()[0].power_state == "ON"

    with pytest.raises(vmm.rest.ApiException) as stale:
        api.vms.power_off_vm(vm_id, if_match=etag)
    assert stale.value.status == 412
    message = error_of(stale.value)
    assert message["code"] == "PLAT-10005" and "Read the VM again" in message["message"]

    reported = httpx.post(f"{standin.base_url}/lab/v1/vms/{vm_id}/guest",
                          json={"ips": {"0": ["10.50.0.21"]}, "hostname": "ntx-gitops"},
                          auth=(USER, PASSWORD), verify=tls(standin))
    assert reported.status_code == 204
    nic = api.vms.get_vm_by_id(vm_id).data.nics[0]
    assert [a.value for a in nic.network_info.ipv4_info.learned_ip_addresses] == ["10.50.0.21"]

    lab_view = httpx.get(f"{standin.base_url}/lab/v1/vms", auth=(USER, PASSWORD),
                         verify=tls(standin)).json()
    assert lab_view["vms"][0]["user_data"] == USER_DATA
    assert lab_view["vms"][0]["nics"][0]["learned_ips"] == ["10.50.0.21"]
    assert lab_view["vms"][0]["hostname"] == "ntx-gitops"

    read = api.vms.get_vm_by_id(vm_id)
    deleted = api.vms.delete_vm_by_id(vm_id, if_match=api.vmm.get_etag(read))
    assert str(wait_task(api, deleted.data.ext_id)[0].status) == "SUCCEEDED"
    with pytest.raises(vmm.rest.ApiException) as gone:
        api.vms.get_vm_by_id(vm_id)
    assert gone.value.status == 404
    assert error_of(gone.value)["code"] == "VMM-30100"
    assert standin.lab_vms() == []


def test_the_lab_watcher_source_sees_power_and_cloud_init(standin: NutanixStandIn,
                                                         api: Clients) -> None:
    task, _ = create_vm(api, vm_body("ntx-registry"))
    vm_id = task.entities_affected[0].ext_id
    source = NutanixSource(str(standin.base_url), USER, PASSWORD, standin.ca_file)
    try:
        [observed] = source.vms()
        assert (observed.key, observed.powered_on, observed.cloud_init) == (
            vm_id, False, (META_DATA, USER_DATA))
        etag = api.vmm.get_etag(api.vms.get_vm_by_id(vm_id))
        wait_task(api, api.vms.power_on_vm(vm_id, if_match=etag).data.ext_id)
        [observed] = source.vms()
        assert observed.powered_on
        source.report_guest(observed, ipaddress.IPv4Address("10.50.0.21"), "ntx-registry")
    finally:
        source.close()
    nic = api.vms.get_vm_by_id(vm_id).data.nics[0]
    assert [a.value for a in nic.network_info.ipv4_info.learned_ip_addresses] == ["10.50.0.21"]


def test_update_needs_a_fresh_etag_and_changes_it(api: Clients) -> None:
    task, _ = create_vm(api, vm_body("ntx-vault"))
    vm_id = task.entities_affected[0].ext_id
    read = api.vms.get_vm_by_id(vm_id)
    vm = read.data
    vm.memory_size_bytes = 8 * GiB
    vm.description = "vault"
    # The body read back carries its ETag in $reserved: the SDK sends it as If-Match.
    updated = api.vms.update_vm_by_id(vm_id, vm)
    assert str(wait_task(api, updated.data.ext_id)[0].status) == "SUCCEEDED"
    again = api.vms.get_vm_by_id(vm_id)
    assert (again.data.memory_size_bytes, again.data.description) == (8 * GiB, "vault")
    with pytest.raises(vmm.rest.ApiException) as stale:
        api.vms.update_vm_by_id(vm_id, vm)  # still the old ETag
    assert stale.value.status == 412


def test_disks_and_nics_have_their_own_calls(api: Clients) -> None:
    """Prism's disk and NIC endpoints: the VM's ETag in If-Match, a task each, the ETag
    moved on; a disk grows (never shrinks) and is added while the VM runs; a NIC moves to
    another subnet."""
    task, _ = create_vm(api, vm_body("ntx-disks"))
    vm_id = task.entities_affected[0].ext_id
    read = api.vms.get_vm_by_id(vm_id)
    etag = api.vmm.get_etag(read)
    assert str(wait_task(api, api.vms.power_on_vm(vm_id, if_match=etag).data.ext_id)[0]
               .status) == "SUCCEEDED"

    def fresh() -> tuple[Any, str]:
        again = api.vms.get_vm_by_id(vm_id)
        return again.data, api.vmm.get_etag(again)

    vm, etag = fresh()
    data = vm.disks[1]
    with pytest.raises(vmm.rest.ApiException) as missing:
        api.vms.update_disk_by_id(vm_id, data.ext_id, data)  # no If-Match
    assert missing.value.status == 428
    data.backing_info.disk_size_bytes = 30 * GiB
    grown = api.vms.update_disk_by_id(vm_id, data.ext_id, data, if_match=etag)
    assert str(wait_task(api, grown.data.ext_id)[0].status) == "SUCCEEDED"
    with pytest.raises(vmm.rest.ApiException) as stale:
        api.vms.create_disk(vm_id, data, if_match=etag)  # the grow moved the ETag on
    assert stale.value.status == 412

    vm, etag = fresh()
    assert [d.backing_info.disk_size_bytes for d in vm.disks][1] == 30 * GiB
    assert str(vm.power_state) == "ON"
    added = api.vms.create_disk(vm_id, Disk(disk_address=DiskAddress(bus_type="SCSI", index=2),
                                            backing_info=VmDisk(disk_size_bytes=5 * GiB)),
                                if_match=etag)
    assert str(wait_task(api, added.data.ext_id)[0].status) == "SUCCEEDED"
    vm, etag = fresh()
    assert [(d.disk_address.index, d.backing_info.disk_size_bytes) for d in vm.disks][2] == \
        (2, 5 * GiB)

    shrink = vm.disks[1]
    shrink.backing_info.disk_size_bytes = 10 * GiB
    failed, _ = wait_task(api, api.vms.update_disk_by_id(vm_id, shrink.ext_id, shrink,
                                                         if_match=etag).data.ext_id)
    assert str(failed.status) == "FAILED"
    assert failed.error_messages[0].error_group == "INVALID_DISK_SIZE"
    vm, etag = fresh()
    clash = api.vms.create_disk(vm_id, Disk(disk_address=DiskAddress(bus_type="SCSI", index=1),
                                            backing_info=VmDisk(disk_size_bytes=GiB)),
                                if_match=etag)
    failed, _ = wait_task(api, clash.data.ext_id)
    assert failed.error_messages[0].error_group == "DISK_ADDRESS_IN_USE"

    vm, etag = fresh()
    moved = api.vms.update_nic_by_id(vm_id, vm.nics[0].ext_id, Nic(network_info=NicNetworkInfo(
        subnet=SubnetReference(ext_id=DMZ.ext_id))), if_match=etag)
    assert str(wait_task(api, moved.data.ext_id)[0].status) == "SUCCEEDED"
    vm, etag = fresh()
    assert vm.nics[0].network_info.subnet.ext_id == DMZ.ext_id
    gone = api.vms.update_nic_by_id(vm_id, "00000000-0000-4000-8000-000000000000", Nic(
        network_info=NicNetworkInfo(subnet=SubnetReference(ext_id=LAN.ext_id))), if_match=etag)
    failed, _ = wait_task(api, gone.data.ext_id)
    assert failed.error_messages[0].error_group == "NIC_NOT_FOUND"
    vm, etag = fresh()
    second = api.vms.create_nic(vm_id, Nic(network_info=NicNetworkInfo(
        subnet=SubnetReference(ext_id=LAN.ext_id))), if_match=etag)
    assert str(wait_task(api, second.data.ext_id)[0].status) == "SUCCEEDED"
    vm, _ = fresh()
    assert [n.network_info.subnet.ext_id for n in vm.nics] == [DMZ.ext_id, LAN.ext_id]


def test_a_change_queued_behind_another_fails_on_the_etag(api: Clients) -> None:
    task, _ = create_vm(api, vm_body("ntx-lb1"))
    vm_id = task.entities_affected[0].ext_id
    read = api.vms.get_vm_by_id(vm_id)
    etag = api.vmm.get_etag(read)
    first = api.vms.power_on_vm(vm_id, if_match=etag)
    read.data.description = "changed while powering on"
    second = api.vms.update_vm_by_id(vm_id, read.data)  # same ETag: accepted, for now
    assert str(wait_task(api, first.data.ext_id)[0].status) == "SUCCEEDED"
    failed, _ = wait_task(api, second.data.ext_id)
    assert str(failed.status) == "FAILED"
    assert failed.error_messages[0].error_group == "VM_ETAG_MISMATCH"


def test_filters_paging_and_duplicate_names(api: Clients) -> None:
    for name in ("ntx-rke2-apps-1", "ntx-rke2-apps-2", "ntx-rke2-apps-1"):
        assert str(create_vm(api, vm_body(name))[0].status) == "SUCCEEDED"
    same = api.vms.list_vms(_filter="name eq 'ntx-rke2-apps-1'")
    assert [v.name for v in same.data] == ["ntx-rke2-apps-1", "ntx-rke2-apps-1"]
    assert len({v.ext_id for v in same.data}) == 2  # Prism allows duplicate names
    page = api.vms.list_vms(_page=1, _limit=2, _orderby="name desc")
    assert [v.name for v in page.data] == ["ntx-rke2-apps-1"]
    assert page.metadata.total_available_results == 3
    assert api.vms.list_vms(_filter="startswith(name, 'ntx-rke2-apps-2')").data[0].name == \
        "ntx-rke2-apps-2"
    with pytest.raises(vmm.rest.ApiException) as bad:
        api.vms.list_vms(_filter="guestOsName eq 'ubuntu'")
    assert bad.value.status == 400
    assert "guestOsName" in error_of(bad.value)["message"]
    with pytest.raises(vmm.rest.ApiException) as malformed:
        api.vms.list_vms(_filter="name eq ")
    assert malformed.value.status == 400
    with pytest.raises(vmm.rest.ApiException) as limit:
        api.vms.list_vms(_limit=500)
    assert limit.value.status == 400
    assert error_of(limit.value)["validationErrorMessages"][0]["attributePath"] == "$limit"


def test_create_is_validated_like_prism(standin: NutanixStandIn, api: Clients) -> None:
    body = vm_body("x")
    body.name = None
    body.memory_size_bytes = None
    with pytest.raises(vmm.rest.ApiException) as invalid:
        api.vms.create_vm(body=body)
    assert invalid.value.status == 400
    problems = {m["attributePath"] for m in error_of(invalid.value)["validationErrorMessages"]}
    assert problems == {"name", "memorySizeBytes"}

    # The SDK's models refuse numSockets 0 before sending; the server refuses it too.
    raw = {"$objectType": "vmm.v4.ahv.config.Vm", "name": "x", "numSockets": 0,
           "memorySizeBytes": GiB, "cluster": {"extId": CLUSTER.ext_id}}
    posted = httpx.post(f"{standin.base_url}/api/vmm/v4.3/ahv/config/vms", json=raw,
                        auth=(USER, PASSWORD), verify=tls(standin))
    assert posted.status_code == 400
    schema = posted.json()["data"]["error"]
    assert schema["$objectType"] == "vmm.v4.error.SchemaValidationError"
    assert [m["attributePath"] for m in schema["validationErrorMessages"]] == ["numSockets"]

    body = vm_body("x", cluster="0005f6b1-2b2e-4b1c-8d7c-0000000000ff")
    with pytest.raises(vmm.rest.ApiException) as cluster:
        api.vms.create_vm(body=body)
    assert cluster.value.status == 400
    assert error_of(cluster.value)["errorGroup"] == "CLUSTER_NOT_FOUND"

    body = vm_body("x")
    body.guest_customization.config.cloud_init_script.value = "not base64!"
    with pytest.raises(vmm.rest.ApiException) as user_data:
        api.vms.create_vm(body=body)
    assert user_data.value.status == 400

    body = vm_body("x", image="9e2d7c1a-0000-4000-8000-0000000000ff")
    task, _ = create_vm(api, body)  # references are checked by the task, as on Prism
    assert str(task.status) == "FAILED"
    assert task.error_messages[0].error_group == "IMAGE_NOT_FOUND"
    assert task.entities_affected in (None, [])
    assert api.vms.list_vms().data is None


def test_capacity_and_a_deleted_image_end_in_failed_tasks(standin: NutanixStandIn,
                                                          api: Clients) -> None:
    task, _ = create_vm(api, vm_body("ntx-big-disk", data_disk=600 * GiB))
    assert str(task.status) == "FAILED"
    assert "not enough free storage" in task.error_messages[0].message
    assert task.legacy_error_message == task.error_messages[0].message

    task, _ = create_vm(api, vm_body("ntx-big-memory", memory=128 * GiB))
    assert str(task.status) == "FAILED"
    assert "exceeds the memory of cluster 'AHV-LAB-01'" in task.error_messages[0].message

    ids = []
    for name in ("ntx-mem-1", "ntx-mem-2"):
        task, _ = create_vm(api, vm_body(name, memory=40 * GiB, data_disk=GiB))
        ids.append(task.entities_affected[0].ext_id)
    for vm_id, expected in zip(ids, ("SUCCEEDED", "FAILED"), strict=True):
        etag = api.vmm.get_etag(api.vms.get_vm_by_id(vm_id))
        task, _ = wait_task(api, api.vms.power_on_vm(vm_id, if_match=etag).data.ext_id)
        assert str(task.status) == expected
    assert "enough free memory" in task.error_messages[0].message

    reference = api.vms.create_vm(body=vm_body("ntx-late-image"))
    standin.remove_image(IMAGE.ext_id)  # deleted while the task is queued
    task, _ = wait_task(api, reference.data.ext_id)
    assert str(task.status) == "FAILED" and "image not found" in task.error_messages[0].message


def test_wrong_password_is_refused_with_a_v4_error(standin: NutanixStandIn) -> None:
    wrong = clients(standin, password="not-the-password")
    with pytest.raises(vmm.rest.ApiException) as refused:
        wrong.vms.list_vms()
    assert refused.value.status == 401
    assert error_of(refused.value)["errorGroup"] == "AUTHENTICATION_FAILED"
    assert {r.auth for r in standin.requests} == {"rejected"}
    anonymous = httpx.get(f"{standin.base_url}/api/vmm/v4.3/ahv/config/vms",
                          verify=tls(standin))
    assert anonymous.status_code == 401
    assert anonymous.json()["data"]["$objectType"] == "vmm.v4.error.ErrorResponse"


def test_state_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "nutanix.json"
    first = NutanixStandIn(state, USER, PASSWORD, clusters=[CLUSTER], subnets=[LAN],
                           images=[IMAGE], task_seconds=0.2)
    first.start()
    try:
        api = clients(first)
        task, _ = create_vm(api, vm_body("ntx-monitoring"))
        vm_id = task.entities_affected[0].ext_id
        etag = api.vmm.get_etag(api.vms.get_vm_by_id(vm_id))
        port, ca = first.port, first.ca_file.read_bytes()
    finally:
        first.stop()
    second = NutanixStandIn(state, USER, PASSWORD, task_seconds=0.2)  # no seeds needed
    second.start(port=port)
    try:
        assert second.ca_file.read_bytes() == ca  # clients keep trusting it
        # The old session cookie is gone with the restart: the SDK logs in again by itself.
        read = api.vms.get_vm_by_id(vm_id)
        assert (read.data.name, api.vmm.get_etag(read)) == ("ntx-monitoring", etag)
        assert [r.auth for r in second.requests[:2]] == ["rejected", "basic"]
        assert str(api.tasks.get_task_by_id(task.ext_id).data.status) == "SUCCEEDED"
    finally:
        second.stop()


def test_older_prism_central_is_refused_by_version(tmp_path: Path) -> None:
    old = NutanixStandIn(tmp_path / "nutanix.json", USER, PASSWORD, clusters=[CLUSTER],
                         api_versions={"vmm": "v4.1"})
    old.start()
    try:
        api = clients(old)
        with pytest.raises(vmm.rest.ApiException) as refused:
            api.vms.list_vms()
        assert refused.value.status == 404
        assert "v4.3 is not served" in error_of(refused.value)["message"]
    finally:
        old.stop()


def test_unsimulated_and_unknown_paths_fail_loudly(standin: NutanixStandIn) -> None:
    def get(path: str) -> httpx.Response:
        assert standin.base_url is not None
        return httpx.get(standin.base_url + path, auth=(USER, PASSWORD),
                         verify=tls(standin))

    assert get("/api/vmm/v4.3/ahv/config/vms/0005f6b1-2b2e-4b1c-8d7c-000000000001/"
               "cd-roms").status_code == 501
    assert get("/api/iam/v4.0/authn/users").status_code == 404
    assert get("/api/vmm/v4.3/ahv/config/vms/not-a-uuid").status_code == 400


def test_a_repeated_request_id_is_one_change(api: Clients) -> None:
    first = api.vms.create_vm(body=vm_body("ntx-once"), **{"NTNX-Request-Id": "req-1"})
    again = api.vms.create_vm(body=vm_body("ntx-once"), **{"NTNX-Request-Id": "req-1"})
    assert first.data.ext_id == again.data.ext_id
    wait_task(api, first.data.ext_id)
    assert len(api.vms.list_vms().data) == 1


def test_injected_503_reaches_the_client_or_its_retries(standin: NutanixStandIn) -> None:
    standin.set_faults(Faults(fail_first=1, path_pattern=r"^GET /api/vmm/v4"))
    api = clients(standin, retries=0)
    with pytest.raises(vmm.rest.ApiException) as unavailable:
        api.vms.list_vms()
    assert unavailable.value.status == 503
    assert error_of(unavailable.value)["errorGroup"] == "SERVICE_UNAVAILABLE"
    assert api.vms.list_vms().data is None  # the next call goes through

    standin.set_faults(Faults(fail_first=2, path_pattern=r"^GET /api/vmm/v4"))
    patient = clients(standin, retries=3)  # the SDK's urllib3 retries 503 by itself
    assert patient.vms.list_vms().metadata.total_available_results == 0
    statuses = [r.status for r in standin.requests if r.path.endswith("/ahv/config/vms")]
    assert statuses[-3:] == [503, 503, 200]


def test_cut_connections_surface_as_urllib3_errors(standin: NutanixStandIn,
                                                   api: Clients) -> None:
    api.vms.list_vms()
    standin.set_faults(Faults(reset_first=1, path_pattern=r"^GET /api/vmm/v4"))
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        api.vms.list_vms()
    assert api.vms.list_vms().data is None

    # Processed, then cut: the change happened although the client saw an error.
    standin.set_faults(Faults(drop_first=1, path_pattern=r"^POST /api/vmm/v4"))
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        api.vms.create_vm(body=vm_body("ntx-unseen"))
    time.sleep(0.5)
    assert [vm.name for vm in standin.lab_vms()] == ["ntx-unseen"]


def test_injected_delay_trips_the_client_timeout(standin: NutanixStandIn,
                                                 api: Clients) -> None:
    api.vms.list_vms()  # version check done before the delay starts
    standin.set_faults(Faults(delay_seconds=1.0, path_pattern=r"^POST /api/vmm/v4"))
    api.vmm.configuration.read_timeout = 300  # milliseconds
    with pytest.raises(urllib3.exceptions.MaxRetryError) as slow:
        api.vms.create_vm(body=vm_body("ntx-slow"))
    assert isinstance(slow.value.reason, urllib3.exceptions.ReadTimeoutError)
    # The server still does the work the client gave up waiting for.
    deadline = time.monotonic() + 5
    while not standin.lab_vms() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [vm.name for vm in standin.lab_vms()] == ["ntx-slow"]


def test_tls_is_verified_against_the_stand_in_ca(standin: NutanixStandIn,
                                                 tmp_path: Path) -> None:
    clu.ClustersApi(api_client=clients(standin).clu).list_clusters()  # the right CA works
    generate_ca(tmp_path / "other", "Some other CA")
    wrong = clients(standin, ca=tmp_path / "other" / "nutanix-ca.pem")
    with pytest.raises(urllib3.exceptions.MaxRetryError) as refused:
        clu.ClustersApi(api_client=wrong.clu).list_clusters()
    assert isinstance(refused.value.reason, urllib3.exceptions.SSLError)
    assert "certificate verify failed" in str(refused.value.reason)


def test_command_line_entry_point(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({
        "clusters": [{"name": "AHV-CLI", "memoryBytes": 32 * GiB}],
        "subnets": [{"name": "cli-lan", "vlanId": 10, "clusterName": "AHV-CLI"}],
        "images": [{"name": "cli-image", "sizeBytes": GiB}]}))
    env = dict(os.environ, NUTANIX_STANDIN_PASSWORD=PASSWORD)
    process = subprocess.Popen(
        [sys.executable, "-m", "lab.nutanix.server", "--state", str(tmp_path / "s.json"),
         "--port", "0", "--user", USER, "--inventory", str(inventory)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=Path(__file__).resolve().parents[2])
    try:
        assert process.stdout is not None
        url_line = process.stdout.readline().strip()
        ca_line = process.stdout.readline().strip()
        assert url_line.startswith("NUTANIX_URL=https://127.0.0.1:"), url_line
        url, ca = url_line.split("=", 1)[1], ca_line.split("=", 1)[1]
        found = httpx.get(f"{url}/api/networking/v4.4/config/subnets",
                          params={"$filter": "name eq 'cli-lan'"}, auth=(USER, PASSWORD),
                          verify=ssl.create_default_context(cafile=ca)).json()
        assert found["data"][0]["networkId"] == 10
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, process.stderr.read() if process.stderr else ""
