"""The `GogsServer` block: Gogs' address, its admin user and that user's API token, and a
client on Gogs' /api/v1 (httpx; python-gogs-client no longer imports, RECIPES.md).

How Gogs 0.13's API behaves, and what this module relies on:

- A token goes in `Authorization: token <sha1>`. Routes under /user, /org/:org/repos and
  /repos/:owner/:repo/(keys|hooks) accept a token only: a password answers 401. Tokens
  are created with Basic auth (user and password) and shown once: 0.13 keeps only their
  SHA256, so a lost token cannot be read back, nor deleted through the API.
- Errors come as `{"message": ..., "url": ...}`, binding errors as a list of
  `{"fieldNames", "classification", "message"}`; 401/403/404 from guards have no body.
  A repository the token cannot see is a 404, like one that does not exist.
- There is no API to change a repository's visibility or description, nor a webhook's
  secret, and a webhook's secret is never shown: the ensure methods say so instead of
  pretending (see each method).
- Adding the same deploy key twice, or a second key under a taken title, is a 500: the
  deploy key method reads the list first and replaces what differs.

Every method that changes something is idempotent and returns whether it changed
anything. Failures raise `GogsError` naming the method, the path, the status and Gogs'
message; transient ones (no connection, reset, time-out, 5xx) raise `TransientGogsError`,
also a `ConnectionError`, so `tasks.retry.transient_only` retries them. The token and
passwords never appear in messages: they travel only in request headers.
"""

from __future__ import annotations

import base64
import binascii
import logging
import ssl
import struct
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
HOOK_EVENTS = ("create", "delete", "fork", "push", "issues", "issue_comment",
               "pull_request", "release")
"""The events a Gogs 0.13 webhook can choose; Gogs silently drops any other name."""


