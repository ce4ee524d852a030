"""The GogsServer block's own logic, without a server: key parsing, Gogs' error bodies
turned into messages, which failures are transient, what the ensure methods send."""

from __future__ import annotations

import base64
import json
import pickle
import ssl
import struct
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from blocks.gogs import (
    GogsClient,
    GogsConflict,
    GogsError,
    GogsServer,
    TransientGogsError,
    gogs_message,
    key_material,
    tls_verify,
)
from tasks.retry import is_transient

TOKEN = "0123456789abcdef0123456789abcdef01234567"


def ssh_key(kind: str = "ssh-ed25519", comment: str = "argocd") -> str:
    blob = struct.pack(">I", len(kind)) + kind.encode() + struct.pack(">I", 32) + bytes(32)
    return f"{kind} {base64.b64encode(blob).decode()} {comment}".strip()


def test_key_material_is_type_and_data_without_the_comment() -> None:
    key = ssh_key()
    assert key_material(key) == " ".join(key.split()[:2])
    assert key_material(ssh_key(comment="")) == key_material(key)
    assert key_material("  " + key + "\n") == key_material(key)
    with pytest.raises(ValueError, match="says ssh-rsa but holds a ssh-ed25519 key"):
        key_material(key.replace("ssh-ed25519", "ssh-rsa", 1))
    with pytest.raises(ValueError, match="not valid base64"):
        key_material("ssh-ed25519 not*base64")
    with pytest.raises(ValueError, match="not an OpenSSH public key line"):
        key_material("ssh-ed25519")


def response(status: int, body: Any = None, text: str = "") -> httpx.Response:
    if body is not None:
        return httpx.Response(status, json=body)
    return httpx.Response(status, text=text)


def test_gogs_message_reads_each_kind_of_error_body() -> None:
    assert gogs_message(response(422, {"message": "repository already exists", "url": "u"})) \
        == "repository already exists"
    binding = [{"fieldNames": ["Name"], "classification": "RequiredError",
                "message": "Required"},
               {"classification": "ContentTypeError", "message": "Empty Content-Type"}]
    assert gogs_message(response(422, binding)) == \
        "Name: RequiredError (Required); request: ContentTypeError (Empty Content-Type)"
    assert "unauthorized" in gogs_message(response(401))
    assert "not visible" in gogs_message(response(404))
    assert gogs_message(response(400, text="Unrecognized action")) == "Unrecognized action"


def test_errors_name_the_call_and_survive_pickling() -> None:
    error = TransientGogsError("/api/v1/user", 502, "Bad Gateway", method="GET",
                               server="https://gogs:3000")
    assert str(error) == "Gogs at https://gogs:3000: GET /api/v1/user -> HTTP 502: Bad Gateway"
    assert isinstance(error, ConnectionError) and is_transient(error)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is TransientGogsError
    assert (copy.url_path, copy.status, copy.message, copy.method) == \
        ("/api/v1/user", 502, "Bad Gateway", "GET")
    assert not is_transient(GogsError("/api/v1/user", 401, "unauthorized"))
    assert not is_transient(GogsConflict("/api/v1/repos/a/b", 200, "is public"))
    assert "no answer" in str(GogsError("/api/v1/user", 0, "refused"))


def test_tls_verify() -> None:
    assert tls_verify(False, "anything") is False
    assert isinstance(tls_verify(True, None), ssl.SSLContext)
    with pytest.raises(ValueError, match="not a PEM certificate"):
        tls_verify(True, "not a certificate")


def test_block_checks_its_url_and_hides_its_token() -> None:
    block = GogsServer(url="https://gitops.example.org:3000/", admin_user="gogsadmin",
                       token=SecretStr(TOKEN))
    assert TOKEN not in repr(block)
    with pytest.raises(ValidationError, match="is not Gogs' URL"):
        GogsServer(url="gitops.example.org", admin_user="gogsadmin", token=SecretStr(TOKEN))


class FakeGogs:
    """Answers from a table of (method, path) -> response; records every request."""

    def __init__(self, answers: dict[tuple[str, str], httpx.Response | Exception]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))
        assert request.headers["Authorization"] == f"token {TOKEN}"
        answer = self.answers.get((request.method, request.url.path))
        if answer is None:
            return httpx.Response(404)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def client(self) -> GogsClient:
        return GogsClient("http://gogs:3000/", SecretStr(TOKEN), admin_user="gogsadmin",
                          transport=httpx.MockTransport(self))


