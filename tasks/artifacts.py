"""Binaries from the artifact mirror, installed on a host only when their sha256 matches.

The orchestrator reads the mirror's `SHA256SUMS` once per run and puts the expected sum
into the host's command, so a host never trusts the mirror on its own: a file whose sum
differs is refused before it replaces anything.
"""

from __future__ import annotations

import shlex
import threading

import httpx

from sizing.artifacts import SUMS_FILE, artifact_path
from sizing.spec import PlatformSpec
from tasks.hostops import Command

_SUMS: dict[str, dict[str, str]] = {}
_LOCK = threading.Lock()


class ArtifactError(RuntimeError):
    """The mirror does not list (or serve) an artifact the spec needs (permanent)."""


def mirror_sums(spec: PlatformSpec) -> dict[str, str]:
    """Path -> sha256 of every file the mirror lists (read once per process and mirror)."""
    url = f"{spec.artifacts.mirror.rstrip('/')}/{SUMS_FILE}"
    with _LOCK:
        if url in _SUMS:
            return _SUMS[url]
    try:
        response = httpx.get(url, timeout=30.0)
    except httpx.HTTPError as error:
        raise ConnectionError(f"artifact mirror {url}: {type(error).__name__}: {error}") from None
    if response.status_code >= 500:
        raise ConnectionError(f"artifact mirror {url}: HTTP {response.status_code}")
    if response.status_code != 200:
        raise ArtifactError(f"artifact mirror {url}: HTTP {response.status_code}")
    sums: dict[str, str] = {}
    for number, line in enumerate(response.text.splitlines(), 1):
        if not line.strip():
            continue
        digest, _, path = line.partition("  ")
        if len(digest) != 64 or not path:
            raise ArtifactError(f"artifact mirror {url} line {number}: not `<sha256>  <path>`")
        sums[path.strip()] = digest
    with _LOCK:
        _SUMS[url] = sums
    return sums


def expected_sha256(spec: PlatformSpec, relative: str) -> str:
    sums = mirror_sums(spec)
    if relative not in sums:
        raise ArtifactError(f"the artifact mirror {spec.artifacts.mirror} does not list "
                            f"{relative} in {SUMS_FILE}; add it to the mirror for this release")
    return sums[relative]


def install_binary(spec: PlatformSpec, component: str, destination: str) -> Command:
    """A command that puts ``component``'s binary at ``destination`` unless it is there
    with the right sum: download beside it, check the sum, then an atomic rename."""
    version: str = getattr(spec.versions, component)
    relative = artifact_path(component, version)
    digest = expected_sha256(spec, relative)
    url = f"{spec.artifacts.mirror.rstrip('/')}/{relative}"
    partial = f"{destination}.download"
    check = f"echo {digest}'  '{shlex.quote(partial)} | sha256sum -c --quiet"
    command = (f"curl -fsS --retry 3 -o {shlex.quote(partial)} {shlex.quote(url)} && "
               f"{{ {check} || {{ echo 'sha256 of {url} differs from the mirror list' >&2; "
               f"rm -f {shlex.quote(partial)}; exit 1; }}; }} && "
               f"chmod 0755 {shlex.quote(partial)} && "
               f"mv -f {shlex.quote(partial)} {shlex.quote(destination)}")
    unless = f"echo {digest}'  '{shlex.quote(destination)} | sha256sum -c --quiet 2>/dev/null"
    return Command(command, unless=unless, name=f"install {component} {version}")
