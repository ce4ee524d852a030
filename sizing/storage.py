"""Where a VM's data lives: its first data disk, formatted and mounted the same way on
every VM, so that each service keeps its state under DATA_MOUNT/<service> (Vault's raft,
the registry's blobs, Gogs' repositories...) and never on the OS disk.

Pure: phase 2 (tasks.prepare, tasks.hostops.DataDisk) and phase 3 read these constants.
"""

from __future__ import annotations

DATA_MOUNT = "/srv/data"
DATA_LABEL = "platform-data"  # ext4 labels: at most 16 bytes
DATA_FSTYPE = "ext4"


def data_dir(service: str) -> str:
    """Where `service` keeps its data on the data disk."""
    if not service or "/" in service or service in (".", ".."):
        raise ValueError(f"not a service name: {service!r}")
    return f"{DATA_MOUNT}/{service}"
