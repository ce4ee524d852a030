"""Where each binary lives on the artifact mirror: one layout for the product and the lab.

The mirror is a plain HTTP tree; `SHA256SUMS` at its root lists every file as
`<sha256>  <path>` (the `sha256sum` format), so a download is checked before it is used.
"""

from __future__ import annotations

from sizing.spec import PlatformSpec

SUMS_FILE = "SHA256SUMS"

LAYOUT: dict[str, str] = {
    "vault": "vault/{version}/vault",
}


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


def sums_url(spec: PlatformSpec) -> str:
    return f"{spec.artifacts.mirror.rstrip('/')}/{SUMS_FILE}"
