"""The `NutanixHypervisor` block: Prism Central's address and credentials, and a session on
its v4 APIs (the official Nutanix SDKs) that implements the phase-1 hypervisor protocol
(blocks.hypervisor).

How Prism Central works, and what this module relies on:

- Every change (create, update, power, delete) answers 202 with a task id; the change is
  made when the task ends. Tasks are polled with the prism TasksApi until SUCCEEDED or
  FAILED; a new VM's extId is only known from its SUCCEEDED task. Capacity, image and
  subnet problems show up as FAILED tasks, not as HTTP errors.
- Power actions, update and delete need the VM's current ETag (If-Match), which only a
  single-VM read gives; it changes whenever a task on the VM ends, so the VM is read again
  before each change.
- The VM update (PUT) changes CPU and memory (growing both works on a running VM) but
  ignores disks, NICs and cloud-init: disks and NICs have their own endpoints, which this
  block does not call yet, so a disk or network below the spec is reported, never fixed.
- A VM read never returns its cloud-init data; ownership is kept in the VM's description
  (``platform.owner=<platform>``).

The SDKs cost about 3 s to import, so they are imported on first use only: importing
`blocks` stays fast.
"""

from __future__ import annotations

import atexit
import base64
import functools
import hashlib
import http.client
import importlib
import json
import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, TypeVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator

from blocks.hypervisor import (
    OWNER_KEY,
    EnsureResult,
    HypervisorError,
    TransientHypervisorError,
    VmState,
    VmWanted,
    differences,
)
from sizing.spec import NutanixPlacement

T = TypeVar("T")
GiB = 1 << 30
DEFAULT_PORT = 9440
VM_REL = "vmm:ahv:config:vm"
PAGE = 100  # the largest $limit Prism Central accepts

# The SDK retries 408/429/503/504 itself; keep that short so the Prefect task's own
# retries (with their backoff and logging) stay in control. Timeouts are in milliseconds.
SDK_RETRY_ATTEMPTS = 2
SDK_BACKOFF_SECONDS = 1.0
CONNECT_TIMEOUT_MS = 10_000
READ_TIMEOUT_MS = 60_000
TASK_TIMEOUT_SECONDS = 1800.0
CREATE_ATTEMPTS = 3  # POSTs of one create after a lost answer, all with the same request id

# Task failures worth a retry: the VM changed under the request, or Prism was busy.
_TRANSIENT_GROUPS = {"VM_ETAG_MISMATCH", "ETAG_MISMATCH", "SERVICE_UNAVAILABLE",
                     "ENTITY_BUSY", "RESOURCE_BUSY", "CONCURRENT_MODIFICATION"}
_TRANSIENT_TEXT = re.compile(r"\bbusy\b|etag|modified after the request|temporarily|"
                             r"try again|retry later|concurrent", re.IGNORECASE)
_OWNER_RE = re.compile(rf"(?:^|\s){re.escape(OWNER_KEY)}=(\S+)")
_REQUEST_IDS = uuid.UUID("5b0f7d1e-6c1a-4f43-9a55-0a9e3c1f2b77")  # namespace for uuid5


