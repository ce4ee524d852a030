"""Phase 2 formats and mounts each VM's data disk on the lab, and refuses a used one.

The lab gives every powered-on VM its disks as vcsim has them: the OS disk (the host's
overlay) and, per data disk, a loop device over a sparse file of the VM's size, seen in
the host as /dev/sdb (lab/hosts.py, lab/guest/lsblk.py). Before phase 2, the monitoring
VM's data disk gets a file system of someone else's: phase 2 must refuse that host with
an error naming the disk and why, leave the disk as it was, and prepare the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from flows.common import PhaseFailed
from flows.prepare import prepare_vms
from flows.provision import provision_vms
from lab.lab import Lab
from sizing.inventory import build_inventory
from sizing.storage import DATA_LABEL, DATA_MOUNT
from tasks.spec import read_spec
from tests.conftest import LAB_SPEC
from tests.labkit import lab_with_prefect, ssh

pytestmark = [pytest.mark.lab, pytest.mark.prefect,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

SPEC = read_spec(LAB_SPEC)
INVENTORY = build_inventory(SPEC)
GIB = 2**30
FOREIGN = "lab-monitoring-01"  # its data disk carries someone else's file system
FORMATTED = ("lab-vault-01", "lab-gitops-01")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with lab_with_prefect(LAB_SPEC, vcsim_port=18984) as lab:
        assert provision_vms(spec_path=str(LAB_SPEC)).created == len(INVENTORY.vms)
        made = lab.hosts.exec(FOREIGN, ["mkfs.ext2", "-q", "-L", "someone-else", "/dev/sdb"])
        assert made.returncode == 0, made.stderr
        yield lab


def _lsblk(lab: Lab, vm_name: str, *, as_admin: bool = True) -> list[dict[str, object]]:
    """What the product's probe reads, over SSH as the admin (or from inside the host
    before phase 2 made the admin user)."""
    command = "lsblk -J -b -o NAME,PATH,SIZE,TYPE,FSTYPE,LABEL,MOUNTPOINT"
    out = ssh(lab, SPEC, vm_name, f"sudo -n {command}") if as_admin else \
        lab.hosts.exec(vm_name, command.split())
    assert out.returncode == 0, out.stderr
    devices: list[dict[str, object]] = json.loads(out.stdout)["blockdevices"]
    return devices


def test_hosts_see_their_vms_disks_and_nothing_of_the_machine(lab: Lab) -> None:
    for vm in INVENTORY.vms:
        if vm.name not in ("lab-vault-01", "lab-lblan-01", FOREIGN):
            continue
        devices = _lsblk(lab, vm.name, as_admin=False)
        assert [(d["name"], d["size"]) for d in devices] == [
            (f"sd{chr(ord('a') + i)}", size * GIB) for i, size in enumerate(vm.disks_gb)]
        assert devices[0]["mountpoint"] == "/"
        # The host's /dev holds its data disks and no disk of the machine.
        nodes = lab.hosts.exec(vm.name, ["sh", "-c", "find /dev -type b | sort"])
        assert nodes.stdout.split() == [f"/dev/sd{chr(ord('a') + i)}"
                                        for i in range(1, len(vm.disks_gb))]


def test_phase_2_refuses_a_used_disk_and_prepares_the_others(lab: Lab) -> None:
    with pytest.raises(PhaseFailed) as caught:
        prepare_vms(spec_path=str(LAB_SPEC))
    message = str(caught.value)
    assert message.startswith(f"phase 2: 1 of {len(INVENTORY.vms)} hosts failed"), message
    assert FOREIGN in message
    assert "no disk can be the 200 GiB data disk for /srv/data" in message
    assert "/dev/sdb (200 GiB, ext2 'someone-else'): carries a ext2 signature" in message
    assert "/dev/sda (60 GiB, overlay, mounted at /)" in message
    # Left exactly as it was.
    probed = lab.hosts.exec(FOREIGN, ["blkid", "-p", "-o", "export", "/dev/sdb"])
    assert "TYPE=ext2" in probed.stdout and "LABEL=someone-else" in probed.stdout
    assert lab.hosts.exec(FOREIGN, ["mountpoint", "-q", DATA_MOUNT]).returncode != 0
    assert DATA_LABEL not in lab.hosts.exec(FOREIGN, ["cat", "/etc/fstab"]).stdout


def test_data_disks_are_ext4_labelled_and_mounted(lab: Lab) -> None:
    for name in FORMATTED:
        vm = INVENTORY.by_name(name)
        size = vm.disks_gb[1] * GIB
        sdb = next(d for d in _lsblk(lab, name) if d["name"] == "sdb")
        assert (sdb["size"], sdb["fstype"], sdb["label"], sdb["mountpoint"]) == \
            (size, "ext4", DATA_LABEL, DATA_MOUNT)
        # The real tools, not the stand-in: mount table, superblock, size, fstab.
        found = ssh(lab, SPEC, name, f"findmnt -n -o SOURCE,FSTYPE {DATA_MOUNT}; "
                                     "sudo -n blkid -p -o export /dev/sdb; "
                                     "sudo -n blockdev --getsize64 /dev/sdb; "
                                     f"df -B1 --output=size {DATA_MOUNT} | tail -1; "
                                     "cat /etc/fstab")
        assert found.returncode == 0, found.stderr
        lines = found.stdout.splitlines()
        assert lines[0].split() == ["/dev/sdb", "ext4"]
        assert "TYPE=ext4" in lines and f"LABEL={DATA_LABEL}" in lines
        assert str(size) in lines
        fs_size = int(next(line for line in lines if line.strip().isdigit()
                           and line.strip() != str(size)))
        assert 0.9 * size < fs_size < size  # the file system spans the disk
        assert f"LABEL={DATA_LABEL} {DATA_MOUNT} ext4 defaults,nofail 0 2" in lines
        # On the machine: the VM's disk is the sparse file of the host, ext4 inside.
        image = lab.hosts.host_dir(name) / "disks" / "sdb.img"
        assert image.stat().st_size == size
        assert image.stat().st_blocks * 512 < size // 10  # sparse
        machine = subprocess.run(["blkid", "-p", "-o", "export", str(image)],
                                 capture_output=True, text=True, check=False)
        assert f"LABEL={DATA_LABEL}" in machine.stdout.splitlines()


def test_second_run_changes_nothing(lab: Lab) -> None:
    # The operator clears the foreign disk; the next run formats it, the one after that
    # changes nothing anywhere.
    wiped = lab.hosts.exec(FOREIGN, ["wipefs", "-a", "-q", "/dev/sdb"])
    assert wiped.returncode == 0, wiped.stderr
    second = prepare_vms(spec_path=str(LAB_SPEC))
    assert (second.changed, second.unchanged) == (1, len(INVENTORY.vms) - 1)
    sdb = next(d for d in _lsblk(lab, FOREIGN) if d["name"] == "sdb")
    assert (sdb["fstype"], sdb["label"], sdb["mountpoint"]) == ("ext4", DATA_LABEL, DATA_MOUNT)
    third = prepare_vms(spec_path=str(LAB_SPEC))
    assert (third.changed, third.unchanged) == (0, len(INVENTORY.vms))


def test_data_survives_a_power_cycle(lab: Lab) -> None:
    """A stopped host boots again (the watcher sees its VM still on) with its data disk
    mounted from /etc/fstab and what was written on it."""
    name = "lab-vault-01"
    wrote = ssh(lab, SPEC, name, f"echo kept | sudo -n tee {DATA_MOUNT}/marker")
    assert wrote.returncode == 0, wrote.stderr
    assert lab.hosts.stop(name)
    deadline = time.monotonic() + 60
    while not lab.hosts.is_running(name):
        assert time.monotonic() < deadline, "the watcher did not boot the host again"
        time.sleep(0.2)
    back = ssh(lab, SPEC, name, f"findmnt -n -o SOURCE {DATA_MOUNT}; cat {DATA_MOUNT}/marker")
    assert back.stdout.split() == ["/dev/sdb", "kept"], back.stderr
