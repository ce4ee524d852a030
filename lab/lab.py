"""The lab as one thing: `up` builds the simulated datacenter for a spec, `down` removes
every trace of it, `status` shows what runs.

Order matters both ways. Up: the unreachable route and bridges first (so no packet toward
a lab address leaves), then vcsim, the mirror, the watcher that boots guests, Prefect and
the blocks. Down: the reverse, the route last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from lab.hosts import LabHosts
from lab.mirror import assemble, bind_address
from lab.network import LabNetwork, bridges_for
from lab.nutanix_lab import NutanixLab
from lab.prefect_stack import PROJECT_DIR, PrefectStack
from lab.processes import Daemon
from lab.ssh_keys import ensure_identity
from lab.vcsim import Vcsim
from lab.watcher import VmSource
from sizing.spec import PlatformSpec
from tasks.spec import resolve_spec_path


class Lab:
    """Everything the lab runs, under one state directory outside the repository."""

    def __init__(self, spec_path: str, spec: PlatformSpec | None,
                 state_dir: Path | None = None, prefect: PrefectStack | None = None) -> None:
        """``spec`` may be None for `down`, which removes whatever the state shows."""
        self.spec_path = str(resolve_spec_path(spec_path).resolve())
        self._spec = spec
        self.prefect = prefect or PrefectStack.from_env()
        self.state_dir = state_dir or self.prefect.state_dir
        self.network = LabNetwork(self.state_dir)
        self.vcsim = Vcsim(self.state_dir)
        self.nutanix = NutanixLab(self.state_dir)
        self.hosts = LabHosts(self.state_dir)
        self.mirror = Daemon(self.state_dir, "mirror")
        self.watcher = Daemon(self.state_dir, "watcher")

    @property
    def spec(self) -> PlatformSpec:
        if self._spec is None:
            raise ValueError("this lab command needs a platform spec")
        return self._spec

    # --- up -----------------------------------------------------------------------------------

    def up(self, with_prefect: bool = True) -> list[str]:
        """Bring up what is missing; a second call changes nothing and says so."""
        try:
            return self._up(with_prefect)
        except Exception as error:
            raise RuntimeError(f"{error}\nThe lab may be partly up: `platformctl lab down` "
                               f"(state {self.state_dir}) removes what was started.") from error

    def _up(self, with_prefect: bool) -> list[str]:
        if os.geteuid() != 0:
            raise RuntimeError("the lab needs root (network namespaces, bridges, mounts)")
        bridges_for(self.spec)  # refuses zones outside the lab range before any change
        self.state_dir.mkdir(parents=True, exist_ok=True)
        done = self.network.up(self.spec)
        if self.spec.hypervisor.kind == "vsphere":
            done += self.vcsim.up(self.spec)
        else:
            done += self.nutanix.up(self.spec)
        done += self._mirror_up()
        done += self._watcher_up()
        if with_prefect:
            started = self.prefect.up()
            done += started + self._register_blocks(force=bool(started))
        return done

    def _mirror_up(self) -> list[str]:
        root = self.state_dir / "mirror"
        done = [f"mirror: {path}" for path in assemble(self.spec, root)]
        if self.mirror.pid() is None:
            host, port = bind_address(self.spec)
            self.mirror.log.unlink(missing_ok=True)
            self.mirror.start([sys.executable, "-m", "lab.mirror", "--root", str(root),
                               "--host", host, "--port", str(port)], cwd=PROJECT_DIR)
            self.mirror.wait_until(lambda: "MIRROR_URL=" in self.mirror.log.read_text(), 10,
                                   "serving")
            done.append(f"artifact mirror serving {self.spec.artifacts.mirror}")
        return done

    def _watcher_up(self) -> list[str]:
        if self.watcher.pid() is not None:
            return []
        env = dict(os.environ) | self._source_env()
        self.watcher.start([sys.executable, "-m", "lab.watcher", "--spec", self.spec_path,
                            "--state", str(self.state_dir)], env=env, cwd=PROJECT_DIR)
        self.watcher.wait_until(lambda: "watching" in self.watcher.log.read_text(), 30,
                                "watching")
        return [f"watcher following {self.spec.hypervisor.kind}: VMs powered on boot lab hosts"]

    def _source_env(self, running_only: bool = False) -> dict[str, str]:
        """The variables lab.sources reads to reach the lab's hypervisor simulators."""
        env: dict[str, str] = {}
        vcsim, prism = self.vcsim.access(), self.nutanix.access()
        if vcsim is not None and not (running_only and self.vcsim.daemon.pid() is None):
            env |= {"LAB_VCSIM_URL": vcsim.url, "LAB_VCSIM_USER": vcsim.user,
                    "LAB_VCSIM_PASSWORD": vcsim.password}
        if prism is not None and not (running_only and self.nutanix.daemon.pid() is None):
            env |= {"LAB_PRISM_URL": prism.url, "LAB_PRISM_USER": prism.user,
                    "LAB_PRISM_PASSWORD": prism.password, "LAB_PRISM_CA": str(prism.ca_file)}
        return env

    def _register_blocks(self, force: bool) -> list[str]:
        """The blocks the spec names, with the lab's values (the lab vCenter, a fresh key)."""
        access = self.vcsim.access() or self.nutanix.access()
        assert access is not None
        key_path = ensure_identity(self.state_dir / "ssh")
        values = {
            "hypervisor": {"kind": self.spec.hypervisor.kind,
                           "name": self.spec.hypervisor.block, "address": access.address,
                           "user": access.user, "password": access.password,
                           "ca_bundle": access.ca_file.read_text()},
            "ssh": {"name": self.spec.ssh.identity_block, "user": self.spec.ssh.user,
                    "private_key": key_path.read_text()},
        }
        text = json.dumps(values, sort_keys=True)
        stamp = self.state_dir / "blocks.sha256"
        digest = hashlib.sha256(text.encode()).hexdigest()
        if not force and stamp.exists() and stamp.read_text() == digest:
            return []
        request = self.state_dir / "blocks-request.json"
        request.write_text(text)
        request.chmod(0o600)
        try:
            env = self.prefect.env()
            for args in (["prefect", "block", "register", "-m", "blocks"],
                         [sys.executable, "-m", "lab.register_blocks", str(request)]):
                if args[0] == "prefect":
                    args[0] = str(Path(sys.executable).parent / "prefect")
                done = subprocess.run(args, env=env, cwd=PROJECT_DIR, capture_output=True,
                                      text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"registering the lab's blocks failed: "
                                       f"{done.stdout[-1500:]}{done.stderr[-1500:]}")
        finally:
            request.unlink(missing_ok=True)
        stamp.write_text(digest)
        return [f"blocks {self.spec.hypervisor.block} ({self.spec.hypervisor.kind} at "
                f"{access.address}) and "
                f"{self.spec.ssh.identity_block} (SSH identity) saved"]

    # --- down ---------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop and remove everything; safe to call when nothing or only part is up."""
        done = self.prefect.down()
        pid = self.watcher.stop()
        if pid:
            done.append(f"stopped watcher (pid {pid})")
        done += [f"deleted lab host {name}" for name in self.hosts.delete_all()]
        pid = self.mirror.stop()
        if pid:
            done.append(f"stopped artifact mirror (pid {pid})")
        done += self.vcsim.down()
        done += self.nutanix.down()
        done += self.network.down()
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
            done.append(f"removed {self.state_dir}")
        return done

    # --- status -------------------------------------------------------------------------------

    def vm_rows(self) -> list[dict[str, object]]:
        """Every VM of the hypervisor with its power, IP, host and SSH reachability."""
        from lab.sources import sources_from_env

        sources = sources_from_env(self._source_env(running_only=True))
        try:
            return [row for source in sources for row in self._vm_rows(source)]
        finally:
            for source in sources:
                source.close()

    def _vm_rows(self, source: VmSource) -> list[dict[str, object]]:
        from lab.cloudinit import CloudInitError, host_config

        rows: list[dict[str, object]] = []
        for vm in sorted(source.vms(), key=lambda v: v.name):
            ip = ""
            if vm.cloud_init is not None:
                with contextlib.suppress(CloudInitError):
                    ip = str(host_config(vm.name, *vm.cloud_init, bridge="").address.ip)
            host_up = self.hosts.is_running(vm.name)
            rows.append({"vm": vm.name, "power": "on" if vm.powered_on else "off",
                         "ip": ip, "host": "up" if host_up else "down",
                         "ssh": "yes" if ip and host_up and ssh_answers(ip) else "no"})
        return rows

    def service_rows(self) -> list[dict[str, object]]:
        access = self.vcsim.access()
        bridges = self.network.bridges()
        return [
            {"service": "network", "state": "up" if self.network.route_present() else "down",
             "where": ", ".join(f"{name} {' '.join(addresses)}"
                                for name, addresses in bridges.items())},
            {"service": "vcsim (vCenter)", "state": _state(self.vcsim.daemon),
             "where": access.url if access else ""},
            {"service": "artifact mirror", "state": _state(self.mirror),
             "where": self.spec.artifacts.mirror},
            {"service": "watcher (guests)", "state": _state(self.watcher),
             "where": f"{len(self.hosts.names())} lab host disk(s)"},
            {"service": "Prefect database", "state": _state(self.prefect.database.daemon),
             "where": f"PostgreSQL, socket in {self.prefect.database.socket_dir}"},
            {"service": "Prefect server", "state": "up" if self.prefect.healthy() else "down",
             "where": self.prefect.ui_url},
            {"service": "Prefect worker", "state": _state(self.prefect.daemon("worker")),
             "where": "pool platform"},
        ]


def _state(daemon: Daemon) -> str:
    pid = daemon.pid()
    return f"up (pid {pid})" if pid else "down"


def ssh_answers(ip: str, timeout: float = 0.5) -> bool:
    """True when an SSH server greets on port 22 (no login attempted)."""
    try:
        with socket.create_connection((ip, 22), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(4).startswith(b"SSH-")
    except OSError:
        return False
