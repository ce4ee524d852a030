#!/usr/bin/python3
"""A stand-in for the Gogs 0.13 binary (simulated): the parts of Gogs the platform uses.

No Gogs binary can be had on the lab machine, so the lab's artifact mirror serves this
file as `gogs/<version>/gogs`; the GITOPS VM installs and runs it exactly as it would run
Gogs: `gogs web --config /etc/gogs/app.ini` under a systemd unit, as the app.ini's
RUN_USER. It needs only Debian's python3 and git.

What it does like Gogs 0.13 (facts taken from Gogs' sources):

- CLI: `web`, `admin create-user`, `serv key-<id>` (the SSH forced command), each with
  `--config/-c`; the same refusal when the current user is not RUN_USER.
- app.ini: the 0.13 keys ([server] EXTERNAL_URL, [auth] DISABLE_REGISTRATION,
  [database] TYPE); the keys 0.13 no longer reads (ROOT_URL, [service], DB_TYPE) are
  refused by name instead of being silently ignored as Gogs would.
- /api/v1: users, access tokens (stored as SHA256 like 0.13, so listing shows no sha1),
  organisations, repositories, deploy keys (always read-only), webhooks; the same guards
  (token-only routes answer 401 to a password, admin routes 403, invisible repos 404),
  the same binding errors (422 `[{"fieldNames":[...],"classification":...}]`, 415, 400)
  and the same `{"message": ..., "url": ...}` error bodies, including Gogs' 500 for a
  deploy key added twice.
- git smart HTTP (through `git http-backend`), with Basic auth by password or token.
- SSH through the system OpenSSH: authorized_keys lines with
  `command="<this file> serv key-<id> --config='<app.ini>'"`, deploy keys read-only.
- Webhooks fired after a push over HTTP (push/create/delete events, X-Gogs-Signature),
  with 0.13's block of local network addresses unless [security] LOCAL_NETWORK_ALLOWLIST
  names the host.

Not simulated: the web UI, teams, collaborators, issues, user SSH keys, mirrors, LFS.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import configparser
import contextlib
import hashlib
import hmac
import io
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any, NoReturn, cast

VERSION = "0.13.3 (lab stand-in, simulated)"
DOC_URL = "https://github.com/gogs/docs-api"
SERVER_ERROR = "Something went wrong, please check the server logs for more information."
ACCESS_DENIED = "Repository does not exist or you do not have access"
ZERO_SHA = "0" * 40

# Access modes, as Gogs orders them.
NONE, READ, WRITE, ADMIN, OWNER = 0, 1, 2, 3, 4
USER_TYPE, ORG_TYPE = 0, 1
KEY_TYPE_USER, KEY_TYPE_DEPLOY = 1, 2

RESERVED_USERNAMES = frozenset({
    "-", "explore", "create", "assets", "css", "img", "js", "less", "plugins", "debug",
    "raw", "install", "api", "avatar", "user", "org", "help", "stars", "issues", "pulls",
    "commits", "repo", "template", "admin", "new", ".", ".."})
RESERVED_USERNAME_PATTERNS = ("*.keys",)
RESERVED_REPO_NAMES = frozenset({".", ".."})
RESERVED_REPO_PATTERNS = ("*.git", "*.wiki")
HOOK_TYPES = ("gogs", "slack", "discord", "dingtalk")
HOOK_CONTENT_TYPES = ("json", "form")
HOOK_EVENTS = ("create", "delete", "fork", "push", "issues", "issue_comment",
               "pull_request", "release")
GIT_SERVICES = {"git-upload-pack": READ, "git-upload-archive": READ, "git-receive-pack": WRITE}

_LOG_LOCK = threading.Lock()
_LOG_FILE: IO[str] | None = None


def log(level: str, message: str) -> None:
    """One line to stderr (and to [log] ROOT_PATH/gogs.log when [log] MODE has `file`)."""
    line = f"{time.strftime('%Y/%m/%d %H:%M:%S')} [{level:>5}] {message}\n"
    with _LOG_LOCK:
        sys.stderr.write(line)
        sys.stderr.flush()
        if _LOG_FILE is not None:
            _LOG_FILE.write(line)
            _LOG_FILE.flush()


def go_args(**values: object) -> str:
    """Go's `%v` of a map (errutil.Args): keys sorted, `map[k:v k2:v2]`."""
    return "map[" + " ".join(f"{key}:{values[key]}" for key in sorted(values)) + "]"


def go_time(unix: int) -> str:
    """Go's JSON form of a local time.Time (RFC 3339, `Z` for UTC)."""
    text = datetime.fromtimestamp(unix).astimezone().isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


# ---------------------------------------------------------------------------------------
# app.ini
# ---------------------------------------------------------------------------------------


class ConfigError(Exception):
    """app.ini is missing, unreadable, or misses what this stand-in needs."""


@dataclass(frozen=True)
class Config:
    path: str
    app_path: str
    run_user: str
    prod_mode: bool
    protocol: str
    domain: str
    external_url: str
    http_addr: str
    http_port: int
    cert_file: str
    key_file: str
    ssh_domain: str
    ssh_port: int
    ssh_root_path: str
    disable_ssh: bool
    repo_root: str
    default_branch: str
    force_private: bool
    db_path: str
    secret_key: str
    disable_registration: bool
    require_signin_view: bool
    local_network_allowlist: tuple[str, ...]
    webhook_timeout: int
    webhook_skip_tls_verify: bool
    log_root: str
    log_to_file: bool


_INTERPOLATION = re.compile(r"%\(([A-Za-z0-9_]+)\)s")
_TRUE = {"1", "t", "true", "y", "yes", "on"}
_FALSE = {"0", "f", "false", "n", "no", "off"}


class _Ini:
    """app.ini the way Gogs' go-ini reads it: keys before any section are in DEFAULT, no
    inline comments (`#` and `;` stay in values), values may be quoted with ", ' or `,
    `%(KEY)s` refers to a key of the same section or of DEFAULT."""

    def __init__(self, path: str) -> None:
        self.path = path
        parser = configparser.ConfigParser(
            interpolation=None, strict=False, default_section="\x00no-default",
            delimiters=("=",), comment_prefixes=("#", ";"), inline_comment_prefixes=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_string("[DEFAULT]\n" + handle.read(), source=path)
        except OSError as error:
            raise ConfigError(f"cannot read {path}: {error.strerror}") from None
        except configparser.Error as error:
            raise ConfigError(f"{path} is not a valid ini file: {error}") from None
        self.sections = {name: dict(parser.items(name)) for name in parser.sections()}

    def has_section(self, section: str) -> bool:
        return section in self.sections

    def raw(self, section: str, key: str) -> str | None:
        value = self.sections.get(section, {}).get(key)
        if value is None:
            return None
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'`":
            value = value[1:-1]
        return value

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        value = self.raw(section, key)
        if value is None:
            return default
        for _ in range(8):
            expanded = _INTERPOLATION.sub(lambda m: self._lookup(section, m.group(1)), value)
            if expanded == value:
                break
            value = expanded
        return value

    def _lookup(self, section: str, key: str) -> str:
        found = self.raw(section, key)
        if found is None:
            found = self.raw("DEFAULT", key)
        return found if found is not None else f"%({key})s"

    def boolean(self, section: str, key: str, default: bool) -> bool:
        value = self.get(section, key)
        if value is None or value == "":
            return default
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ConfigError(f"{self.path}: [{section}] {key} = {value!r} is not a boolean")

    def integer(self, section: str, key: str, default: int) -> int:
        value = self.get(section, key)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{self.path}: [{section}] {key} = {value!r} is not a number"
                              ) from None


def _app_path() -> str:
    return os.path.abspath(sys.argv[0])


