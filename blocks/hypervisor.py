"""The one small protocol phase 1 and the drift check drive, whatever the hypervisor.

A hypervisor block (VsphereHypervisor, NutanixHypervisor) opens a session that implements
`HypervisorSession`. Phase 1 does not know which one it talks to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Action = Literal["created", "changed", "unchanged"]

OWNER_KEY = "platform.owner"
"""Marks a VM as made by this orchestrator for a given platform (vSphere extraConfig,
Nutanix description); a VM with an inventory name but another owner is foreign."""


class HypervisorError(RuntimeError):
    """A permanent fault: retrying will not help (bad login, missing template, no space)."""


class TransientHypervisorError(RuntimeError):
    """A passing fault: connection reset, time-out, 5xx, busy object. Retried with backoff."""


@dataclass(frozen=True)
class CloudInit:
    """Metadata and user data for the guest's first boot. Holds a private host key."""

    metadata: str
    userdata: str

    def __repr__(self) -> str:  # never print the key, even by accident
        return "CloudInit(<secret>)"


@dataclass(frozen=True)
class VmWanted:
    """A VM as the inventory wants it."""

    name: str
    vcpu: int
    memory_gb: int
    disks_gb: tuple[int, ...]
    network: str  # port group or subnet name of the VM's zone
    owner: str  # the platform's name (spec.name)
    # Only a creation uses it (it holds the VM's private host key): None when the caller
    # saw the VM exist. Should the VM vanish meanwhile, `vanished` is raised to retry.
    cloud_init: CloudInit | None = field(repr=False)

    def creation_data(self) -> CloudInit:
        """The cloud-init data for creating this VM."""
        if self.cloud_init is None:
            raise TransientHypervisorError(f"VM {self.name} vanished while it was being "
                                           "checked; the retry creates it")
        return self.cloud_init


@dataclass(frozen=True)
class VmState:
    """A VM as the hypervisor shows it."""

    id: str
    name: str
    powered_on: bool
    vcpu: int
    memory_gb: int
    disks_gb: tuple[int, ...]
    networks: tuple[str, ...]
    guest_ip: str | None
    owner: str | None

    def row(self) -> dict[str, object]:
        return {"name": self.name, "power": "on" if self.powered_on else "off",
                "vcpu": self.vcpu, "memory_gb": self.memory_gb,
                "disks_gb": list(self.disks_gb), "networks": list(self.networks),
                "ip": self.guest_ip or ""}


@dataclass(frozen=True)
class EnsureResult:
    """What `ensure_vm` found and did; `notes` say what differs and was left alone."""

    action: Action
    state: VmState
    changes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def differences(want: VmWanted, have: VmState) -> tuple[list[str], list[str]]:
    """(too small: to grow when resize is allowed, larger than wanted: reported only)."""
    smaller, larger = [], []
    for what, wanted, actual in (("vCPU", want.vcpu, have.vcpu),
                                 ("memory GB", want.memory_gb, have.memory_gb)):
        if actual < wanted:
            smaller.append(f"{what} {actual} < {wanted}")
        elif actual > wanted:
            larger.append(f"{what} {actual} > {wanted}")
    for index, wanted in enumerate(want.disks_gb):
        if index >= len(have.disks_gb):
            smaller.append(f"disk {index + 1} missing (want {wanted} GB)")
        elif have.disks_gb[index] < wanted:
            smaller.append(f"disk {index + 1} {have.disks_gb[index]} GB < {wanted} GB")
        elif have.disks_gb[index] > wanted:
            larger.append(f"disk {index + 1} {have.disks_gb[index]} GB > {wanted} GB")
    if want.network not in have.networks:
        smaller.append(f"network {', '.join(have.networks) or 'none'} != {want.network}")
    return smaller, larger


class HypervisorSession(Protocol):
    """An open session on one hypervisor, bound to the spec's placement."""

    def preflight(self, networks: list[str]) -> list[str]:
        """Problems that must stop phase 1 before any VM is touched (empty: go)."""
        ...

    def list_vms(self) -> list[VmState]:
        ...

    def find_vm(self, name: str) -> VmState | None:
        """The VM with this name; raises HypervisorError if the name is not unique."""
        ...

    def ensure_vm(self, want: VmWanted, resize: bool) -> EnsureResult:
        """Create the VM, or compare and (with ``resize``) grow what is too small."""
        ...

    def power_on(self, name: str) -> bool:
        """True if it was off and is now on."""
        ...

    def wait_for_ip(self, name: str, expected: str, timeout: float) -> str:
        ...

    def delete_vm(self, name: str) -> bool:
        ...

    def close(self) -> None:
        ...
