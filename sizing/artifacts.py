"""Where each binary lives on the artifact mirror: one layout for the product and the lab.

The mirror is a plain HTTP tree; `SHA256SUMS` at its root lists every file as
`<sha256>  <path>` (the `sha256sum` format), so a download is checked before it is used.
Container images are OCI archives (`skopeo copy oci-archive:...` reads them) under
`images/<name>/<tag>.oci.tar`, one per line of the release's images list
(sizing.images).
"""

from __future__ import annotations

from sizing.images import Image
from sizing.spec import PlatformSpec

SUMS_FILE = "SHA256SUMS"

LAYOUT: dict[str, str] = {
    "vault": "vault/{version}/vault",
    "gogs": "gogs/{version}/gogs",
}
IMAGE_LAYOUT = "images/{name}/{tag}.oci.tar"


def artifact_path(component: str, version: str) -> str:
    """The path of a component's binary relative to the mirror's root."""
    try:
        return LAYOUT[component].format(version=version)
    except KeyError:
        raise KeyError(f"no artifact layout for {component!r}; known: "
                       f"{', '.join(sorted(LAYOUT))}") from None


def artifact_url(spec: PlatformSpec, component: str) -> str:
    version: str = getattr(spec.versions, component)
    return f"{spec.artifacts.mirror.rstrip('/')}/{artifact_path(component, version)}"


def image_archive_path(image: Image) -> str:
    """The path of an image's OCI archive relative to the mirror's root (the name's own
    slashes become directories; a tag never holds one)."""
    return IMAGE_LAYOUT.format(name=image.name, tag=image.tag)


def image_archive_url(spec: PlatformSpec, image: Image) -> str:
    return f"{spec.artifacts.mirror.rstrip('/')}/{image_archive_path(image)}"


def sums_url(spec: PlatformSpec) -> str:
    return f"{spec.artifacts.mirror.rstrip('/')}/{SUMS_FILE}"
