"""The inventory: every VM of the platform, with its name, place, address and size.

Names and addresses are a pure function of the spec. Each role owns a fixed block of
consecutive addresses at the start of its zone's host range (see ``RoleInfo.capacity``),
so a higher tier or a larger count only fills more of the block: no VM ever changes name
or IP because another was added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address

from sizing.spec import PlatformSpec, ZoneName
from sizing.tiers import ROLE_INFO, ROLES, Cluster, Role, RoleInfo, Size, size_for


@dataclass(frozen=True)
class VM:
    """One virtual machine as the spec wants it."""

    name: str
    role: Role
    index: int  # 1-based position within its role
    zone: ZoneName
    cluster: Cluster | None
    node: str | None
    ip: IPv4Address
    vcpu: int
    memory_gb: int
    disks_gb: tuple[int, ...]
    fqdn: str

    def row(self) -> dict[str, object]:
        """A flat, JSON-ready view (the plan's rows, the artifacts' tables)."""
        return {
            "name": self.name,
            "role": self.role.value,
            "cluster": self.cluster.value if self.cluster else None,
            "zone": self.zone.value,
            "ip": str(self.ip),
            "vcpu": self.vcpu,
            "memory_gb": self.memory_gb,
            "disks_gb": list(self.disks_gb),
            "fqdn": self.fqdn,
        }


@dataclass(frozen=True)
class Inventory:
    """All VMs in a stable order (zone blocks, then index), and the host groups."""

    vms: tuple[VM, ...]
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def by_name(self, name: str) -> VM:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(f"no VM named {name!r} in the inventory")

    def group(self, name: str) -> list[VM]:
        return [self.by_name(n) for n in self.groups[name]]

    def of_role(self, role: Role) -> list[VM]:
        return [vm for vm in self.vms if vm.role is role]

    def totals(self) -> dict[str, int]:
        return {
            "vms": len(self.vms),
            "vcpu": sum(vm.vcpu for vm in self.vms),
            "memory_gb": sum(vm.memory_gb for vm in self.vms),
            "disk_gb": sum(sum(vm.disks_gb) for vm in self.vms),
        }


def effective_size(spec: PlatformSpec, role: Role) -> Size:
    """The tier's size of a role with the spec's overrides applied."""
    base = size_for(spec.users, role)
    override = spec.overrides.get(role.value)
    if override is None:
        return base
    return Size(
        count=base.count if override.count is None else override.count,
        vcpu=override.vcpu or base.vcpu,
        memory_gb=override.memory_gb or base.memory_gb,
        disks_gb=tuple(override.disks_gb) if override.disks_gb else base.disks_gb,
        reason=f"{base.reason} (overridden in the spec)",
    )


def block_offsets(zone: ZoneName) -> dict[Role, int]:
    """Offset of each role's first address from the start of the zone's host range."""
    offsets: dict[Role, int] = {}
    position = 0
    for info in ROLES:
        if info.zone is zone:
            offsets[info.role] = position
            position += info.capacity
    return offsets


def addresses_needed(spec: PlatformSpec) -> dict[ZoneName, int]:
    """How many addresses from the start of each zone's host range the inventory uses."""
    needed: dict[ZoneName, int] = {zone: 0 for zone in ZoneName}
    for zone in ZoneName:
        for role, offset in block_offsets(zone).items():
            count = effective_size(spec, role).count
            if count:
                needed[zone] = max(needed[zone], offset + count)
    return needed


def vm_name(spec: PlatformSpec, role: Role, index: int) -> str:
    return f"{spec.name}-{role.value}-{index:02d}"


def build_inventory(spec: PlatformSpec) -> Inventory:
    """Every VM the spec asks for. The spec must have passed validation."""
    vms: list[VM] = []
    for zone_name in ZoneName:
        zone = spec.zones.get(zone_name)
        for role, offset in block_offsets(zone_name).items():
            info: RoleInfo = ROLE_INFO[role]
            size = effective_size(spec, role)
            for index in range(1, size.count + 1):
                name = vm_name(spec, role, index)
                vms.append(VM(
                    name=name,
                    role=role,
                    index=index,
                    zone=zone_name,
                    cluster=info.cluster,
                    node=info.node,
                    ip=zone.hosts.first + offset + index - 1,
                    vcpu=size.vcpu,
                    memory_gb=size.memory_gb,
                    disks_gb=size.disks_gb,
                    fqdn=f"{name}.{spec.domain}",
                ))
    return Inventory(vms=tuple(vms), groups=_groups(vms))


def _groups(vms: list[VM]) -> dict[str, tuple[str, ...]]:
    """The host groups later phases address (the old Ansible inventory groups)."""
    groups: dict[str, list[str]] = {"all": [vm.name for vm in vms]}

    def add(group: str, vm: VM) -> None:
        groups.setdefault(group, []).append(vm.name)

    for vm in vms:
        add(vm.role.value.replace("-", "_"), vm)
        if vm.cluster is not None:
            add(f"rke2_{vm.cluster.value}", vm)
            add(f"rke2_{vm.cluster.value}_{vm.node}s", vm)
            add("rke2_nodes", vm)
            add(f"rke2_{vm.node}s", vm)
        elif vm.role in (Role.LBLAN, Role.LBDMZ, Role.LBINTEGRATION):
            add("load_balancers", vm)
            add("infra", vm)
        else:
            add("infra", vm)
    return {name: tuple(members) for name, members in groups.items()}
