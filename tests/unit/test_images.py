"""The release's images list, the mirror's layout for images, and the lab's OCI images."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from lab import mirror, oci
from sizing.artifacts import (
    IMAGE_LAYOUT,
    SUMS_FILE,
    artifact_path,
    image_archive_path,
    image_archive_url,
)
from sizing.images import Image, ImageListError, parse_images
from sizing.spec import PlatformSpec
from tasks.spec import read_images
from tests.conftest import ROOT

LAB_IMAGES = ROOT / "deployments" / "lab" / "images.txt"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def _error(text: str) -> str:
    with pytest.raises(ImageListError) as caught:
        parse_images(text, "deployments/x/images.txt")
    return str(caught.value)


# --- the parser ------------------------------------------------------------------------------

def test_entries_comments_and_blank_lines() -> None:
    text = (f"# a release\n\nrancher/rke2-runtime:v1.32.9-rke2r1@{D1}\n"
            f"   busybox:1.36.1@{D2}   # trailing comment\n")
    assert parse_images(text) == [Image("rancher/rke2-runtime", "v1.32.9-rke2r1", D1),
                                  Image("busybox", "1.36.1", D2)]
    assert parse_images(text)[0].reference == "rancher/rke2-runtime:v1.32.9-rke2r1"
    assert parse_images(text)[1].line() == f"busybox:1.36.1@{D2}"
    assert parse_images("# nothing yet\n") == []


@pytest.mark.parametrize(("line", "cause"), [
    ("busybox:1.36", "no digest"),
    ("busybox@" + D1, "has no tag"),
    ("busybox:1.36@sha256:abc", "is not sha256: followed by 64"),
    ("busybox:1.36@sha512:" + "1" * 64, "is not sha256: followed by 64"),
    ("busybox:1.36@sha256:" + "A" * 64, "is not sha256: followed by 64"),
    ("BusyBox:1.36@" + D1, "is not a repository name"),
    ("lab//hello:1@" + D1, "is not a repository name"),
    ("-lab/hello:1@" + D1, "is not a repository name"),
    ("busybox:.hidden@" + D1, "is not a tag"),
    ("busybox:" + "t" * 129 + "@" + D1, "is not a tag"),
    ("images.ministry.example/library/busybox:1@" + D1, "names a registry host"),
    ("registry:5000/busybox:1@" + D1, "names a registry host"),
    ("localhost/busybox:1@" + D1, "names a registry host"),
    (f"busybox:1@{D1} busybox:2@{D2}", "one image per line; found 2 words"),
])
def test_a_bad_line_is_named_with_file_line_and_cause(line: str, cause: str) -> None:
    message = _error(f"# header\n\n{line}\n")
    assert message.startswith("deployments/x/images.txt:3: "), message
    assert cause in message


def test_registry_like_single_names_are_plain_names() -> None:
    """A dot or `localhost` only means a host in the first of several components."""
    assert parse_images(f"my.tools:1@{D1}\nlocalhost:2@{D2}\n")[0].name == "my.tools"


def test_a_duplicate_names_both_lines() -> None:
    message = _error(f"busybox:1.36@{D1}\n# again\nbusybox:1.36@{D2}\n")
    assert message.startswith("deployments/x/images.txt:3: busybox:1.36 is already listed at "
                              "line 1")
    # Another tag of the same name is not a duplicate.
    assert len(parse_images(f"busybox:1.36@{D1}\nbusybox:1.37@{D2}\n")) == 2


def test_read_images_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageListError, match=r"nope/images.txt: no such images list"):
        read_images(tmp_path / "nope" / "images.txt")
    path = tmp_path / "images.txt"
    path.write_text(f"ok:1@{D1}\nbad\n")
    with pytest.raises(ImageListError, match=rf"^{path}:2: no digest"):
        read_images(path)


# --- the mirror's layout -----------------------------------------------------------------------

def test_mirror_layout_for_images_and_gogs(lab_spec: PlatformSpec) -> None:
    image = Image("lab/tools/netcheck", "0.1", D1)
    assert IMAGE_LAYOUT == "images/{name}/{tag}.oci.tar"
    assert image_archive_path(image) == "images/lab/tools/netcheck/0.1.oci.tar"
    assert image_archive_url(lab_spec, image) == \
        "http://10.231.0.1:8080/images/lab/tools/netcheck/0.1.oci.tar"
    assert artifact_path("gogs", "0.13.3") == "gogs/0.13.3/gogs"


# --- the lab's images --------------------------------------------------------------------------

def test_lab_builder_gives_exactly_the_pinned_digests() -> None:
    built = oci.build_all()
    assert [b.image for b in built] == read_images(LAB_IMAGES)
    assert 3 <= len(built) <= 4
    again = oci.build_all()
    assert [b.archive for b in again] == [b.archive for b in built], "byte for byte the same"


def test_printed_lines_are_the_images_list(capsys: pytest.CaptureFixture[str]) -> None:
    oci.main()
    printed = parse_images(capsys.readouterr().out, "python -m lab.oci")
    assert printed == read_images(LAB_IMAGES)


def _members(archive: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {info.name: info for info in tar.getmembers()}


def _read(archive: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        handle = tar.extractfile(name)
        assert handle is not None
        return handle.read()


def test_archive_is_an_oci_layout_with_content_addressed_blobs() -> None:
    built = oci.build(oci.LAB_IMAGES[0])
    members = _members(built.archive)
    assert all(info.mtime == oci.EPOCH and info.uid == 0 and info.gid == 0
               for info in members.values())
    assert list(members) == sorted(members), "entries sorted"
    assert json.loads(_read(built.archive, "oci-layout")) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(_read(built.archive, "index.json"))
    [descriptor] = index["manifests"]
    assert descriptor["digest"] == built.image.digest
    assert descriptor["annotations"] == {"org.opencontainers.image.ref.name": "1.0"}
    for name in (n for n in members if n.startswith("blobs/sha256/") and members[n].isfile()):
        assert hashlib.sha256(_read(built.archive, name)).hexdigest() == name.rsplit("/", 1)[1]
    manifest = json.loads(_read(built.archive, f"blobs/sha256/{built.image.digest[7:]}"))
    assert manifest["mediaType"] == oci.MEDIA_MANIFEST and len(manifest["layers"]) == 1
    layer = _read(built.archive, "blobs/sha256/" + manifest["layers"][0]["digest"][7:])
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        handle = tar.extractfile("etc/lab-image")
        assert handle is not None and b"lab/hello 1.0" in handle.read()


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_reads_each_archive_with_its_pinned_digest(tmp_path: Path) -> None:
    pinned = {image.reference: image.digest for image in read_images(LAB_IMAGES)}
    for built in oci.build_all():
        path = tmp_path / f"{built.image.name.replace('/', '_')}-{built.image.tag}.oci.tar"
        path.write_bytes(built.archive)
        for reference in (f"oci-archive:{path}", f"oci-archive:{path}:{built.image.tag}"):
            out = subprocess.run(["skopeo", "inspect", "--format", "{{.Digest}}", reference],
                                 capture_output=True, text=True, timeout=60, check=False)
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == pinned[built.image.reference]


# --- the lab's mirror --------------------------------------------------------------------------

def test_mirror_needs_the_gogs_standin(lab_spec: PlatformSpec, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert mirror.GOGS_STANDIN.is_file()
    assert mirror.sources(lab_spec)[f"gogs/{lab_spec.versions.gogs}/gogs"] == mirror.GOGS_STANDIN
    missing = tmp_path / "lab" / "gogs" / "standin.py"
    monkeypatch.setattr(mirror, "GOGS_STANDIN", missing)
    with pytest.raises(FileNotFoundError, match=r"lab/gogs/standin\.py"):
        mirror.sources(lab_spec)


def test_mirror_serves_images_and_gogs_with_sums_and_assembles_once(
        lab_spec: PlatformSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever the stand-in holds, the mirror copies it: a small script stands for it here.
    standin = tmp_path / "standin.py"
    standin.write_text("#!/usr/bin/python3\nprint('gogs stand-in')\n")
    monkeypatch.setattr(mirror, "GOGS_STANDIN", standin)
    root = tmp_path / "mirror"
    first = mirror.assemble(lab_spec, root)
    images = read_images(LAB_IMAGES)
    expected = {f"vault/{lab_spec.versions.vault}/vault", f"gogs/{lab_spec.versions.gogs}/gogs",
                *(image_archive_path(image) for image in images), SUMS_FILE}
    assert set(first) == expected
    sums = {path: digest for digest, path in
            (line.split("  ", 1) for line in (root / SUMS_FILE).read_text().splitlines())}
    assert set(sums) == expected - {SUMS_FILE}
    for relative, digest in sums.items():
        assert hashlib.sha256((root / relative).read_bytes()).hexdigest() == digest
    gogs = root / f"gogs/{lab_spec.versions.gogs}/gogs"
    assert gogs.read_bytes() == standin.read_bytes() and gogs.stat().st_mode & 0o111
    assert mirror.assemble(lab_spec, root) == [], "a second assemble changes nothing"
    # A damaged image is put back, and the sums follow.
    damaged = image_archive_path(images[0])
    (root / damaged).write_bytes(b"not an archive")
    assert mirror.assemble(lab_spec, root) == [damaged, SUMS_FILE]
    assert not [p for p in root.rglob(".*")], "no temporary file left"