class NutanixHypervisor(Block):
    """Prism Central credentials. TLS is verified unless turned off; a private CA may be given."""

    _block_type_name = "Nutanix Hypervisor"
    _block_type_slug = "nutanix-hypervisor"
    _description = ("Prism Central (v4 APIs) address and credentials used by phase 1 and the "
                    "drift check.")

    address: str = Field(description="Prism Central host name or address, with :port if not "
                                     f"{DEFAULT_PORT}")
    user: str = Field(description="Prism Central user, e.g. svc-platform")
    password: SecretStr
    verify_tls: bool = Field(default=True, description="verify Prism Central's TLS certificate")
    ca_bundle: str | None = Field(default=None, description="PEM of the CA that signed Prism "
                                                            "Central's certificate")

    @field_validator("address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        split_address(value)
        return value

    def open(self, placement: NutanixPlacement) -> NutanixSession:
        """A session bound to the spec's cluster and image. Nothing is sent before the first
        call; a refused login then raises HypervisorError at once."""
        host, port = split_address(self.address)
        ca_file = None
        if self.verify_tls and self.ca_bundle:
            if "BEGIN CERTIFICATE" not in self.ca_bundle:
                raise HypervisorError(f"Prism Central {self.address}: ca_bundle of this block is "
                                      "not a PEM certificate; paste the CA's PEM text")
            ca_file = _ca_file(self.ca_bundle)
        return NutanixSession(address=self.address, host=host, port=port, user=self.user,
                              password=self.password.get_secret_value(),
                              verify_tls=self.verify_tls, ca_file=ca_file, placement=placement)


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of "host", "host:port", "[v6]:port" or "https://host:port/"."""
    text = address.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0]
    port = ""
    if text.startswith("["):
        inside, _, rest = text[1:].partition("]")
        host = f"[{inside}]"
        port = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    if not host.strip("[]") or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"{address!r} is not a Prism Central address: use host or host:port, "
                         f"e.g. prism.example.org:{DEFAULT_PORT}")
    return host, int(port) if port else DEFAULT_PORT


def owner_of(description: str | None) -> str | None:
    """The platform named by ``platform.owner=<name>`` in a VM description, if any."""
    found = _OWNER_RE.search(description or "")
    return found.group(1) if found else None


def api_message(body: str | None) -> str:
    """The messages of a v4 error body: a list of AppMessages or one SchemaValidationError."""
    if not body:
        return "no details"
    try:
        data = json.loads(body).get("data") or {}
        error = data.get("error") if isinstance(data, dict) else None
    except (ValueError, AttributeError):
        return body.strip()[:300]
    if isinstance(error, list):
        parts = [f"{m.get('message', '').strip()} [{m.get('code') or m.get('errorGroup')}]"
                 for m in error if isinstance(m, dict)]
        return "; ".join(parts) or "no details"
    if isinstance(error, dict):
        details = [f"{m.get('attributePath') or m.get('location') or '$'}: {m.get('message')}"
                   for m in error.get("validationErrorMessages") or [] if isinstance(m, dict)]
        return "invalid request: " + ("; ".join(details) or str(error.get("error")))
    return body.strip()[:300]


def classify_fault(error: BaseException, address: str, user: str,
                   what: str) -> HypervisorError | TransientHypervisorError | None:
    """Sort an SDK or transport error into permanent and transient; None if it is neither
    (a bug, left to propagate as is). Messages name Prism Central, the step and the cause."""
    import urllib3

    where = f"Prism Central {address}"
    if isinstance(error, urllib3.exceptions.MaxRetryError):
        reason = error.reason
        if isinstance(reason, urllib3.exceptions.SSLError | ssl.SSLError):
            return _tls_error(where, what, reason)
        if isinstance(reason, urllib3.exceptions.ReadTimeoutError | TimeoutError |
                      urllib3.exceptions.ConnectTimeoutError):
            return TransientHypervisorError(f"{where}: {what}: timed out ({_short(reason)})")
        return TransientHypervisorError(f"{where}: {what}: connection failed "
                                        f"({_short(reason)})")
    if isinstance(error, urllib3.exceptions.SSLError | ssl.SSLError):
        return _tls_error(where, what, error)
    if type(error).__name__ == "ApiException" and hasattr(error, "status"):
        status = int(getattr(error, "status", 0) or 0)
        text = str(getattr(error, "reason", "") or "")
        message = api_message(getattr(error, "body", None))
        if status == 0:
            if "SSL" in text:
                return _tls_error(where, what, text.strip().splitlines()[-1])
            return HypervisorError(f"{where}: {what}: the request could not be sent: "
                                   f"{text.strip()[:200]}")
        if status == 401:
            return HypervisorError(f"{where} refused the login of {user} ({what}): check the "
                                   "user and password in this block")
        if status == 403:
            return HypervisorError(f"{where}: user {user} is not allowed to do this ({what}): "
                                   f"{message}; give it a role that may manage VMs")
        if status == 412:
            return TransientHypervisorError(f"{where}: {what}: the VM changed meanwhile (its "
                                            f"ETag is no longer current): {message}")
        if status in (408, 429) or (status >= 500 and status != 501):
            return TransientHypervisorError(f"{where}: {what}: HTTP {status}: {message}")
        return HypervisorError(f"{where}: {what} was refused (HTTP {status}): {message}")
    if isinstance(error, ConnectionError | TimeoutError | socket.timeout |
                  http.client.HTTPException | urllib3.exceptions.HTTPError):
        return TransientHypervisorError(f"{where}: {what}: {_short(error)}")
    return None


def _tls_error(where: str, what: str, reason: object) -> HypervisorError:
    return HypervisorError(f"{where}: TLS verification failed while {what} ({_short(reason)}); "
                           "set ca_bundle in this block to the PEM of the CA that signed its "
                           "certificate")


def _short(reason: object) -> str:
    text = str(reason).strip() or type(reason).__name__
    return text if len(text) <= 240 else text[:237] + "..."


class NutanixSession:
    """One session on Prism Central's v4 APIs, bound to a cluster and an image.

    Holds one SDK ApiClient per API namespace (vmm, prism, networking, clustermgmt), made on
    first use; placement ids (cluster, image, subnets) are looked up once and cached.
    """

    def __init__(self, *, address: str, host: str, port: int, user: str, password: str,
                 verify_tls: bool, ca_file: str | None, placement: NutanixPlacement) -> None:
        self.address = address
        self.user = user
        self.placement = placement
        self._host, self._port = host, port
        self._password = password
        self._verify_tls = verify_tls
        self._ca_file = ca_file
        self._clients: dict[str, Any] = {}
        self._secrets: list[str] = [password]
        self._cluster_id: str | None = None
        self._image_id: str | None = None
        self._subnets: list[Any] | None = None

    def __repr__(self) -> str:
        return f"NutanixSession({self.address!r}, user={self.user!r})"

    def close(self) -> None:
        for client in self._clients.values():
            pool = getattr(getattr(client, "rest_client", None), "pool_manager", None)
            if pool is not None:
                pool.clear()
        self._clients.clear()

    # --- SDK clients and faults -----------------------------------------------------------

    def _client(self, namespace: str) -> Any:
        client = self._clients.get(namespace)
        if client is None:
            module = getattr(_sdk(), namespace)
            config = module.Configuration()
            config.host = self._host
            config.port = self._port
            config.username = self.user
            config.password = self._password
            config.verify_ssl = self._verify_tls
            config.root_ca_certificate_file = self._ca_file
            config.max_retry_attempts = SDK_RETRY_ATTEMPTS
            config.backoff_factor = SDK_BACKOFF_SECONDS
            config.connect_timeout = CONNECT_TIMEOUT_MS
            config.read_timeout = READ_TIMEOUT_MS
            client = self._clients[namespace] = module.ApiClient(configuration=config)
        return client

    @property
    def _vm_api(self) -> Any:
        return _sdk().vmm.VmApi(api_client=self._client("vmm"))

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret and len(secret) >= 4:
                text = text.replace(secret, "<redacted>")
        return text

    def _call(self, what: str, action: Callable[[], T]) -> T:
        """Run one SDK call, sorting its faults into permanent and transient ones."""
        try:
            return action()
        except Exception as error:
            fault = classify_fault(error, self.address, self.user, what)
            if fault is None:
                raise
            raise type(fault)(self._scrub(str(fault))) from None

    def _read_missing_ok(self, what: str, ext_id: str) -> tuple[Any, str] | None:
        """(VM, ETag) read by extId, or None if Prism says 404."""
        try:
            response = self._vm_api.get_vm_by_id(ext_id)
        except Exception as error:
            if type(error).__name__ == "ApiException" and getattr(error, "status", 0) == 404:
                return None
            fault = classify_fault(error, self.address, self.user, what)
            if fault is None:
                raise
            raise type(fault)(self._scrub(str(fault))) from None
        return response.data, str(self._client("vmm").get_etag(response) or "")

    def _read(self, name: str, ext_id: str) -> tuple[Any, str]:
        found = self._read_missing_ok(f"reading VM {name}", ext_id)
        if found is None:
            raise HypervisorError(f"VM {name} ({ext_id}) vanished from Prism Central "
                                  f"{self.address} while it was being worked on")
        return found

    def _all(self, what: str, fetch: Callable[[int], Any]) -> list[Any]:
        """Every item of a paged list (an empty list answers without `data`)."""
        items: list[Any] = []
        page = 0
        while True:
            response = self._call(what, functools.partial(fetch, page))
            data = list(response.data or [])
            items += data
            total = getattr(getattr(response, "metadata", None), "total_available_results",
                            None)
            if len(data) < PAGE or (total is not None and len(items) >= total):
                return items
            page += 1

    # --- tasks ----------------------------------------------------------------------------

    def _task_id(self, response: Any) -> str:
        data = getattr(response, "data", None)
        ext_id = getattr(data, "ext_id", None)
        if not ext_id:
            raise HypervisorError(f"Prism Central {self.address} accepted a change but returned "
                                  f"no task reference ({type(data).__name__})")
        return str(ext_id)

    def _wait(self, what: str, task_id: str, timeout: float = TASK_TIMEOUT_SECONDS) -> Any:
        """Poll a task to its end; return it (SUCCEEDED or FAILED)."""
        tasks = _sdk().prism.TasksApi(api_client=self._client("prism"))
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            task = self._call(f"{what} (reading task {task_id})",
                              lambda: tasks.get_task_by_id(task_id)).data
            status = _enum(task.status)
            if status in ("SUCCEEDED", "FAILED", "CANCELED"):
                return task
            if time.monotonic() > deadline:
                raise TransientHypervisorError(
                    f"Prism Central {self.address}: {what}: task {task_id} still {status} after "
                    f"{timeout:.0f} s; it may still finish: look at it in Prism, then re-run")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def _failure(self, what: str, task: Any) -> HypervisorError | TransientHypervisorError:
        messages = list(getattr(task, "error_messages", None) or [])
        first = messages[0] if messages else None
        text = (getattr(first, "message", None) or getattr(task, "legacy_error_message", None)
                or f"task ended {_enum(task.status)} without a message")
        group = str(getattr(first, "error_group", "") or "")
        transient = group in _TRANSIENT_GROUPS or bool(_TRANSIENT_TEXT.search(text))
        kind = TransientHypervisorError if transient else HypervisorError
        return kind(self._scrub(f"Prism Central {self.address}: {what} failed: {text}"
                                + (f" [{group}]" if group else "")))

    def _run(self, what: str, submit: Callable[[], Any]) -> Any:
        """Submit a change, wait for its task, raise if it FAILED; return the task."""
        task = self._wait(what, self._task_id(self._call(what, submit)))
        if _enum(task.status) != "SUCCEEDED":
            raise self._failure(what, task)
        return task

    # --- placement ------------------------------------------------------------------------

    def _clusters_named(self, name: str) -> list[Any]:
        clusters = _sdk().clu.ClustersApi(api_client=self._client("clu"))
        return [c for c in self._all("listing clusters", lambda page: clusters.list_clusters(
            _filter=f"name eq {_quote(name)}", _page=page, _limit=PAGE)) if c.name == name]

    def _all_subnets(self, refresh: bool = False) -> list[Any]:
        if self._subnets is None or refresh:
            subnets = _sdk().net.SubnetsApi(api_client=self._client("net"))
            self._subnets = self._all("listing subnets", lambda page: subnets.list_subnets(
                _page=page, _limit=PAGE))
        return self._subnets

    def preflight(self, networks: list[str]) -> list[str]:
        p, where = self.placement, f"Prism Central {self.address}"
        problems: list[str] = []
        found = self._clusters_named(p.cluster)
        usable = [c for c in found if not _is_prism_central(c)]
        cluster_id = None
        if len(usable) == 1:
            cluster_id = str(usable[0].ext_id)
        elif len(usable) > 1:
            problems.append(f"{len(usable)} clusters are named {p.cluster!r} on {where} "
                            f"({', '.join(str(c.ext_id) for c in usable)}); rename all but one")
        elif found:
            problems.append(f"{p.cluster!r} is the Prism Central itself, which cannot run VMs; "
                            "name an AHV cluster")
        else:
            clusters = _sdk().clu.ClustersApi(api_client=self._client("clu"))
            names = sorted(str(c.name) for c in self._all(
                "listing clusters", lambda page: clusters.list_clusters(_page=page, _limit=PAGE))
                if not _is_prism_central(c))
            problems.append(f"cluster {p.cluster!r} not found on {where} (found: "
                            f"{', '.join(names) or 'none'})")

        images = _sdk().vmm.ImagesApi(api_client=self._client("vmm"))
        named = [i for i in self._all(f"finding image {p.image}", lambda page: images.list_images(
            _filter=f"name eq {_quote(p.image)}", _page=page, _limit=PAGE)) if i.name == p.image]
        image_id = None
        if not named:
            names = sorted(str(i.name) for i in self._all(
                "listing images", lambda page: images.list_images(_page=page, _limit=PAGE)))
            shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more"
                                              if len(names) > 20 else "")
            problems.append(f"image {p.image!r} not found on {where} (found: {shown or 'none'}); "
                            "upload it or fix hypervisor.nutanix.image")
        elif len(named) > 1:
            problems.append(f"{len(named)} images are named {p.image!r} on {where} "
                            f"({', '.join(str(i.ext_id) for i in named)}); rename or remove the "
                            "extra ones")
        else:
            image = named[0]
            kind = _enum(image.type)
            locations = [str(c) for c in image.cluster_location_ext_ids or []]
            if kind and kind != "DISK_IMAGE":
                problems.append(f"image {p.image!r} is an {kind}, not a DISK_IMAGE: VMs clone "
                                "their boot disk from a disk image with cloud-init")
            elif cluster_id and locations and cluster_id not in locations:
                problems.append(f"image {p.image!r} is not placed on cluster {p.cluster}; "
                                "place it there (image placement) first")
            else:
                image_id = str(image.ext_id)

        subnets = self._all_subnets(refresh=True)
        for name in networks:
            same = [s for s in subnets if s.name == name]
            on = [s for s in same if cluster_id and cluster_id in _subnet_clusters(s)]
            if not same:
                problems.append(f"subnet {name!r} not found on {where}")
            elif cluster_id and not on:
                elsewhere = sorted({str(s.cluster_name or s.cluster_reference) for s in same})
                problems.append(f"subnet {name!r} is not on cluster {p.cluster} (only on "
                                f"{', '.join(elsewhere)})")
            elif len(on) > 1:
                problems.append(f"{len(on)} subnets are named {name!r} on cluster {p.cluster} "
                                f"({', '.join(str(s.ext_id) for s in on)}); rename all but one")
        if not problems:
            self._cluster_id, self._image_id = cluster_id, image_id
        return problems

    def _placement_cluster(self) -> str | None:
        """The spec's cluster extId (None if it cannot be told apart), looked up once."""
        if self._cluster_id is None:
            usable = [c for c in self._clusters_named(self.placement.cluster)
                      if not _is_prism_central(c)]
            if len(usable) == 1:
                self._cluster_id = str(usable[0].ext_id)
        return self._cluster_id

    def _placement(self, network: str) -> tuple[str, str, str]:
        """(cluster, image, subnet) extIds; runs the preflight checks once if needed."""
        if self._cluster_id is None or self._image_id is None:
            problems = self.preflight([network])
            if problems:
                raise HypervisorError(f"Prism Central {self.address}: cannot place VMs: "
                                      + "; ".join(problems))
        assert self._cluster_id is not None and self._image_id is not None
        subnet = self._subnet_id(network, self._cluster_id)
        if subnet is None:
            raise HypervisorError(f"subnet {network!r} not found on cluster "
                                  f"{self.placement.cluster} of Prism Central {self.address}")
        return self._cluster_id, self._image_id, subnet

    def _subnet_id(self, name: str, cluster_id: str) -> str | None:
        on = [s for s in self._all_subnets() if s.name == name
              and cluster_id in _subnet_clusters(s)]
        if len(on) > 1:
            raise HypervisorError(f"{len(on)} subnets are named {name!r} on cluster "
                                  f"{self.placement.cluster}; rename all but one")
        return str(on[0].ext_id) if on else None

    def _subnet_name(self, ext_id: str) -> str:
        for refresh in (False, True):
            for subnet in self._all_subnets(refresh=refresh):
                if str(subnet.ext_id) == ext_id:
                    return str(subnet.name)
        return ext_id

    # --- reading VMs ----------------------------------------------------------------------

    def _state(self, vm: Any) -> VmState:
        disks = _sized_disks(vm)
        networks, ips = [], []
        for nic in vm.nics or []:
            info = nic.network_info or nic.nic_network_info
            subnet = getattr(getattr(info, "subnet", None), "ext_id", None)
            if subnet:
                networks.append(self._subnet_name(str(subnet)))
            learned = getattr(getattr(info, "ipv4_info", None), "learned_ip_addresses", None)
            ips += [str(a.value) for a in learned or [] if getattr(a, "value", None)]
        sockets, cores = int(vm.num_sockets or 0), int(vm.num_cores_per_socket or 1)
        return VmState(
            id=str(vm.ext_id), name=str(vm.name), powered_on=_enum(vm.power_state) == "ON",
            vcpu=sockets * cores, memory_gb=int((vm.memory_size_bytes or 0) // GiB),
            disks_gb=tuple(int(d.backing_info.disk_size_bytes // GiB) for d in disks),
            networks=tuple(networks), guest_ip=ips[0] if ips else None,
            owner=owner_of(vm.description))

    def _vms(self, name: str | None = None) -> list[Any]:
        what = f"finding VM {name}" if name else "listing VMs"
        query = {"_filter": f"name eq {_quote(name)}"} if name else {}
        found = self._all(what, lambda page: self._vm_api.list_vms(_page=page, _limit=PAGE,
                                                                    **query))
        return [vm for vm in found if name is None or vm.name == name]

    def list_vms(self) -> list[VmState]:
        return [self._state(vm) for vm in self._vms()]

    def _find(self, name: str) -> Any | None:
        found = self._vms(name)
        if len(found) > 1:
            raise HypervisorError(f"Prism Central {self.address}: {len(found)} VMs are named "
                                  f"{name} ({', '.join(str(vm.ext_id) for vm in found)}); "
                                  "rename or remove the extra ones")
        return found[0] if found else None

    def find_vm(self, name: str) -> VmState | None:
        vm = self._find(name)
        return None if vm is None else self._state(vm)

    def _require(self, name: str) -> Any:
        vm = self._find(name)
        if vm is None:
            raise HypervisorError(f"VM {name} not found on Prism Central {self.address}")
        return vm

    # --- changing VMs ---------------------------------------------------------------------

    def ensure_vm(self, want: VmWanted, resize: bool) -> EnsureResult:
        vm = self._find(want.name)
        if vm is None:
            created = self._create(want)
            return EnsureResult("created", self._state(created), changes=(
                f"created on cluster {self.placement.cluster} from image "
                f"{self.placement.image}",))
        state = self._state(vm)
        if state.owner != want.owner:
            raise HypervisorError(
                f"VM {want.name} exists on Prism Central {self.address} but was not created "
                f"for platform {want.owner} (owner: {state.owner or 'unknown'}); rename or "
                "remove it, it is not touched")
        to_fix, larger = differences(want, state)
        notes = [f"{want.name}: {item}: larger than the spec, left as is" for item in larger]
        cluster = getattr(getattr(vm, "cluster", None), "ext_id", None)
        placed = self._placement_cluster()
        if placed and cluster and str(cluster) != placed:
            notes.append(f"{want.name}: runs on another cluster than {self.placement.cluster} "
                         f"({cluster}); left where it is")
        if not to_fix:
            return EnsureResult("unchanged", state, notes=tuple(notes))
        if not resize:
            notes += [f"{want.name}: {item}: below the spec; set hypervisor.resize: true to fix"
                      for item in to_fix]
            return EnsureResult("unchanged", state, notes=tuple(notes))
        changes: list[str] = []
        if any(item.startswith(("vCPU", "memory")) for item in to_fix):
            changes += self._grow(state, want)
        if any(item.startswith(("disk", "network")) for item in to_fix):
            changes += self._fix_devices(want, state)
        return EnsureResult("changed", self._state(self._read(want.name, state.id)[0]),
                            changes=tuple(to_fix + changes), notes=tuple(notes))

    def _create(self, want: VmWanted) -> Any:
        cluster_id, image_id, subnet_id = self._placement(want.network)
        cloud_init = want.creation_data()
        for text in (cloud_init.userdata, _b64(cloud_init.userdata)):
            self._secrets.append(text)
        try:
            body = _vm_body(want, cluster_id, image_id, subnet_id)
        except ValueError as error:  # the SDK's model checks (sizes, lengths)
            raise HypervisorError(f"VM {want.name}: cannot build the create request: "
                                  f"{self._scrub(str(error))}") from None
        # The same wish gets the same request id, so a create repeated after a lost answer
        # (here or in a retried task) returns the first task instead of making a second VM.
        digest = hashlib.sha256(f"{cloud_init.metadata}\0{cloud_init.userdata}"
                                .encode()).hexdigest()
        request_id = str(uuid.uuid5(_REQUEST_IDS, f"{self.address}/{cluster_id}/{want.owner}/"
                                                  f"{want.name}/{digest}"))
        what = f"creating VM {want.name}"
        for attempt in ("first", "fresh"):
            task = self._wait(what, self._post_create(what, body, request_id))
            vm_id = next((str(e.ext_id) for e in task.entities_affected or []
                          if e.rel == VM_REL), None)
            if _enum(task.status) == "SUCCEEDED" and vm_id:
                found = self._read_missing_ok(f"reading new VM {want.name}", vm_id)
                if found is not None:
                    return found[0]
            if attempt == "fresh":
                if _enum(task.status) == "SUCCEEDED":
                    raise HypervisorError(f"Prism Central {self.address}: {what}: the task "
                                          f"{task.ext_id} succeeded but names no VM")
                raise self._failure(what, task)
            # The answer may be Prism remembering an earlier create with this request id
            # (a VM deleted since, or a failure since fixed): ask once more, as a new request.
            request_id = str(uuid.uuid4())
        raise AssertionError("unreachable")

    def _post_create(self, what: str, body: Any, request_id: str) -> str:
        """POST the create; after a lost answer, POST again with the same request id."""
        for attempt in range(1, CREATE_ATTEMPTS + 1):
            try:
                return self._task_id(self._call(what, lambda: self._vm_api.create_vm(
                    body=body, **{"NTNX-Request-Id": request_id})))
            except TransientHypervisorError:
                if attempt == CREATE_ATTEMPTS:
                    raise
                time.sleep(attempt)
        raise AssertionError("unreachable")

    def _grow(self, state: VmState, want: VmWanted) -> list[str]:
        """Grow vCPU and memory through the VM update (PUT) with the VM's ETag.

        Adding sockets and memory works on a running AHV VM; the VM is powered off only when
        its cores per socket must change (the wanted vCPU count is not a multiple of them).
        """
        vm, etag = self._read(want.name, state.id)
        cores = int(vm.num_cores_per_socket or 1)
        reshape = state.vcpu < want.vcpu and want.vcpu % cores != 0
        extra: list[str] = []
        if reshape and state.powered_on:
            self._run(f"powering off {want.name} to change its cores per socket", lambda: (
                self._vm_api.power_off_vm(state.id, if_match=etag)))
            extra.append("powered off to change cores per socket")
            vm, etag = self._read(want.name, state.id)
        if state.vcpu < want.vcpu:
            if reshape:
                vm.num_cores_per_socket, vm.num_sockets = 1, want.vcpu
            else:
                vm.num_sockets = want.vcpu // cores
        if state.memory_gb < want.memory_gb:
            vm.memory_size_bytes = want.memory_gb * GiB
        self._run(f"resizing {want.name}", lambda: self._vm_api.update_vm_by_id(
            state.id, vm, if_match=etag))
        if reshape and state.powered_on:
            _, etag = self._read(want.name, state.id)
            self._run(f"powering on {want.name}", lambda: self._vm_api.power_on_vm(
                state.id, if_match=etag))
            extra.append("powered on again")
        return extra

    def _fix_devices(self, want: VmWanted, state: VmState) -> list[str]:
        """Grow the disks that are too small, add the missing ones, put the first NIC on
        the zone's subnet (or add one). The VM update (PUT) ignores disks and NICs: each has
        its own call, with the VM's latest ETag. AHV does all three on a running VM."""
        m = _sdk().models
        done: list[str] = []
        vm, etag = self._read(want.name, state.id)
        for index, wanted in enumerate(want.disks_gb):
            disks = _sized_disks(vm)
            what = f"disk {index + 1} of {want.name}"
            if index < len(disks):
                disk = disks[index]
                if int(disk.backing_info.disk_size_bytes) >= wanted * GiB:
                    continue
                disk.backing_info.disk_size_bytes = wanted * GiB
                self._run(f"growing {what} to {wanted} GB", functools.partial(
                    self._vm_api.update_disk_by_id, state.id, str(disk.ext_id), disk,
                    if_match=etag))
                done.append(f"{what} grown to {wanted} GB")
            else:
                taken = {int(d.disk_address.index or 0) for d in vm.disks or []
                         if d.disk_address is not None
                         and _enum(d.disk_address.bus_type) == "SCSI"}
                slot = next(i for i in range(len(taken) + 1) if i not in taken)
                body = m.Disk(disk_address=m.DiskAddress(bus_type="SCSI", index=slot),
                              backing_info=m.VmDisk(disk_size_bytes=wanted * GiB))
                self._run(f"adding {what} ({wanted} GB)", functools.partial(
                    self._vm_api.create_disk, state.id, body, if_match=etag))
                done.append(f"{what} added ({wanted} GB, SCSI {slot})")
            vm, etag = self._read(want.name, state.id)  # each change moves the ETag on
        if want.network not in state.networks:
            _, _, subnet_id = self._placement(want.network)
            body = m.Nic(network_info=m.NicNetworkInfo(
                subnet=m.SubnetReference(ext_id=subnet_id)))
            nics = list(vm.nics or [])
            if nics:
                self._run(f"moving the NIC of {want.name} to subnet {want.network}",
                          functools.partial(self._vm_api.update_nic_by_id, state.id,
                                            str(nics[0].ext_id), body, if_match=etag))
                done.append(f"NIC moved to subnet {want.network}")
            else:
                self._run(f"adding a NIC on subnet {want.network} to {want.name}",
                          functools.partial(self._vm_api.create_nic, state.id, body,
                                            if_match=etag))
                done.append(f"NIC added on subnet {want.network}")
        return done

    def power_on(self, name: str) -> bool:
        vm, etag = self._read(name, str(self._require(name).ext_id))
        if _enum(vm.power_state) == "ON":
            return False
        what = f"powering on {name}"
        task = self._wait(what, self._task_id(self._call(what, lambda: self._vm_api.power_on_vm(
            str(vm.ext_id), if_match=etag))))
        if _enum(task.status) == "SUCCEEDED":
            return True
        messages = list(task.error_messages or [])
        if messages and messages[0].error_group == "INVALID_POWER_STATE_TRANSITION" and \
                "already powered on" in str(messages[0].message):
            return False  # someone else powered it on meanwhile
        raise self._failure(what, task)

    def wait_for_ip(self, name: str, expected: str, timeout: float) -> str:
        ext_id = str(self._require(name).ext_id)
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        last_fault = ""
        while time.monotonic() < deadline:
            try:
                vm, _ = self._read(name, ext_id)
            except TransientHypervisorError as fault:  # keep waiting through a passing fault
                last_fault = f"; last fault: {fault}"
            else:
                seen = self._ips(vm)
                if expected in seen:
                    return expected
            time.sleep(0.5)
        raise HypervisorError(
            f"VM {name} did not report IP {expected} within {timeout:.0f} s (Prism Central "
            f"{self.address} shows {', '.join(seen) or 'no IP'}): check its console, cloud-init "
            f"(config drive) and its subnet{last_fault}")

    @staticmethod
    def _ips(vm: Any) -> list[str]:
        out: list[str] = []
        for nic in vm.nics or []:
            info = nic.network_info or nic.nic_network_info
            learned = getattr(getattr(info, "ipv4_info", None), "learned_ip_addresses", None)
            out += [str(a.value) for a in learned or [] if getattr(a, "value", None)]
        return out

    def delete_vm(self, name: str) -> bool:
        found = self._find(name)
        if found is None:
            return False
        ext_id = str(found.ext_id)
        vm, etag = self._read(name, ext_id)
        if _enum(vm.power_state) == "ON":
            self._run(f"powering off {name}", lambda: self._vm_api.power_off_vm(
                ext_id, if_match=etag))
            vm, etag = self._read(name, ext_id)
        self._run(f"deleting {name}", lambda: self._vm_api.delete_vm_by_id(ext_id, if_match=etag))
        return True


# --- request bodies and small helpers --------------------------------------------------------


def _vm_body(want: VmWanted, cluster_id: str, image_id: str, subnet_id: str) -> Any:
    """The v4 Vm of a create: sockets of one core, a boot disk cloned from the image at the
    wanted size, the data disks, one NIC on the zone's subnet, cloud-init (config drive)."""
    m = _sdk().models
    sizes = list(want.disks_gb)
    boot = m.VmDisk(data_source=m.DataSource(reference=m.ImageReference(image_ext_id=image_id)),
                    disk_size_bytes=sizes[0] * GiB if sizes else None)
    disks = [m.Disk(disk_address=m.DiskAddress(bus_type="SCSI", index=0), backing_info=boot)]
    disks += [m.Disk(disk_address=m.DiskAddress(bus_type="SCSI", index=index),
                     backing_info=m.VmDisk(disk_size_bytes=size * GiB))
              for index, size in enumerate(sizes[1:], start=1)]
    data = want.creation_data()
    cloud_init = m.CloudInit(datasource_type="CONFIG_DRIVE_V2",
                             metadata=_b64(data.metadata),
                             cloud_init_script=m.Userdata(value=_b64(data.userdata)))
    return m.Vm(
        name=want.name, description=f"{OWNER_KEY}={want.owner} (made by the platform "
                                    "orchestrator, phase 1)",
        num_sockets=want.vcpu, num_cores_per_socket=1, memory_size_bytes=want.memory_gb * GiB,
        cluster=m.ClusterReference(ext_id=cluster_id), disks=disks,
        nics=[m.Nic(network_info=m.NicNetworkInfo(subnet=m.SubnetReference(ext_id=subnet_id)))],
        guest_customization=m.GuestCustomizationParams(config=cloud_init))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _quote(value: str) -> str:
    """An OData string literal."""
    return "'" + value.replace("'", "''") + "'"


def _enum(value: Any) -> str:
    """The name of an SDK enum value (or a plain string)."""
    if value is None:
        return ""
    return str(getattr(value, "name", None) or value).rsplit(".", 1)[-1]


def _is_prism_central(cluster: Any) -> bool:
    functions = getattr(getattr(cluster, "config", None), "cluster_function", None) or []
    return any(_enum(f) == "PRISM_CENTRAL" for f in functions)


def _subnet_clusters(subnet: Any) -> set[str]:
    out = {str(subnet.cluster_reference)} if getattr(subnet, "cluster_reference", None) else set()
    out.update(str(c) for c in getattr(subnet, "cluster_reference_list", None) or [])
    return out


def _sized_disks(vm: Any) -> list[Any]:
    """The VM's disks that have a size (not CD-ROMs), the boot disk first: the order of
    the spec's `disks_gb`."""
    return sorted((d for d in vm.disks or []
                   if getattr(d.backing_info, "disk_size_bytes", None) is not None),
                  key=_disk_order)


def _disk_order(disk: Any) -> tuple[int, str, int]:
    """The image-cloned (boot) disk first, then by bus and index."""
    backing = disk.backing_info
    from_image = getattr(getattr(getattr(backing, "data_source", None), "reference", None),
                         "image_ext_id", None)
    address = disk.disk_address
    return (0 if from_image else 1, _enum(getattr(address, "bus_type", "")),
            int(getattr(address, "index", 0) or 0))


# --- the SDKs, imported on first use --------------------------------------------------------


class _RepairSdkLogCalls(logging.Filter):
    """The SDKs log ``logger.error("text", error)`` without a %s (version negotiation), which
    logging reports as a formatting error (and pytest's log capture raises as TypeError).
    Add the placeholders, and log an SDK error by its status only: its text would carry the
    response headers (a session cookie) and body."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple) and "%" not in str(record.msg):
            record.msg = f"{record.msg}: " + " ".join(["%s"] * len(record.args))
            record.args = tuple(
                f"ApiException(status={getattr(a, 'status', None)})"
                if type(a).__name__ == "ApiException" else a for a in record.args)
        return True


_REPAIR = _RepairSdkLogCalls()


_SDK_LOCK = threading.Lock()
_SDK: list[SimpleNamespace] = []


def _sdk() -> SimpleNamespace:
    """The four Nutanix SDK packages and the vmm models phase 1 builds (about 3 s, once;
    phase 1's concurrent tasks wait for the first import instead of racing it)."""
    if not _SDK:
        with _SDK_LOCK:
            if not _SDK:
                _SDK.append(_import_sdk())
    return _SDK[0]


def _import_sdk() -> SimpleNamespace:
    import ntnx_clustermgmt_py_client as clu
    import ntnx_networking_py_client as net
    import ntnx_prism_py_client as prism
    import ntnx_vmm_py_client as vmm

    for package in (vmm, prism, net, clu):
        for name in (f"{package.__name__}.api_client", f"{package.__name__}.rest"):
            logger = logging.getLogger(name)
            if _REPAIR not in logger.filters:
                logger.addFilter(_REPAIR)
    names = ("CloudInit", "ClusterReference", "DataSource", "Disk", "DiskAddress",
             "GuestCustomizationParams", "ImageReference", "Nic", "NicNetworkInfo",
             "SubnetReference", "Userdata", "Vm", "VmDisk")
    prefix = "ntnx_vmm_py_client.models.vmm.v4.ahv.config"
    models = SimpleNamespace(**{name: getattr(importlib.import_module(f"{prefix}.{name}"), name)
                                for name in names})
    return SimpleNamespace(vmm=vmm, prism=prism, net=net, clu=clu, models=models)


_CA_LOCK = threading.Lock()
_CA_DIR: list[str] = []


def _ca_file(pem: str) -> str:
    """A file holding the PEM (the SDK takes a path), in a private directory of this process."""
    digest = hashlib.sha256(pem.encode()).hexdigest()[:16]
    with _CA_LOCK:
        if not _CA_DIR:
            _CA_DIR.append(tempfile.mkdtemp(prefix="platform-nutanix-ca-"))
            atexit.register(shutil.rmtree, _CA_DIR[0], True)
        path = os.path.join(_CA_DIR[0], f"{digest}.pem")
        if not os.path.exists(path):
            with open(path + ".tmp", "w") as handle:
                handle.write(pem)
            os.replace(path + ".tmp", path)
    return path
