"""The lab's Prism Central when the spec says nutanix: the v4 stand-in (lab/nutanix/) as a
background process, seeded with the spec's cluster, one subnet per zone and the image."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import yaml

from lab.access import Access
from lab.processes import Daemon
from sizing.spec import PlatformSpec

PROJECT_DIR = Path(__file__).resolve().parent.parent


class NutanixLab:
    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        self.state_dir = state_dir
        self.daemon = Daemon(state_dir, "nutanix")
        self.port = port or int(os.environ.get("PLATFORM_LAB_PRISM_PORT", "19440"))
        self.access_file = state_dir / "nutanix.json"

    def access(self) -> Access | None:
        return Access.load(self.access_file)

    def up(self, spec: PlatformSpec) -> list[str]:
        placement = spec.hypervisor.nutanix
        if placement is None:
            raise ValueError("the Nutanix stand-in serves nutanix specs only")
        if self.daemon.pid() is not None and self.access() is not None:
            return []
        directory = self.state_dir / "nutanix"
        directory.mkdir(parents=True, exist_ok=True)
        inventory = directory / "inventory.yaml"
        inventory.write_text(yaml.safe_dump({
            "clusters": [{"name": placement.cluster}],
            "subnets": [{"name": zone.network, "vlanId": zone.vlan or 0,
                         "clusterName": placement.cluster} for _, zone in spec.zones.items()],
            "images": [{"name": placement.image, "sizeBytes": 4 * 1024**3}],
        }))
        user, password = "admin", secrets.token_urlsafe(18)
        self.daemon.log.unlink(missing_ok=True)
        self.daemon.start([sys.executable, "-m", "lab.nutanix.server",
                           "--state", str(directory / "state.json"), "--port", str(self.port),
                           "--user", user, "--inventory", str(inventory)],
                          env=dict(os.environ, NUTANIX_STANDIN_PASSWORD=password),
                          cwd=PROJECT_DIR)
        self.daemon.wait_until(lambda: "NUTANIX_CA_FILE=" in self.daemon.log.read_text(), 30,
                               "serving")
        ca_file = next(line.split("=", 1)[1] for line in self.daemon.log.read_text().splitlines()
                       if line.startswith("NUTANIX_CA_FILE="))
        access = Access(f"127.0.0.1:{self.port}", user, password, Path(ca_file))
        access.save(self.access_file)
        return [f"started the Nutanix Prism Central stand-in on {access.url} (cluster "
                f"{placement.cluster}, image {placement.image})"]

    def down(self) -> list[str]:
        pid = self.daemon.stop()
        self.access_file.unlink(missing_ok=True)
        return [f"stopped the Nutanix stand-in (pid {pid})"] if pid else []