def _work_dir() -> str:
    return os.environ.get("GOGS_WORK_DIR") or os.path.dirname(_app_path())


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def load_config(path: str | None, *, check_run_user: bool = True) -> Config:
    """Read and check app.ini; every refusal names the file, the section and the key."""
    if not path:
        raise ConfigError("no configuration file given: use --config /etc/gogs/app.ini")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"configuration file {path} does not exist")
    ini = _Ini(path)
    work_dir = _work_dir()

    def absolute(value: str) -> str:
        return os.path.normpath(value if os.path.isabs(value) else os.path.join(work_dir, value))

    def required(section: str, key: str) -> str:
        value = ini.get(section, key)
        if not value:
            where = "at the top (before any section)" if section == "DEFAULT" else f"[{section}]"
            raise ConfigError(f"{path}: {key} is required {where}")
        return value

    # Keys Gogs 0.13 no longer reads: refused here, silently ignored by the real binary.
    if ini.raw("server", "ROOT_URL") is not None and ini.raw("server", "EXTERNAL_URL") is None:
        raise ConfigError(f"{path}: [server] ROOT_URL is no longer read by Gogs 0.13; "
                          "use [server] EXTERNAL_URL")
    if ini.has_section("service"):
        raise ConfigError(f"{path}: section [service] is no longer read by Gogs 0.13; "
                          "move DISABLE_REGISTRATION and REQUIRE_SIGNIN_VIEW to [auth]")
    if ini.raw("database", "DB_TYPE") is not None and ini.raw("database", "TYPE") is None:
        raise ConfigError(f"{path}: [database] DB_TYPE is no longer read by Gogs 0.13; "
                          "use [database] TYPE")

    if not ini.boolean("security", "INSTALL_LOCK", False):
        raise ConfigError(f"{path}: [security] INSTALL_LOCK must be true: this stand-in has "
                          "no install page (Gogs would redirect every request to /install)")
    secret_key = required("security", "SECRET_KEY")
    run_user = required("DEFAULT", "RUN_USER")
    if check_run_user and run_user != _current_user():
        raise ConfigError(f'user configured to run Gogs is "{run_user}", but the current '
                          f'user is "{_current_user()}"')

    protocol = (ini.get("server", "PROTOCOL", "http") or "http").lower()
    if protocol not in ("http", "https"):
        raise ConfigError(f"{path}: [server] PROTOCOL = {protocol!r}: this stand-in serves "
                          "http or https only")
    cert_file = key_file = ""
    if protocol == "https":
        cert_file = absolute(required("server", "CERT_FILE"))
        key_file = absolute(required("server", "KEY_FILE"))
        for key, file in (("CERT_FILE", cert_file), ("KEY_FILE", key_file)):
            if not os.path.isfile(file):
                raise ConfigError(f"{path}: [server] {key} = {file} does not exist")
    domain = ini.get("server", "DOMAIN", "localhost") or "localhost"
    http_port = ini.integer("server", "HTTP_PORT", 3000)
    if not 0 < http_port < 65536:
        raise ConfigError(f"{path}: [server] HTTP_PORT = {http_port} is not a TCP port")
    external_url = required("server", "EXTERNAL_URL")
    if not external_url.endswith("/"):
        external_url += "/"
    if ini.boolean("server", "START_SSH_SERVER", False):
        raise ConfigError(f"{path}: [server] START_SSH_SERVER must be false: this stand-in "
                          "uses the system's OpenSSH through authorized_keys")
    home = pwd.getpwuid(os.geteuid()).pw_dir if run_user == _current_user() else \
        _home_of(run_user)

    db_type = (ini.get("database", "TYPE") or "").lower()
    if db_type != "sqlite3":
        raise ConfigError(f"{path}: [database] TYPE must be sqlite3 (got {db_type or 'nothing'})")
    log_mode = (ini.get("log", "MODE", "console") or "console").lower()

    return Config(
        path=path,
        app_path=_app_path(),
        run_user=run_user,
        prod_mode=(ini.get("DEFAULT", "RUN_MODE", "dev") or "dev") == "prod",
        protocol=protocol,
        domain=domain,
        external_url=external_url,
        http_addr=ini.get("server", "HTTP_ADDR", "0.0.0.0") or "0.0.0.0",
        http_port=http_port,
        cert_file=cert_file,
        key_file=key_file,
        ssh_domain=ini.get("server", "SSH_DOMAIN", domain) or domain,
        ssh_port=ini.integer("server", "SSH_PORT", 22),
        ssh_root_path=absolute(ini.get("server", "SSH_ROOT_PATH") or
                               os.path.join(home, ".ssh")),
        disable_ssh=ini.boolean("server", "DISABLE_SSH", False),
        repo_root=absolute(required("repository", "ROOT")),
        default_branch=ini.get("repository", "DEFAULT_BRANCH", "main") or "main",
        force_private=ini.boolean("repository", "FORCE_PRIVATE", False),
        db_path=absolute(required("database", "PATH")),
        secret_key=secret_key,
        disable_registration=ini.boolean("auth", "DISABLE_REGISTRATION", False),
        require_signin_view=ini.boolean("auth", "REQUIRE_SIGNIN_VIEW", False),
        local_network_allowlist=tuple(
            item.strip() for item in (ini.get("security", "LOCAL_NETWORK_ALLOWLIST") or
                                      "").split(",") if item.strip()),
        webhook_timeout=ini.integer("webhook", "DELIVER_TIMEOUT", 15),
        webhook_skip_tls_verify=ini.boolean("webhook", "SKIP_TLS_VERIFY", False),
        log_root=absolute(ini.get("log", "ROOT_PATH") or os.path.join(work_dir, "log")),
        log_to_file="file" in [mode.strip() for mode in log_mode.split(",")],
    )


def _home_of(user: str) -> str:
    try:
        return pwd.getpwnam(user).pw_dir
    except KeyError:
        return os.path.expanduser("~")


# ---------------------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT, lower_name TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL, full_name TEXT NOT NULL DEFAULT '', email TEXT NOT NULL DEFAULT '',
    passwd TEXT NOT NULL DEFAULT '', salt TEXT NOT NULL DEFAULT '',
    type INTEGER NOT NULL DEFAULT 0, is_admin INTEGER NOT NULL DEFAULT 0,
    is_active INTEGER NOT NULL DEFAULT 1, description TEXT NOT NULL DEFAULT '',
    website TEXT NOT NULL DEFAULT '', location TEXT NOT NULL DEFAULT '',
    created_unix INTEGER NOT NULL, updated_unix INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS org_user (
    id INTEGER PRIMARY KEY AUTOINCREMENT, org_id INTEGER NOT NULL, uid INTEGER NOT NULL,
    is_owner INTEGER NOT NULL DEFAULT 0, UNIQUE (org_id, uid));
CREATE TABLE IF NOT EXISTS access_token (
    id INTEGER PRIMARY KEY AUTOINCREMENT, uid INTEGER NOT NULL, name TEXT NOT NULL,
    sha256 TEXT NOT NULL UNIQUE, created_unix INTEGER NOT NULL,
    updated_unix INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS repository (
    id INTEGER PRIMARY KEY AUTOINCREMENT, owner_id INTEGER NOT NULL,
    lower_name TEXT NOT NULL, name TEXT NOT NULL, description TEXT NOT NULL DEFAULT '',
    is_private INTEGER NOT NULL DEFAULT 0, default_branch TEXT NOT NULL,
    created_unix INTEGER NOT NULL, updated_unix INTEGER NOT NULL,
    UNIQUE (owner_id, lower_name));
CREATE TABLE IF NOT EXISTS public_key (
    id INTEGER PRIMARY KEY AUTOINCREMENT, owner_id INTEGER NOT NULL DEFAULT 0,
    name TEXT NOT NULL, fingerprint TEXT NOT NULL, content TEXT NOT NULL,
    mode INTEGER NOT NULL DEFAULT 2, type INTEGER NOT NULL DEFAULT 1,
    created_unix INTEGER NOT NULL, updated_unix INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS deploy_key (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key_id INTEGER NOT NULL, repo_id INTEGER NOT NULL,
    name TEXT NOT NULL, fingerprint TEXT NOT NULL, created_unix INTEGER NOT NULL,
    updated_unix INTEGER NOT NULL DEFAULT 0, UNIQUE (key_id, repo_id));
CREATE TABLE IF NOT EXISTS webhook (
    id INTEGER PRIMARY KEY AUTOINCREMENT, repo_id INTEGER NOT NULL, url TEXT NOT NULL,
    content_type TEXT NOT NULL, secret TEXT NOT NULL DEFAULT '', events TEXT NOT NULL,
    is_active INTEGER NOT NULL DEFAULT 0, hook_task_type TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '', created_unix INTEGER NOT NULL,
    updated_unix INTEGER NOT NULL);
"""

Row = sqlite3.Row


class Store:
    """The sqlite3 database at [database] PATH (mode 600: it holds password hashes and
    webhook secrets). One connection, guarded by a lock, shared by the server's threads."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.lock = threading.RLock()
        self.db = sqlite3.connect(path, timeout=30, check_same_thread=False,
                                  isolation_level=None)
        self.db.row_factory = sqlite3.Row
        with self.lock:
            self.db.executescript(SCHEMA)

    def all(self, sql: str, *args: object) -> list[Row]:
        with self.lock:
            return list(self.db.execute(sql, args).fetchall())

    def one(self, sql: str, *args: object) -> Row | None:
        with self.lock:
            row: Row | None = self.db.execute(sql, args).fetchone()
            return row

    def run(self, sql: str, *args: object) -> int:
        with self.lock:
            cursor = self.db.execute(sql, args)
            return int(cursor.lastrowid or 0)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    # --- users -----------------------------------------------------------------------

    def user_by_name(self, name: str) -> Row | None:
        return self.one("SELECT * FROM users WHERE lower_name = ?", name.lower())

    def user_by_id(self, uid: int) -> Row | None:
        return self.one("SELECT * FROM users WHERE id = ?", uid)

    def is_org_owner(self, org_id: int, uid: int) -> bool:
        row = self.one("SELECT is_owner FROM org_user WHERE org_id = ? AND uid = ?", org_id, uid)
        return bool(row and row["is_owner"])

    def is_org_member(self, org_id: int, uid: int) -> bool:
        return self.one("SELECT 1 FROM org_user WHERE org_id = ? AND uid = ?",
                        org_id, uid) is not None

    def repo_by_name(self, owner_id: int, name: str) -> Row | None:
        return self.one("SELECT * FROM repository WHERE owner_id = ? AND lower_name = ?",
                        owner_id, name.lower())

    def repo_by_id(self, repo_id: int) -> Row | None:
        return self.one("SELECT * FROM repository WHERE id = ?", repo_id)


class GogsFault(Exception):
    """An error Gogs reports to API callers with 422 (name taken, not allowed...)."""


def now() -> int:
    return int(time.time())


def hash_password(password: str, salt: str) -> str:
    """Gogs' password hash: PBKDF2-SHA256, 10000 rounds, 50 bytes, hex."""
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), 10000, 50).hex()


