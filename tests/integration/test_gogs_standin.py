"""The Gogs stand-in (lab/gogs/standin.py), driven the way the platform drives Gogs.

One stand-in runs for the module on loopback, started as the lab starts it (`gogs web
--config app.ini`, as the app.ini's RUN_USER), with its own sqlite database, repository
root and authorized_keys directory in a temporary directory. The product's `GogsServer`
block talks to it; git talks to it over smart HTTP and through the `serv` forced command
that authorized_keys gives sshd (a small GIT_SSH_COMMAND wrapper plays sshd: it runs the
key's forced command, as written in authorized_keys, with SSH_ORIGINAL_COMMAND set).
No root, no lab needed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pwd
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from blocks.gogs import GogsConflict, GogsError, GogsServer, TransientGogsError
from lab.tls import issue

STANDIN = Path(__file__).resolve().parents[2] / "lab" / "gogs" / "standin.py"
RUN_USER = pwd.getpwuid(os.geteuid()).pw_name
ADMIN, ADMIN_PASSWORD = "gogsadmin", "Adm1n-pass-7f3c9a"
BOB, BOB_PASSWORD = "bob", "B0b-pass-41d2e8"
HOOK_SECRET = "hook-secret-9b1e77"
ORG, REPO = "platform", "gitops"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def app_ini(base: Path, port: int, *, protocol: str = "http") -> str:
    tls = ""
    if protocol == "https":
        cert, key = issue(base / "tls", "gogs", ["127.0.0.1"])
        tls = f"CERT_FILE = {cert}\nKEY_FILE = {key}\n"
    return (f"RUN_USER = {RUN_USER}\nRUN_MODE = prod\n\n"
            f"[server]\nPROTOCOL = {protocol}\nDOMAIN = 127.0.0.1\nHTTP_ADDR = 127.0.0.1\n"
            f"HTTP_PORT = {port}\nEXTERNAL_URL = {protocol}://%(DOMAIN)s:%(HTTP_PORT)s/\n"
            "SSH_DOMAIN = 127.0.0.1\nSSH_PORT = 22\nSTART_SSH_SERVER = false\n"
            f"SSH_ROOT_PATH = {base}/ssh\n{tls}\n"
            f"[repository]\nROOT = {base}/repositories\n\n"
            f"[database]\nTYPE = sqlite3\nPATH = {base}/data/gogs.db\n\n"
            f"[security]\nINSTALL_LOCK = true\nSECRET_KEY = \"k%ey#{port}\"\n"
            "LOCAL_NETWORK_ALLOWLIST = 127.0.0.1\n\n"
            f"[auth]\nDISABLE_REGISTRATION = true\n\n[log]\nROOT_PATH = {base}/log\n")


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(STANDIN), *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=60, check=False)


@dataclass
class StandIn:
    base: Path
    config: Path
    url: str
    process: subprocess.Popen[bytes]
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@contextmanager
def running_standin(base: Path, protocol: str = "http") -> Iterator[StandIn]:
    """`gogs web --config app.ini` on a free loopback port, stopped (by its pid) at the end."""
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = base / "app.ini"
    config.write_text(app_ini(base, port, protocol=protocol))
    stderr_path = base / "gogs.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen([str(STANDIN), "web", "--config", str(config)],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    standin = StandIn(base, config, f"{protocol}://127.0.0.1:{port}/", process, stderr_path)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                pytest.fail(f"the stand-in exited ({process.returncode}): {standin.stderr()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the stand-in never listened: {standin.stderr()}")
                time.sleep(0.05)
        yield standin
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Site:
    """The module's stand-in with its admin, the admin's token and the block."""

    standin: StandIn
    token: str
    gogs: GogsServer
    bob_token: str
    secrets: list[str] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.standin.url + "api/v1"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with running_standin(tmp_path_factory.mktemp("gogs")) as standin:
        made = run_cli(standin.config, "admin", "create-user", "--name", ADMIN, "--password",
                       ADMIN_PASSWORD, "--email", "admin@example.org", "--admin")
        assert made.returncode == 0, made.stderr
        assert made.stdout.strip() == f"New user '{ADMIN}' has been successfully created!"
        token = GogsServer.create_token(standin.url, ADMIN, ADMIN_PASSWORD, "platform")
        gogs = GogsServer(url=standin.url, admin_user=ADMIN, token=token)
        assert gogs.whoami() == ADMIN
        with httpx.Client(base_url=standin.url + "api/v1",
                          headers={"Authorization": f"token {token.get_secret_value()}"}) as http:
            bob = http.post("/admin/users", json={"username": BOB, "email": "bob@example.org",
                                                  "password": BOB_PASSWORD})
            assert bob.status_code == 201, bob.text
        bob_token = GogsServer.create_token(standin.url, BOB, BOB_PASSWORD, "bob")
        yield Site(standin, token.get_secret_value(), gogs, bob_token.get_secret_value(),
                   [ADMIN_PASSWORD, token.get_secret_value(), HOOK_SECRET, BOB_PASSWORD,
                    bob_token.get_secret_value()])


def git_env(home: Path, **extra: str) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ["PATH"], "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0", "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "t@e.st",
            "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "t@e.st", **extra}


def git(*args: str, env: dict[str, str], cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def new_key(directory: Path, name: str) -> tuple[Path, str]:
    private = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                    str(private)], check=True, capture_output=True)
    return private, (directory / f"{name}.pub").read_text().strip()


# --- the CLI ---------------------------------------------------------------------------


def test_create_user_refuses_a_taken_or_reserved_name(site: Site) -> None:
    again = run_cli(site.standin.config, "admin", "create-user", "--name", ADMIN,
                    "--password", "x", "--email", "other@example.org")
    assert again.returncode == 1
    assert f"CreateUser: user already exists: map[name:{ADMIN}]" in again.stderr
    # Gogs reserves "admin" (and api, user, org...): the site admin needs another name.
    reserved = run_cli(site.standin.config, "admin", "create-user", "--name", "admin",
                       "--password", "x", "--email", "a@example.org", "--admin")
    assert reserved.returncode == 1
    assert "name is not allowed: map[name:admin reason:reserved]" in reserved.stderr


@pytest.mark.parametrize(("change", "refusal"), [
    (("INSTALL_LOCK = true", "INSTALL_LOCK = false"), "[security] INSTALL_LOCK must be true"),
    ((f"RUN_USER = {RUN_USER}", "RUN_USER = somebody-else"),
     'user configured to run Gogs is "somebody-else"'),
    (("EXTERNAL_URL", "ROOT_URL"), "[server] ROOT_URL is no longer read by Gogs 0.13"),
    (("[auth]", "[service]"), "section [service] is no longer read by Gogs 0.13"),
    (("TYPE = sqlite3", "TYPE = mysql"), "[database] TYPE must be sqlite3"),
    (("PROTOCOL = http", "PROTOCOL = https"), "CERT_FILE is required [server]"),
])
def test_web_refuses_an_incomplete_app_ini(tmp_path: Path, change: tuple[str, str],
                                           refusal: str) -> None:
    config = tmp_path / "app.ini"
    config.write_text(app_ini(tmp_path, free_port()).replace(*change, 1))
    started = subprocess.run([str(STANDIN), "web", "-c", str(config)], capture_output=True,
                             text=True, timeout=20, check=False)
    assert started.returncode == 1
    assert refusal in started.stderr
    assert "[FATAL]" in started.stderr


# --- tokens and authentication ---------------------------------------------------------


def test_tokens_need_the_password_and_the_api_needs_the_token(site: Site) -> None:
    assert re.fullmatch(r"[0-9a-f]{40}", site.token)
    with pytest.raises(GogsError) as wrong:
        GogsServer.create_token(site.standin.url, ADMIN, "not-the-password", "other")
    assert wrong.value.status == 401
    assert not isinstance(wrong.value, ConnectionError)
    with pytest.raises(GogsError) as taken:
        GogsServer.create_token(site.standin.url, ADMIN, ADMIN_PASSWORD, "platform")
    assert taken.value.status == 422
    assert "access token already exists: map[name:platform userID:1]" in str(taken.value)
    assert "Settings > Applications" in str(taken.value)

    with httpx.Client(base_url=site.api) as http:
        # /user takes a token only: the password is a 401, with no body, like Gogs.
        by_password = http.get("/user", auth=(ADMIN, ADMIN_PASSWORD))
        assert (by_password.status_code, by_password.content) == (401, b"")
        by_header = http.get("/user", headers={"Authorization": f"token {site.token}"})
        assert by_header.json()["username"] == ADMIN
        by_query = http.get("/user", params={"token": site.token})
        assert by_query.json()["login"] == ADMIN
        # 0.13 keeps only the SHA256 of a token: the list cannot show it again.
        listed = http.get(f"/users/{ADMIN}/tokens", auth=(ADMIN, ADMIN_PASSWORD))
        assert listed.json() == [{"name": "platform", "sha1": ""}]
    assert site.gogs.whoami() == ADMIN


# --- organisation, repository, deploy key, webhook through the block ---------------------


def test_ensure_methods_change_once_then_report_no_change(site: Site, tmp_path: Path) -> None:
    gogs = site.gogs
    assert gogs.ensure_org(ORG, "e-Government platform") is True
    assert gogs.ensure_org(ORG, "e-Government platform") is False
    assert gogs.ensure_org(ORG, "e-Government platform (lab)") is True
    assert gogs.ensure_org(ORG, "e-Government platform (lab)") is False

    assert gogs.ensure_repo(ORG, REPO, private=True, description="GitOps") is True
    assert gogs.ensure_repo(ORG, REPO, private=True, description="GitOps") is False
    with pytest.raises(GogsConflict, match="is private, wanted public"):
        gogs.ensure_repo(ORG, REPO, private=False, description="GitOps")
    assert (site.standin.base / "repositories" / ORG / f"{REPO}.git" / "HEAD").is_file()

    _, argocd = new_key(tmp_path, "argocd")
    _, other = new_key(tmp_path, "other")
    assert gogs.ensure_deploy_key(ORG, REPO, "argocd", argocd) is True
    assert gogs.ensure_deploy_key(ORG, REPO, "argocd", argocd) is False
    assert gogs.ensure_deploy_key(ORG, REPO, "argocd", other) is True  # same title: replaced
    assert gogs.ensure_deploy_key(ORG, REPO, "argocd", argocd) is True  # and back
    with gogs.client() as client:
        keys = client.call("GET", f"/repos/{ORG}/{REPO}/keys")
    assert [(key["title"], key["key"], key["read_only"]) for key in keys] == \
        [("argocd", argocd, True)]

    hook = "http://127.0.0.1:9/argocd/api/webhook"
    assert gogs.ensure_webhook(ORG, REPO, hook, HOOK_SECRET, ["push"]) is True
    assert gogs.ensure_webhook(ORG, REPO, hook, HOOK_SECRET, ["push"]) is False
    assert gogs.ensure_webhook(ORG, REPO, hook, HOOK_SECRET, ["push", "create"]) is True
    assert gogs.ensure_webhook(ORG, REPO, hook, HOOK_SECRET, ["create", "push"]) is False
    assert gogs.ensure_webhook(ORG, REPO, hook, HOOK_SECRET, ["push"], replace=True) is True
    with gogs.client() as client:
        hooks = client.call("GET", f"/repos/{ORG}/{REPO}/hooks")
    assert len(hooks) == 1
    assert hooks[0]["config"] == {"url": hook, "content_type": "json"}  # never the secret
    assert (hooks[0]["events"], hooks[0]["active"], hooks[0]["type"]) == (["push"], True,
                                                                          "gogs")
    with pytest.raises(ValueError, match="events must be among"):
        gogs.ensure_webhook(ORG, REPO, hook, HOOK_SECRET, ["pushes"])


# --- error bodies ------------------------------------------------------------------------


def test_errors_have_gogs_status_codes_and_bodies(site: Site, tmp_path: Path) -> None:
    site.gogs.ensure_org(ORG, "e-Government platform (lab)")
    site.gogs.ensure_repo(ORG, REPO, private=True, description="GitOps")
    admin = {"Authorization": f"token {site.token}"}
    with httpx.Client(base_url=site.api, headers=admin) as http:
        missing = http.get(f"/repos/{ORG}/nothing-here")
        assert (missing.status_code, missing.content) == (404, b"")
        assert http.get("/no/such/route").status_code == 404

        empty_name = http.post(f"/org/{ORG}/repos", json={"name": ""})
        assert empty_name.status_code == 422
        assert empty_name.json() == [{"fieldNames": ["Name"], "classification": "RequiredError",
                                      "message": "Required"}]
        bad_name = http.post(f"/org/{ORG}/repos", json={"name": "no spaces"})
        assert bad_name.json()[0]["classification"] == "AlphaDashDotError"
        taken = http.post(f"/org/{ORG}/repos", json={"name": REPO})
        assert taken.status_code == 422
        org_id = http.get(f"/orgs/{ORG}").json()["id"]
        assert taken.json() == {"message": f"repository already exists: map[name:{REPO} "
                                           f"ownerID:{org_id}]",
                                "url": "https://github.com/gogs/docs-api"}
        no_type = http.post(f"/org/{ORG}/repos", content=b'{"name":"x"}')
        assert no_type.status_code == 415
        assert no_type.json() == [{"classification": "ContentTypeError",
                                   "message": "Empty Content-Type"}]
        wrong_type = http.post(f"/org/{ORG}/repos", json={"name": "x", "private": "yes"})
        assert wrong_type.status_code == 400
        assert wrong_type.json()[0]["classification"] == "DeserializationError"
        bad_hook = http.post(f"/repos/{ORG}/{REPO}/hooks",
                             json={"type": "gogs", "config": {"url": "http://x/"}})
        assert bad_hook.json()["message"] == "Missing config option: content_type"

        _, key = new_key(tmp_path, "twice")
        first = http.post(f"/repos/{ORG}/{REPO}/keys", json={"title": "twice", "key": key})
        assert first.status_code == 201
        second = http.post(f"/repos/{ORG}/{REPO}/keys", json={"title": "twice", "key": key})
        assert second.status_code == 500  # Gogs wraps "already exists" into a server error
        assert "Something went wrong" in second.json()["message"]
        bad_key = http.post(f"/repos/{ORG}/{REPO}/keys", json={"title": "bad", "key": "ssh-x"})
        assert bad_key.status_code == 422
        assert bad_key.json()["message"].startswith("Invalid key content")
        assert http.delete(f"/repos/{ORG}/{REPO}/keys/{first.json()['id']}").status_code == 204

        again = http.post("/admin/users", json={"username": BOB, "email": "b2@example.org"})
        assert again.json()["message"] == f"user already exists: map[name:{BOB}]"
        used = http.post("/admin/users", json={"username": "carol", "email": "bob@example.org"})
        assert used.json()["message"] == "email has been used: map[email:bob@example.org]"

    bob_token = SecretStr(site.bob_token)
    bob = {"Authorization": f"token {site.bob_token}"}
    with httpx.Client(base_url=site.api, headers=bob) as http:
        forbidden = http.post("/admin/users", json={"username": "eve", "email": "e@x.org"})
        assert (forbidden.status_code, forbidden.content) == (403, b"")
        assert http.get(f"/repos/{ORG}/{REPO}").status_code == 404  # private: invisible
        not_owner = http.post(f"/org/{ORG}/repos", json={"name": "mine"})
        assert not_owner.json()["message"] == "Given user is not owner of organization."

    with pytest.raises(GogsError) as refused:
        GogsServer(url=site.standin.url, admin_user=BOB, token=bob_token).ensure_org(
            "bobs-org", "Bob")
    assert refused.value.status == 403
    assert refused.value.method == "POST"
    assert refused.value.url_path == "/api/v1/admin/users/bob/orgs"
    assert "HTTP 403" in str(refused.value)
    assert bob_token.get_secret_value() not in str(refused.value)

    closed = GogsServer(url=f"http://127.0.0.1:{free_port()}/", admin_user=ADMIN,
                        token=site.token)
    with pytest.raises(TransientGogsError) as down:
        closed.whoami()
    assert isinstance(down.value, ConnectionError)
    assert down.value.status == 0


def test_auto_init_makes_one_commit_on_the_default_branch(site: Site, tmp_path: Path) -> None:
    with httpx.Client(base_url=site.api,
                      headers={"Authorization": f"token {site.token}"}) as http:
        made = http.post("/user/repos", json={"name": "Notes", "description": "scratch",
                                              "auto_init": True})
    assert made.status_code == 201, made.text
    repo = made.json()
    assert (repo["full_name"], repo["private"], repo["empty"], repo["default_branch"]) == \
        (f"{ADMIN}/Notes", False, False, "main")
    assert repo["clone_url"] == f"{site.standin.url}{ADMIN}/Notes.git"
    assert repo["ssh_url"] == f"{RUN_USER}@127.0.0.1:{ADMIN}/Notes.git"
    bare = site.standin.base / "repositories" / ADMIN / "notes.git"  # lower-case, like Gogs
    env = git_env(tmp_path / "home")
    shown = git("--git-dir", str(bare), "show", "main:README.md", env=env)
    assert shown.stdout == "# Notes\n\nscratch"
    with httpx.Client() as http:  # public: anonymous reads
        assert http.get(f"{site.standin.url}{ADMIN}/notes.git/info/refs",
                        params={"service": "git-upload-pack"}).status_code == 200
    raw = HTTPConnection("127.0.0.1", int(site.standin.url.split(":")[2][:-1]))
    raw.request("GET", f"/{ADMIN}/notes.git/objects/../../config")  # sent as written
    answer = raw.getresponse()
    assert (answer.status, answer.read()) == (400, b"Request path contains suspicious "
                                                   b"characters")
    raw.close()


# --- git over HTTP and webhooks ----------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[Received]]]:
    got: list[Received] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append(Received(dict(self.headers.items()), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    finally:
        server.shutdown()
        server.server_close()


def test_push_then_clone_over_http_fires_the_webhook(site: Site, tmp_path: Path) -> None:
    site.gogs.ensure_org(ORG, "e-Government platform (lab)")
    site.gogs.ensure_repo(ORG, "apps", private=True)
    env = git_env(tmp_path / "home")
    authed = site.standin.url.replace("http://", f"http://{ADMIN}:{site.token}@") + \
        f"{ORG}/apps.git"
    anonymous = f"{site.standin.url}{ORG}/apps.git"

    with webhook_receiver() as (hook_url, got):
        assert site.gogs.ensure_webhook(ORG, "apps", hook_url, HOOK_SECRET, ["push"]) is True
        blocked = hook_url.replace("127.0.0.1", "localhost")  # not in the allowlist
        assert site.gogs.ensure_webhook(ORG, "apps", blocked, HOOK_SECRET, ["push"]) is True

        work = tmp_path / "work"
        cloned = git("clone", "-q", authed, str(work), env=env)
        assert cloned.returncode == 0, cloned.stderr  # an empty private repository
        (work / "apps.yaml").write_text("kind: List\n")
        git("add", "apps.yaml", env=env, cwd=work)
        git("commit", "-qm", "first application", env=env, cwd=work)
        pushed = git("push", "-q", "origin", "HEAD:main", env=env, cwd=work)
        assert pushed.returncode == 0, pushed.stderr

        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(got) == 1
    delivery = got[0]
    assert delivery.headers["X-Gogs-Event"] == "push"
    assert delivery.headers["X-Gogs-Signature"] == hmac.new(
        HOOK_SECRET.encode(), delivery.body, hashlib.sha256).hexdigest()
    payload = json.loads(delivery.body)
    assert payload["ref"] == "refs/heads/main"
    assert payload["repository"]["full_name"] == f"{ORG}/apps"
    assert payload["commits"][0]["added"] == ["apps.yaml"]
    assert HOOK_SECRET.encode() not in delivery.body
    assert "implicitly blocked" in site.standin.stderr()

    again = git("clone", "-q", authed.replace(f":{site.token}@", f":{ADMIN_PASSWORD}@"),
                str(tmp_path / "again"), env=env)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "apps.yaml").read_text() == "kind: List\n"

    refused = git("clone", "-q", anonymous, str(tmp_path / "anonymous"), env=env)
    assert refused.returncode != 0
    assert "could not read Username" in refused.stderr
    with httpx.Client() as http:
        refs = f"{anonymous}/info/refs"
        for auth in (None, (ADMIN, "wrong-password")):
            asked = http.get(refs, params={"service": "git-upload-pack"}, auth=auth)
            assert asked.status_code == 401
            assert asked.headers["WWW-Authenticate"] == 'Basic realm="."'
        stranger = http.get(refs, params={"service": "git-upload-pack"},
                            auth=(BOB, BOB_PASSWORD))
        assert (stranger.status_code, stranger.text) == (403, "User permission denied")
        bob_push = http.post(f"{anonymous}/git-receive-pack", auth=(BOB, site.bob_token))
        assert bob_push.status_code == 403  # a token in the password field works, the right not
    assert re.search(r'"POST /platform/apps\.git/git-receive-pack" 200', site.standin.stderr())


# --- SSH through the serv forced command -----------------------------------------------

SSHD = """#!/bin/sh
# Plays ssh + sshd: git runs `<this> <host> <command>`; sshd would run the key's forced
# command from authorized_keys through the shell, with SSH_ORIGINAL_COMMAND set.
for last; do :; done
SSH_ORIGINAL_COMMAND="$last" exec sh -c "$FORCED_COMMAND"
"""


def forced_command(authorized_keys: str, public_key: str) -> str:
    material = " ".join(public_key.split()[:2])
    for line in authorized_keys.splitlines():
        if material in line:
            found = re.match(r'^command="([^"]*)",', line)
            assert found, line
            return found.group(1)
    raise AssertionError(f"no authorized_keys line for {public_key}")


def test_deploy_key_clones_over_ssh_and_cannot_push(site: Site, tmp_path: Path) -> None:
    site.gogs.ensure_org(ORG, "e-Government platform (lab)")
    site.gogs.ensure_repo(ORG, REPO, private=True, description="GitOps")
    site.gogs.ensure_repo(ORG, "apps", private=True)
    _, argocd = new_key(tmp_path, "argocd-ssh")
    _, elsewhere = new_key(tmp_path, "apps-only")
    site.gogs.ensure_deploy_key(ORG, REPO, "argocd", argocd)
    site.gogs.ensure_deploy_key(ORG, "apps", "apps-only", elsewhere)
    # Something for the clone to fetch, pushed over HTTP with the token.
    env = git_env(tmp_path / "home")
    seed = tmp_path / "seed"
    authed = site.standin.url.replace("http://", f"http://{ADMIN}:{site.token}@")
    assert git("clone", "-q", f"{authed}{ORG}/{REPO}.git", str(seed), env=env).returncode == 0
    (seed / "README.md").write_text("# gitops\n")
    git("add", "README.md", env=env, cwd=seed)
    git("commit", "-qm", "readme", env=env, cwd=seed)
    assert git("push", "-q", "origin", "HEAD:main", env=env, cwd=seed).returncode == 0

    ssh_dir = site.standin.base / "ssh"
    authorized = ssh_dir / "authorized_keys"
    assert stat.S_IMODE(ssh_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(authorized.stat().st_mode) == 0o600
    assert authorized.stat().st_uid == os.geteuid()
    text = authorized.read_text()
    for line in text.splitlines():
        assert re.fullmatch(
            rf'command="{re.escape(str(STANDIN))} serv key-\d+ '
            rf"--config='{re.escape(str(site.standin.config))}'\",no-port-forwarding,"
            r"no-X11-forwarding,no-agent-forwarding,no-pty ssh-ed25519 \S+ \S+", line), line
    assert argocd in text and elsewhere in text

    wrapper = tmp_path / "sshd"
    wrapper.write_text(SSHD)
    wrapper.chmod(0o755)

    def ssh_env(public_key: str) -> dict[str, str]:
        return git_env(tmp_path / "home", GIT_SSH_COMMAND=str(wrapper), GIT_SSH_VARIANT="simple",
                       FORCED_COMMAND=forced_command(text, public_key))

    clone = tmp_path / "by-ssh"
    cloned = git("clone", "-q", f"git@gitops:{ORG}/{REPO}.git", str(clone), env=ssh_env(argocd))
    assert cloned.returncode == 0, cloned.stderr
    assert (clone / "README.md").read_text() == "# gitops\n"

    (clone / "more.txt").write_text("no\n")
    git("add", "more.txt", env=env, cwd=clone)
    git("commit", "-qm", "try", env=env, cwd=clone)
    pushed = git("push", "-q", "origin", "HEAD:main", env=ssh_env(argocd), cwd=clone)
    assert pushed.returncode != 0
    assert "Gogs: Key permission denied" in pushed.stderr

    other = git("clone", "-q", f"git@gitops:{ORG}/{REPO}.git", str(tmp_path / "other"),
                env=ssh_env(elsewhere))
    assert other.returncode != 0
    assert "Gogs: Key access denied" in other.stderr

    # A removed deploy key leaves authorized_keys.
    with site.gogs.client() as client:
        for key in client.call("GET", f"/repos/{ORG}/apps/keys"):
            client.call("DELETE", f"/repos/{ORG}/apps/keys/{key['id']}", expect=(204,))
    assert elsewhere not in authorized.read_text()
    assert argocd in authorized.read_text()


# --- TLS ---------------------------------------------------------------------------------


def test_https_with_the_ca_given_to_the_block(tmp_path: Path) -> None:
    with running_standin(tmp_path / "tls-site", protocol="https") as standin:
        ca = (standin.base / "tls" / "lab-ca.pem").read_text()
        made = run_cli(standin.config, "admin", "create-user", "--name", ADMIN, "--password",
                       ADMIN_PASSWORD, "--email", "admin@example.org", "--admin")
        assert made.returncode == 0, made.stderr
        token = GogsServer.create_token(standin.url, ADMIN, ADMIN_PASSWORD, "tls",
                                        ca_bundle=ca)
        assert GogsServer(url=standin.url, admin_user=ADMIN, token=token,
                          ca_bundle=ca).whoami() == ADMIN
        with pytest.raises(GogsError) as untrusted:
            GogsServer(url=standin.url, admin_user=ADMIN, token=token).whoami()
        assert "not trusted" in str(untrusted.value)
        assert not isinstance(untrusted.value, TransientGogsError)
        assert token.get_secret_value() not in standin.stderr()


# --- last: nothing secret was ever logged ------------------------------------------------


def test_the_log_has_one_line_per_request_and_no_secret(site: Site) -> None:
    log = site.standin.stderr()
    assert re.search(r'127\.0\.0\.1 "GET /api/v1/user" 200 [0-9.]+ms', log)
    basic = base64.b64encode(f"{ADMIN}:{ADMIN_PASSWORD}".encode()).decode()
    for secret in [*site.secrets, basic]:
        assert secret not in log
