"""Phase 3's registry on the lab: Debian's docker-registry on lab-gitops-01, seeded from the
lab mirror's OCI archives, then used from the root namespace as a cluster node would.

The TLS certificate comes from a CA this test makes, standing in for Vault's PKI.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.lab import Lab
from lab.oci import ImageDefinition, build
from lab.tls import issue
from sizing.images import Image
from sizing.inventory import build_inventory
from tasks.hostops import ConnectionPool, HostOpError
from tasks.prepare import ssh_pool
from tasks.registry import RegistryCredentials, RegistryTls, apply_registry
from tasks.spec import read_images, read_spec
from tests.conftest import LAB_SPEC, ROOT
from tests.labkit import prepared_lab, ssh

pytestmark = [pytest.mark.lab, pytest.mark.prefect,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]

SPEC = read_spec(LAB_SPEC)
INVENTORY = build_inventory(SPEC)
GITOPS = INVENTORY.by_name("lab-gitops-01")
HOST, PORT = SPEC.artifacts.registry.split(":")[0], 5000
BY_IP = f"{GITOPS.ip}:{PORT}"  # the root namespace has no /etc/hosts entry for HOST
IMAGES = read_images(ROOT / "deployments" / "lab" / "images.txt")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with prepared_lab(vcsim_port=18992) as lab:
        yield lab


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and the registry's certificate for its name and address (Vault's PKI later)."""
    directory = tmp_path_factory.mktemp("pki")
    issue(directory, "registry", [HOST, str(GITOPS.ip)])
    certs = directory / "certs.d"  # a skopeo --cert-dir: the CA as *.crt
    certs.mkdir()
    shutil.copy(directory / "lab-ca.pem", certs / "ca.crt")
    return directory


@pytest.fixture(scope="module")
def tls(pki: Path) -> RegistryTls:
    return RegistryTls((pki / "registry.pem").read_text(), (pki / "registry.key").read_text(),
                       (pki / "lab-ca.pem").read_text())


@pytest.fixture(scope="module")
def credentials() -> RegistryCredentials:
    return RegistryCredentials("platform-seed", secrets.token_urlsafe(24))


@pytest.fixture(scope="module")
def pool(lab: Lab) -> Iterator[ConnectionPool]:
    with ssh_pool(SPEC) as pool:
        yield pool


