"""The cloud-init data a VM boots with (pure, no I/O).

vSphere hands it to the guest through guestinfo (blocks.vsphere.guestinfo), Nutanix as
guest customization. The user data carries the VM's private SSH host key: the result is
secret material, handed to the hypervisor and never logged, returned or published.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocks.hypervisor import CloudInit
from sizing.inventory import VM
from sizing.spec import PlatformSpec
from templates import render


@dataclass(frozen=True)
class HostKey:
    kind: str  # "ed25519", "rsa", ...
    private: str
    public: str


def render_cloud_init(spec: PlatformSpec, vm: VM, authorized_keys: list[str],
                      host_keys: list[HostKey], instance_id: str) -> CloudInit:
    """Metadata and user data for one VM's first boot."""
    metadata = render("cloud-init/meta-data.yaml.j2", instance_id=instance_id, vm=vm,
                      zone=spec.zones.get(vm.zone), domain=spec.domain)
    userdata = render("cloud-init/user-data.yaml.j2", vm=vm,
                      user=spec.ssh.bootstrap_user or spec.ssh.user,
                      authorized_keys=authorized_keys,
                      host_keys={key.kind: {"private": key.private, "public": key.public}
                                 for key in host_keys})
    return CloudInit(metadata=metadata, userdata=userdata)