def random_string(length: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def check_name_allowed(name: str, names: frozenset[str], patterns: tuple[str, ...]) -> None:
    lowered = name.strip().lower()
    if not lowered:
        raise GogsFault("name is not allowed: " + go_args(reason="empty name"))
    if lowered in names:
        raise GogsFault("name is not allowed: " + go_args(reason="reserved", name=lowered))
    for pattern in patterns:
        if (pattern.startswith("*") and lowered.endswith(pattern[1:])) or \
                (pattern.endswith("*") and lowered.startswith(pattern[:-1])):
            raise GogsFault("name is not allowed: " + go_args(reason="reserved", pattern=pattern))


def create_user(store: Store, name: str, email: str, password: str, *, admin: bool = False,
                full_name: str = "") -> Row:
    """Gogs' Users.Create: name allowed, name free, e-mail free; activated."""
    check_name_allowed(name, RESERVED_USERNAMES, RESERVED_USERNAME_PATTERNS)
    with store.transaction():
        if store.user_by_name(name) is not None:
            raise GogsFault("user already exists: " + go_args(name=name))
        if email and store.one("SELECT 1 FROM users WHERE lower(email) = ?",
                               email.lower()) is not None:
            raise GogsFault("email has been used: " + go_args(email=email))
        salt = random_string(10)
        stamp = now()
        uid = store.run(
            "INSERT INTO users (lower_name, name, full_name, email, passwd, salt, type, "
            "is_admin, is_active, created_unix, updated_unix) VALUES (?,?,?,?,?,?,?,?,1,?,?)",
            name.lower(), name, full_name, email, hash_password(password, salt), salt,
            USER_TYPE, int(admin), stamp, stamp)
    user = store.user_by_id(uid)
    assert user is not None
    return user


def authenticate(store: Store, login: str, password: str) -> Row | None:
    """User by name (or e-mail when it has an @) and password; organisations cannot log in."""
    if "@" in login:
        user = store.one("SELECT * FROM users WHERE lower(email) = ? AND type = ?",
                         login.lower(), USER_TYPE)
    else:
        user = store.user_by_name(login)
    if user is None or user["type"] != USER_TYPE or not user["is_active"]:
        return None
    if not hmac.compare_digest(hash_password(password, user["salt"]), user["passwd"]):
        return None
    return user


def user_by_token(store: Store, token: str) -> Row | None:
    if not token:
        return None
    digest = hashlib.sha256(token.encode()).hexdigest()
    row = store.one("SELECT * FROM access_token WHERE sha256 = ?", digest)
    if row is None:
        return None
    store.run("UPDATE access_token SET updated_unix = ? WHERE id = ?", now(), row["id"])
    return store.user_by_id(row["uid"])


def access_mode(store: Store, uid: int, repo: Row) -> int:
    """Gogs' Perms.AccessMode without teams: owner, organisation owner, else public read."""
    mode = NONE if repo["is_private"] else READ
    if uid <= 0:
        return mode
    if uid == repo["owner_id"]:
        return OWNER
    owner = store.user_by_id(repo["owner_id"])
    if owner is not None and owner["type"] == ORG_TYPE and store.is_org_owner(owner["id"], uid):
        return OWNER
    return mode


# ---------------------------------------------------------------------------------------
# Git and SSH keys
# ---------------------------------------------------------------------------------------


def repo_path(cfg: Config, owner_name: str, repo_name: str) -> str:
    return os.path.join(cfg.repo_root, owner_name.lower(), repo_name.lower() + ".git")


def git(*args: str, cwd: str | None = None, env: dict[str, str] | None = None,
        stdin: bytes | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env=env, input=stdin, capture_output=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args[:2])} failed: "
                           f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode(errors="replace")


def repo_is_empty(path: str) -> bool:
    try:
        return not git("for-each-ref", "--count=1", "refs/heads", cwd=path).strip()
    except (RuntimeError, OSError):
        return True


def init_repository(cfg: Config, path: str, branch: str, *, readme: str | None,
                    author: tuple[str, str]) -> None:
    """`git init --bare` at ROOT/<owner>/<repo>.git; with auto_init, one commit (README.md)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    git("init", "--bare", "--quiet", f"--initial-branch={branch}", path)
    if readme is None:
        return
    env = {**os.environ, "GIT_DIR": path,
           "GIT_AUTHOR_NAME": author[0], "GIT_AUTHOR_EMAIL": author[1],
           "GIT_COMMITTER_NAME": author[0], "GIT_COMMITTER_EMAIL": author[1]}
    blob = git("hash-object", "-w", "--stdin", env=env, stdin=readme.encode()).strip()
    tree = git("mktree", env=env, stdin=f"100644 blob {blob}\tREADME.md\n".encode()).strip()
    commit = git("commit-tree", tree, "-m", "Initial commit", env=env).strip()
    git("update-ref", f"refs/heads/{branch}", commit, env=env)


def parse_key_string(content: str) -> str:
    """Gogs' parseKeyString: one OpenSSH line (or an SSH2 block) to `type base64 comment`."""
    content = content.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    lines = content.split("\n")
    key_type = key_content = comment = ""
    if len(lines) == 1:
        parts = lines[0].split(" ", 2)
        if len(parts) == 1:
            key_content = parts[0]
        elif len(parts) == 2:
            key_type, key_content = parts
        else:
            key_type, key_content, comment = parts
        found = _type_in_blob(key_content)
        if not key_type:
            key_type = found
        elif key_type != found:
            raise ValueError(f"key type and content does not match: {key_type} - {found}")
    else:
        continuation = False
        for line in lines:
            if continuation or any(char in line for char in ":-"):
                continuation = line.endswith("\\")
            else:
                key_content += line
        key_type = _type_in_blob(key_content)
    return f"{key_type} {key_content} {comment}".strip()


def _type_in_blob(blob: str) -> str:
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"extractTypeFromBase64Key: invalid key format: {error}") from None
    if len(raw) < 4:
        raise ValueError("extractTypeFromBase64Key: invalid key format: <nil>")
    length = struct.unpack(">I", raw[:4])[0]
    if len(raw) < 4 + length:
        raise ValueError(f"extractTypeFromBase64Key: invalid key format: not enough length "
                         f"{length}")
    return raw[4:4 + length].decode(errors="replace")