class _Records(logging.Handler):
    """Keeps every record it sees as "<logger> <message>"."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()}")


@pytest.fixture(scope="module")
def seeded(lab: Lab, pool: ConnectionPool, tls: RegistryTls,
           credentials: RegistryCredentials) -> str:
    """The first apply; its report and every log record it made, as text (checked for
    secrets by the tests)."""
    handler = _Records()
    records = handler.lines
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        report = apply_registry(pool, SPEC, INVENTORY, GITOPS, tls, credentials, IMAGES)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert {f"command seed {image.reference}" for image in IMAGES} <= set(report.changed)
    assert "service docker-registry.service" in report.changed
    assert any("command seed lab/hello:1.0" in record for record in records), \
        "the debug log shows the commands (and is checked for secrets)"
    return "\n".join([str(report), repr(report), *records])


@pytest.fixture(scope="module")
def authfile(tmp_path_factory: pytest.TempPathFactory, credentials: RegistryCredentials) -> Path:
    """A containers auth file for the registry by address, as a client would hold it."""
    token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode())
    path = tmp_path_factory.mktemp("auth") / "auth.json"
    path.write_text(json.dumps({"auths": {BY_IP: {"auth": token.decode()}}}))
    path.chmod(0o600)
    return path


def _ssh(lab: Lab, vm_name: str, command: str,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return ssh(lab, SPEC, vm_name, command, stdin=stdin)


def _curl(pki: Path, path: str, credentials: RegistryCredentials | None = None,
          *extra: str) -> subprocess.CompletedProcess[str]:
    """curl by the registry's name (resolved with --resolve), verifying with the CA; the
    login goes in on standard input, never on the command line."""
    config = f'user = "{credentials.username}:{credentials.password}"\n' if credentials else ""
    return subprocess.run(
        ["curl", "-sS", "-K", "-", "--resolve", f"{HOST}:{PORT}:{GITOPS.ip}",
         "--cacert", str(pki / "lab-ca.pem"), "-w", "\n%{http_code}", *extra,
         f"https://{HOST}:{PORT}{path}"],
        input=config, capture_output=True, text=True, timeout=30, check=False)


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_registry_runs_as_its_user_and_a_second_apply_changes_nothing(
        lab: Lab, pool: ConnectionPool, tls: RegistryTls, credentials: RegistryCredentials,
        seeded: str, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    again = apply_registry(pool, SPEC, INVENTORY, GITOPS, tls, credentials, IMAGES)
    assert again.changed == [], again.changed
    assert len(again.unchanged) == len(again.results) >= 14 + len(IMAGES)
    out = _ssh(lab, "lab-gitops-01", "ps -o user:20= -C docker-registry; "
                                     "sudo -n stat -c '%U:%G %a' /etc/docker/registry/htpasswd "
                                     "/etc/docker/registry/tls/registry.key "
                                     "/etc/docker/registry/seed-auth.json")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["docker-registry", "root:docker-registry", "640",
                                  "root:docker-registry", "640", "root:root", "600"]
    output = capfd.readouterr()
    for text in (seeded, f"{again}\n{again!r}", caplog.text, output.out, output.err):
        assert credentials.password not in text
        assert tls.key_pem.splitlines()[1] not in text


def test_tls_verifies_with_the_ca_and_only_with_it(seeded: str, pki: Path) -> None:
    context = ssl.create_default_context(cafile=str(pki / "lab-ca.pem"))
    with socket.create_connection((str(GITOPS.ip), PORT), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=HOST) as tls_socket:
        peer = tls_socket.getpeercert()
        assert peer is not None and ("DNS", HOST) in peer["subjectAltName"]
    untrusting = ssl.create_default_context()  # the system's CAs only
    with socket.create_connection((str(GITOPS.ip), PORT), timeout=10) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        untrusting.wrap_socket(raw, server_hostname=HOST)
    answer = _curl(pki, "/v2/")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.endswith("\n401"), "TLS verified; the API wants a login"


def test_anonymous_access_is_refused(seeded: str, pki: Path, tmp_path: Path) -> None:
    built = build(ImageDefinition("test/anonymous", "1", (("x", b"x\n", 0o644),), ("/x",)))
    archive = tmp_path / "anonymous.oci.tar"
    archive.write_bytes(built.archive)
    push = _skopeo("copy", "--dest-cert-dir", str(pki / "certs.d"), f"oci-archive:{archive}",
                   f"docker://{BY_IP}/test/anonymous:1")
    assert push.returncode != 0
    assert "authentication required" in push.stderr or "unauthorized" in push.stderr, push.stderr
    catalog = _curl(pki, "/v2/_catalog")
    assert catalog.stdout.endswith("\n401")
    wrong = _curl(pki, "/v2/_catalog", RegistryCredentials("platform-seed", "not-the-password"))
    assert wrong.stdout.endswith("\n401")


def test_authenticated_push_and_pull_keep_digests(seeded: str, pki: Path, authfile: Path,
                                                  tmp_path: Path) -> None:
    built = build(ImageDefinition("test/pushed", "2", (("etc/pushed", b"pushed by the test\n",
                                                        0o644),), ("/bin/true",)))
    archive = tmp_path / "pushed.oci.tar"
    archive.write_bytes(built.archive)
    certs = str(pki / "certs.d")
    push = _skopeo("copy", "--preserve-digests", "--dest-authfile", str(authfile),
                   "--dest-cert-dir", certs, f"oci-archive:{archive}",
                   f"docker://{BY_IP}/test/pushed:2")
    assert push.returncode == 0, push.stderr
    for image in [built.image, *IMAGES]:
        reference = f"docker://{BY_IP}/{image.reference}"
        inspect = _skopeo("inspect", "--no-tags", "--format", "{{.Digest}}", "--authfile",
                          str(authfile), "--cert-dir", certs, reference)
        assert inspect.returncode == 0, inspect.stderr
        assert inspect.stdout.strip() == image.digest
    pulled = tmp_path / "pulled"
    pull = _skopeo("copy", "--preserve-digests", "--src-authfile", str(authfile),
                   "--src-cert-dir", certs, f"docker://{BY_IP}/{IMAGES[0].reference}",
                   f"oci:{pulled}:{IMAGES[0].tag}")
    assert pull.returncode == 0, pull.stderr
    index = json.loads((pulled / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [IMAGES[0].digest]


def test_catalog_lists_the_seeded_images(seeded: str, pki: Path,
                                         credentials: RegistryCredentials) -> None:
    catalog = _curl(pki, "/v2/_catalog", credentials)
    body, _, status = catalog.stdout.rpartition("\n")
    assert status == "200", catalog.stdout + catalog.stderr
    assert {image.name for image in IMAGES} <= set(json.loads(body)["repositories"])
    tags = _curl(pki, "/v2/lab/hello/tags/list", credentials)
    body, _, status = tags.stdout.rpartition("\n")
    assert status == "200" and sorted(json.loads(body)["tags"]) == ["1.0", "1.1"]
    assert credentials.password not in catalog.stdout + catalog.stderr


@pytest.mark.parametrize("node", ["lab-apps-server-01", "lab-dmz-server-01"])
def test_a_cluster_node_reaches_the_registry_by_name(lab: Lab, seeded: str, tls: RegistryTls,
                                                     node: str) -> None:
    """By the name phase 2 put in /etc/hosts, through its firewall, from the LAN and DMZ."""
    out = _ssh(lab, node,
               f"getent hosts {HOST}; cat > /tmp/registry-ca.pem; curl -sS -o /dev/null "
               f"-w '%{{http_code}}' --cacert /tmp/registry-ca.pem https://{HOST}:{PORT}/v2/",
               stdin=tls.ca_pem)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == str(GITOPS.ip) and out.stdout.endswith("401")


def test_a_bad_seed_names_the_host_and_the_cause_without_secrets(
        lab: Lab, pool: ConnectionPool, tls: RegistryTls, credentials: RegistryCredentials,
        seeded: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    missing = Image("lab/missing", "1", "sha256:" + "0" * 64)
    with pytest.raises(HostOpError) as caught:
        apply_registry(pool, SPEC, INVENTORY, GITOPS, tls, credentials, [*IMAGES, missing])
    message = str(caught.value)
    assert "lab-gitops-01" in message and "command seed lab/missing:1" in message
    assert "images/lab/missing/1.oci.tar is not listed in" in message
    # A pin that is not what the mirror holds is refused before anything is pushed.
    moved = Image("lab/hello", "1.0", "sha256:" + "3" * 64)
    with pytest.raises(HostOpError) as pinned:
        apply_registry(pool, SPEC, INVENTORY, GITOPS, tls, credentials, [moved])
    assert f"holds the manifest {IMAGES[0].digest}, but the images list pins " \
           f"{moved.digest}" in str(pinned.value)
    for error in (caught.value, pinned.value):
        for text in (str(error), repr(error), repr(error.results), caplog.text):
            assert credentials.password not in text
            assert tls.key_pem.splitlines()[1] not in text
    # Nothing was harmed: the next run with the real list changes nothing.
    assert apply_registry(pool, SPEC, INVENTORY, GITOPS, tls, credentials, IMAGES).changed == []
