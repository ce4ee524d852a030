"""The lab's SSH identity: a key pair generated once per lab, saved in the SshIdentity
block that phase 1 injects and every later phase logs in with."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def ensure_identity(directory: Path) -> Path:
    """Path of the lab's private key (OpenSSH format); the `.pub` beside it."""
    private = directory / "id_ed25519"
    if private.exists():
        return private
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    (directory / "id_ed25519.pub").write_bytes(public + b" platform-lab\n")
    return private
