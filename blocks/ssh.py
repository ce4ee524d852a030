"""The `SshIdentity` block: the key the orchestrator logs in to every VM with."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class SshIdentity(Block):
    """The admin user's private key, and how to reach hosts (jump hosts, timeouts, fan-out).

    Host keys are never auto-accepted: they come from phase 1, which generated them.
    """

    _block_type_name = "SSH Identity"
    _block_type_slug = "ssh-identity"
    _description = "SSH user and private key used by every phase that works over SSH."

    user: str = Field(description="login user on the VMs")
    private_key: SecretStr = Field(description="OpenSSH private key (ed25519 or RSA)")
    passphrase: SecretStr | None = Field(default=None)
    jump_hosts: dict[str, str] = Field(default_factory=dict,
                                       description="zone name -> user@jump-host[:port]")
    connect_timeout: float = Field(default=10.0, gt=0)
    concurrency: int = Field(default=20, ge=1)

    def public_key(self) -> str:
        """The OpenSSH public key line of the private key (what cloud-init authorizes)."""
        from cryptography.hazmat.primitives import serialization

        passphrase = self.passphrase.get_secret_value().encode() if self.passphrase else None
        try:
            key = serialization.load_ssh_private_key(
                self.private_key.get_secret_value().encode(), password=passphrase)
        except (ValueError, TypeError) as error:
            raise ValueError(f"SSH identity of {self.user}: the private key cannot be read "
                             f"({error}); expected an OpenSSH private key") from None
        return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode()
