"""The NutanixHypervisor block's pure parts: addresses, ownership, error bodies, fault sorting.

No server and no Nutanix SDK import (they cost seconds): SDK errors are matched by their
shape, so a local `ApiException` stands in for the SDKs' own.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import urllib3
from pydantic import SecretStr, ValidationError

from blocks.hypervisor import HypervisorError, TransientHypervisorError
from blocks.nutanix import (
    NutanixHypervisor,
    NutanixSession,
    _RepairSdkLogCalls,
    api_message,
    classify_fault,
    owner_of,
    split_address,
)
from sizing.spec import NutanixPlacement

ROOT = Path(__file__).resolve().parents[2]
PLACEMENT = NutanixPlacement(cluster="AHV-01", image="debian-12")
# urllib3 uses an error's connection pool only in its message: these tests need none.
NO_POOL = cast(Any, None)


class ApiException(Exception):  # the shape of the SDKs' rest.ApiException
    def __init__(self, status: int, body: object = None, reason: str = "") -> None:
        super().__init__(status)
        self.status, self.reason = status, reason
        self.body = body if isinstance(body, str) or body is None else json.dumps(body)


def app_messages(*messages: tuple[str, str]) -> dict[str, object]:
    return {"data": {"$objectType": "vmm.v4.error.ErrorResponse", "error": [
        {"message": text, "code": code, "errorGroup": "X"} for text, code in messages]}}


def test_importing_the_block_leaves_the_sdks_unimported() -> None:
    probe = ("import sys, blocks.nutanix; "
             "sys.exit(any(m.startswith('ntnx_') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT).returncode == 0


@pytest.mark.parametrize(("address", "expected"), [
    ("prism.example.org", ("prism.example.org", 9440)),
    ("prism.example.org:443", ("prism.example.org", 443)),
    ("https://10.0.0.5:9440/", ("10.0.0.5", 9440)),
    ("[fd00::5]:9441", ("[fd00::5]", 9441)),
    ("[fd00::5]", ("[fd00::5]", 9440)),
])
def test_address_forms(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize("address", ["", "prism:port", "prism:70000", ":9440"])
def test_bad_addresses_are_refused_when_the_block_is_made(address: str) -> None:
    with pytest.raises(ValidationError, match="not a Prism Central address"):
        NutanixHypervisor(address=address, user="u", password=SecretStr("p"))


def test_a_ca_bundle_must_be_pem() -> None:
    block = NutanixHypervisor(address="prism", user="u", password=SecretStr("p"),
                              ca_bundle="not a certificate")
    with pytest.raises(HypervisorError, match="ca_bundle of this block is not a PEM"):
        block.open(PLACEMENT)


def test_owner_is_read_from_the_description() -> None:
    assert owner_of("platform.owner=lab (made by the platform orchestrator)") == "lab"
    assert owner_of("web server\nplatform.owner=prod") == "prod"
    assert owner_of("xplatform.owner=lab") is None
    assert owner_of(None) is None


def test_error_bodies_of_both_shapes() -> None:
    listed = json.dumps(app_messages(("VM not found.", "VMM-30100"), ("Second.", "VMM-1")))
    assert api_message(listed) == "VM not found. [VMM-30100]; Second. [VMM-1]"
    schema = json.dumps({"data": {"error": {
        "$objectType": "vmm.v4.error.SchemaValidationError", "error": "Bad Request",
        "validationErrorMessages": [{"attributePath": "numSockets", "message": "must be > 0"},
                                    {"location": "$.name", "message": "must not be null"}]}}})
    assert api_message(schema) == \
        "invalid request: numSockets: must be > 0; $.name: must not be null"
    assert api_message("<html>gateway</html>") == "<html>gateway</html>"
    assert api_message(None) == "no details"


def fault(error: BaseException) -> HypervisorError | TransientHypervisorError | None:
    return classify_fault(error, "pc.example:9440", "svc-platform", "listing VMs")


def test_api_errors_are_sorted_by_status() -> None:
    refused = fault(ApiException(401, app_messages(("Authentication failed.", "IAM-40100"))))
    assert isinstance(refused, HypervisorError)
    assert str(refused).startswith("Prism Central pc.example:9440 refused the login of "
                                   "svc-platform (listing VMs)")
    assert isinstance(fault(ApiException(403, app_messages(("Denied.", "IAM-1")))),
                      HypervisorError)
    for status in (408, 429, 500, 502, 503, 504):
        assert isinstance(fault(ApiException(status, app_messages(("Busy.", "X")))),
                          TransientHypervisorError), status
    stale = fault(ApiException(412, app_messages(("Invalid eTag header.", "PLAT-10005"))))
    assert isinstance(stale, TransientHypervisorError) and "ETag" in str(stale)
    for status in (400, 404, 428, 501):
        assert isinstance(fault(ApiException(status, "{}")), HypervisorError), status
    tls = fault(ApiException(0, reason="SSLError\ncertificate verify failed"))
    assert isinstance(tls, HypervisorError) and "ca_bundle" in str(tls)


def test_transport_errors_are_sorted_by_reason() -> None:
    def max_retry(reason: Exception) -> urllib3.exceptions.MaxRetryError:
        return urllib3.exceptions.MaxRetryError(NO_POOL, "/api/vmm/v4.3/ahv/config/vms", reason)

    bad_cert = fault(max_retry(urllib3.exceptions.SSLError("certificate verify failed")))
    assert isinstance(bad_cert, HypervisorError)
    assert "TLS verification failed" in str(bad_cert) and "ca_bundle" in str(bad_cert)
    reset = fault(max_retry(urllib3.exceptions.ProtocolError("Connection aborted.")))
    assert isinstance(reset, TransientHypervisorError) and "connection failed" in str(reset)
    slow = fault(max_retry(urllib3.exceptions.ReadTimeoutError(NO_POOL, "/x", "timed out")))
    assert isinstance(slow, TransientHypervisorError) and "timed out" in str(slow)
    assert isinstance(fault(ConnectionResetError()), TransientHypervisorError)
    assert fault(ValueError("a bug")) is None


def session(password: str = "S3cret-Pa55") -> NutanixSession:
    return NutanixSession(address="pc.example:9440", host="pc.example", port=9440,
                          user="svc-platform", password=password, verify_tls=True,
                          ca_file=None, placement=PLACEMENT)


def task(group: str, message: str) -> SimpleNamespace:
    return SimpleNamespace(status="FAILED", legacy_error_message=message, error_messages=[
        SimpleNamespace(message=message, error_group=group)])


def test_failed_tasks_are_transient_only_when_retrying_can_help() -> None:
    s = session()
    stale = s._failure("resizing lab-vault-01", task(
        "VM_ETAG_MISMATCH", "it was modified after the request was accepted"))
    assert isinstance(stale, TransientHypervisorError)
    full = s._failure("powering on lab-vault-01", task(
        "INSUFFICIENT_MEMORY", "no host of cluster 'AHV-01' has enough free memory"))
    assert type(full) is HypervisorError
    assert str(full) == ("Prism Central pc.example:9440: powering on lab-vault-01 failed: no "
                         "host of cluster 'AHV-01' has enough free memory [INSUFFICIENT_MEMORY]")
    quiet = SimpleNamespace(status="FAILED", legacy_error_message=None, error_messages=None)
    assert "without a message" in str(s._failure("deleting x", quiet))


def test_secrets_never_reach_a_message() -> None:
    s = session("S3cret-Pa55")
    leaked = s._failure("creating x", task("X", "bad value 'S3cret-Pa55' in request"))
    assert "S3cret-Pa55" not in str(leaked) and "<redacted>" in str(leaked)
    assert "S3cret-Pa55" not in repr(s)


def test_sdk_log_calls_without_placeholders_are_repaired() -> None:
    record = logging.LogRecord("ntnx_vmm_py_client.api_client", logging.ERROR, __file__, 1,
                               "Could not fetch supported versions from server",
                               (ApiException(401, '{"secret": "cookie"}'),), None)
    assert _RepairSdkLogCalls().filter(record)
    assert record.getMessage() == ("Could not fetch supported versions from server: "
                                   "ApiException(status=401)")
