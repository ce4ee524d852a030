"""The Nutanix stand-in as a source for the lab's guest watcher (`lab.watcher.VmSource`).

It reads the stand-in's lab endpoint (`GET /lab/v1/vms`, not part of the Nutanix API) over
verified HTTPS, and reports a booted guest's address back (`POST /lab/v1/vms/<id>/guest`),
which the VM then shows as a learned IP of its NIC, as Prism shows what AHV learned.
"""

from __future__ import annotations

import ssl
import time
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import httpx

from lab.watcher import ObservedVM


class NutanixSource:
    """Follows the VMs of one Nutanix stand-in, by polling (Prism has no change feed the lab
    could follow)."""

    POLL_SECONDS = 0.1

    def __init__(self, base_url: str, user: str, password: str, ca_file: Path | str) -> None:
        self._http = httpx.Client(base_url=base_url, auth=(user, password), timeout=10.0,
                                  verify=ssl.create_default_context(cafile=str(ca_file)))
        self._nics: dict[str, list[dict[str, Any]]] = {}
        self._vmm_version: str | None = None

    def close(self) -> None:
        self._http.close()

    def vms(self) -> list[ObservedVM]:
        """Every VM; cloud-init is (metadata, userdata) as the guest's config drive has it."""
        response = self._http.get("/lab/v1/vms")
        response.raise_for_status()
        observed = []
        self._nics = {}
        for vm in response.json()["vms"]:
            self._nics[vm["ext_id"]] = vm["nics"]
            cloud_init = None
            if vm["user_data"] is not None:
                # AHV writes a meta_data with the VM's uuid and name when none is given.
                metadata = vm["meta_data"] or (f"instance-id: {vm['ext_id']}\n"
                                               f"local-hostname: {vm['name']}\n")
                cloud_init = (metadata, vm["user_data"])
            observed.append(ObservedVM(key=vm["ext_id"], name=vm["name"],
                                       powered_on=vm["power_state"] == "ON",
                                       loader=partial(_given, cloud_init),
                                       disks_loader=partial(self._disks, vm["ext_id"])))
        return observed

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, self.POLL_SECONDS))

    def _disks(self, ext_id: str) -> tuple[int, ...]:
        """The VM's disks in bytes through the v4 API, as the product reads them: the
        image-cloned (boot) disk first, then by bus and index."""
        if self._vmm_version is None:
            info = self._http.request("OPTIONS", "/api/vmm/unversioned/info")
            info.raise_for_status()
            self._vmm_version = str(info.json()["data"])
        response = self._http.get(f"/api/vmm/{self._vmm_version}/ahv/config/vms/{ext_id}")
        response.raise_for_status()
        disks = response.json()["data"].get("disks") or []

        def order(disk: dict[str, Any]) -> tuple[int, str, int]:
            source = (disk.get("backingInfo") or {}).get("dataSource")
            address = disk.get("diskAddress") or {}
            return (0 if source else 1, str(address.get("busType", "")),
                    int(address.get("index", 0) or 0))

        return tuple(int(d["backingInfo"]["diskSizeBytes"]) for d in sorted(disks, key=order)
                     if (d.get("backingInfo") or {}).get("diskSizeBytes") is not None)

    def report_guest(self, vm: ObservedVM, ip: IPv4Address, hostname: str) -> None:
        """What AHV learns once the guest's network is up: its IP (on the NIC that asked for
        it, else the first) and its hostname."""
        nics = self._nics.get(vm.key, [])
        index = next((i for i, nic in enumerate(nics) if nic["requested_ip"] == str(ip)), 0)
        response = self._http.post(f"/lab/v1/vms/{vm.key}/guest",
                                   json={"ips": {str(index): [str(ip)]}, "hostname": hostname})
        response.raise_for_status()


def _given(data: tuple[str, str] | None) -> tuple[str, str] | None:
    return data
