"""Small OCI images for the lab's registry, built byte for byte the same on every machine.

An air-gapped release ships its images as OCI archives on the artifact mirror, pinned by
manifest digest in `deployments/<env>/images.txt`. The lab has no image to download, so
it makes a handful here: each one config, one uncompressed layer and a manifest, laid
out as an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`) in a tar
archive that `skopeo copy oci-archive:FILE ...` reads. The index annotates the manifest
with its tag (`org.opencontainers.image.ref.name`), so `oci-archive:FILE:TAG` works too.

Everything that could vary is fixed (mtimes, owners, entry order, JSON key order, no
compression), so the digests are stable and deployments/lab/images.txt can pin them.
`python -m lab.oci` prints the images.txt lines of what it builds.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass

from sizing.images import Image

EPOCH = 1735689600  # 2025-01-01T00:00:00Z: every mtime and the configs' "created"
CREATED = "2025-01-01T00:00:00Z"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = "1.0.0"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass(frozen=True)
class ImageDefinition:
    """What one lab image holds: files (path in the image, content, mode) and its command."""

    name: str
    tag: str
    files: tuple[tuple[str, bytes, int], ...]
    cmd: tuple[str, ...]


@dataclass(frozen=True)
class BuiltImage:
    image: Image  # name, tag, manifest digest
    archive: bytes  # the OCI archive (a tar of the image layout)


def _text(line: str) -> bytes:
    return (line + "\n").encode()


LAB_IMAGES: tuple[ImageDefinition, ...] = (
    ImageDefinition("lab/hello", "1.0",
                    (("etc/lab-image", _text("lab/hello 1.0: a lab image for the registry"),
                      0o644),),
                    ("/bin/cat", "/etc/lab-image")),
    ImageDefinition("lab/hello", "1.1",
                    (("etc/lab-image", _text("lab/hello 1.1: a lab image for the registry"),
                      0o644),),
                    ("/bin/cat", "/etc/lab-image")),
    ImageDefinition("lab/pause", "3.10",
                    (("pause", _text("#!/bin/sh\nexec sleep infinity"), 0o755),),
                    ("/pause",)),
    ImageDefinition("lab/tools/netcheck", "0.1",
                    (("usr/local/bin/netcheck",
                      _text("#!/bin/sh\n# lab image: reports that it ran\necho netcheck ok"),
                      0o755),),
                    ("/usr/local/bin/netcheck",)),
)


def _json(value: object) -> bytes:
    """Canonical JSON: sorted keys, no spaces (the digest is of these exact bytes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(entries: list[tuple[str, bytes | None, int]]) -> bytes:
    """A ustar archive of (path, content or None for a directory, mode), in the order given,
    owned by 0:0, every mtime EPOCH."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, content, mode in entries:
            info = tarfile.TarInfo(path)
            info.mtime = EPOCH
            info.mode = mode
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _with_parents(files: tuple[tuple[str, bytes, int], ...]) -> list[tuple[str, bytes | None,
                                                                            int]]:
    """Files and every parent directory, sorted, directories before what they hold."""
    entries: dict[str, tuple[bytes | None, int]] = {}
    for path, content, mode in files:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            entries.setdefault("/".join(parts[:depth]) + "/", (None, 0o755))
        entries[path] = (content, mode)
    return [(path, content, mode) for path, (content, mode) in sorted(entries.items())]


def build(definition: ImageDefinition) -> BuiltImage:
    """One image as an OCI archive, and its manifest digest."""
    layer = _tar(_with_parents(definition.files))
    config = _json({
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {"Cmd": list(definition.cmd),
                   "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                   "Labels": {"org.opencontainers.image.title": definition.name,
                              "org.opencontainers.image.version": definition.tag}},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        "history": [{"created": CREATED, "created_by": "lab.oci (platform lab image)"}],
    })
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": _digest(layer), "size": len(layer)}],
        "annotations": {"org.opencontainers.image.created": CREATED},
    })
    digest = _digest(manifest)
    index = _json({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{"mediaType": MEDIA_MANIFEST, "digest": digest, "size": len(manifest),
                       "annotations": {REF_NAME: definition.tag}}],
    })
    blobs = sorted({_digest(blob).removeprefix("sha256:"): blob
                    for blob in (config, layer, manifest)}.items())
    archive = _tar([("blobs/", None, 0o755), ("blobs/sha256/", None, 0o755),
                    *((f"blobs/sha256/{hexdigest}", blob, 0o644) for hexdigest, blob in blobs),
                    ("index.json", index, 0o644),
                    ("oci-layout", _json({"imageLayoutVersion": LAYOUT_VERSION}), 0o644)])
    return BuiltImage(Image(definition.name, definition.tag, digest), archive)


def build_all(definitions: tuple[ImageDefinition, ...] = LAB_IMAGES) -> list[BuiltImage]:
    return [build(definition) for definition in definitions]


def main() -> None:
    print("# The lab's images (lab/oci.py builds them; `python -m lab.oci` prints this).")
    for built in build_all():
        print(built.image.line())


if __name__ == "__main__":
    main()
