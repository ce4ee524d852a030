"""A Nutanix Prism Central v4 API stand-in (simulated) for the lab and the tests.

The official Nutanix v4 SDKs talk to it unchanged; see `lab.nutanix.server` to run it.
`NutanixStandIn` is imported lazily so that `python -m lab.nutanix.server` runs cleanly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lab.nutanix.faults import Faults
from lab.nutanix.inventory import Cluster, GiB, Image, LabNic, LabVm, Subnet, TiB

if TYPE_CHECKING:
    from lab.nutanix.server import NutanixStandIn

__all__ = ["Cluster", "Faults", "GiB", "Image", "LabNic", "LabVm", "NutanixStandIn", "Subnet",
           "TiB"]


def __getattr__(name: str) -> Any:
    if name == "NutanixStandIn":
        from lab.nutanix.server import NutanixStandIn

        return NutanixStandIn
    raise AttributeError(name)
