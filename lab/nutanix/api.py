"""The HTTP side of the Nutanix stand-in: an ASGI app speaking the Prism Central v4 API.

It serves the calls the project makes through the official SDKs, with the paths, versions,
headers and bodies those SDKs use (see `wire` for the envelopes):

    OPTIONS /api/<ns>/unversioned/info                   -> {"data": "<highest version>"}
    GET/POST        /api/vmm/<v>/ahv/config/vms          list ($filter $orderby $page $limit
                                                          $select) / create -> task
    GET/PUT/DELETE  /api/vmm/<v>/ahv/config/vms/<extId>  read (ETag header) / update, delete
                                                          (If-Match required) -> task
    POST /api/vmm/<v>/ahv/config/vms/<extId>/$actions/{power-on,power-off,shutdown}
    GET  /api/vmm/<v>/content/images[/<extId>]
    GET  /api/networking/<v>/config/subnets[/<extId>]
    GET  /api/clustermgmt/<v>/config/clusters[/<extId>]
    GET  /api/clustermgmt/<v>/config/storage-containers[/<extId>]
    GET  /api/prism/<v>/config/tasks[/<extId>]
    GET  /lab/v1/vms                                     the lab's view (not Nutanix API)
    POST /lab/v1/vms/<extId>/guest                       a booted guest's IPs and hostname

Every call needs Basic auth or the `NTNX_IGW_SESSION` cookie a Basic-auth call sets. A real
path the stand-in does not simulate answers 501, an unknown one 404, so nothing the project
does passes here by being ignored. Changes answer 202 with a `prism.v4.config.TaskReference`;
a repeated `NTNX-Request-Id` gets the first answer again instead of a second change.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from lab.nutanix.faults import FaultPlan
from lab.nutanix.inventory import Store, etag_of
from lab.nutanix.odata import Getter, ODataError, parse_filter, parse_orderby
from lab.nutanix.render import (
    render_cluster,
    render_container,
    render_image,
    render_subnet,
    render_task,
    render_vm,
)
from lab.nutanix.vmspec import (
    SpecProblems,
    Unsimulated,
    is_uuid,
    parse_create,
    parse_device,
    parse_update,
)
from lab.nutanix.wire import (
    SERVED_VERSIONS,
    app_message,
    envelope,
    error_body,
    link,
    metadata,
    schema_error_body,
    typed,
)

JSON = dict[str, Any]
COOKIE = "NTNX_IGW_SESSION"
CODE_PREFIX = {"vmm": "VMM", "prism": "PRISM", "networking": "NET", "clustermgmt": "CLU"}
TASK_ID_RE = re.compile(r"^[A-Za-z0-9+/=]+:[0-9a-fA-F-]{36}$")


@dataclass(frozen=True)
class RequestRecord:
    """One request as the stand-in saw it (for tests: order, auth kind, injected fault)."""

    method: str
    path: str
    query: str
    status: int  # 0 when the connection was cut
    auth: str  # "basic", "cookie", "rejected" or "none"
    fault: str | None


@dataclass
class Call:
    """One authenticated request, routed."""

    request: Request
    namespace: str
    version: str
    params: dict[str, str]
    user: str
    base_url: str
    body: bytes


class ApiError(Exception):
    """An error response to send as is."""

    def __init__(self, status: int, body: JSON, headers: Mapping[str, str] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: str
    response_type: str | None


def _route(method: str, pattern: str, handler: str, response_type: str | None) -> _Route:
    return _Route(method, re.compile(f"^{pattern}$"), handler, response_type)


_V = r"(?P<version>[^/]+)"
_ID = r"(?P<ext_id>[^/]+)"
_SUB = r"(?P<sub_id>[^/]+)"  # a disk or NIC of the VM
ROUTES = (
    _route("OPTIONS", r"/api/(?P<ns>[^/]+)/unversioned/info", "info", None),
    _route("GET", rf"/api/vmm/{_V}/ahv/config/vms", "list_vms",
           "vmm.v4.ahv.config.ListVmsApiResponse"),
    _route("POST", rf"/api/vmm/{_V}/ahv/config/vms", "create_vm",
           "vmm.v4.ahv.config.CreateVmApiResponse"),
    _route("GET", rf"/api/vmm/{_V}/ahv/config/vms/{_ID}", "get_vm",
           "vmm.v4.ahv.config.GetVmApiResponse"),
    _route("PUT", rf"/api/vmm/{_V}/ahv/config/vms/{_ID}", "update_vm",
           "vmm.v4.ahv.config.UpdateVmApiResponse"),
    _route("DELETE", rf"/api/vmm/{_V}/ahv/config/vms/{_ID}", "delete_vm",
           "vmm.v4.ahv.config.DeleteVmApiResponse"),
    _route("POST", rf"/api/vmm/{_V}/ahv/config/vms/{_ID}/disks", "create_disk",
           "vmm.v4.ahv.config.CreateDiskApiResponse"),
    _route("PUT", rf"/api/vmm/{_V}/ahv/config/vms/{_ID}/disks/{_SUB}", "update_disk",
           "vmm.v4.ahv.config.UpdateDiskApiResponse"),
    _route("POST", rf"/api/vmm/{_V}/ahv/config/vms/{_ID}/nics", "create_nic",
           "vmm.v4.ahv.config.CreateNicApiResponse"),
    _route("PUT", rf"/api/vmm/{_V}/ahv/config/vms/{_ID}/nics/{_SUB}", "update_nic",
           "vmm.v4.ahv.config.UpdateNicApiResponse"),
    _route("POST", rf"/api/vmm/{_V}/ahv/config/vms/{_ID}/\$actions/power-on", "power_on",
           "vmm.v4.ahv.config.PowerOnVmApiResponse"),
    _route("POST", rf"/api/vmm/{_V}/ahv/config/vms/{_ID}/\$actions/power-off", "power_off",
           "vmm.v4.ahv.config.PowerOffVmApiResponse"),
    _route("POST", rf"/api/vmm/{_V}/ahv/config/vms/{_ID}/\$actions/shutdown", "shutdown",
           "vmm.v4.ahv.config.ShutdownVmApiResponse"),
    _route("GET", rf"/api/vmm/{_V}/content/images", "list_images",
           "vmm.v4.content.ListImagesApiResponse"),
    _route("GET", rf"/api/vmm/{_V}/content/images/{_ID}", "get_image",
           "vmm.v4.content.GetImageApiResponse"),
    _route("GET", rf"/api/networking/{_V}/config/subnets", "list_subnets",
           "networking.v4.config.ListSubnetsApiResponse"),
    _route("GET", rf"/api/networking/{_V}/config/subnets/{_ID}", "get_subnet",
           "networking.v4.config.GetSubnetApiResponse"),
    _route("GET", rf"/api/clustermgmt/{_V}/config/clusters", "list_clusters",
           "clustermgmt.v4.config.ListClustersApiResponse"),
    _route("GET", rf"/api/clustermgmt/{_V}/config/clusters/{_ID}", "get_cluster",
           "clustermgmt.v4.config.GetClusterApiResponse"),
    _route("GET", rf"/api/clustermgmt/{_V}/config/storage-containers", "list_containers",
           "clustermgmt.v4.config.ListStorageContainersApiResponse"),
    _route("GET", rf"/api/clustermgmt/{_V}/config/storage-containers/{_ID}", "get_container",
           "clustermgmt.v4.config.GetStorageContainerApiResponse"),
    _route("GET", rf"/api/prism/{_V}/config/tasks", "list_tasks",
           "prism.v4.config.ListTasksApiResponse"),
    _route("GET", rf"/api/prism/{_V}/config/tasks/{_ID}", "get_task",
           "prism.v4.config.GetTaskApiResponse"),
    _route("GET", r"/lab/v1/vms", "lab_vms", None),
    _route("POST", rf"/lab/v1/vms/{_ID}/guest", "lab_guest", None),
)


def _get(*keys: str) -> Getter:
    def getter(item: Mapping[str, Any]) -> Any:
        value: Any = item
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        return value
    return getter


VM_FIELDS = {"name": _get("name"), "extId": _get("extId"), "powerState": _get("powerState"),
             "cluster/extId": _get("cluster", "extId"), "host/extId": _get("host", "extId"),
             "numSockets": _get("numSockets"), "memorySizeBytes": _get("memorySizeBytes"),
             "createTime": _get("createTime"), "updateTime": _get("updateTime")}
IMAGE_FIELDS = {"name": _get("name"), "extId": _get("extId"), "type": _get("type"),
                "sizeBytes": _get("sizeBytes")}
SUBNET_FIELDS = {"name": _get("name"), "extId": _get("extId"),
                 "subnetType": _get("subnetType"), "networkId": _get("networkId"),
                 "clusterReference": _get("clusterReference")}
CLUSTER_FIELDS = {"name": _get("name"), "extId": _get("extId")}
CONTAINER_FIELDS = {"name": _get("name"), "extId": _get("extId"),
                    "containerExtId": _get("containerExtId"), "clusterExtId": _get("clusterExtId")}
TASK_FIELDS = {"extId": _get("extId"), "status": _get("status"),
               "operation": _get("operation"), "createdTime": _get("createdTime")}


def served_versions(highest: Mapping[str, str] | None) -> dict[str, tuple[str, ...]]:
    """Versions per namespace, cut (or extended) to a configured highest one."""
    out = dict(SERVED_VERSIONS)
    for namespace, top in (highest or {}).items():
        minor = int(top.split(".")[1])
        out[namespace] = tuple(f"v4.{n}" for n in range(minor + 1))
    return out


class NutanixApi:
    """The ASGI application; one per stand-in, sharing its `Store` and `FaultPlan`."""

    def __init__(self, store: Store, username: str, password: str, faults: FaultPlan, *,
                 session_seconds: float = 900.0,
                 versions: Mapping[str, str] | None = None) -> None:
        self.store = store
        self.username = username
        self.password = password
        self.faults = faults
        self.session_seconds = session_seconds
        self.versions = served_versions(versions)
        self.sessions: dict[str, tuple[str, float]] = {}
        self.requests: list[RequestRecord] = []
        self._lock = threading.Lock()

    # ---- ASGI entry ------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        decision = self.faults.decide(method, path)
        request = Request(scope, receive)
        try:
            payload = await request.body()
        except ClientDisconnect:
            self._log(RequestRecord(method, path, query, 0, "none", None))
            return
        if decision.delay:
            # A client that gives up meanwhile does not stop the work, as on a real server.
            await asyncio.sleep(decision.delay)
        if decision.action == "reset":
            self._log(RequestRecord(method, path, query, 0, "none", "reset"))
            _cut(send)
            return
        if decision.action == "fail":
            namespace, version = self._namespace_of(path)
            body = error_body(namespace, version, None, [app_message(
                namespace, version, "The service is temporarily unavailable; retry later.",
                f"{CODE_PREFIX.get(namespace, 'PLAT')}-50300", "SERVICE_UNAVAILABLE")])
            self._log(RequestRecord(method, path, query, decision.status, "none", "fail"))
            await _json(decision.status, body)(scope, receive, send)
            return
        response, auth = self._handle(request, payload)
        if decision.action == "drop":
            self._log(RequestRecord(method, path, query, 0, auth, "drop"))
            _cut(send)
            return
        self._log(RequestRecord(method, path, query, response.status_code, auth, None))
        await response(scope, receive, send)

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    # ---- auth ------------------------------------------------------------------------------

    def _authenticate(self, request: Request) -> tuple[str | None, str, str | None]:
        """(user or None, how, new session cookie). A wrong Basic header wins over a cookie."""
        header = request.headers.get("authorization")
        now = time.time()
        if header is not None:
            scheme, _, token = header.partition(" ")
            try:
                user, _, password = base64.b64decode(token, validate=True).decode().partition(
                    ":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None, "rejected", None
            if scheme.lower() == "basic" and hmac.compare_digest(user, self.username) and \
                    hmac.compare_digest(password, self.password):
                session = secrets.token_urlsafe(32)
                with self._lock:
                    self.sessions = {k: v for k, v in self.sessions.items() if v[1] > now}
                    self.sessions[session] = (user, now + self.session_seconds)
                return user, "basic", session
            return None, "rejected", None
        cookie = request.cookies.get(COOKIE)
        if cookie:
            with self._lock:
                found = self.sessions.get(cookie)
            if found and found[1] > now:
                return found[0], "cookie", None
            return None, "rejected", None
        return None, "none", None

    def _namespace_of(self, path: str) -> tuple[str, str]:
        parts = path.split("/")
        namespace = parts[2] if len(parts) > 2 and parts[1] == "api" else "prism"
        if namespace not in self.versions:
            namespace = "prism"
        version = parts[3] if len(parts) > 3 and parts[3] in self.versions[namespace] \
            else self.versions[namespace][-1]
        return namespace, version

    # ---- routing ---------------------------------------------------------------------------

    def _handle(self, request: Request, body: bytes) -> tuple[Response, str]:
        path, method = request.url.path, request.method
        if not (path.startswith("/api/") or path.startswith("/lab/")):
            return Response("Not Found", 404, media_type="text/plain"), "none"
        namespace, version = self._namespace_of(path)
        user, how, session = self._authenticate(request)
        if user is None:
            message = ("Authentication required: send HTTP Basic credentials or a valid "
                       f"{COOKIE} cookie." if how == "none" else
                       "Authentication failed: the username or password is not valid, or the "
                       "session has expired.")
            return _json(401, error_body(namespace, version, None, [app_message(
                namespace, version, message, "IAM-40100", "AUTHENTICATION_FAILED")]),
                {"WWW-Authenticate": 'Basic realm="Prism Central"'}), how
        try:
            response = self._dispatch(request, body, user, method, path, namespace, version)
        except ApiError as error:
            response = _json(error.status, error.body, error.headers)
        if session:
            response.set_cookie(COOKIE, session, max_age=int(self.session_seconds), path="/",
                                secure=True, httponly=True, samesite="strict")
        return response, how

    def _dispatch(self, request: Request, body: bytes, user: str, method: str, path: str,
                  namespace: str, version: str) -> Response:
        allowed = []
        for route in ROUTES:
            match = route.pattern.match(path)
            if not match:
                continue
            allowed.append(route.method)
            if route.method != method:
                continue
            params = {k: v for k, v in match.groupdict().items() if v is not None}
            if "version" in params and params["version"] not in self.versions[namespace]:
                raise self._not_found(namespace, version, route.response_type,
                                      f"API version {params['version']} is not served for "
                                      f"'{namespace}' (served: "
                                      f"{', '.join(self.versions[namespace])}).")
            call = Call(request, namespace, params.get("version", version), params, user,
                        str(request.base_url).rstrip("/"), body)
            key = request.headers.get("ntnx-request-id")
            if method in ("POST", "PUT", "DELETE") and key:
                seen = self.store.recall(f"{user}:{key}")
                if seen is not None:
                    return _json(seen[0], seen[1])
            handler: Callable[[Call, str | None], Response] = getattr(self, route.handler)
            response = handler(call, route.response_type)
            if method in ("POST", "PUT", "DELETE") and key and 200 <= response.status_code < 300:
                self.store.remember(f"{user}:{key}", response.status_code,
                                    json.loads(bytes(response.body)))
            return response
        if allowed:
            return _json(405, error_body(namespace, version, None, [app_message(
                namespace, version, f"Method {method} is not allowed on {path}.",
                f"{CODE_PREFIX.get(namespace, 'PLAT')}-40500", "METHOD_NOT_ALLOWED")]),
                {"Allow": ", ".join(sorted(set(allowed)))})
        parts = path.split("/")
        if len(parts) > 4 and parts[2] in self.versions and parts[3] in self.versions[parts[2]]:
            return _json(501, error_body(namespace, version, None, [app_message(
                namespace, version, f"{method} {path} is a Prism Central API the Nutanix "
                "stand-in does not simulate.", f"{CODE_PREFIX[namespace]}-50100",
                "NOT_SIMULATED")]))
        raise self._not_found(namespace, version, None, f"No API at {path}.")

    # ---- helpers -----------------------------------------------------------------------

    def _not_found(self, namespace: str, version: str, response_type: str | None,
                   message: str, code: str = "", group: str = "NOT_FOUND",
                   arguments: dict[str, str] | None = None) -> ApiError:
        code = code or f"{CODE_PREFIX.get(namespace, 'PLAT')}-40400"
        return ApiError(404, error_body(namespace, version, response_type, [app_message(
            namespace, version, message, code, group, arguments)]))

    def _bad_request(self, call: Call, response_type: str | None, message: str, code: str,
                     group: str, status: int = 400) -> ApiError:
        return ApiError(status, error_body(call.namespace, call.version, response_type, [
            app_message(call.namespace, call.version, message, code, group)]))

    def _schema_error(self, call: Call, response_type: str | None,
                      problems: list[tuple[str, str]]) -> ApiError:
        return ApiError(400, schema_error_body(call.namespace, call.version, response_type,
                                               call.request.url.path, problems, time.time()))

    def _json_body(self, call: Call, response_type: str | None) -> Any:
        content_type = call.request.headers.get("content-type", "")
        if not content_type.lower().startswith("application/json"):
            raise self._bad_request(call, response_type, f"Content-Type {content_type!r} is not "
                                    "supported; send application/json.", "PLAT-41500",
                                    "UNSUPPORTED_MEDIA_TYPE", status=415)
        try:
            return json.loads(call.body)
        except ValueError as error:
            raise self._schema_error(call, response_type,
                                     [("", f"malformed JSON: {error}")]) from None

    def _unsimulated(self, call: Call, what: str) -> ApiError:
        return ApiError(501, error_body(call.namespace, call.version, None, [app_message(
            call.namespace, call.version, f"The Nutanix stand-in does not simulate {what}.",
            f"{CODE_PREFIX[call.namespace]}-50101", "NOT_SIMULATED")]))

    def _ext_id(self, call: Call, response_type: str | None) -> str:
        ext_id = call.params["ext_id"]
        if not is_uuid(ext_id):
            raise self._schema_error(call, response_type,
                                     [("extId", "must match the UUID pattern")])
        return ext_id.lower()

    def _task_reference(self, call: Call, response_type: str | None, task: JSON) -> Response:
        prism = self.versions["prism"][-1]
        data = typed("prism.v4.config.TaskReference", call.version, {"extId": task["extId"]})
        meta = metadata(links=[link(f"{call.base_url}/api/prism/{prism}/config/tasks/"
                                    f"{task['extId']}", "self")])
        return _json(202, envelope(response_type or "", call.version, data, meta=meta))

    def _single(self, call: Call, response_type: str | None, data: JSON,
                headers: Mapping[str, str] | None = None) -> Response:
        return _json(200, envelope(response_type or "", call.version, data), headers)

    def _list(self, call: Call, response_type: str | None, items: list[JSON],
              fields: Mapping[str, Getter]) -> Response:
        query = call.request.query_params
        for key in query:
            if key in ("$expand", "$apply"):
                raise self._unsimulated(call, f"the {key} query option")
        problems: list[tuple[str, str]] = []
        numbers = {}
        for key, low, high, default in (("$page", 0, None, 0), ("$limit", 1, 100, 50)):
            raw = query.get(key)
            if raw is None:
                numbers[key] = default
                continue
            if not re.fullmatch(r"-?\d+", raw):
                problems.append((key, "must be an integer"))
                continue
            value = int(raw)
            if value < low or (high is not None and value > high):
                problems.append((key, f"must be between {low} and {high}" if high else
                                 f"must be greater than or equal to {low}"))
            numbers[key] = value
        if problems:
            raise self._schema_error(call, response_type, problems)
        prefix = CODE_PREFIX[call.namespace]
        option = "$filter"
        try:
            if query.get("$filter") is not None:
                predicate = parse_filter(query["$filter"], fields)
                items = [item for item in items if predicate(item)]
            option = "$orderby"
            if query.get("$orderby") is not None:
                for getter, descending in reversed(parse_orderby(query["$orderby"], fields)):
                    items.sort(key=_sort_key(getter), reverse=descending)
        except ODataError as error:
            raise self._bad_request(call, response_type, f"Invalid {option} expression: {error}",
                                    f"{prefix}-40001", "INVALID_QUERY") from None
        if query.get("$select") is not None:
            chosen = [name.strip() for name in query["$select"].split(",") if name.strip()]
            known = set(fields) | {key for item in items for key in item}
            unknown = [name for name in chosen if name not in known and name != "*"]
            if unknown:
                raise self._bad_request(call, response_type, "Invalid $select: unknown "
                                        f"properties {', '.join(unknown)}.", f"{prefix}-40002",
                                        "INVALID_QUERY")
            if "*" not in chosen:
                keep = set(chosen) | {"extId", "$objectType", "$reserved"}
                items = [{k: v for k, v in item.items() if k in keep} for item in items]
        total = len(items)
        page, limit = numbers["$page"], numbers["$limit"]
        chunk = items[page * limit:(page + 1) * limit]
        last = max((total - 1) // limit, 0)
        url = call.request.url.remove_query_params(["$page", "$limit"])

        def at(number: int) -> str:
            return str(url.include_query_params(**{"$page": number, "$limit": limit}))

        links = [link(at(page), "self"), link(at(0), "first"), link(at(last), "last")]
        if page < last:
            links.append(link(at(page + 1), "next"))
        if 0 < page <= last + 1:
            links.append(link(at(page - 1), "prev"))
        meta = metadata(paginated=True, links=links, total=total)
        return _json(200, envelope(response_type or "", call.version, chunk or None, meta=meta))

    def _find_vm(self, call: Call, response_type: str | None) -> JSON:
        ext_id = self._ext_id(call, response_type)
        self.store.settle()
        vm = self.store.vms.get(ext_id)
        if vm is None:
            raise self._not_found(call.namespace, call.version, response_type,
                                  f"Failed to perform the operation on the VM with UUID "
                                  f"'{ext_id}', because it is not found.", "VMM-30100",
                                  "VM_NOT_FOUND", {"vm_uuid": ext_id})
        return vm

    def _check_if_match(self, call: Call, response_type: str | None, vm: JSON) -> str:
        given = call.request.headers.get("if-match")
        if given is None:
            raise self._bad_request(call, response_type, "The If-Match header is required for "
                                    "this operation: send the ETag of the latest read of the "
                                    "VM.", "PLAT-10004", "MISSING_ETAG_HEADER", status=428)
        current = etag_of(vm)
        if given.strip() != current:
            raise self._bad_request(call, response_type, "Invalid eTag header: the VM has "
                                    "changed since this ETag was read (or the value is not an "
                                    "ETag of it). Read the VM again and retry.", "PLAT-10005",
                                    "ETAG_MISMATCH", status=412)
        return current

    # ---- handlers --------------------------------------------------------------------

    def info(self, call: Call, response_type: str | None) -> Response:
        namespace = call.params["ns"]
        if namespace not in self.versions:
            raise self._not_found("prism", self.versions["prism"][-1], None,
                                  f"Unknown API namespace '{namespace}'.")
        return _json(200, {"data": self.versions[namespace][-1]})

    def list_vms(self, call: Call, response_type: str | None) -> Response:
        with self.store.lock:
            self.store.settle()
            items = [render_vm(vm, call.version, call.base_url)
                     for vm in self.store.vms.values()]
        items.sort(key=lambda vm: str(vm["createTime"]))
        return self._list(call, response_type, items, VM_FIELDS)

    def get_vm(self, call: Call, response_type: str | None) -> Response:
        with self.store.lock:
            vm = self._find_vm(call, response_type)
            return self._single(call, response_type, render_vm(vm, call.version, call.base_url),
                                {"ETag": etag_of(vm)})

    def create_vm(self, call: Call, response_type: str | None) -> Response:
        data = self._json_body(call, response_type)
        try:
            spec = parse_create(data)
        except SpecProblems as problems:
            raise self._schema_error(call, response_type, problems.problems) from None
        except Unsimulated as what:
            raise self._unsimulated(call, str(what)) from None
        with self.store.lock:
            cluster = self.store.clusters.get(spec["clusterExtId"])
            if cluster is None:
                pc = self.store.state.get("prismCentral") or {}
                detail = (" It is the Prism Central itself, which cannot run VMs."
                          if pc.get("extId") == spec["clusterExtId"] else "")
                raise self._bad_request(call, response_type, "Failed to create the VM: cluster "
                                        f"with extId '{spec['clusterExtId']}' was not "
                                        f"found.{detail}", "VMM-30102", "CLUSTER_NOT_FOUND")
            task = self.store.new_task(kind="create_vm", operation="CreateVm",
                                       description="Create VM", owner=call.user,
                                       cluster_ext_id=cluster["extId"],
                                       vm_ext_id=spec["extId"], payload={"vm": spec})
        return self._task_reference(call, response_type, task)

    def update_vm(self, call: Call, response_type: str | None) -> Response:
        with self.store.lock:
            vm = self._find_vm(call, response_type)
            etag = self._check_if_match(call, response_type, vm)
            changes = self._parsed(call, response_type, lambda data: parse_update(data, vm))
            task = self.store.new_task(kind="update_vm", operation="UpdateVm",
                                       description="Update VM", owner=call.user,
                                       cluster_ext_id=vm["clusterExtId"], vm_ext_id=vm["extId"],
                                       payload={"changes": changes}, expect_etag=etag)
        return self._task_reference(call, response_type, task)

    def _parsed(self, call: Call, response_type: str | None,
                parse: Callable[[Any], JSON]) -> JSON:
        """The request body checked by ``parse``; its problems as Prism's error bodies."""
        data = self._json_body(call, response_type)
        try:
            return parse(data)
        except SpecProblems as problems:
            raise self._schema_error(call, response_type, problems.problems) from None
        except Unsimulated as what:
            raise self._unsimulated(call, str(what)) from None

    def _vm_task(self, call: Call, response_type: str | None, kind: str, operation: str,
                 description: str) -> Response:
        with self.store.lock:
            vm = self._find_vm(call, response_type)
            etag = self._check_if_match(call, response_type, vm)
            task = self.store.new_task(kind=kind, operation=operation, description=description,
                                       owner=call.user, cluster_ext_id=vm["clusterExtId"],
                                       vm_ext_id=vm["extId"], expect_etag=etag)
        return self._task_reference(call, response_type, task)

    def _device_task(self, call: Call, response_type: str | None, kind: str,
                     operation: str, description: str) -> Response:
        """A disk or NIC added (POST) or changed (PUT): the VM's ETag in If-Match, the
        work done by a task, as for the VM's own update."""
        device = "disk" if "disk" in kind else "nic"
        with self.store.lock:
            vm = self._find_vm(call, response_type)
            etag = self._check_if_match(call, response_type, vm)
            payload: JSON = {device: self._parsed(
                call, response_type, lambda data: parse_device(device, data))}
            if "sub_id" in call.params:
                payload["extId"] = call.params["sub_id"]
            task = self.store.new_task(kind=kind, operation=operation, description=description,
                                       owner=call.user, cluster_ext_id=vm["clusterExtId"],
                                       vm_ext_id=vm["extId"], payload=payload,
                                       expect_etag=etag)
        return self._task_reference(call, response_type, task)

    def create_disk(self, call: Call, response_type: str | None) -> Response:
        return self._device_task(call, response_type, "create_disk", "CreateDisk",
                                 "Create disk")

    def update_disk(self, call: Call, response_type: str | None) -> Response:
        return self._device_task(call, response_type, "update_disk", "UpdateDisk",
                                 "Update disk")

    def create_nic(self, call: Call, response_type: str | None) -> Response:
        return self._device_task(call, response_type, "create_nic", "CreateNic", "Create NIC")

    def update_nic(self, call: Call, response_type: str | None) -> Response:
        return self._device_task(call, response_type, "update_nic", "UpdateNic", "Update NIC")

    def delete_vm(self, call: Call, response_type: str | None) -> Response:
        return self._vm_task(call, response_type, "delete_vm", "DeleteVm", "Delete VM")

    def power_on(self, call: Call, response_type: str | None) -> Response:
        return self._vm_task(call, response_type, "power_on", "PowerOnVm", "Power on VM")

    def power_off(self, call: Call, response_type: str | None) -> Response:
        return self._vm_task(call, response_type, "power_off", "PowerOffVm", "Power off VM")

    def shutdown(self, call: Call, response_type: str | None) -> Response:
        return self._vm_task(call, response_type, "power_off", "ShutdownVm",
                             "Shut down VM (ACPI)")

    def list_images(self, call: Call, response_type: str | None) -> Response:
        with self.store.lock:
            everywhere = list(self.store.clusters)
            items = [render_image(i, everywhere, self.username, call.version, call.base_url)
                     for i in self.store.images.values()]
        return self._list(call, response_type, items, IMAGE_FIELDS)

    def get_image(self, call: Call, response_type: str | None) -> Response:
        ext_id = self._ext_id(call, response_type)
        with self.store.lock:
            image = self.store.images.get(ext_id)
            if image is None:
                raise self._not_found(call.namespace, call.version, response_type,
                                      "Failed to perform the operation as the backend service "
                                      "could not find the entity.", "VMM-20005",
                                      "IMAGE_NOT_FOUND", {"image_uuid": ext_id})
            return self._single(call, response_type, render_image(
                image, list(self.store.clusters), self.username, call.version, call.base_url))

    def list_subnets(self, call: Call, response_type: str | None) -> Response:
        with self.store.lock:
            items = [self._subnet(call, s) for s in self.store.subnets.values()]
        return self._list(call, response_type, items, SUBNET_FIELDS)

    def get_subnet(self, call: Call, response_type: str | None) -> Response:
        ext_id = self._ext_id(call, response_type)
        with self.store.lock:
            subnet = self.store.subnets.get(ext_id)
            if subnet is None:
                raise self._not_found(call.namespace, call.version, response_type,
                                      f"Subnet with extId '{ext_id}' was not found.",
                                      "NET-40400", "SUBNET_NOT_FOUND")
            return self._single(call, response_type, self._subnet(call, subnet))

    def _subnet(self, call: Call, subnet: JSON) -> JSON:
        cluster = self.store.clusters.get(subnet["clusterExtId"]) or {}
        return render_subnet(subnet, cluster.get("name"), call.version, call.base_url)

    def _cluster_items(self, call: Call) -> list[JSON]:
        """Every cluster, and Prism Central itself: it lists itself as a cluster too."""
        def count(cluster: str) -> int:
            return sum(1 for vm in self.store.vms.values() if vm["clusterExtId"] == cluster)

        items = [render_cluster(c, count(c["extId"]), call.version, call.base_url)
                 for c in self.store.clusters.values()]
        pc = self.store.state.get("prismCentral")
        if pc:
            items.append(render_cluster(pc, 0, call.version, call.base_url, central=True))
        return items

    def list_clusters(self, call: Call, response_type: str | None) -> Response:
        with self.store.lock:
            self.store.settle()
            items = self._cluster_items(call)
        return self._list(call, response_type, items, CLUSTER_FIELDS)

    def get_cluster(self, call: Call, response_type: str | None) -> Response:
        ext_id = self._ext_id(call, response_type)
        with self.store.lock:
            self.store.settle()
            found = [c for c in self._cluster_items(call) if c["extId"] == ext_id]
            if not found:
                raise self._not_found(call.namespace, call.version, response_type,
                                      f"Cluster with extId '{ext_id}' was not found.",
                                      "CLU-40400", "CLUSTER_NOT_FOUND")
            return self._single(call, response_type, found[0])

    def list_containers(self, call: Call, response_type: str | None) -> Response:
        with self.store.lock:
            items = [render_container(c, call.version, call.base_url)
                     for c in self.store.clusters.values()]
        return self._list(call, response_type, items, CONTAINER_FIELDS)

    def get_container(self, call: Call, response_type: str | None) -> Response:
        ext_id = self._ext_id(call, response_type)
        with self.store.lock:
            for cluster in self.store.clusters.values():
                if cluster["containerExtId"] == ext_id:
                    return self._single(call, response_type,
                                        render_container(cluster, call.version, call.base_url))
        raise self._not_found(call.namespace, call.version, response_type,
                              f"Storage container with extId '{ext_id}' was not found.",
                              "CLU-40401", "STORAGE_CONTAINER_NOT_FOUND")

    def get_task(self, call: Call, response_type: str | None) -> Response:
        ext_id = call.params["ext_id"]
        with self.store.lock:
            self.store.settle()
            task = self.store.tasks.get(ext_id) if TASK_ID_RE.match(ext_id) else None
            if task is None:
                raise self._not_found(call.namespace, call.version, response_type,
                                      f"Task with extId '{ext_id}' was not found.",
                                      "PRISM-40400", "TASK_NOT_FOUND")
            now = self.store.clock()
            return self._single(call, response_type, render_task(
                task, self.store.task_status(task, now), now, call.version, call.base_url))

    def list_tasks(self, call: Call, response_type: str | None) -> Response:
        with self.store.lock:
            self.store.settle()
            now = self.store.clock()
            items = [render_task(task, self.store.task_status(task, now), now, call.version,
                                 call.base_url)
                     for task in sorted(self.store.tasks.values(), key=lambda t: -t["createdAt"])]
        return self._list(call, response_type, items, TASK_FIELDS)

    def lab_vms(self, call: Call, response_type: str | None) -> Response:
        return _json(200, {"vms": [vm.to_json() for vm in self.store.lab_vms()]})

    def lab_guest(self, call: Call, response_type: str | None) -> Response:
        """What a booted lab guest reports: {"ips": {"<nic index>": [...]}, "hostname": ...}."""
        data = self._json_body(call, None)
        try:
            ips = {int(index): [str(ip) for ip in found]
                   for index, found in dict(data.get("ips") or {}).items()}
            hostname = data.get("hostname")
            self.store.report_guest(call.params["ext_id"], ips,
                                    None if hostname is None else str(hostname))
        except KeyError as error:
            raise self._not_found("vmm", self.versions["vmm"][-1], None, str(error)) from None
        except (ValueError, TypeError, AttributeError, IndexError) as error:
            raise self._bad_request(call, None, f"Cannot record the guest report: {error}",
                                    "LAB-40000", "INVALID_GUEST_REPORT") from None
        return Response(status_code=204)


def _sort_key(getter: Getter) -> Callable[[Mapping[str, Any]], tuple[bool, Any]]:
    """Sort by a property, entities without it last."""
    def key(item: Mapping[str, Any]) -> tuple[bool, Any]:
        value = getter(item)
        return (value is None, "" if value is None else value)
    return key


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status, headers=dict(headers or {}),
                    media_type="application/json")


def _cut(send: Send) -> None:
    """Close the client's connection without a response (what a crashing gateway does).

    ASGI has no way to do this, so it reaches the uvicorn transport behind `send`.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise RuntimeError("connection faults need the stand-in's own uvicorn server")
    transport.abort()
    if cycle is not None and hasattr(cycle, "disconnected"):
        cycle.disconnected = True


__all__ = ["COOKIE", "NutanixApi", "RequestRecord"]
