"""The `VaultServer` block: where the platform's Vault is and how the orchestrator logs in.

Phase 3 creates it once Vault is initialised: the address, the platform's root CA (Vault's
own PKI root, which also signs Vault's listener certificate) and the orchestrator's
AppRole. Every later phase gets an authenticated client with `VaultServer.client()`.

Errors name the address and the cause, never a token or a secret id. A refused or
unreachable Vault is `VaultUnavailable` (a ConnectionError, so tasks retry it); refused
credentials are `VaultAuthError` (permanent).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

if TYPE_CHECKING:
    import hvac


class VaultUnavailable(ConnectionError):
    """Vault did not answer, answered 5xx, or is sealed (transient: retry, or unseal)."""


class VaultAuthError(RuntimeError):
    """Vault refused the block's credentials (permanent: the AppRole or token is wrong)."""


def ca_file(pem: str) -> str:
    """A file holding ``pem``, for clients that want a path (requests/hvac's ``verify``).

    One file per distinct CA, in a private directory, written once.
    """
    digest = hashlib.sha256(pem.encode()).hexdigest()[:16]
    directory = Path(tempfile.gettempdir()) / f"platform-ca-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{digest}.pem"
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(pem)
        partial.replace(path)
    return str(path)


def anonymous_client(address: str, ca_pem: str, timeout: float = 30.0) -> hvac.Client:
    """A client without a token, verifying Vault with ``ca_pem``: what phase 3 uses before
    the block exists (init, unseal, health)."""
    import hvac

    return hvac.Client(url=address, verify=ca_file(ca_pem), timeout=timeout)


class VaultServer(Block):
    """Vault (or OpenBao) address, the CA that signs its certificate, and an AppRole or a
    token for the orchestrator."""

    _block_type_name = "Vault Server"
    _block_type_slug = "vault-server"
    _description = "The platform's Vault: address, CA certificate and the orchestrator's login."

    address: str = Field(description="https://host:8200")
    ca_certificate: str = Field(description="PEM of the CA that signs Vault's certificate")
    role_id: SecretStr | None = Field(default=None, description="the orchestrator's AppRole")
    secret_id: SecretStr | None = Field(default=None)
    token: SecretStr | None = Field(default=None, description="instead of an AppRole")
    approle_mount: str = Field(default="approle")
    timeout: float = Field(default=30.0, gt=0)

    def client(self) -> hvac.Client:
        """An hvac client logged in with the AppRole (or the token), TLS verified."""
        import hvac
        import requests

        client = hvac.Client(url=self.address, verify=ca_file(self.ca_certificate),
                             timeout=self.timeout)
        try:
            if self.role_id is not None and self.secret_id is not None:
                client.auth.approle.login(role_id=self.role_id.get_secret_value(),
                                          secret_id=self.secret_id.get_secret_value(),
                                          mount_point=self.approle_mount)
            elif self.token is not None:
                client.token = self.token.get_secret_value()
                client.auth.token.lookup_self()
            else:
                raise VaultAuthError(f"Vault {self.address}: the block has neither an AppRole "
                                     "(role_id and secret_id) nor a token")
        except (hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden,
                hvac.exceptions.InvalidRequest) as error:
            raise VaultAuthError(f"Vault {self.address} refused the orchestrator's login: "
                                 f"{_first_error(error)}") from None
        except (hvac.exceptions.VaultDown, hvac.exceptions.InternalServerError,
                hvac.exceptions.BadGateway) as error:
            raise VaultUnavailable(f"Vault {self.address} is not serving: "
                                   f"{_first_error(error)}") from None
        except requests.exceptions.SSLError as error:
            raise VaultAuthError(f"Vault {self.address}: its TLS certificate does not verify "
                                 f"with the block's CA: {error}") from None
        except requests.exceptions.ConnectionError as error:
            raise VaultUnavailable(f"Vault {self.address} cannot be reached: "
                                   f"{type(error).__name__}") from None
        return client


def _first_error(error: Any) -> str:
    errors = getattr(error, "errors", None)
    if errors:
        return "; ".join(str(e) for e in errors)
    return str(error) or type(error).__name__