def fingerprint(content: str) -> str:
    """`ssh-keygen -lf`'s SHA256 fingerprint of a public key line."""
    raw = base64.b64decode(content.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


_AUTHORIZED_KEYS_LOCK = threading.Lock()


def rewrite_authorized_keys(cfg: Config, store: Store) -> None:
    """Gogs' RewriteAuthorizedKeys: every key of the database, one forced-command line each;
    the file is replaced whole (mode 600, directory 700, owned by RUN_USER)."""
    with _AUTHORIZED_KEYS_LOCK:
        os.makedirs(cfg.ssh_root_path, mode=0o700, exist_ok=True)
        os.chmod(cfg.ssh_root_path, 0o700)
        target = os.path.join(cfg.ssh_root_path, "authorized_keys")
        temporary = target + ".tmp"
        fd = os.open(temporary, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            for key in store.all("SELECT id, content FROM public_key ORDER BY id"):
                handle.write(f'command="{cfg.app_path} serv key-{key["id"]} '
                             f"--config='{cfg.path}'\",no-port-forwarding,no-X11-forwarding,"
                             f"no-agent-forwarding,no-pty {key['content']}\n")
        os.chmod(temporary, 0o600)
        if os.geteuid() == 0 and cfg.run_user != "root":
            with contextlib.suppress(KeyError):
                account = pwd.getpwnam(cfg.run_user)
                os.chown(cfg.ssh_root_path, account.pw_uid, account.pw_gid)
                os.chown(temporary, account.pw_uid, account.pw_gid)
        os.replace(temporary, target)


# ---------------------------------------------------------------------------------------
# API bodies and errors
# ---------------------------------------------------------------------------------------


class Reply(Exception):
    """Ends a request: a status with a JSON body, or with no body at all."""

    def __init__(self, status: int, body: Any = None, *, text: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.text = text
        self.headers = headers or {}


def error_status(status: int, message: str) -> Reply:
    """APIContext.ErrorStatus."""
    return Reply(status, {"message": message, "url": DOC_URL})


def server_error(context: str, error: BaseException) -> Reply:
    """APIContext.Error: the cause goes to the log, the caller gets Gogs' generic 500."""
    log("ERROR", f"{context}: {error}")
    return error_status(500, SERVER_ERROR)


@dataclass(frozen=True)
class Field:
    json: str
    go: str
    kind: str  # str, bool, int, map, list, ptrbool
    rules: str = ""


@dataclass(frozen=True)
class Form:
    go_type: str
    fields: tuple[Field, ...]


CREATE_USER = Form("api.CreateUserOption", (
    Field("source_id", "SourceID", "int"), Field("login_name", "LoginName", "str"),
    Field("username", "Username", "str", "Required;AlphaDashDot;MaxSize(35)"),
    Field("full_name", "FullName", "str", "MaxSize(100)"),
    Field("email", "Email", "str", "Required;Email;MaxSize(254)"),
    Field("password", "Password", "str", "MaxSize(255)"),
    Field("send_notify", "SendNotify", "bool")))
CREATE_TOKEN = Form("api.CreateAccessTokenOption", (Field("name", "Name", "str", "Required"),))
CREATE_ORG = Form("api.CreateOrgOption", (
    Field("username", "UserName", "str", "Required"), Field("full_name", "FullName", "str"),
    Field("description", "Description", "str"), Field("website", "Website", "str"),
    Field("location", "Location", "str")))
EDIT_ORG = Form("api.EditOrgOption", (
    Field("full_name", "FullName", "str", "MaxSize(100)"),
    Field("description", "Description", "str", "MaxSize(255)"),
    Field("website", "Website", "str", "MaxSize(100)"),
    Field("location", "Location", "str", "MaxSize(50)")))
CREATE_REPO = Form("api.CreateRepoOption", (
    Field("name", "Name", "str", "Required;AlphaDashDot;MaxSize(100)"),
    Field("description", "Description", "str", "MaxSize(255)"),
    Field("private", "Private", "bool"), Field("unlisted", "Unlisted", "bool"),
    Field("auto_init", "AutoInit", "bool"), Field("gitignores", "Gitignores", "str"),
    Field("license", "License", "str"), Field("readme", "Readme", "str")))
CREATE_KEY = Form("api.CreateKeyOption", (
    Field("title", "Title", "str", "Required"), Field("key", "Key", "str", "Required")))
CREATE_HOOK = Form("api.CreateHookOption", (
    Field("type", "Type", "str", "Required"), Field("config", "Config", "map", "Required"),
    Field("events", "Events", "list"), Field("active", "Active", "bool")))
EDIT_HOOK = Form("api.EditHookOption", (
    Field("config", "Config", "map"), Field("events", "Events", "list"),
    Field("active", "Active", "ptrbool")))

_ZERO: dict[str, Any] = {"str": "", "bool": False, "int": 0, "map": None, "list": None,
                         "ptrbool": None}
_GO_TYPE = {"str": "string", "bool": "bool", "int": "int64", "map": "map[string]string",
            "list": "[]string", "ptrbool": "bool"}
_ALPHA_DASH_DOT = re.compile(r"[^0-9A-Za-z_\-.]")
_EMAIL = re.compile(r"[\w!#$%&'*+/=?^_`{|}~-]+(?:\.[\w!#$%&'*+/=?^_`{|}~-]+)*@"
                    r"(?:[\w](?:[\w-]*[\w])?\.)+[a-zA-Z0-9](?:[\w-]*[\w])?", re.ASCII)


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z][a-z])|(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _binding_error(status: int, classification: str, message: str,
                   fields: list[str] | None = None) -> Reply:
    item: dict[str, Any] = {}
    if fields:
        item["fieldNames"] = fields
    item["classification"] = classification
    item["message"] = message
    return Reply(status, [item])


def bind(method: str, content_type: str, body: bytes, form: Form) -> dict[str, Any]:
    """go-macaron/binding's Bind: decode by Content-Type, then the fields' rules; errors
    answer 400 (decoding), 415 (content type) or 422 (rules) with binding's JSON list."""
    values = {f.json: _ZERO[f.kind] for f in form.fields}
    if method in ("POST", "PUT") or content_type:
        if "form-urlencoded" in content_type:
            query = urllib.parse.parse_qs(body.decode(errors="replace"))
            for f in form.fields:
                given = query.get(_snake(f.go))
                if not given or f.kind in ("map", "list"):
                    continue
                if f.kind == "str":
                    values[f.json] = given[0]
                elif f.kind in ("bool", "ptrbool"):
                    values[f.json] = given[0].lower() in ("on", *_TRUE)
                elif f.kind == "int":
                    try:
                        values[f.json] = int(given[0] or "0")
                    except ValueError:
                        raise _binding_error(422, "IntegerTypeError",
                                             "Value could not be parsed as integer",
                                             [_snake(f.go)]) from None
        elif "json" in content_type:
            values = _decode_json(body, form, values)
        elif "multipart/form-data" not in content_type:
            raise _binding_error(415, "ContentTypeError",
                                 "Empty Content-Type" if not content_type
                                 else "Unsupported Content-Type")
    problems: list[dict[str, Any]] = []
    for f in form.fields:
        problem = _check_rules(f, values[f.json])
        if problem:
            problems.append({"fieldNames": [f.go], "classification": problem[0],
                             "message": problem[1]})
    if problems:
        raise Reply(422, problems)
    return values


def _decode_json(body: bytes, form: Form, values: dict[str, Any]) -> dict[str, Any]:
    if not body.strip():
        return values  # io.EOF: an empty body binds the zero values
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise _binding_error(400, "DeserializationError",
                             f"invalid character in JSON: {error}") from None
    if not isinstance(data, dict):
        raise _binding_error(400, "DeserializationError",
                             f"json: cannot unmarshal {_json_kind(data)} into Go value of "
                             f"type {form.go_type}")
    by_name = {f.json.lower(): f for f in form.fields}
    for key, value in data.items():
        f = by_name.get(key.lower())
        if f is None or value is None:
            continue
        expected = {"str": "string", "bool": "bool", "ptrbool": "bool", "int": "number",
                    "map": "object", "list": "array"}[f.kind]
        ok = _json_kind(value) == expected
        if ok and f.kind == "int":
            ok = isinstance(value, int) or float(value).is_integer()
        if ok and f.kind == "map":
            ok = all(isinstance(item, str) for item in value.values())
        if ok and f.kind == "list":
            ok = all(isinstance(item, str) for item in value)
        if not ok:
            raise _binding_error(
                400, "DeserializationError",
                f"json: cannot unmarshal {_json_kind(value)} into Go struct field "
                f"{form.go_type.split('.')[-1]}.{f.json} of type {_GO_TYPE[f.kind]}")
        values[f.json] = int(value) if f.kind == "int" else value
    return values


def _check_rules(f: Field, value: Any) -> tuple[str, str] | None:
    for rule in filter(None, f.rules.split(";")):
        if rule == "Required":
            empty = (not value) if f.kind == "list" else value in ("", False, 0, None)
            if empty:
                return "RequiredError", "Required"
        elif rule == "AlphaDashDot":
            if _ALPHA_DASH_DOT.search(str(value)):
                return "AlphaDashDotError", "AlphaDashDot"
        elif rule.startswith("MaxSize("):
            limit = int(rule[8:-1])
            if isinstance(value, (str, list)) and len(value) > limit:
                return "MaxSizeError", "MaxSize"
        elif rule == "Email" and not _EMAIL.search(str(value)):
            return "EmailError", "Email"
    return None


def user_json(cfg: Config, user: Row, *, email: bool = True) -> dict[str, Any]:
    return {"id": user["id"], "username": user["name"], "login": user["name"],
            "full_name": user["full_name"], "email": user["email"] if email else "",
            "avatar_url": f"{cfg.external_url}img/avatar_default.png"}


def org_json(cfg: Config, org: Row) -> dict[str, Any]:
    return {"id": org["id"], "username": org["name"], "full_name": org["full_name"],
            "avatar_url": f"{cfg.external_url}img/avatar_default.png",
            "description": org["description"], "website": org["website"],
            "location": org["location"]}


def repo_json(cfg: Config, repo: Row, owner: Row, mode: int | None) -> dict[str, Any]:
    full_name = f"{owner['name']}/{repo['name']}"
    if cfg.ssh_port != 22:
        ssh_url = f"ssh://{cfg.run_user}@{cfg.ssh_domain}:{cfg.ssh_port}/{full_name}.git"
    else:
        ssh_url = f"{cfg.run_user}@{cfg.ssh_domain}:{full_name}.git"
    permissions = None if mode is None else \
        {"admin": mode >= ADMIN, "push": mode >= WRITE, "pull": True}
    return {
        "id": repo["id"], "owner": user_json(cfg, owner), "name": repo["name"],
        "full_name": full_name, "description": repo["description"],
        "private": bool(repo["is_private"]), "unlisted": False, "fork": False,
        "parent": None, "empty": repo_is_empty(repo_path(cfg, owner["name"], repo["name"])),
        "mirror": False, "size": 0, "html_url": cfg.external_url + full_name,
        "ssh_url": ssh_url, "clone_url": cfg.external_url + full_name + ".git",
        "website": "", "stars_count": 0, "forks_count": 0, "watchers_count": 0,
        "open_issues_count": 0, "default_branch": repo["default_branch"],
        "created_at": go_time(repo["created_unix"]), "updated_at": go_time(repo["updated_unix"]),
        "permissions": permissions}


def deploy_key_json(cfg: Config, owner: Row, repo: Row, key: Row, content: str
                    ) -> dict[str, Any]:
    link = f"{cfg.external_url}api/v1/repos/{owner['name']}/{repo['name']}/keys/"
    return {"id": key["id"], "key": content, "url": f"{link}{key['id']}", "title": key["name"],
            "created_at": go_time(key["created_unix"]), "read_only": True}


def hook_json(hook: Row) -> dict[str, Any]:
    config = {"url": hook["url"], "content_type": hook["content_type"]}
    if hook["hook_task_type"] == "slack":
        config.update(json.loads(hook["meta"] or "{}"))
    return {"id": hook["id"], "type": hook["hook_task_type"], "config": config,
            "events": json.loads(hook["events"]), "active": bool(hook["is_active"]),
            "updated_at": go_time(hook["updated_unix"]),
            "created_at": go_time(hook["created_unix"])}


# ---------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------


@dataclass
class Call:
    """One API request, with who made it and how they proved it."""

    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str
    body: bytes
    user: Row | None = None
    token_auth: bool = False
    basic_auth: bool = False
    params: dict[str, str] = field(default_factory=dict)

    def require_token(self) -> Row:
        if not self.token_auth or self.user is None:
            raise Reply(401)
        return self.user

    def require_basic(self) -> Row:
        if not self.basic_auth or self.user is None:
            raise Reply(401)
        return self.user

    def require_admin(self) -> Row:
        if self.user is None or not self.user["is_admin"]:
            raise Reply(403)
        return self.user


Handler = Callable[["Api", Call], tuple[int, Any]]
ROUTES: list[tuple[str, re.Pattern[str], str]] = []


def route(method: str, pattern: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        ROUTES.append((method, re.compile("^" + pattern + "$"), handler.__name__))
        return handler
    return register


class Api:
    """Gogs' /api/v1 routes the platform uses, with Gogs' guards in Gogs' order."""

    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg
        self.store = store

    def authenticate(self, call: Call, authorization: str) -> None:
        """Token from ?token=, ?access_token= or `Authorization: token`; else Basic with a
        password (Gogs' API does not take a token in Basic auth; git over HTTP does)."""
        token = (call.query.get("token") or call.query.get("access_token") or [""])[0]
        fields = authorization.split()
        if not token and len(fields) == 2 and fields[0] == "token":
            token = fields[1]
        if token:
            user = user_by_token(self.store, token)
            if user is not None:
                call.user, call.token_auth = user, True
                return
        if len(fields) == 2 and fields[0] == "Basic":
            login, password = decode_basic(fields[1])
            if login:
                user = authenticate(self.store, login, password)
                if user is not None:
                    call.user, call.basic_auth = user, True

    def handle(self, call: Call) -> tuple[int, Any]:
        for method, pattern, name in ROUTES:
            match = pattern.match(call.path)
            if match and method == call.method:
                call.params = {key: urllib.parse.unquote(value)
                               for key, value in match.groupdict().items()}
                handler: Handler = getattr(Api, name)
                return handler(self, call)
        raise Reply(404)

    # --- helpers ---------------------------------------------------------------------

    def repo_assignment(self, call: Call) -> tuple[Row, Row, int]:
        owner = self.store.user_by_name(call.params["owner"])
        if owner is None:
            raise Reply(404)
        repo = self.store.repo_by_name(owner["id"], call.params["repo"])
        if repo is None:
            raise Reply(404)
        if call.token_auth and call.user is not None and call.user["is_admin"]:
            mode = OWNER
        else:
            mode = access_mode(self.store, call.user["id"] if call.user else 0, repo)
        if mode < READ:
            raise Reply(404)
        return owner, repo, mode

    def repo_admin(self, call: Call) -> tuple[Row, Row, Row]:
        doer = call.require_token()
        owner, repo, mode = self.repo_assignment(call)
        if mode < ADMIN:
            raise Reply(403)
        return doer, owner, repo

    def bind(self, call: Call, form: Form) -> dict[str, Any]:
        return bind(call.method, call.content_type, call.body, form)

    # --- users and tokens --------------------------------------------------------------

    @route("GET", r"/users/(?P<username>[^/]+)")
    def get_user(self, call: Call) -> tuple[int, Any]:
        user = self.store.user_by_name(call.params["username"])
        if user is None:
            raise Reply(404)
        return 200, user_json(self.cfg, user, email=call.user is not None)

    @route("GET", r"/users/(?P<username>[^/]+)/tokens")
    def list_tokens(self, call: Call) -> tuple[int, Any]:
        user = call.require_basic()
        rows = self.store.all("SELECT name FROM access_token WHERE uid = ? ORDER BY id",
                              user["id"])
        # 0.13 keeps only the SHA256 of a token: its sha1 cannot be shown again.
        return 200, [{"name": row["name"], "sha1": ""} for row in rows]

    @route("POST", r"/users/(?P<username>[^/]+)/tokens")
    def create_token(self, call: Call) -> tuple[int, Any]:
        user = call.require_basic()
        form = self.bind(call, CREATE_TOKEN)
        sha1 = hashlib.sha1(str(uuid.uuid4()).encode()).hexdigest()
        with self.store.transaction():
            if self.store.one("SELECT 1 FROM access_token WHERE uid = ? AND name = ?",
                              user["id"], form["name"]) is not None:
                raise error_status(422, "access token already exists: " +
                                   go_args(userID=user["id"], name=form["name"]))
            self.store.run("INSERT INTO access_token (uid, name, sha256, created_unix) "
                           "VALUES (?,?,?,?)", user["id"], form["name"],
                           hashlib.sha256(sha1.encode()).hexdigest(), now())
        return 201, {"name": form["name"], "sha1": sha1}

    @route("GET", r"/user")
    def whoami(self, call: Call) -> tuple[int, Any]:
        return 200, user_json(self.cfg, call.require_token())

    @route("GET", r"/user/orgs")
    def my_orgs(self, call: Call) -> tuple[int, Any]:
        user = call.require_token()
        rows = self.store.all("SELECT users.* FROM users JOIN org_user ON org_user.org_id = "
                              "users.id WHERE org_user.uid = ? ORDER BY users.id", user["id"])
        return 200, [org_json(self.cfg, row) for row in rows]

    @route("POST", r"/admin/users")
    def admin_create_user(self, call: Call) -> tuple[int, Any]:
        call.require_admin()
        form = self.bind(call, CREATE_USER)
        if form["source_id"]:
            raise error_status(422, "login source does not exist: " +
                               go_args(id=form["source_id"]))
        try:
            user = create_user(self.store, form["username"], form["email"], form["password"],
                               full_name=form["full_name"])
        except GogsFault as fault:
            raise error_status(422, str(fault)) from None
        log("TRACE", f"Account {user['name']!r} created by an admin")
        return 201, user_json(self.cfg, user)

    # --- organisations ---------------------------------------------------------------

    @route("POST", r"/admin/users/(?P<username>[^/]+)/orgs")
    def admin_create_org(self, call: Call) -> tuple[int, Any]:
        call.require_admin()
        form = self.bind(call, CREATE_ORG)
        owner = self.store.user_by_name(call.params["username"])
        if owner is None:
            raise Reply(404)
        return self.create_org(owner, form)

    @route("POST", r"/user/orgs")
    def create_my_org(self, call: Call) -> tuple[int, Any]:
        user = call.require_token()
        return self.create_org(user, self.bind(call, CREATE_ORG))

    def create_org(self, owner: Row, form: dict[str, Any]) -> tuple[int, Any]:
        name = form["username"]
        try:
            check_name_allowed(name, RESERVED_USERNAMES, RESERVED_USERNAME_PATTERNS)
        except GogsFault as fault:
            raise error_status(422, str(fault)) from None
        with self.store.transaction():
            if self.store.user_by_name(name) is not None:
                raise error_status(422, "user already exists: " + go_args(name=name))
            stamp = now()
            org_id = self.store.run(
                "INSERT INTO users (lower_name, name, full_name, description, website, "
                "location, type, is_active, created_unix, updated_unix) "
                "VALUES (?,?,?,?,?,?,?,1,?,?)", name.lower(), name, form["full_name"],
                form["description"], form["website"], form["location"], ORG_TYPE, stamp, stamp)
            self.store.run("INSERT INTO org_user (org_id, uid, is_owner) VALUES (?,?,1)",
                           org_id, owner["id"])
        os.makedirs(os.path.join(self.cfg.repo_root, name.lower()), exist_ok=True)
        org = self.store.user_by_id(org_id)
        assert org is not None
        return 201, org_json(self.cfg, org)

    @route("GET", r"/orgs/(?P<org>[^/]+)")
    def get_org(self, call: Call) -> tuple[int, Any]:
        org = self.store.user_by_name(call.params["org"])
        if org is None:
            raise Reply(404)
        return 200, org_json(self.cfg, org)

    @route("PATCH", r"/orgs/(?P<org>[^/]+)")
    def edit_org(self, call: Call) -> tuple[int, Any]:
        org = self.store.user_by_name(call.params["org"])
        if org is None:
            raise Reply(404)
        form = self.bind(call, EDIT_ORG)
        if call.user is None or not self.store.is_org_owner(org["id"], call.user["id"]):
            raise Reply(403)
        self.store.run("UPDATE users SET full_name = ?, description = ?, website = ?, "
                       "location = ?, updated_unix = ? WHERE id = ?", form["full_name"],
                       form["description"], form["website"], form["location"], now(), org["id"])
        org = self.store.user_by_id(org["id"])
        assert org is not None
        return 200, org_json(self.cfg, org)

    # --- repositories ----------------------------------------------------------------

    @route("POST", r"/user/repos")
    def create_my_repo(self, call: Call) -> tuple[int, Any]:
        user = call.require_token()
        form = self.bind(call, CREATE_REPO)
        if user["type"] == ORG_TYPE:
            raise error_status(422, "Not allowed to create repository for organization.")
        return self.create_repo(user, user, form)

    @route("POST", r"/org/(?P<org>[^/]+)/repos")
    def create_org_repo(self, call: Call) -> tuple[int, Any]:
        user = call.require_token()
        form = self.bind(call, CREATE_REPO)
        org = self.store.user_by_name(call.params["org"])
        if org is None or org["type"] != ORG_TYPE:
            raise Reply(404)
        if not self.store.is_org_owner(org["id"], user["id"]):
            raise error_status(403, "Given user is not owner of organization.")
        return self.create_repo(user, org, form)

    def create_repo(self, doer: Row, owner: Row, form: dict[str, Any]) -> tuple[int, Any]:
        name = form["name"]
        try:
            check_name_allowed(name, RESERVED_REPO_NAMES, RESERVED_REPO_PATTERNS)
        except GogsFault as fault:
            raise error_status(422, str(fault)) from None
        stamp = now()
        with self.store.transaction():
            if self.store.repo_by_name(owner["id"], name) is not None:
                raise error_status(422, "repository already exists: " +
                                   go_args(ownerID=owner["id"], name=name))
            repo_id = self.store.run(
                "INSERT INTO repository (owner_id, lower_name, name, description, is_private, "
                "default_branch, created_unix, updated_unix) VALUES (?,?,?,?,?,?,?,?)",
                owner["id"], name.lower(), name, form["description"],
                int(form["private"] or self.cfg.force_private), self.cfg.default_branch,
                stamp, stamp)
        path = repo_path(self.cfg, owner["name"], name)
        readme = None
        if form["auto_init"]:
            readme = f"# {name}\n\n{form['description']}" if form["description"] else \
                f"# {name}\n"
        email = doer["email"] or f"{doer['lower_name']}@noreply.{self.cfg.domain}"
        try:
            init_repository(self.cfg, path, self.cfg.default_branch, readme=readme,
                            author=(doer["name"], email))
        except (RuntimeError, OSError) as error:
            self.store.run("DELETE FROM repository WHERE id = ?", repo_id)
            shutil.rmtree(path, ignore_errors=True)
            raise server_error("create repository", error) from None
        repo = self.store.repo_by_id(repo_id)
        assert repo is not None
        log("TRACE", f"Repository created: {owner['name']}/{name}")
        return 201, repo_json(self.cfg, repo, owner, OWNER)

    @route("GET", r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)")
    def get_repo(self, call: Call) -> tuple[int, Any]:
        owner, repo, mode = self.repo_assignment(call)
        return 200, repo_json(self.cfg, repo, owner, mode)

    @route("DELETE", r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)")
    def delete_repo(self, call: Call) -> tuple[int, Any]:
        doer = call.require_token()
        owner, repo, mode = self.repo_assignment(call)
        if owner["type"] == ORG_TYPE and not self.store.is_org_owner(owner["id"], doer["id"]):
            raise error_status(403, "Given user is not owner of organization.")
        if mode < ADMIN:
            raise Reply(403)
        with self.store.transaction():
            self.store.run("DELETE FROM webhook WHERE repo_id = ?", repo["id"])
            keys = self.store.all("SELECT key_id FROM deploy_key WHERE repo_id = ?", repo["id"])
            self.store.run("DELETE FROM deploy_key WHERE repo_id = ?", repo["id"])
            for key in keys:
                self._drop_unused_public_key(key["key_id"])
            self.store.run("DELETE FROM repository WHERE id = ?", repo["id"])
        shutil.rmtree(repo_path(self.cfg, owner["name"], repo["name"]), ignore_errors=True)
        if keys:
            rewrite_authorized_keys(self.cfg, self.store)
        log("TRACE", f"Repository deleted: {owner['name']}/{repo['name']}")
        return 204, None

    # --- deploy keys -----------------------------------------------------------------

    @route("GET", r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/keys")
    def list_keys(self, call: Call) -> tuple[int, Any]:
        _, owner, repo = self.repo_admin(call)
        rows = self.store.all("SELECT deploy_key.*, public_key.content FROM deploy_key JOIN "
                              "public_key ON public_key.id = deploy_key.key_id "
                              "WHERE deploy_key.repo_id = ? ORDER BY deploy_key.id", repo["id"])
        return 200, [deploy_key_json(self.cfg, owner, repo, row, row["content"]) for row in rows]

    @route("GET", r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/keys/(?P<id>[^/]+)")
    def get_key(self, call: Call) -> tuple[int, Any]:
        _, owner, repo = self.repo_admin(call)
        # Like Gogs, the key is looked up by its id alone, whatever repository is named.
        row = self.store.one("SELECT deploy_key.*, public_key.content FROM deploy_key JOIN "
                             "public_key ON public_key.id = deploy_key.key_id "
                             "WHERE deploy_key.id = ?", _int_param(call.params["id"]))
        if row is None:
            raise Reply(404)
        return 200, deploy_key_json(self.cfg, owner, repo, row, row["content"])

    @route("POST", r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/keys")
    def add_key(self, call: Call) -> tuple[int, Any]:
        _, owner, repo = self.repo_admin(call)
        form = self.bind(call, CREATE_KEY)
        if self.cfg.disable_ssh:
            raise error_status(422, "Invalid key content: %v: SSH is disabled")
        try:
            content = parse_key_string(form["key"])
        except ValueError as error:
            raise error_status(422, f"Invalid key content: %v: {error}") from None
        if "\n" in content or "\r" in content:
            raise error_status(422, "Invalid key content: %v: only a single line with a "
                                    "single key please")
        with self.store.transaction():
            if self.store.one("SELECT 1 FROM public_key WHERE content = ? AND type = ?",
                              content, KEY_TYPE_USER) is not None:
                raise error_status(422, "Key content has been used as non-deploy key")
            pkey = self.store.one("SELECT * FROM public_key WHERE content = ? AND type = ? "
                                  "AND mode = ?", content, KEY_TYPE_DEPLOY, READ)
            stamp = now()
            if pkey is None:
                key_id = self.store.run(
                    "INSERT INTO public_key (name, fingerprint, content, mode, type, "
                    "created_unix) VALUES (?,?,?,?,?,?)", form["title"], fingerprint(content),
                    content, READ, KEY_TYPE_DEPLOY, stamp)
            else:
                key_id = pkey["id"]
            # Gogs wraps both of these in "addDeployKey: %v", so they end as a 500.
            if self.store.one("SELECT 1 FROM deploy_key WHERE key_id = ? AND repo_id = ?",
                              key_id, repo["id"]) is not None:
                raise server_error("add key", RuntimeError(
                    "addDeployKey: public key already exists [key_id: "
                    f"{key_id}, repo_id: {repo['id']}]"))
            if self.store.one("SELECT 1 FROM deploy_key WHERE repo_id = ? AND name = ?",
                              repo["id"], form["title"]) is not None:
                raise server_error("add key", RuntimeError(
                    f"addDeployKey: public key already exists [repo_id: {repo['id']}, "
                    f"name: {form['title']}]"))
            deploy_id = self.store.run(
                "INSERT INTO deploy_key (key_id, repo_id, name, fingerprint, created_unix) "
                "VALUES (?,?,?,?,?)", key_id, repo["id"], form["title"], fingerprint(content),
                stamp)
        rewrite_authorized_keys(self.cfg, self.store)
        row = self.store.one("SELECT * FROM deploy_key WHERE id = ?", deploy_id)
        assert row is not None
        return 201, deploy_key_json(self.cfg, owner, repo, row, content)

    @route("DELETE", r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/keys/(?P<id>[^/]+)")
    def delete_key(self, call: Call) -> tuple[int, Any]:
        doer, _, _ = self.repo_admin(call)
        key = self.store.one("SELECT * FROM deploy_key WHERE id = ?",
                             _int_param(call.params["id"]))
        if key is None:
            return 204, None
        if not doer["is_admin"]:
            target = self.store.repo_by_id(key["repo_id"])
            if target is None or access_mode(self.store, doer["id"], target) < ADMIN:
                raise error_status(403, "You do not have access to this key")
        with self.store.transaction():
            self.store.run("DELETE FROM deploy_key WHERE id = ?", key["id"])
            self._drop_unused_public_key(key["key_id"])
        rewrite_authorized_keys(self.cfg, self.store)
        return 204, None

    def _drop_unused_public_key(self, key_id: int) -> None:
        if self.store.one("SELECT 1 FROM deploy_key WHERE key_id = ?", key_id) is None:
            self.store.run("DELETE FROM public_key WHERE id = ?", key_id)

    # --- webhooks --------------------------------------------------------------------

    @route("GET", r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/hooks")
    def list_hooks(self, call: Call) -> tuple[int, Any]:
        _, _, repo = self.repo_admin(call)
        rows = self.store.all("SELECT * FROM webhook WHERE repo_id = ? ORDER BY id", repo["id"])
        return 200, [hook_json(row) for row in rows]

    @route("POST", r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/hooks")
    def create_hook(self, call: Call) -> tuple[int, Any]:
        _, _, repo = self.repo_admin(call)
        form = self.bind(call, CREATE_HOOK)
        if form["type"] not in HOOK_TYPES:
            raise error_status(422, "Invalid hook type.")
        config: dict[str, str] = form["config"]
        for name in ("url", "content_type"):
            if name not in config:
                raise error_status(422, "Missing config option: " + name)
        if config["content_type"] not in HOOK_CONTENT_TYPES:
            raise error_status(422, "Invalid content type.")
        meta = ""
        if form["type"] == "slack":
            if "channel" not in config:
                raise error_status(422, "Missing config option: channel")
            meta = json.dumps({key: config.get(key, "") for key in
                               ("channel", "username", "icon_url", "color")})
        events = _chosen_events(form["events"])
        stamp = now()
        hook_id = self.store.run(
            "INSERT INTO webhook (repo_id, url, content_type, secret, events, is_active, "
            "hook_task_type, meta, created_unix, updated_unix) VALUES (?,?,?,?,?,?,?,?,?,?)",
            repo["id"], config["url"], config["content_type"], config.get("secret", ""),
            json.dumps(events), int(bool(form["active"])), form["type"], meta, stamp, stamp)
        hook = self.store.one("SELECT * FROM webhook WHERE id = ?", hook_id)
        assert hook is not None
        return 201, hook_json(hook)

    @route("PATCH", r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/hooks/(?P<id>[^/]+)")
    def edit_hook(self, call: Call) -> tuple[int, Any]:
        _, _, repo = self.repo_admin(call)
        form = self.bind(call, EDIT_HOOK)
        hook = self.store.one("SELECT * FROM webhook WHERE repo_id = ? AND id = ?", repo["id"],
                              _int_param(call.params["id"]))
        if hook is None:
            raise Reply(404)
        url, content_type, meta = hook["url"], hook["content_type"], hook["meta"]
        config: dict[str, str] | None = form["config"]
        if config is not None:
            url = config.get("url", url)
            if "content_type" in config:
                if config["content_type"] not in HOOK_CONTENT_TYPES:
                    raise error_status(422, "Invalid content type.")
                content_type = config["content_type"]
            if hook["hook_task_type"] == "slack" and "channel" in config:
                meta = json.dumps({key: config.get(key, "") for key in
                                   ("channel", "username", "icon_url", "color")})
        # Like Gogs: the secret is not editable through the API; events default to push.
        events = _chosen_events(form["events"])
        active = hook["is_active"] if form["active"] is None else int(bool(form["active"]))
        self.store.run("UPDATE webhook SET url = ?, content_type = ?, events = ?, "
                       "is_active = ?, meta = ?, updated_unix = ? WHERE id = ?", url,
                       content_type, json.dumps(events), active, meta, now(), hook["id"])
        hook = self.store.one("SELECT * FROM webhook WHERE id = ?", hook["id"])
        assert hook is not None
        return 200, hook_json(hook)

    @route("DELETE", r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/hooks/(?P<id>[^/]+)")
    def delete_hook(self, call: Call) -> tuple[int, Any]:
        _, _, repo = self.repo_admin(call)
        self.store.run("DELETE FROM webhook WHERE repo_id = ? AND id = ?", repo["id"],
                       _int_param(call.params["id"]))
        return 204, None


def _int_param(value: str) -> int:
    """macaron's ParamsInt64: anything that is not a number reads as 0."""
    try:
        return int(value)
    except ValueError:
        return 0


def _chosen_events(events: list[str] | None) -> list[str]:
    wanted = set(events or ["push"])
    return [event for event in HOOK_EVENTS if event in wanted]


def decode_basic(encoded: str) -> tuple[str, str]:
    try:
        text = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, ValueError):
        return "", ""
    login, _, password = text.partition(":")
    return login, password


# ---------------------------------------------------------------------------------------
# Webhook delivery
# ---------------------------------------------------------------------------------------


def _host_blocked(hostname: str, allowlist: tuple[str, ...]) -> bool:
    """Gogs' netutil.IsBlockedLocalHostname: allowed by exact name or `*`, else blocked
    when any address it resolves to is not a global one (loopback, private, link-local)."""
    if any(hostname == allowed or allowed == "*" for allowed in allowlist):
        return False
    try:
        infos = socket.getaddrinfo(hostname, None)
    except OSError:
        return True
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global:
            return True
    return False


def deliver(cfg: Config, hook: Row, event: str, payload: dict[str, Any]) -> None:
    """One delivery, like Gogs' HookTask.deliver; logs the URL without credentials."""
    body = json.dumps(payload, indent=2).encode()
    parts = urllib.parse.urlsplit(hook["url"])
    host = parts.hostname or ""
    shown = f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
    if _host_blocked(host, cfg.local_network_allowlist):
        log("WARN", f"webhook {hook['id']} {event} to {shown} not delivered: Payload URL "
            "resolved to a local network address that is implicitly blocked.")
        return
    delivery = str(uuid.uuid4())
    signature = hmac.new(hook["secret"].encode(), body, hashlib.sha256).hexdigest()
    if hook["content_type"] == "form":
        data = urllib.parse.urlencode({"payload": body.decode()}).encode()
        content_type = "application/x-www-form-urlencoded"
    else:
        data, content_type = body, "application/json"
    request = urllib.request.Request(hook["url"], data=data, method="POST", headers={
        "Content-Type": content_type, "User-Agent": "GogsServer",
        "X-Github-Delivery": delivery, "X-Github-Event": event,
        "X-Gogs-Delivery": delivery, "X-Gogs-Event": event, "X-Gogs-Signature": signature})
    context = ssl.create_default_context()
    if cfg.webhook_skip_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=cfg.webhook_timeout,
                                    context=context) as answer:
            log("INFO", f"webhook {hook['id']} {event} delivered to {shown}: {answer.status}")
    except urllib.error.HTTPError as error:
        log("WARN", f"webhook {hook['id']} {event} to {shown}: HTTP {error.code}")
    except (OSError, ValueError) as error:
        log("WARN", f"webhook {hook['id']} {event} to {shown} failed: {error}")


def push_events(cfg: Config, store: Store, owner: Row, repo: Row, pusher: Row,
                changes: list[tuple[str, str, str]]) -> None:
    """After a push: create/delete/push payloads to the repository's active webhooks."""
    hooks = store.all("SELECT * FROM webhook WHERE repo_id = ? AND is_active = 1", repo["id"])
    if not hooks:
        return
    path = repo_path(cfg, owner["name"], repo["name"])
    repository = repo_json(cfg, repo, owner, None)
    sender = user_json(cfg, pusher)
    for ref, before, after in changes:
        kind = "tag" if ref.startswith("refs/tags/") else "branch"
        short = ref.split("/", 2)[2] if ref.count("/") >= 2 else ref
        deliveries: list[tuple[str, dict[str, Any]]] = []
        if after == ZERO_SHA:
            deliveries.append(("delete", {"ref": short, "ref_type": kind, "pusher_type": "user",
                                          "repository": repository, "sender": sender}))
        else:
            if before == ZERO_SHA:
                deliveries.append(("create", {
                    "ref": short, "ref_type": kind, "sha": after,
                    "default_branch": repo["default_branch"], "repository": repository,
                    "sender": sender}))
            compare = f"{cfg.external_url}{owner['name']}/{repo['name']}/compare/" \
                      f"{before}...{after}" if before != ZERO_SHA else ""
            deliveries.append(("push", {
                "ref": ref, "before": before, "after": after, "compare_url": compare,
                "commits": _commits(cfg, path, owner, repo, before, after),
                "repository": repository, "pusher": sender, "sender": sender}))
        for event, payload in deliveries:
            for hook in hooks:
                if event in json.loads(hook["events"]):
                    threading.Thread(target=deliver, args=(cfg, hook, event, payload),
                                     daemon=True).start()


def _commits(cfg: Config, path: str, owner: Row, repo: Row, before: str, after: str
             ) -> list[dict[str, Any]]:
    spec = after if before == ZERO_SHA else f"{before}..{after}"
    try:
        text = git("log", "--max-count=20", "--format=%H%x00%an%x00%ae%x00%cn%x00%ce%x00%cI"
                   "%x00%B%x1e", spec, cwd=path)
    except RuntimeError:
        return []
    commits = []
    for record in filter(None, (item.strip("\n") for item in text.split("\x1e"))):
        sha, a_name, a_mail, c_name, c_mail, stamp, message = record.split("\x00", 6)
        changed: dict[str, list[str]] = {"A": [], "D": [], "M": []}
        with contextlib.suppress(RuntimeError):
            for line in git("diff-tree", "--root", "--no-commit-id", "--name-status", "-r",
                            sha, cwd=path).splitlines():
                status, _, name = line.partition("\t")
                changed.setdefault(status[:1], []).append(name)
        commits.append({
            "id": sha, "message": message.strip() + "\n",
            "url": f"{cfg.external_url}{owner['name']}/{repo['name']}/commit/{sha}",
            "author": {"name": a_name, "email": a_mail, "username": ""},
            "committer": {"name": c_name, "email": c_mail, "username": ""},
            "added": changed["A"], "removed": changed["D"], "modified": changed["M"],
            "timestamp": stamp})
    return commits


def _refs(path: str) -> dict[str, str]:
    try:
        text = git("for-each-ref", "--format=%(objectname) %(refname)", cwd=path)
    except RuntimeError:
        return {}
    return {ref: sha for sha, _, ref in (line.partition(" ") for line in text.splitlines())}


# ---------------------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------------------

_GIT_PATH = re.compile(r"^/(?P<owner>[^/]+)/(?P<repo>[^/]+?)(?:\.git)?/"
                       r"(?P<action>info/refs|git-upload-pack|git-receive-pack|HEAD|"
                       r"objects/.+)$")


class GogsHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cfg: Config, store: Store, address: tuple[str, int]) -> None:
        self.cfg = cfg
        self.store = store
        self.api = Api(cfg, store)
        self.tls: ssl.SSLContext | None = None
        super().__init__(address, RequestHandler)
        if cfg.protocol == "https":
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls.load_cert_chain(cfg.cert_file, cfg.key_file)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (TLS handshake, reset): one line, no traceback."""
        log("WARN", f"connection from {client_address[0]}: {sys.exc_info()[1]}")

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.tls is not None:  # the handshake runs in the request's thread
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address


class RequestHandler(BaseHTTPRequestHandler):
    server: GogsHTTPServer
    status = 0
    protocol_version = "HTTP/1.1"
    server_version = "GogsStandIn"
    sys_version = ""
    timeout = 300

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError):
                self.close_connection = True
                raise

    def handle(self) -> None:
        with contextlib.suppress(ssl.SSLError, ConnectionError, TimeoutError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        """BaseHTTPRequestHandler would log the request line, query string included: the
        stand-in logs its own line instead (no query string, no credentials)."""

    def do_GET(self) -> None:
        self.dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    def dispatch(self) -> None:
        started = time.monotonic()
        path = urllib.parse.urlsplit(self.path).path
        self.status = 0
        try:
            if path == "/api/v1" or path.startswith("/api/v1/"):
                self.serve_api(path[len("/api/v1"):] or "/")
            elif _GIT_PATH.match(path):
                self.serve_git(path)
            elif path == "/" and self.command in ("GET", "HEAD"):
                self.send_bytes(200, b"<html><body>Gogs (lab stand-in, simulated)</body></html>",
                                "text/html; charset=UTF-8")
            else:
                self.read_body()
                self.send_bytes(404, b"Not Found", "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # the caller gets Gogs' 500; the cause goes to the log
            log("ERROR", f"{self.command} {path}: {type(error).__name__}: {error}")
            traceback.print_exc(file=sys.stderr)
            if not self.status:
                with contextlib.suppress(OSError):
                    self.send_json(500, {"message": SERVER_ERROR, "url": DOC_URL})
            self.close_connection = True
        finally:
            log("INFO", f'{self.client_address[0]} "{self.command} {path}" {self.status} '
                f"{(time.monotonic() - started) * 1000:.1f}ms")

    # --- plumbing --------------------------------------------------------------------

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_bytes(self, status: int, body: bytes, content_type: str | None,
                   headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(body, separators=(",", ":")).encode(),
                        "application/json; charset=UTF-8",
                        headers)

    def send_reply(self, reply: Reply) -> None:
        if reply.body is not None:
            self.send_json(reply.status, reply.body, reply.headers)
        else:
            self.send_bytes(reply.status, (reply.text or "").encode(),
                            "text/plain; charset=utf-8" if reply.text else None, reply.headers)

    # --- the API ---------------------------------------------------------------------

    def serve_api(self, api_path: str) -> None:
        split = urllib.parse.urlsplit(self.path)
        call = Call(method=self.command, path=api_path.rstrip("/") or "/",
                    query=urllib.parse.parse_qs(split.query),
                    content_type=self.headers.get("Content-Type", ""), body=self.read_body())
        api = self.server.api
        try:
            with api.store.lock:
                api.authenticate(call, self.headers.get("Authorization", ""))
                status, body = api.handle(call)
        except Reply as reply:
            self.send_reply(reply)
            return
        if body is None:
            self.send_bytes(status, b"", None)
        else:
            self.send_json(status, body)

    # --- git over HTTP ---------------------------------------------------------------

    def ask_credentials(self, status: int, text: str = "") -> Reply:
        return Reply(status, text=text, headers={"WWW-Authenticate": 'Basic realm="."'})

    def serve_git(self, path: str) -> None:
        match = _GIT_PATH.match(path)
        assert match is not None
        cfg, store = self.server.cfg, self.server.store
        body = self.read_body()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        action = match["action"]
        if ".." in action.split("/") or "\\" in action:
            self.send_bytes(400, b"Request path contains suspicious characters",
                            "text/plain; charset=utf-8")
            return
        service = (query.get("service") or [""])[0]
        push = action == "git-receive-pack" or service == "git-receive-pack"
        try:
            with store.lock:
                owner, repo, user = self.git_access(match["owner"], match["repo"], push)
        except Reply as reply:
            self.send_reply(reply)
            return
        repo_dir = repo_path(cfg, owner["name"], repo["name"])
        if not os.path.isdir(repo_dir):
            self.send_bytes(404, b"Not Found", "text/plain; charset=utf-8")
            return
        before = _refs(repo_dir) if action == "git-receive-pack" else {}
        self.run_http_backend(f"/{owner['lower_name']}/{repo['lower_name']}.git/{action}",
                              body, user)
        if action == "git-receive-pack" and user is not None:
            after = _refs(repo_dir)
            changes = [(ref, before.get(ref, ZERO_SHA), after.get(ref, ZERO_SHA))
                       for ref in sorted(set(before) | set(after))
                       if before.get(ref) != after.get(ref)]
            if changes:
                store.run("UPDATE repository SET updated_unix = ? WHERE id = ?", now(),
                          repo["id"])
                push_events(cfg, store, owner, repo, user, changes)

    def git_access(self, owner_name: str, repo_name: str, push: bool
                   ) -> tuple[Row, Row, Row | None]:
        """Gogs' HTTPContexter: who may pull or push, answered like Gogs answers."""
        store, cfg = self.server.store, self.server.cfg
        owner = store.user_by_name(owner_name)
        repo = store.repo_by_name(owner["id"], repo_name.removesuffix(".wiki")) \
            if owner is not None else None
        if owner is None or repo is None:
            raise Reply(404)
        if not push and not repo["is_private"] and not cfg.require_signin_view:
            return owner, repo, None
        fields = self.headers.get("Authorization", "").split()
        if len(fields) != 2 or fields[0] != "Basic":
            raise self.ask_credentials(401)
        login, password = decode_basic(fields[1])
        user = authenticate(store, login, password) if login else None
        if user is None:  # 0.13: a token works in the username or in the password field
            user = user_by_token(store, login) or user_by_token(store, password)
        if user is None:
            raise self.ask_credentials(401)
        if access_mode(store, user["id"], repo) < (WRITE if push else READ):
            raise self.ask_credentials(403, "User permission denied")
        return owner, repo, user

    def run_http_backend(self, path_info: str, body: bytes, user: Row | None) -> None:
        cfg = self.server.cfg
        query = urllib.parse.urlsplit(self.path).query
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_PROJECT_ROOT": cfg.repo_root,
            "GIT_HTTP_EXPORT_ALL": "1", "REQUEST_METHOD": self.command, "PATH_INFO": path_info,
            "QUERY_STRING": query, "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": self.client_address[0],
            "SERVER_PROTOCOL": "HTTP/1.1", "GATEWAY_INTERFACE": "CGI/1.1",
            "HOME": os.environ.get("HOME", "/"),
        }
        if user is not None:
            env["REMOTE_USER"] = user["name"]
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as stderr:
            stdin.write(body)
            stdin.seek(0)
            process = subprocess.Popen(["git", "http-backend"], stdin=stdin,
                                       stdout=subprocess.PIPE, stderr=stderr, env=env)
            assert process.stdout is not None
            output = cast(io.BufferedReader, process.stdout)
            status, headers = 200, []
            while True:
                line = output.readline().decode("latin-1").rstrip("\r\n")
                if not line:
                    break
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.strip().split()[0])
                else:
                    headers.append((name.strip(), value.strip()))
            self.status = status
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while True:
                chunk = output.read1(65536)
                if not chunk:
                    break
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            if process.wait() != 0:
                stderr.seek(0)
                log("ERROR", f"git http-backend {path_info}: "
                    f"{stderr.read().decode(errors='replace').strip()}")


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def fatal(message: str) -> NoReturn:
    log("FATAL", message)
    sys.exit(1)


def _open_log(cfg: Config) -> None:
    global _LOG_FILE
    if cfg.log_to_file:
        os.makedirs(cfg.log_root, exist_ok=True)
        _LOG_FILE = open(os.path.join(cfg.log_root, "gogs.log"), "a", encoding="utf-8")  # noqa: SIM115


def cmd_web(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as error:
        fatal(f"Failed to initialize application: {error}")
    _open_log(cfg)
    os.makedirs(cfg.repo_root, exist_ok=True)
    store = Store(cfg.db_path)
    port = args.port or cfg.http_port
    try:
        server = GogsHTTPServer(cfg, store, (cfg.http_addr, port))
    except OSError as error:
        fatal(f"Failed to start server: listen {cfg.http_addr}:{port}: {error.strerror}")
    except ssl.SSLError as error:
        fatal(f"Failed to start server: load CERT_FILE/KEY_FILE: {error}")

    def stop(signum: int, _frame: Any) -> None:
        log("INFO", f"Received signal {signum}, shutting down")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log("INFO", f"Gogs {VERSION}")
    log("INFO", f"Listen on {cfg.protocol}://{cfg.http_addr}:{server.server_address[1]}")
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    return 0


def cmd_create_user(args: argparse.Namespace) -> int:
    for flag, what in (("name", "Username"), ("password", "Password"), ("email", "Email")):
        if getattr(args, flag) is None:
            fatal(f"Failed to start application: {what} is not specified")
    try:
        cfg = load_config(args.config)
    except ConfigError as error:
        fatal(f"Failed to start application: init configuration: {error}")
    store = Store(cfg.db_path)
    try:
        create_user(store, args.name, args.email, args.password, admin=args.admin)
    except GogsFault as fault:
        fatal(f"Failed to start application: CreateUser: {fault}")
    print(f"New user '{args.name}' has been successfully created!")
    return 0


class _Serv:
    """`gogs serv key-<id>`: what sshd runs for a key of authorized_keys."""

    def __init__(self, cfg: Config | None) -> None:
        self.cfg = cfg
        self.log: IO[str] | None = None
        if cfg is not None:
            with contextlib.suppress(OSError):
                os.makedirs(os.path.join(cfg.log_root, "hooks"), exist_ok=True)
                self.log = open(os.path.join(cfg.log_root, "hooks", "serv.log"), "a",  # noqa: SIM115
                                encoding="utf-8")

    def fail(self, user_message: str, detail: str = "") -> NoReturn:
        """Gogs' fail(): the user message to the git client; the detail too outside prod."""
        sys.stderr.write(f"Gogs: {user_message}\n")
        if detail:
            if self.cfg is None or not self.cfg.prod_mode:
                sys.stderr.write(detail + "\n")
            if self.log is not None:
                self.log.write(f"{time.strftime('%Y/%m/%d %H:%M:%S')} [ERROR] {detail}\n")
                self.log.flush()
        sys.stderr.flush()
        sys.exit(1)


def cmd_serv(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as error:
        _Serv(None).fail("Internal error", f"Failed to init configuration: {error}")
    serv = _Serv(cfg)
    if cfg.disable_ssh:
        sys.stderr.write("Gogs: SSH has been disabled\n")
        return 0
    if not args.key:
        serv.fail("Not enough arguments", "Not enough arguments")
    command = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    if not command:
        sys.stderr.write("Hi there, You've successfully authenticated, but Gogs does not "
                         "provide shell access.\nIf this is unexpected, please log in with "
                         "password and setup Gogs under another user.\n")
        return 0
    verb, _, rest = command.partition(" ")
    rest = rest.replace("'/", "'", 1)
    full_name = rest.strip("'").lower()
    fields = full_name.split("/", 1) if verb and rest else []
    if len(fields) != 2:
        serv.fail("Invalid repository path", f"Invalid repository path: {rest}")
    owner_name = fields[0]
    repo_name = fields[1].removesuffix(".git").removesuffix(".wiki")
    try:
        store = Store(cfg.db_path)
        owner = store.user_by_name(owner_name)
        if owner is None:
            serv.fail("Repository owner does not exist", f"Unregistered owner: {owner_name}")
        repo = store.repo_by_name(owner["id"], repo_name)
        if repo is None:
            serv.fail(ACCESS_DENIED, f"Repository does not exist: {owner['name']}/{repo_name}")
        wanted = GIT_SERVICES.get(verb)
        if wanted is None:
            serv.fail("Unknown git command", f"Unknown git command '{verb}'")
        key = store.one("SELECT * FROM public_key WHERE id = ?",
                        _int_param(args.key.removeprefix("key-")))
        if key is None:
            serv.fail("Invalid key ID", f"Invalid key ID '{args.key}': public key does not "
                      "exist")
        if wanted == WRITE or repo["is_private"] or cfg.require_signin_view:
            if key["type"] == KEY_TYPE_DEPLOY:
                if key["mode"] < wanted:
                    serv.fail("Key permission denied",
                              f"Cannot push with deployment key: {key['id']}")
                if store.one("SELECT 1 FROM deploy_key WHERE key_id = ? AND repo_id = ?",
                             key["id"], repo["id"]) is None:
                    serv.fail("Key access denied", f"Deploy key access denied: [key_id: "
                              f"{key['id']}, repo_id: {repo['id']}]")
                store.run("UPDATE deploy_key SET updated_unix = ? WHERE key_id = ? AND "
                          "repo_id = ?", now(), key["id"], repo["id"])
            else:
                serv.fail(ACCESS_DENIED, "User keys are not simulated by this stand-in")
        store.run("UPDATE public_key SET updated_unix = ? WHERE id = ?", now(), key["id"])
    except sqlite3.Error as error:
        serv.fail("Internal error", f"Failed to use the database: {error}")
    path = repo_path(cfg, owner["name"], repo["name"])
    done = subprocess.run(["git", verb.removeprefix("git-"), path], cwd=cfg.repo_root,
                          check=False)
    if done.returncode != 0:
        serv.fail("Internal error", f"Failed to execute git command: exit status "
                  f"{done.returncode}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gogs", description="Gogs 0.13 (lab stand-in)")
    parser.add_argument("-v", "--version", action="version", version=f"Gogs version {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True)

    web = commands.add_parser("web", help="Start web server")
    web.add_argument("-c", "--config", default=None, help="Custom configuration file path")
    web.add_argument("-p", "--port", type=int, default=0, help="Temporary port number")
    web.set_defaults(run=cmd_web)

    admin = commands.add_parser("admin", help="Perform admin operations on command line")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True)
    create = admin_commands.add_parser("create-user", help="Create a new user in database")
    create.add_argument("--name", default=None)
    create.add_argument("--password", default=None)
    create.add_argument("--email", default=None)
    create.add_argument("--admin", action="store_true")
    create.add_argument("-c", "--config", default=None)
    create.set_defaults(run=cmd_create_user)

    serv = commands.add_parser("serv", help="This command should only be called by SSH shell")
    serv.add_argument("key", nargs="?", default="")
    serv.add_argument("-c", "--config", default=None)
    serv.set_defaults(run=cmd_serv)

    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
