"""The `SshIdentity` block: the key the orchestrator logs in to every VM with.

`SshIdentity.connect(host, known_host_keys)` opens a Fabric connection that trusts
exactly the host keys it is given (the ones phase 1 generated and injected through
cloud-init): no ~/.ssh/known_hosts, no ~/.ssh/config, no agent, no key files, no
auto-add. Every failure to connect is one of three errors, each naming the host, the step
and the cause:

- `HostKeyMismatch`: the host presented a key that is not among the known ones (changed
  or unknown); the message carries both fingerprints in OpenSSH's `SHA256:...` form.
- `AuthenticationRefused`: the host refused the identity's key for that user.
- `HostUnreachable`: no TCP connection, no SSH banner, or the jump host could not reach
  it (a `ConnectionError`, so `tasks.retry.is_transient` retries it; the other two are
  permanent).

Private keys never appear in messages or logs: only their public fingerprints do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import socket
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

if TYPE_CHECKING:
    import paramiko
    from fabric import Connection


class SshHostError(Exception):
    """Something failed on (or on the way to) a host: says which host, which step, why."""

    def __init__(self, host: str, step: str, cause: str) -> None:
        super().__init__(f"{host}: {step} failed: {cause}")
        self.host = host
        self.step = step
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Prefect's task boundary
        return (self.__class__, (self.host, self.step, self.cause))


class HostUnreachable(SshHostError, ConnectionError):
    """No SSH session could be set up with the host (transient: worth a retry)."""


class SshNotListening(HostUnreachable):
    """The host answered, but nothing accepts connections on its SSH port yet: a VM that
    reported its IP while its boot goes on (sshd starts after cloud-init's users)."""


class AuthenticationRefused(SshHostError):
    """The host refused the identity's key (permanent: the key or the user is wrong)."""


class HostKeyMismatch(SshHostError):
    """The host's key is not one phase 1 injected: a changed host, or the wrong address."""

    def __init__(self, host: str, presented: str, expected: Sequence[str]) -> None:
        wanted = ", ".join(expected) if expected else "none (no host key is known for it)"
        super().__init__(host, "host key verification",
                         f"the host presented {presented}, expected {wanted}; "
                         "connection refused (a changed or unknown host key)")
        self.presented = presented
        self.expected = tuple(expected)

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.host, self.presented, self.expected))


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's `<type> SHA256:<base64>` form of a public key's fingerprint."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


def parse_public_key(line: str) -> paramiko.PKey:
    """A public key from an OpenSSH line (`ssh-ed25519 AAAA... [comment]`) or from a
    known_hosts line (`host ssh-ed25519 AAAA...`)."""
    import paramiko

    fields = line.split()
    for index, field in enumerate(fields[:-1]):
        if field.startswith(("ssh-", "ecdsa-", "sk-")):
            try:
                blob = base64.b64decode(fields[index + 1], validate=True)
                return paramiko.PKey.from_type_string(field, blob)
            except (binascii.Error, ValueError, paramiko.SSHException) as error:
                raise ValueError(f"unreadable {field} public key ({error})") from None
    raise ValueError(f"not an OpenSSH public key line: {line[:40]!r}")


def _refusing_policy(expected: Sequence[str]) -> paramiko.MissingHostKeyPolicy:
    """RejectPolicy that says what was presented (and that nothing was known)."""
    import paramiko

    class _Refuse(paramiko.RejectPolicy):
        def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                             key: paramiko.PKey) -> None:
            # paramiko names a host on another port "[host]:port", as known_hosts does
            host = hostname[1:].rsplit("]:", 1)[0] if hostname.startswith("[") else hostname
            raise HostKeyMismatch(host, fingerprint(key), expected)

    return _Refuse()


def _hostkey_name(host: str, port: int) -> str:
    """How paramiko looks a host up in its host keys (like known_hosts)."""
    return host if port == 22 else f"[{host}]:{port}"


