"""The cloud-init data phase 1 hands to a VM is what the lab's guest (and cloud-init) reads."""

from __future__ import annotations

import base64
from ipaddress import IPv4Address, IPv4Interface

import yaml

from blocks.vsphere import guestinfo
from lab.cloudinit import from_guestinfo, host_config
from sizing.inventory import build_inventory
from sizing.spec import PlatformSpec
from tasks.cloud_init import HostKey, render_cloud_init

PRIVATE = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def test_round_trip(lab_spec: PlatformSpec) -> None:
    vm = build_inventory(lab_spec).by_name("lab-dmz-server-02")
    cloud_init = render_cloud_init(
        lab_spec, vm, ["ssh-ed25519 AAAAC3 orchestrator"],
        [HostKey("ed25519", PRIVATE, "ssh-ed25519 AAAAhost")], instance_id="vm-42")
    metadata, userdata = cloud_init.metadata, cloud_init.userdata
    assert "PRIVATE" not in repr(cloud_init)
    extra = guestinfo(cloud_init)
    assert extra["guestinfo.userdata.encoding"] == "base64"
    assert base64.b64decode(extra["guestinfo.userdata"]).decode() == userdata
    decoded = from_guestinfo(extra)
    assert decoded == (metadata, userdata)
    config = host_config(vm.name, metadata, userdata, bridge="plab-dmz")
    assert config.address == IPv4Interface("10.231.1.23/24")
    assert config.gateway == IPv4Address("10.231.1.1")
    assert config.hostname == "lab-dmz-server-02"
    assert config.fqdn == "lab-dmz-server-02.lab.egov.example"
    assert config.instance_id == "vm-42"
    assert [(u.name, u.ssh_authorized_keys, u.sudo) for u in config.users] == [
        ("debian", ("ssh-ed25519 AAAAC3 orchestrator",), True)]
    assert config.host_keys == (("ed25519", PRIVATE, "ssh-ed25519 AAAAhost"),)
    cloud_config = yaml.safe_load(userdata)
    assert cloud_config["ssh_pwauth"] is False and cloud_config["disable_root"] is True


def test_no_guestinfo_means_no_cloud_init() -> None:
    assert from_guestinfo({"guestinfo.metadata": "x"}) is None
