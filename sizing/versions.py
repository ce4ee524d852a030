"""The supported version matrix: the component versions this project is tested with.

A spec may pin any listed version; anything else is refused before a run starts, since an
untested combination is where air-gapped upgrades go wrong. The first entry is the default.
"""

from __future__ import annotations

SUPPORTED_VERSIONS: dict[str, tuple[str, ...]] = {
    "rke2": ("v1.32.9+rke2r1", "v1.31.13+rke2r1", "v1.30.14+rke2r2"),
    "rancher": ("v2.12.2", "v2.11.6"),
    "vault": ("1.20.4", "1.19.10"),
    "gogs": ("0.13.3", "0.13.2"),
    "argocd": ("v3.1.8", "v2.14.20"),
    "cert_manager": ("v1.18.2", "v1.17.4"),
    "longhorn": ("v1.9.1", "v1.8.2"),
    "minio": ("RELEASE.2025-09-07T16-13-09Z", "RELEASE.2025-04-22T22-12-26Z"),
    "keycloak": ("26.3.4", "26.2.5"),
    "kafka": ("4.0.0", "3.9.1"),
    "n8n": ("1.112.3", "1.100.1"),
    "flowable": ("7.2.0", "7.1.0"),
    "gravitee": ("4.8.5", "4.7.9"),
    "neuvector": ("5.4.6", "5.4.5"),
    "coroot": ("1.15.5", "1.14.3"),
}

DEFAULT_VERSIONS: dict[str, str] = {
    name: versions[0] for name, versions in SUPPORTED_VERSIONS.items()
}
