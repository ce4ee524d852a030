"""The lab's vCenter: vcsim built from Debian's govmomi sources (lab/vcsim/), started on
loopback with an inventory shaped like the spec's vSphere placement.

Datastores and port groups can only be named at start (vcsim 0.24.2 cannot rename them),
so the spec's names go on the command line; the template VM is the one `-vm 1` creates,
renamed and marked as a template. vcsim keeps its inventory in memory: a restart loses
every VM, like a freshly installed vCenter.
"""

from __future__ import annotations

import os
import re
import secrets
import ssl
import subprocess
from pathlib import Path
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from lab.access import Access
from lab.processes import Daemon
from lab.tls import issue
from sizing.spec import PlatformSpec

CACHE = Path(os.environ.get("PLATFORM_CACHE", "/var/cache/platform-orchestrator"))
BUILD_SCRIPT = Path(__file__).resolve().parent / "vcsim" / "build.sh"


def build() -> Path:
    """The vcsim binary, built once into the cache (about 20 s cold)."""
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building vcsim with {BUILD_SCRIPT} failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


class Vcsim:
    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        self.state_dir = state_dir
        self.daemon = Daemon(state_dir, "vcsim")
        self.port = port or int(os.environ.get("PLATFORM_LAB_VCSIM_PORT", "18989"))
        self.access_file = state_dir / "vcsim.json"

    def access(self) -> Access | None:
        return Access.load(self.access_file)

    def up(self, spec: PlatformSpec, extra_args: tuple[str, ...] = ()) -> list[str]:
        placement = spec.hypervisor.vsphere
        if placement is None:
            raise ValueError("vcsim serves vSphere specs only (hypervisor.kind: vsphere)")
        if self.daemon.pid() is not None and self.access() is not None:
            return []
        binary = build()
        cert, key = issue(self.state_dir / "tls", "vcsim", ["127.0.0.1", "localhost"])
        access = Access(f"127.0.0.1:{self.port}", "lab-admin@vsphere.local",
                             secrets.token_urlsafe(18), self.state_dir / "tls" / "lab-ca.pem",
                        path="/sdk")
        self.daemon.log.unlink(missing_ok=True)
        self.daemon.start([
            str(binary), "-l", access.address, "-username", access.user,
            "-tls-cert", str(cert), "-tls-key", str(key),
            "-dc-name", placement.datacenter, "-cluster-name", placement.cluster,
            "-ds-name", placement.datastore,
            "-pg-names", ",".join(zone.network for _, zone in spec.zones.items()),
            "-vm", "1", "-autostart=false", *extra_args],
            env=dict(os.environ, VCSIM_PASSWORD=access.password))
        self.daemon.wait_until(lambda: "VCSIM_URL=" in self._log(), 30, "serving")
        access.save(self.access_file)
        self._make_template(access, placement.template)
        return [f"started vcsim on {access.url} ({placement.datacenter}/{placement.cluster}, "
                f"template {placement.template})"]

    def down(self) -> list[str]:
        pid = self.daemon.stop()
        self.access_file.unlink(missing_ok=True)
        return [f"stopped vcsim (pid {pid})"] if pid else []

    def _log(self) -> str:
        return self.daemon.log.read_text(errors="replace") if self.daemon.log.exists() else ""

    def _make_template(self, access: Access, name: str) -> None:
        si = connect(access)
        try:
            seed = next(vm for vm in all_of(si, vim.VirtualMachine)
                        if re.search(r"_VM0$", vm.name))
            WaitForTask(seed.Rename_Task(name))
            seed.MarkAsTemplate()
        finally:
            Disconnect(si)


def connect(access: Access) -> vim.ServiceInstance:
    """A pyvmomi session that verifies vcsim's certificate against the lab CA."""
    context = ssl.create_default_context(cafile=str(access.ca_file))
    host, port = access.address.rsplit(":", 1)
    return SmartConnect(host=host, port=int(port), user=access.user, pwd=access.password,
                        sslContext=context)


def all_of(si: vim.ServiceInstance, kind: type) -> list[Any]:
    """Every managed object of a kind (VirtualMachine, ClusterComputeResource, ...)."""
    content = si.RetrieveContent()
    assert content.viewManager is not None
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return list(view.view)
    finally:
        view.Destroy()
