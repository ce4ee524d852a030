"""Run the Nutanix Prism Central v4 stand-in (simulated) over HTTPS on loopback.

No Nutanix simulator exists, so the lab and the tests run this instead: the real v4 SDKs
talk to it unchanged (paths, versions, auth, cookies, ETags, tasks, error bodies), and it
behaves like Prism Central where the project can tell the difference (see `api` and
`inventory` for what is simulated and how).

In Python::

    standin = NutanixStandIn(tmp / "nutanix.json", "admin", "secret",
                             clusters=[Cluster("AHV-01")], ...)
    url = standin.start()          # https://127.0.0.1:<port>, CA in standin.ca_file
    ...
    standin.stop()

From a shell (prints NUTANIX_URL=... and NUTANIX_CA_FILE=... once it serves)::

    python -m lab.nutanix.server --state /var/lib/lab/nutanix.json --port 9440 \
        --user admin --password secret --inventory inventory.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import uvicorn
import yaml

from lab.nutanix.api import NutanixApi, RequestRecord
from lab.nutanix.faults import FaultPlan, Faults
from lab.nutanix.inventory import Cluster, Image, LabVm, Store, Subnet
from lab.nutanix.tls import DEFAULT_HOSTS, ensure_tls


def _as(kind: type[Any], items: Iterable[Any]) -> list[Any]:
    return [item if isinstance(item, kind) else kind.from_mapping(item) for item in items]


class NutanixStandIn:
    """A Prism Central stand-in: state in `state_file`, TLS files beside it."""

    def __init__(self, state_file: Path, username: str, password: str,
                 clusters: Sequence[Cluster | Mapping[str, Any]] = (),
                 subnets: Sequence[Subnet | Mapping[str, Any]] = (),
                 images: Sequence[Image | Mapping[str, Any]] = (),
                 task_seconds: float = 0.6, fault: Faults | None = None, *,
                 session_seconds: float = 900.0, api_versions: Mapping[str, str] | None = None,
                 prism_central_name: str | None = "prism-central",
                 tls_hosts: tuple[str, ...] = DEFAULT_HOSTS) -> None:
        self.state_file = Path(state_file)
        self.faults = FaultPlan(fault)
        self.store = Store(self.state_file, clusters=_as(Cluster, clusters),
                           subnets=_as(Subnet, subnets), images=_as(Image, images),
                           task_seconds=task_seconds, prism_central_name=prism_central_name)
        self.api = NutanixApi(self.store, username, password, self.faults,
                              session_seconds=session_seconds, versions=api_versions)
        self.tls = ensure_tls(self.state_file.parent, tls_hosts)
        self.base_url: str | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def ca_file(self) -> Path:
        """The CA certificate clients verify the server with."""
        return self.tls.ca_file

    @property
    def port(self) -> int:
        """The port it listens on (after `start`)."""
        if self._socket is None:
            raise RuntimeError("the stand-in is not running")
        return int(self._socket.getsockname()[1])

    def start(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0) -> str:
        """Serve in a background thread; return the base URL once it accepts connections."""
        if self._thread is not None:
            raise RuntimeError("already started")
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self._socket = sock
        config = uvicorn.Config(
            self.api, host=host, port=self.port, http="h11", loop="asyncio", lifespan="off",
            ws="none",
            log_config=None, log_level="warning", access_log=False, proxy_headers=False,
            ssl_certfile=str(self.tls.cert_file), ssl_keyfile=str(self.tls.key_file),
            timeout_keep_alive=30, timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=self._serve, args=(server, sock),
                                  name=f"nutanix-standin-{self.port}", daemon=True)
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the Nutanix stand-in did not start")
            time.sleep(0.02)
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        self.base_url = f"https://{shown}:{self.port}"
        return self.base_url

    def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            await server.serve(sockets=[sock])

        asyncio.run(serve())

    def stop(self) -> None:
        """Stop serving and wait for the server thread; the state file stays.

        Open connections are cut: idle keep-alive TLS connections of clients would otherwise
        hold the shutdown until uvicorn's graceful timeout.
        """
        server, loop = self._server, self._loop
        if server is not None:
            server.should_exit = True
            if loop is not None and not loop.is_closed():
                def cut() -> None:
                    for connection in list(server.server_state.connections):
                        transport = getattr(connection, "transport", None)
                        if transport is not None:
                            transport.abort()

                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(cut)
        if self._thread is not None:
            self._thread.join(timeout=15)
            if self._thread.is_alive():
                raise RuntimeError("the Nutanix stand-in did not stop")
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
        self._loop = None
        self.base_url = None

    def __enter__(self) -> NutanixStandIn:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    # ---- for the lab and tests (not part of the Nutanix API) ----------------------------

    def lab_vms(self) -> list[LabVm]:
        """Every VM with power state, cloud-init data and NICs (the guest watcher's view)."""
        return self.store.lab_vms()

    def report_guest(self, vm_ext_id: str, ips: Mapping[int, Iterable[str]],
                     hostname: str | None = None) -> None:
        """What a booted guest tells the hypervisor: IPs per NIC index, and its hostname."""
        self.store.report_guest(vm_ext_id, ips, hostname)

    def remove_image(self, ext_id: str) -> None:
        """Delete an image behind the clients' back."""
        self.store.remove_image(ext_id)

    def set_capacity(self, cluster_ext_id: str, *, memory_bytes: int | None = None,
                     storage_bytes: int | None = None) -> None:
        """Change a cluster's simulated memory or storage capacity."""
        self.store.set_capacity(cluster_ext_id, memory_bytes=memory_bytes,
                                storage_bytes=storage_bytes)

    def set_faults(self, faults: Faults) -> None:
        """Replace the fault plan (counters restart)."""
        self.faults.set(faults)

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request seen so far, in order."""
        return list(self.api.requests)


def _inventory(path: Path | None) -> tuple[list[Cluster], list[Subnet], list[Image]]:
    """Read clusters, subnets and images from a YAML/JSON file; subnets may name clusters."""
    if path is None:
        return [], [], []
    data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") \
        else json.loads(path.read_text())
    clusters = [Cluster.from_mapping(c) for c in data.get("clusters", [])]
    by_name = {c.name: c.ext_id for c in clusters}
    subnets = []
    for raw in data.get("subnets", []):
        raw = dict(raw)
        if "clusterName" in raw:
            raw["clusterExtId"] = by_name[raw.pop("clusterName")]
        subnets.append(Subnet.from_mapping(raw))
    images = [Image.from_mapping(i) for i in data.get("images", [])]
    return clusters, subnets, images


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; serves until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, required=True,
                        help="state JSON file; the TLS files go in its directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9440)
    parser.add_argument("--user", default="admin")
    parser.add_argument("--password", default=os.environ.get("NUTANIX_STANDIN_PASSWORD"),
                        help="or NUTANIX_STANDIN_PASSWORD")
    parser.add_argument("--inventory", type=Path,
                        help="YAML/JSON with clusters, subnets, images (first start only)")
    parser.add_argument("--task-seconds", type=float, default=0.6)
    args = parser.parse_args(argv)
    if not args.password:
        parser.error("--password (or NUTANIX_STANDIN_PASSWORD) is required")
    clusters, subnets, images = _inventory(args.inventory)
    hosts = tuple(dict.fromkeys((args.host, *DEFAULT_HOSTS)))
    standin = NutanixStandIn(args.state, args.user, args.password, clusters, subnets, images,
                             task_seconds=args.task_seconds, tls_hosts=hosts)
    done = threading.Event()

    def finish(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    url = standin.start(args.host, args.port)
    print(f"NUTANIX_URL={url}", flush=True)
    print(f"NUTANIX_CA_FILE={standin.ca_file}", flush=True)
    while not done.wait(1.0):
        pass
    standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