class GogsError(RuntimeError):
    """A permanent failure of a Gogs API call (refused, invalid, not found, conflict)."""

    def __init__(self, url_path: str, status: int, message: str, *, method: str = "GET",
                 server: str = "") -> None:
        self.url_path = url_path
        self.status = status
        self.message = message
        self.method = method
        self.server = server
        where = f"Gogs at {server}: " if server else "Gogs: "
        answer = f"HTTP {status}" if status else "no answer"
        super().__init__(f"{where}{method} {url_path} -> {answer}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Prefect's task boundary
        return (_rebuild, (self.__class__, self.url_path, self.status, self.message,
                           self.method, self.server))


class TransientGogsError(GogsError, ConnectionError):
    """No answer, a reset connection, a time-out or a 5xx: worth a retry."""


class GogsConflict(GogsError):
    """What Gogs holds differs from what is wanted in a way its API cannot change."""


def _rebuild(cls: type[GogsError], url_path: str, status: int, message: str, method: str,
             server: str) -> GogsError:
    return cls(url_path, status, message, method=method, server=server)


def _hint(status: int) -> str:
    return {401: "unauthorized: the token, or the user and password, were refused",
            403: "forbidden: this user lacks the right (site admin or owner needed)",
            404: "not found, or not visible to this user",
            415: "unsupported content type"}.get(status, "")


def gogs_message(response: httpx.Response) -> str:
    """Gogs' own words for a failed call: its message, its binding errors, or the status."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    if isinstance(body, list) and body and all(isinstance(item, dict) for item in body):
        return "; ".join(
            f"{','.join(item.get('fieldNames') or []) or 'request'}: "
            f"{item.get('classification', '')} ({item.get('message', '')})" for item in body)
    text = response.text.strip()
    return text[:200] if text else (_hint(response.status_code) or response.reason_phrase)


def key_material(public_key: str) -> str:
    """`type base64` of an OpenSSH public key line (the comment is not part of the key)."""
    fields = public_key.strip().split()
    if len(fields) < 2:
        raise ValueError("not an OpenSSH public key line (`<type> <base64> [comment]`)")
    try:
        blob = base64.b64decode(fields[1], validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        declared = blob[4:4 + length].decode()
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        raise ValueError("not an OpenSSH public key line: the key data is not valid "
                         "base64 of an SSH key") from None
    if declared != fields[0]:
        raise ValueError(f"not an OpenSSH public key line: it says {fields[0]} but holds "
                         f"a {declared} key")
    return f"{fields[0]} {fields[1]}"


def tls_verify(verify: bool, ca_bundle: str | None) -> ssl.SSLContext | bool:
    """What httpx verifies against: the given CA (PEM text), else the system's store."""
    if not verify:
        return False
    if ca_bundle:
        if "BEGIN CERTIFICATE" not in ca_bundle:
            raise ValueError("ca_bundle is not a PEM certificate: paste the CA's PEM text")
        return ssl.create_default_context(cadata=ca_bundle)
    return ssl.create_default_context()


def _check_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not Gogs' URL: use http(s)://host[:port]/")
    return value.strip()


class GogsClient:
    """Gogs' /api/v1 with one token; use as a context manager (it holds a connection pool).
    """

    def __init__(self, url: str, token: SecretStr | None, *, admin_user: str = "",
                 verify: ssl.SSLContext | bool = True,
                 basic: tuple[str, SecretStr] | None = None,
                 timeout: float = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = _check_url(url).rstrip("/")
        self.admin_user = admin_user
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"token {token.get_secret_value()}"
        auth = None if basic is None else httpx.BasicAuth(basic[0],
                                                          basic[1].get_secret_value())
        self._http = httpx.Client(base_url=self.url + "/api/v1", headers=headers, auth=auth,
                                  verify=verify, timeout=timeout, follow_redirects=False,
                                  transport=transport)
        self._me: str | None = None

    def __enter__(self) -> GogsClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- plumbing --------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, *,
             expect: Iterable[int] = (200,), absent_ok: bool = False) -> Any:
        """One API call: the decoded body for an expected status, None for a 404 when
        `absent_ok`, else GogsError (TransientGogsError for no answer and 5xx)."""
        full = "/api/v1" + path
        try:
            response = self._http.request(method, path, json=body)
        except httpx.UnsupportedProtocol as error:
            raise GogsError(full, 0, f"unsupported URL: {error}", method=method,
                            server=self.url) from None
        except httpx.TransportError as error:
            text = str(error) or type(error).__name__
            if "CERTIFICATE_VERIFY_FAILED" in text:  # a wrong CA does not heal by waiting
                raise GogsError(full, 0, f"TLS certificate not trusted: {text}", method=method,
                                server=self.url) from None
            raise TransientGogsError(full, 0, f"{type(error).__name__}: {text}",
                                     method=method, server=self.url) from None
        if response.status_code in tuple(expect):
            if not response.content:
                return None
            try:
                return response.json()
            except ValueError:
                raise GogsError(full, response.status_code, "the answer is not JSON",
                                method=method, server=self.url) from None
        if absent_ok and response.status_code == 404:
            return None
        error_class = TransientGogsError if response.status_code >= 500 else GogsError
        raise error_class(full, response.status_code, gogs_message(response), method=method,
                          server=self.url)

    # --- what the phases call --------------------------------------------------------

    def whoami(self) -> str:
        """The token's user name (GET /user)."""
        if self._me is None:
            self._me = str(self.call("GET", "/user")["username"])
        return self._me

    def ensure_org(self, name: str, full_name: str) -> bool:
        """The organisation exists (created by the site admin, owned by `admin_user`), with
        this full name."""
        org = self.call("GET", f"/orgs/{_seg(name)}", absent_ok=True)
        if org is None:
            if not self.admin_user:
                raise ValueError(f"organisation {name}: no admin_user to create it for")
            self.call("POST", f"/admin/users/{_seg(self.admin_user)}/orgs",
                      {"username": name, "full_name": full_name}, expect=(201,))
            return True
        if org.get("full_name", "") == full_name:
            return False
        self.call("PATCH", f"/orgs/{_seg(name)}",
                  {"full_name": full_name, "description": org.get("description", ""),
                   "website": org.get("website", ""), "location": org.get("location", "")})
        return True

    def ensure_repo(self, owner: str, name: str, private: bool = True,
                    description: str = "") -> bool:
        """The repository exists with this visibility. Gogs 0.13 has no API to change a
        repository: a different visibility raises GogsConflict, a different description is
        logged and left alone."""
        path = f"/repos/{_seg(owner)}/{_seg(name)}"
        repo = self.call("GET", path, absent_ok=True)
        if repo is None:
            target = "/user/repos" if owner.lower() == self.whoami().lower() \
                else f"/org/{_seg(owner)}/repos"
            self.call("POST", target, {"name": name, "description": description,
                                       "private": private}, expect=(201,))
            return True
        if bool(repo.get("private")) != private:
            have, want = ("private", "public") if repo.get("private") else ("public", "private")
            raise GogsConflict("/api/v1" + path, 200,
                               f"repository {owner}/{name} is {have}, wanted {want}; Gogs' "
                               "API cannot change that: change it in the repository's "
                               "settings", server=self.url)
        if repo.get("description", "") != description:
            log.warning("Gogs repository %s/%s: description %r differs from %r; Gogs' API "
                        "cannot change it, left as is", owner, name,
                        repo.get("description", ""), description)
        return False

    def ensure_deploy_key(self, owner: str, repo: str, title: str, public_key: str) -> bool:
        """The repository has this (read-only) deploy key under this title; a key with the
        same title but other key data, or the same key under another title, is replaced."""
        try:
            wanted = key_material(public_key)
        except ValueError as error:
            raise ValueError(f"deploy key {title!r} for {owner}/{repo}: {error}") from None
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/keys"
        exact, stale = None, []
        for key in self.call("GET", path):
            try:
                material = key_material(key.get("key", ""))
            except ValueError:
                material = ""
            if key.get("title") == title and material == wanted and exact is None:
                exact = key
            elif key.get("title") == title or material == wanted:
                stale.append(key)
        for key in stale:
            self.call("DELETE", f"{path}/{int(key['id'])}", expect=(204,))
        if exact is not None:
            return bool(stale)
        self.call("POST", path, {"title": title, "key": public_key.strip()}, expect=(201,))
        return True

    def ensure_webhook(self, owner: str, repo: str, url: str, secret: SecretStr | str,
                       events: Iterable[str], *, content_type: str = "json",
                       replace: bool = False) -> bool:
        """An active webhook to `url` with these events. Gogs never shows a webhook's secret
        and its API cannot change one: an existing hook keeps its secret unless `replace`,
        which deletes and recreates it (for a rotated secret)."""
        chosen = sorted(set(events))
        unknown = [event for event in chosen if event not in HOOK_EVENTS]
        if not chosen or unknown:
            raise ValueError(f"webhook {url} on {owner}/{repo}: events must be among "
                             f"{', '.join(HOOK_EVENTS)} (got {', '.join(chosen) or 'none'})")
        secret_text = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        path = f"/repos/{_seg(owner)}/{_seg(repo)}/hooks"
        mine = [hook for hook in self.call("GET", path)
                if (hook.get("config") or {}).get("url") == url]
        changed = False
        for hook in mine if replace else mine[1:]:
            self.call("DELETE", f"{path}/{int(hook['id'])}", expect=(204,))
            changed = True
        if replace or not mine:
            self.call("POST", path, {"type": "gogs", "active": True, "events": chosen,
                                     "config": {"url": url, "content_type": content_type,
                                                "secret": secret_text}}, expect=(201,))
            return True
        hook = mine[0]
        if sorted(hook.get("events") or []) == chosen and hook.get("active") and \
                (hook.get("config") or {}).get("content_type") == content_type:
            return changed
        self.call("PATCH", f"{path}/{int(hook['id'])}",
                  {"config": {"url": url, "content_type": content_type}, "events": chosen,
                   "active": True})
        return True


def _seg(name: str) -> str:
    """One path segment: Gogs names never hold a slash; quote anything unusual."""
    if not name or "/" in name:
        raise ValueError(f"{name!r} is not a Gogs user, organisation or repository name")
    return quote(name, safe="")


class GogsServer(Block):
    """Gogs' address, the site admin's user name and its API token (TLS verified unless
    turned off; a private CA may be given as PEM text)."""

    _block_type_name = "Gogs Server"
    _block_type_slug = "gogs-server"
    _description = ("Gogs' URL, its site admin and the admin's API token; the client of "
                    "Gogs' /api/v1 used by phase 3 and the GitOps phases.")

    url: str = Field(description="Gogs' external URL, e.g. https://gitops.example.org:3000/")
    admin_user: str = Field(description="the site admin that owns the organisations")
    token: SecretStr = Field(description="the admin's API token (its sha1)")
    ca_bundle: str | None = Field(default=None, description="PEM of the CA that signed Gogs' "
                                                            "certificate")
    verify: bool = Field(default=True, description="verify Gogs' TLS certificate")

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        return _check_url(value)

    def client(self, timeout: float = DEFAULT_TIMEOUT) -> GogsClient:
        """A client with the admin's token; close it (or use `with`)."""
        return GogsClient(self.url, self.token, admin_user=self.admin_user,
                          verify=tls_verify(self.verify, self.ca_bundle), timeout=timeout)

    def whoami(self) -> str:
        with self.client() as gogs:
            return gogs.whoami()

    def ensure_org(self, name: str, full_name: str) -> bool:
        with self.client() as gogs:
            return gogs.ensure_org(name, full_name)

    def ensure_repo(self, owner: str, name: str, private: bool = True,
                    description: str = "") -> bool:
        with self.client() as gogs:
            return gogs.ensure_repo(owner, name, private, description)

    def ensure_deploy_key(self, owner: str, repo: str, title: str, public_key: str) -> bool:
        with self.client() as gogs:
            return gogs.ensure_deploy_key(owner, repo, title, public_key)

    def ensure_webhook(self, owner: str, repo: str, url: str, secret: SecretStr | str,
                       events: Iterable[str], *, content_type: str = "json",
                       replace: bool = False) -> bool:
        with self.client() as gogs:
            return gogs.ensure_webhook(owner, repo, url, secret, events,
                                       content_type=content_type, replace=replace)

    @staticmethod
    def wait_until_serving(url: str, ca_bundle: str, timeout: float = 60.0) -> None:
        """Return once Gogs answers HTTP at ``url`` (any status); ConnectionError after
        ``timeout`` seconds without an answer."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(f"{url.rstrip('/')}/api/v1/version",
                          verify=tls_verify(True, ca_bundle), timeout=5.0)
                return
            except httpx.TransportError as error:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"Gogs does not answer on {url} after "
                                          f"{timeout:.0f} s ({type(error).__name__})") from None
                time.sleep(0.5)

    @staticmethod
    def password_works(url: str, user: str, password: str, ca_bundle: str) -> bool:
        """Whether ``user`` exists with ``password`` (Gogs takes a password only on its
        token routes: 200 there, 401 otherwise); 5xx is a TransientGogsError."""
        path = f"/api/v1/users/{_seg(user)}/tokens"
        response = httpx.get(f"{url.rstrip('/')}{path}", auth=(user, password),
                             verify=tls_verify(True, ca_bundle), timeout=10.0)
        if response.status_code >= 500:
            raise TransientGogsError(path, response.status_code, gogs_message(response),
                                     server=url)
        return response.status_code == 200

    @staticmethod
    def create_token(url: str, user: str, password: SecretStr | str, name: str,
                     ca_bundle: str | None = None, verify: bool = True,
                     timeout: float = DEFAULT_TIMEOUT) -> SecretStr:
        """A new API token for `user`, made with its password (Basic auth). Gogs shows a
        token once and cannot delete one through its API: a taken name is a GogsError."""
        secret = password if isinstance(password, SecretStr) else SecretStr(password)
        with GogsClient(url, None, verify=tls_verify(verify, ca_bundle), basic=(user, secret),
                        timeout=timeout) as gogs:
            try:
                made = gogs.call("POST", f"/users/{_seg(user)}/tokens", {"name": name},
                                 expect=(201,))
            except GogsError as error:
                if error.status == 422 and "already exists" in error.message:
                    raise GogsError(error.url_path, 422, f"{error.message}: Gogs cannot show "
                                    "an existing token again nor delete it through its API; "
                                    "use another name, or delete it under the user's "
                                    "Settings > Applications", method="POST",
                                    server=error.server) from None
                raise
        sha1 = str((made or {}).get("sha1", ""))
        if len(sha1) != 40:
            raise GogsError(f"/api/v1/users/{user}/tokens", 201, "the answer holds no token",
                            method="POST", server=gogs.url)
        return SecretStr(sha1)