def split_jump(spec: str) -> tuple[str | None, str, int]:
    """`user@host[:port]` -> (user, host, port)."""
    user, _, rest = spec.rpartition("@")
    host, port = rest, 22
    if rest.count(":") == 1:
        host, port_text = rest.split(":")
        port = int(port_text)
    elif rest.startswith("[") and "]:" in rest:
        host, port_text = rest[1:].split("]:")
        port = int(port_text)
    return (user or None), host, port


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

        key = self._load_private()
        return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode()

    def _load_private(self) -> Any:
        """The private key as a `cryptography` object (OpenSSH format, or PEM for RSA)."""
        from cryptography.hazmat.primitives import serialization

        passphrase = self.passphrase.get_secret_value().encode() if self.passphrase else None
        data = self.private_key.get_secret_value().encode()
        try:
            try:
                return serialization.load_ssh_private_key(data, password=passphrase)
            except ValueError as first:
                if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
                    raise first
                return serialization.load_pem_private_key(data, password=passphrase)
        except (ValueError, TypeError) as error:
            raise ValueError(f"SSH identity of {self.user}: the private key cannot be read "
                             f"({error}); expected an OpenSSH private key (ed25519 or RSA)"
                             + ("" if passphrase else "; no passphrase is set")) from None

    def pkey(self) -> paramiko.PKey:
        """The private key as paramiko needs it (ed25519, RSA or ECDSA; passphrase applied)."""
        import paramiko
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

        loaded = self._load_private()
        key_class: type[paramiko.PKey]
        if isinstance(loaded, ed25519.Ed25519PrivateKey):
            key_class = paramiko.Ed25519Key
        elif isinstance(loaded, rsa.RSAPrivateKey):
            key_class = paramiko.RSAKey
        elif isinstance(loaded, ec.EllipticCurvePrivateKey):
            key_class = paramiko.ECDSAKey
        else:
            raise ValueError(f"SSH identity of {self.user}: unsupported key type "
                             f"{type(loaded).__name__}; use ed25519 or RSA")
        password = self.passphrase.get_secret_value() if self.passphrase else None
        return key_class.from_private_key(io.StringIO(self.private_key.get_secret_value()),
                                          password=password)

    def connect(self, host: str, known_host_keys: Iterable[str], *, port: int = 22,
                user: str | None = None, zone: str | None = None,
                jump: str | Connection | None = None,
                jump_host_keys: Iterable[str] = ()) -> Connection:
        """An open Fabric connection to `host` that trusts only `known_host_keys`.

        `known_host_keys`: OpenSSH public key lines (or known_hosts lines) of the host, as
        phase 1 injected them. `user` defaults to the block's user. The jump host is
        `jump` (a `user@host[:port]` string or an open Connection) or else the block's
        jump host for `zone`; a jump host's own keys come in `jump_host_keys`.
        Raises HostKeyMismatch, AuthenticationRefused or HostUnreachable.
        """
        gateway: Connection | None
        if jump is None and zone is not None and zone in self.jump_hosts:
            jump = self.jump_hosts[zone]
        if isinstance(jump, str):
            jump_user, jump_host, jump_port = split_jump(jump)
            gateway = self.connect(jump_host, jump_host_keys, port=jump_port, user=jump_user)
        else:
            gateway = jump
        connection = self.connection(host, known_host_keys, port=port, user=user,
                                     gateway=gateway)
        open_connection(connection)
        return connection

    def connection(self, host: str, known_host_keys: Iterable[str], *, port: int = 22,
                   user: str | None = None, gateway: Connection | None = None) -> Connection:
        """The same Connection as `connect`, not opened yet (Fabric opens it on first use;
        call `open_connection` to get this module's errors)."""
        from fabric import Config, Connection

        keys = [parse_public_key(line) for line in known_host_keys]
        expected = [fingerprint(key) for key in keys]
        connection = Connection(
            host, user=user or self.user, port=port, gateway=gateway,
            config=Config(lazy=True, overrides={"load_ssh_configs": False}),
            connect_timeout=self.connect_timeout,
            connect_kwargs={"pkey": self.pkey(), "look_for_keys": False,
                            "allow_agent": False, "banner_timeout": self.connect_timeout,
                            "auth_timeout": self.connect_timeout,
                            "channel_timeout": self.connect_timeout})
        client: paramiko.SSHClient = connection.client
        client.get_host_keys().clear()
        client._system_host_keys.clear()  # never ~/.ssh/known_hosts
        for key in keys:
            client.get_host_keys().add(_hostkey_name(host, port), key.get_name(), key)
        client.set_missing_host_key_policy(_refusing_policy(expected))
        return connection


def open_connection(connection: Connection) -> None:
    """Open (or keep) the connection, turning paramiko's failures into this module's errors."""
    import paramiko

    if connection.is_connected:
        return
    host = connection.host
    where = f"{connection.user}@{host}:{connection.port}"
    gateway = connection.gateway
    via = f" via {gateway.host}" if gateway is not None and not isinstance(gateway, str) else ""
    if gateway is not None and not isinstance(gateway, str):
        open_connection(gateway)  # its own errors name the jump host
    try:
        if gateway is None:
            # Our own socket, for TCP_NODELAY: without it every exchange of a small
            # request waits for the peer's delayed ACK (about 40 ms on Linux), which makes
            # a round trip 90 ms instead of 2 ms and the handshake 0.3 s instead of 0.05.
            sock = socket.create_connection((host, int(connection.port)),
                                            timeout=connection.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.connect_kwargs["sock"] = sock
        connection.open()
    except SshHostError:
        connection.close()
        raise
    except paramiko.BadHostKeyException as error:
        connection.close()
        raise HostKeyMismatch(host, fingerprint(error.key),
                              [fingerprint(error.expected_key)]) from None
    except paramiko.AuthenticationException as error:
        connection.close()
        raise AuthenticationRefused(
            host, "SSH authentication",
            f"{where} refused the key {_public_fingerprint(connection)} ({error})") from None
    except paramiko.ChannelException as error:
        connection.close()
        # The jump host's "connect failed": nothing listens there yet, or no route to it.
        kind = SshNotListening if error.code == paramiko.OPEN_FAILED_CONNECT_FAILED \
            else HostUnreachable
        raise kind(host, "SSH connect",
                              f"{where}{via}: the jump host could not reach it "
                              f"({error.text or error})") from None
    except TimeoutError as error:
        connection.close()
        raise HostUnreachable(host, "SSH connect",
                              f"{where}{via}: no answer within {connection.connect_timeout} s"
                              f" ({error or 'timed out'})") from None
    except ConnectionRefusedError as error:
        connection.close()
        raise SshNotListening(host, "SSH connect", f"{where}{via}: {error}") from None
    except (OSError, EOFError, paramiko.SSHException) as error:
        connection.close()
        raise HostUnreachable(host, "SSH connect",
                              f"{where}{via}: {error or type(error).__name__}") from None


def _public_fingerprint(connection: Connection) -> str:
    pkey = connection.connect_kwargs.get("pkey")
    return fingerprint(pkey) if pkey is not None else "(no key)"
