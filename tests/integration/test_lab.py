"""The lab as a whole: up, status, down, up again; a VM powered on in vcsim boots a host
that answers SSH with the injected keys; power off and destroy stop and remove it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pyVim.task import WaitForTask
from pyVmomi import vim

from blocks.vsphere import guestinfo
from lab.hosts import LabHosts
from lab.lab import Lab, ssh_answers
from lab.network import LAB_RANGE
from lab.prefect_stack import PrefectStack
from lab.vcsim import all_of, connect
from sizing.inventory import build_inventory
from sizing.spec import PlatformSpec
from tasks.cloud_init import HostKey, render_cloud_init
from tests.conftest import LAB_SPEC, exclusive_lab
from tests.labkit import lab_root

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]


def _leftovers(state: Path) -> list[str]:
    """Everything of the lab that would outlive `down`."""
    found = []
    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True,
                                      check=True).stdout)
    hosts = LabHosts(state)
    veths = {hosts._veth(name) for name in ("lab-vault-01", "bare-vm")}
    found += [f"link {link['ifname']}" for link in links
              if link["ifname"].startswith("plab-") or link["ifname"] in veths]
    routes = subprocess.run(["ip", "route", "show", "type", "unreachable"],
                            capture_output=True, text=True, check=True).stdout
    if str(LAB_RANGE) in routes:
        found.append(f"route unreachable {LAB_RANGE}")
    if subprocess.run(["nft", "list", "table", "inet", "platform_lab"],
                      capture_output=True, check=False).returncode == 0:
        found.append("nft table platform_lab")
    found += [f"netns {n}" for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                   text=True, check=True).stdout.split()
              if n.startswith(f"lab{hosts._tag}-")]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if str(state).encode() in cmdline:
                found.append(f"process {pid} {cmdline[:80]!r}")
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line.split()[4]}" for line in mounts.splitlines() if str(state) in line]
    loops = json.loads(subprocess.run(["losetup", "--list", "--json", "--output",
                                       "NAME,BACK-FILE"], capture_output=True, text=True,
                                      check=True).stdout or '{"loopdevices": []}')
    found += [f"loop device {loop['name']} on {loop['back-file']}"
              for loop in loops["loopdevices"] if str(state) in str(loop.get("back-file"))]
    if state.exists():
        found.append(f"directory {state}")
    return found


@pytest.fixture(scope="module")
def lab(lab_spec: PlatformSpec) -> Iterator[Lab]:
    with exclusive_lab():  # first: a refusal leaves no directory and no setting behind
        root = lab_root()
        state = root / "state"
        os.environ["PLATFORM_LAB_VCSIM_PORT"] = "18997"
        lab = Lab(str(LAB_SPEC), lab_spec, state_dir=state,
                  prefect=PrefectStack(state_dir=state, port=4317))
        try:
            yield lab
        finally:
            lab.down()
            os.environ.pop("PLATFORM_LAB_VCSIM_PORT", None)
            assert _leftovers(state) == []
            shutil.rmtree(root)


def test_up_status_down_up_again(lab: Lab) -> None:
    first = lab.up()
    assert any("started vcsim" in line for line in first)
    assert any("Prefect server" in line for line in first)
    assert lab.up() == [], "a second `up` must change nothing"
    services = {row["service"]: row["state"] for row in lab.service_rows()}
    assert all(str(state).startswith("up") for state in services.values()), services
    assert "Prefect database" in services
    assert lab.vm_rows() == []

    # The main job through the lab's worker; `lab run` prints how a failed run ended.
    assert lab.prefect.last_run("platform/full") is None
    missing = lab.state_dir / "no-such-spec.yaml"
    assert lab.prefect.run_deployment("platform/full", {
        "spec_path": str(missing), "plan_only": "true"}) != 0
    outcome = lab.prefect.last_run("platform/full")
    assert outcome is not None and outcome.state == "Failed"
    assert f"platform spec {missing} does not exist" in outcome.message
    assert outcome.url.startswith(f"{lab.prefect.ui_url}/runs/flow-run/")

    removed = lab.down()
    assert any("removed unreachable route" in line for line in removed)
    assert _leftovers(lab.state_dir) == []

    again = lab.up(with_prefect=False)
    assert any("started vcsim" in line for line in again)


def _clone(si: vim.ServiceInstance, name: str) -> vim.VirtualMachine:
    """Clone the lab template the way phase 1 does, without its checks (this tests the lab)."""
    template = next(v for v in all_of(si, vim.VirtualMachine) if v.name == "debian-12-template")
    cluster = all_of(si, vim.ClusterComputeResource)[0]
    WaitForTask(template.CloneVM_Task(
        folder=template.parent, name=name,
        spec=vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=cluster.resourcePool))))
    return next(v for v in all_of(si, vim.VirtualMachine) if v.name == name)


def _keypair() -> tuple[str, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, public


def test_vm_powered_on_answers_ssh_with_the_injected_keys(lab: Lab, lab_spec: PlatformSpec,
                                                         tmp_path: Path) -> None:
    lab.up(with_prefect=False)
    vm = build_inventory(lab_spec).by_name("lab-vault-01")
    user_private, user_public = _keypair()
    host_private, host_public = _keypair()
    cloud_init = render_cloud_init(lab_spec, vm, [user_public],
                                   [HostKey("ed25519", host_private, host_public)],
                                   instance_id="test-vault-1")
    access = lab.vcsim.access()
    assert access is not None
    clone = _clone(connect(access), vm.name)
    WaitForTask(clone.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key=k, value=v)
        for k, v in guestinfo(cloud_init).items()])))

    started = time.monotonic()
    WaitForTask(clone.PowerOnVM_Task())
    while not ssh_answers(str(vm.ip)) and time.monotonic() - started < 15:
        time.sleep(0.1)
    answered_s = time.monotonic() - started
    assert ssh_answers(str(vm.ip)), (tmp_path, lab.watcher.log.read_text()[-2000:])
    assert answered_s < 5, f"SSH answered after {answered_s:.1f} s"

    key_file = tmp_path / "id"
    key_file.write_text(user_private)
    key_file.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_text(f"{vm.ip} {host_public}\n")
    ssh = ["ssh", "-i", str(key_file), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
           "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}",
           "-o", "ConnectTimeout=5", f"debian@{vm.ip}"]
    done = subprocess.run([*ssh, "hostname; sudo -n true && echo sudo-ok"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["lab-vault-01", "sudo-ok"]

    # The guest reported its address, as VMware tools would: phase 1 waits for it.
    deadline = time.monotonic() + 5
    guest = clone.guest
    assert guest is not None
    while guest.ipAddress != str(vm.ip) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert guest.ipAddress == str(vm.ip)
    assert {"vm": vm.name, "power": "on", "ip": str(vm.ip), "host": "up",
            "ssh": "yes"} in lab.vm_rows()

    # A wrong host key is refused: strict checking holds.
    _, other_public = _keypair()
    known.write_text(f"{vm.ip} {other_public}\n")
    refused = subprocess.run([*ssh, "true"], capture_output=True, text=True, timeout=30,
                             check=False)
    assert refused.returncode != 0 and "HOST IDENTIFICATION HAS CHANGED" in refused.stderr

    # A guest that dies while its VM is on is booted again (within the watcher's liveness
    # period), as vSphere's HA would restart a VM, keeping its disk and host key.
    run_record = lab.hosts.host_dir(vm.name) / "run.json"
    killed = json.loads(run_record.read_text())["init_pid"]
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
            lab.hosts.booted(vm.name) and run_record.is_file()
            and json.loads(run_record.read_text())["init_pid"] != killed):
        time.sleep(0.1)
    assert json.loads(run_record.read_text())["init_pid"] != killed, \
        lab.watcher.log.read_text()[-2000:]
    known.write_text(f"{vm.ip} {host_public}\n")
    again = subprocess.run([*ssh, "hostname"], capture_output=True, text=True, timeout=30,
                           check=False)
    assert again.returncode == 0 and again.stdout.strip() == "lab-vault-01", again.stderr

    WaitForTask(clone.PowerOffVM_Task())
    deadline = time.monotonic() + 10
    while lab.hosts.is_running(vm.name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not lab.hosts.is_running(vm.name)
    assert not ssh_answers(str(vm.ip))
    assert vm.name in lab.hosts.names(), "powering off keeps the VM's disk"

    WaitForTask(clone.Destroy_Task())
    deadline = time.monotonic() + 10
    while vm.name in lab.hosts.names() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vm.name not in lab.hosts.names()


def test_vm_without_cloud_init_boots_unreachable(lab: Lab) -> None:
    lab.up(with_prefect=False)
    access = lab.vcsim.access()
    assert access is not None
    bare = _clone(connect(access), "bare-vm")
    WaitForTask(bare.PowerOnVM_Task())
    deadline = time.monotonic() + 3
    while "without cloud-init" not in lab.watcher.log.read_text() and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert "bare-vm: powered on without cloud-init data" in lab.watcher.log.read_text()
    assert not lab.hosts.is_running("bare-vm")
    WaitForTask(bare.PowerOffVM_Task())
    WaitForTask(bare.Destroy_Task())


def test_clones_have_disks_of_their_own(lab: Lab) -> None:
    """vcsim 0.24.2 handed the template's own disk object to every clone (so a clone's disk
    named another clone's file, and parallel clones raced: FileNotFound on reconfigure);
    lab/vcsim/build.sh patches that. Each clone's disk file is in its own folder, as on
    vCenter, and the template keeps its own."""
    lab.up(with_prefect=False)
    access = lab.vcsim.access()
    assert access is not None
    si = connect(access)
    template = next(v for v in all_of(si, vim.VirtualMachine) if v.name == "debian-12-template")

    def disk_files(vm: vim.VirtualMachine) -> list[str]:
        assert vm.config is not None
        return [cast(Any, d.backing).fileName for d in vm.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualDisk)]

    before = disk_files(template)
    clones = [_clone(si, name) for name in ("clone-a", "clone-b")]
    try:
        for clone in clones:
            files = disk_files(clone)
            assert files and all(f"] {clone.name}/" in name for name in files), files
        assert disk_files(template) == before
    finally:
        for clone in clones:
            WaitForTask(clone.Destroy_Task())
