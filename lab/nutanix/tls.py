"""TLS material for the Nutanix stand-in: a private CA and a server certificate it signs.

Prism Central only speaks HTTPS, and the project's clients verify certificates, so the
stand-in must be verifiable too. The CA file is what a client passes as
`Configuration.root_ca_certificate_file`. The files are kept in the state directory and
reused across restarts, so a client that trusts the CA keeps trusting the restarted server.
The certificates carry the extensions strict X.509 verification asks for (SKI/AKI, key
usage, SAN), so they also verify under Python 3.13's stricter defaults.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE = "nutanix-ca.pem"
CA_KEY_FILE = "nutanix-ca-key.pem"
CERT_FILE = "nutanix-server.pem"
KEY_FILE = "nutanix-server-key.pem"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the PEM files: the CA clients trust, and the server's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def generate_ca(directory: Path, common_name: str = "Nutanix stand-in CA") -> tuple[
        x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create a CA certificate and key in `directory` (also used by tests to make a wrong CA)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / CA_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / CA_KEY_FILE, key)
    return cert, key


def _server_cert(directory: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                 hosts: tuple[str, ...]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / KEY_FILE, key)


def _still_good(directory: Path, hosts: tuple[str, ...]) -> bool:
    """True when the existing files cover `hosts` and stay valid for at least a day."""
    try:
        cert = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
        ca = x509.load_pem_x509_certificate((directory / CA_FILE).read_bytes())
        serialization.load_pem_private_key((directory / KEY_FILE).read_bytes(), None)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    covered = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    covered |= set(san.get_values_for_type(x509.DNSName))
    soon = _now() + dt.timedelta(days=1)
    return (set(hosts) <= covered and cert.issuer == ca.subject
            and cert.not_valid_after_utc > soon and ca.not_valid_after_utc > soon)


def ensure_tls(directory: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> TlsFiles:
    """Return the TLS files in `directory`, creating them when missing, stale or too narrow."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE)
    if _still_good(directory, hosts):
        return files
    try:
        ca = x509.load_pem_x509_certificate((directory / CA_FILE).read_bytes())
        loaded = serialization.load_pem_private_key((directory / CA_KEY_FILE).read_bytes(), None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey) or \
                ca.not_valid_after_utc < _now() + dt.timedelta(days=30):
            raise ValueError("CA unusable")
        ca_key = loaded
    except (OSError, ValueError):
        ca, ca_key = generate_ca(directory)
    _server_cert(directory, ca, ca_key, hosts)
    return files
