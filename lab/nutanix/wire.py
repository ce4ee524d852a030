"""The JSON shapes of the Prism Central v4 APIs, as the official Python SDKs read them.

Every v4 body is an envelope `{"data": ..., "metadata": ..., "$objectType": ...,
"$reserved": {"$fv": "v4.rN"}}`. The SDK picks a model class from each object's
`$objectType`, so every object the stand-in returns names its type; an object without one
comes back to the caller as a bare dict. The SDK copies the `ETag` response header into
`data.$reserved`, which therefore must exist on single-entity responses.

Errors come back as `{"data": {"error": [AppMessage...], "$objectType":
"<ns>.v4.error.ErrorResponse"}}`, or, for schema violations, with `error` holding one
`<ns>.v4.error.SchemaValidationError` object instead of a list. Codes and messages follow
what public traces of real Prism Central show where known (VMM-30100 VM_NOT_FOUND,
PLAT-10004 MISSING_ETAG_HEADER, PLAT-10005 on a bad eTag); the others are the stand-in's.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

JSON = dict[str, Any]

# Versions each namespace serves, oldest first; the last one is what
# `OPTIONS /api/<ns>/unversioned/info` reports. The installed SDKs use vmm v4.3,
# prism v4.4, networking v4.4 and clustermgmt v4.3.
SERVED_VERSIONS: dict[str, tuple[str, ...]] = {
    "vmm": ("v4.0", "v4.1", "v4.2", "v4.3"),
    "prism": ("v4.0", "v4.1", "v4.2", "v4.3", "v4.4"),
    "networking": ("v4.0", "v4.1", "v4.2", "v4.3", "v4.4"),
    "clustermgmt": ("v4.0", "v4.1", "v4.2", "v4.3"),
}
LOCALE = "en-US"


def fv(version: str) -> str:
    """The `$fv` (format version) the SDK of `version` stamps on its objects: v4.3 -> v4.r3."""
    major, _, minor = version.lstrip("v").partition(".")
    return f"v{major}.r{minor or '0'}"


def typed(object_type: str, version: str, body: JSON) -> JSON:
    """Stamp one object with its `$objectType` and `$reserved`, keeping existing fields."""
    out: JSON = {"$reserved": {"$fv": fv(version)}, "$objectType": object_type}
    out.update(body)
    return out


def timestamp(seconds: float) -> str:
    """ISO 8601 with an explicit UTC offset, as v4 dates are written."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds")


def flags(*, error: bool = False, paginated: bool = False) -> list[JSON]:
    """The metadata flags every v4 response carries."""
    return [{"$objectType": "common.v1.config.Flag", "$reserved": {"$fv": "v1.r0"},
             "name": "hasError", "value": error},
            {"$objectType": "common.v1.config.Flag", "$reserved": {"$fv": "v1.r0"},
             "name": "isPaginated", "value": paginated},
            {"$objectType": "common.v1.config.Flag", "$reserved": {"$fv": "v1.r0"},
             "name": "isTruncated", "value": False}]


def link(href: str, rel: str) -> JSON:
    """A `common.v1.response.ApiLink`."""
    return {"$objectType": "common.v1.response.ApiLink", "$reserved": {"$fv": "v1.r0"},
            "href": href, "rel": rel}


def metadata(*, error: bool = False, paginated: bool = False, links: list[JSON] | None = None,
             total: int | None = None) -> JSON:
    """A `common.v1.response.ApiResponseMetadata`."""
    out: JSON = {"$objectType": "common.v1.response.ApiResponseMetadata",
                 "$reserved": {"$fv": "v1.r0"}, "flags": flags(error=error, paginated=paginated)}
    if links:
        out["links"] = links
    if total is not None:
        out["totalAvailableResults"] = total
    return out


def envelope(response_type: str, version: str, data: Any = None, *,
             meta: JSON | None = None) -> JSON:
    """A whole response body. `data` None leaves the key out, as an empty v4 list does."""
    out: JSON = {"$reserved": {"$fv": fv(version)}, "$objectType": response_type}
    if data is not None:
        out["data"] = data
    out["metadata"] = meta if meta is not None else metadata()
    return out


def app_message(namespace: str, version: str, message: str, code: str, group: str,
                arguments: dict[str, str] | None = None, severity: str = "ERROR") -> JSON:
    """One `<ns>.v4.error.AppMessage`."""
    return typed(f"{namespace}.v4.error.AppMessage", version, {
        "message": message, "severity": severity, "code": code, "locale": LOCALE,
        "errorGroup": group, "argumentsMap": dict(arguments or {})})


def error_body(namespace: str, version: str, response_type: str | None,
               messages: list[JSON]) -> JSON:
    """An error response: `data` is an ErrorResponse whose `error` is a list of AppMessages."""
    data = typed(f"{namespace}.v4.error.ErrorResponse", version, {"error": messages})
    out: JSON = {"$reserved": {"$fv": fv(version)}}
    if response_type:
        out["$objectType"] = response_type
    out["data"] = data
    out["metadata"] = metadata(error=True)
    return out


def schema_error_body(namespace: str, version: str, response_type: str | None, path: str,
                      problems: list[tuple[str, str]], now: float) -> JSON:
    """A 400 for schema violations: `error` is one SchemaValidationError, not a list."""
    details = [typed(f"{namespace}.v4.error.SchemaValidationErrorMessage", version, {
        "location": f"$.{attribute}" if attribute else "$", "message": message,
        "attributePath": attribute}) for attribute, message in problems]
    error = typed(f"{namespace}.v4.error.SchemaValidationError", version, {
        "timestamp": timestamp(now), "statusCode": 400, "error": "Bad Request",
        "path": path, "validationErrorMessages": details})
    data = typed(f"{namespace}.v4.error.ErrorResponse", version, {"error": error})
    out: JSON = {"$reserved": {"$fv": fv(version)}}
    if response_type:
        out["$objectType"] = response_type
    out["data"] = data
    out["metadata"] = metadata(error=True)
    return out
