"""The images a release needs in the private registry, pinned by manifest digest.

One file per environment, `deployments/<env>/images.txt`, one image per line::

    # comment lines and blank lines are ignored; a comment may also end a line
    rancher/rke2-runtime:v1.32.9-rke2r1@sha256:<64 hex digits>

The digest pins exactly what an air-gapped site receives: the registry is seeded with
that manifest and nothing else, so a tag moved upstream cannot change a release. Names are
registry-relative (the registry is the spec's `artifacts.registry`); each name:tag appears
once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The distribution reference grammar: lowercase path components joined by separators.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
NAME_LIMIT = 255


class ImageListError(ValueError):
    """A line of an images list is wrong: the message names the file, the line and why."""


@dataclass(frozen=True, order=True)
class Image:
    """One pinned image: repository name (no registry host), tag, manifest digest."""

    name: str
    tag: str
    digest: str

    @property
    def reference(self) -> str:
        """`name:tag`, as pushed to the registry."""
        return f"{self.name}:{self.tag}"

    def line(self) -> str:
        """The images.txt line for this image."""
        return f"{self.name}:{self.tag}@{self.digest}"


def parse_image(entry: str) -> Image:
    """One `name:tag@sha256:<hex>` entry; ValueError says what is wrong with it."""
    reference, at, digest = entry.partition("@")
    if not at:
        raise ValueError("no digest: write name:tag@sha256:<64 hex digits>")
    if not DIGEST_RE.fullmatch(digest):
        raise ValueError(f"digest {digest!r} is not sha256: followed by 64 lowercase hex "
                         "digits")
    name, colon, tag = reference.rpartition(":")
    if not colon or "/" in tag:
        raise ValueError(f"{reference!r} has no tag: write name:tag@sha256:...")
    first, slash, _ = name.partition("/")
    looks_like_host = "." in first or ":" in first or first == "localhost"
    if ":" in name or (slash and looks_like_host):
        raise ValueError(f"{name!r} names a registry host; names are relative to the "
                         "platform's registry (artifacts.registry)")
    if len(name) > NAME_LIMIT or not NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a repository name (lowercase letters, digits, "
                         "separators . _ __ - between them, components joined by /)")
    if not TAG_RE.fullmatch(tag):
        raise ValueError(f"{tag!r} is not a tag (letters, digits, _ . -, at most 128, not "
                         "starting with . or -)")
    return Image(name, tag, digest)


def parse_images(text: str, source: str = "<images>") -> list[Image]:
    """Every image of an images list, in file order; `source` names the file in errors."""
    images: list[Image] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()  # "#" is never part of an entry
        if not line:
            continue
        if len(line.split()) != 1:
            raise ImageListError(f"{source}:{number}: one image per line; found "
                                 f"{len(line.split())} words in {line!r}")
        try:
            image = parse_image(line)
        except ValueError as error:
            raise ImageListError(f"{source}:{number}: {error}") from None
        if image.reference in seen:
            raise ImageListError(f"{source}:{number}: {image.reference} is already listed "
                                 f"at line {seen[image.reference]}; list each name:tag once")
        seen[image.reference] = number
        images.append(image)
    return images