def test_call_maps_statuses_and_transport_failures() -> None:
    fake = FakeGogs({
        ("GET", "/api/v1/user"): response(502, text="bad gateway"),
        ("GET", "/api/v1/orgs/down"): httpx.ConnectError("Connection refused"),
        ("GET", "/api/v1/orgs/platform"): response(200, {"username": "platform"}),
    })
    with fake.client() as gogs:
        with pytest.raises(TransientGogsError) as bad_gateway:
            gogs.whoami()
        assert bad_gateway.value.status == 502
        with pytest.raises(TransientGogsError, match="ConnectError: Connection refused"):
            gogs.call("GET", "/orgs/down")
        assert gogs.call("GET", "/orgs/none", absent_ok=True) is None
        with pytest.raises(GogsError) as missing:
            gogs.call("GET", "/orgs/none")
        assert not isinstance(missing.value, TransientGogsError)
        assert "HTTP 404" in str(missing.value) and TOKEN not in str(missing.value)
        assert gogs.call("GET", "/orgs/platform") == {"username": "platform"}


def test_ensure_deploy_key_removes_what_differs_then_adds() -> None:
    wanted, old = ssh_key(comment="argocd"), ssh_key("ecdsa-sha2-nistp256", "old")
    fake = FakeGogs({
        ("GET", "/api/v1/repos/platform/gitops/keys"): response(200, [
            {"id": 4, "title": "argocd", "key": old},
            {"id": 5, "title": "renamed", "key": ssh_key(comment="elsewhere")},
            {"id": 6, "title": "unrelated", "key": ssh_key("ssh-rsa", "x")}]),
        ("DELETE", "/api/v1/repos/platform/gitops/keys/4"): httpx.Response(204),
        ("DELETE", "/api/v1/repos/platform/gitops/keys/5"): httpx.Response(204),
        ("POST", "/api/v1/repos/platform/gitops/keys"): response(201, {"id": 7}),
    })
    with fake.client() as gogs:
        assert gogs.ensure_deploy_key("platform", "gitops", "argocd", wanted) is True
    assert [(method, path) for method, path, _ in fake.requests[1:]] == [
        ("DELETE", "/api/v1/repos/platform/gitops/keys/4"),
        ("DELETE", "/api/v1/repos/platform/gitops/keys/5"),
        ("POST", "/api/v1/repos/platform/gitops/keys")]
    assert fake.requests[-1][2] == {"title": "argocd", "key": wanted}
    with pytest.raises(ValueError, match="deploy key 'argocd' for platform/gitops"):
        fake.client().ensure_deploy_key("platform", "gitops", "argocd", "not a key")


def test_ensure_webhook_sends_the_secret_only_when_creating() -> None:
    path = "/api/v1/repos/platform/gitops/hooks"
    fake = FakeGogs({
        ("GET", path): response(200, [{"id": 3, "type": "gogs", "active": True,
                                       "events": ["push"], "config": {
                                           "url": "https://argocd/api/webhook",
                                           "content_type": "form"}}]),
        ("PATCH", f"{path}/3"): response(200, {"id": 3}),
    })
    with fake.client() as gogs:
        assert gogs.ensure_webhook("platform", "gitops", "https://argocd/api/webhook",
                                   SecretStr("s3cret"), ["push"]) is True
        with pytest.raises(ValueError, match="events must be among"):
            gogs.ensure_webhook("platform", "gitops", "https://x/", "s", [])
    method, _, body = fake.requests[-1]
    assert method == "PATCH"
    assert body == {"config": {"url": "https://argocd/api/webhook", "content_type": "json"},
                    "events": ["push"], "active": True}
    assert len(fake.requests) == 2  # the invalid events were refused before any request


def test_ensure_repo_picks_the_user_or_organisation_route() -> None:
    fake = FakeGogs({
        ("GET", "/api/v1/user"): response(200, {"username": "gogsadmin"}),
        ("POST", "/api/v1/user/repos"): response(201, {"id": 1}),
        ("POST", "/api/v1/org/platform/repos"): response(201, {"id": 2}),
        ("GET", "/api/v1/repos/platform/public"): response(200, {"private": False,
                                                                 "description": ""}),
    })
    with fake.client() as gogs:
        assert gogs.ensure_repo("GogsAdmin", "scratch") is True
        assert gogs.ensure_repo("platform", "gitops", description="GitOps") is True
        with pytest.raises(GogsConflict, match="is public, wanted private"):
            gogs.ensure_repo("platform", "public")
        with pytest.raises(ValueError, match="is not a Gogs"):
            gogs.ensure_repo("platform", "a/b")
    posts = [(path, body) for method, path, body in fake.requests if method == "POST"]
    assert posts == [
        ("/api/v1/user/repos", {"name": "scratch", "description": "", "private": True}),
        ("/api/v1/org/platform/repos", {"name": "gitops", "description": "GitOps",
                                        "private": True})]
