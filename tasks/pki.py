"""TLS certificates of the platform's services: issued by Vault's PKI, renewed only when due.

Every service certificate (Vault's own listener, the registry, Gogs, later the clusters)
comes from the intermediate CA in Vault (`tasks.vault` sets it up). A certificate on a
host is kept while it chains to the current CA, names exactly the wanted names and
addresses, and has more than a third of its life left; otherwise a new one is issued.
So a second run issues nothing.

Vault's listener needs a certificate before Vault's PKI exists: `bootstrap_certificate`
makes a short-lived self-signed one, which phase 3 replaces with a PKI one as soon as the
PKI is up.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    import hvac

PKI_ROOT_MOUNT = "pki"
PKI_MOUNT = "pki_int"
PKI_ROLE = "platform-services"
SERVICE_TTL = "8760h"  # one year; renewed at a third of its life left


@dataclass(frozen=True)
class TlsBundle:
    """A certificate (leaf first, then the chain up to the root), its key, and the root."""

    certificate: str
    private_key: str = field(repr=False)
    ca: str


def _names(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return ({name.lower() for name in san.get_values_for_type(x509.DNSName)},
            {str(ip) for ip in san.get_values_for_type(x509.IPAddress)})


def split_pem(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode()) if pem.strip() else []


def is_current(chain_pem: str | None, ca_pem: str, dns_names: Sequence[str],
               ip_addresses: Sequence[str], *, now: datetime.datetime | None = None) -> bool:
    """Whether the certificate on a host can stay: signed under ``ca_pem``, the same names,
    and more than a third of its validity left."""
    if not chain_pem:
        return False
    try:
        chain = split_pem(chain_pem)
        roots = split_pem(ca_pem)
    except ValueError:
        return False
    if not chain or not roots:
        return False
    leaf = chain[0]
    now = now or datetime.datetime.now(datetime.UTC)
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now >= end - (end - start) / 3:
        return False
    if _names(leaf) != ({n.lower() for n in dns_names}, {str(ip) for ip in ip_addresses}):
        return False
    root_keys = {root.subject.rfc4514_string(): root for root in roots}
    # Walk the chain as written: each certificate verified by the next, the last by a root.
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except Exception:  # InvalidSignature, ValueError, TypeError: not our chain
            return False
    top = chain[-1]
    root = root_keys.get(top.issuer.rfc4514_string())
    if root is None:
        return False
    try:
        top.verify_directly_issued_by(root)
    except Exception:
        return False
    return True


def bootstrap_certificate(common_name: str, dns_names: Sequence[str],
                          ip_addresses: Sequence[str], *, days: int = 2) -> TlsBundle:
    """A self-signed certificate for Vault's first start, before its PKI exists."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "platform bootstrap")])
    now = datetime.datetime.now(datetime.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return TlsBundle(certificate=pem, private_key=key_pem, ca=pem)


def issue(client: hvac.Client, root: str, common_name: str, dns_names: Sequence[str],
          ip_addresses: Sequence[str], *, ttl: str = SERVICE_TTL) -> TlsBundle:
    """A new certificate from the platform's intermediate CA (``root``: the root CA's
    PEM, left out of the chain the service sends)."""
    data: dict[str, Any] = client.secrets.pki.generate_certificate(
        name=PKI_ROLE, common_name=common_name, mount_point=PKI_MOUNT,
        extra_params={"alt_names": ",".join(n for n in dns_names if n != common_name),
                      "ip_sans": ",".join(ip_addresses), "ttl": ttl,
                      "exclude_cn_from_sans": False})["data"]
    chain = [data["certificate"], *[c for c in data.get("ca_chain", [])
                                      if c.strip() != data["certificate"].strip()]]
    chain = [c for c in chain if c.strip() != root.strip()]
    return TlsBundle(certificate="\n".join(c.strip() for c in chain) + "\n",
                     private_key=data["private_key"].strip() + "\n", ca=root)


def root_certificate(client: hvac.Client) -> str:
    """The platform's root CA certificate (PEM), which every client trusts."""
    response = client.adapter.get(f"/v1/{PKI_ROOT_MOUNT}/cert/ca", raise_exception=True)
    body = response.json() if hasattr(response, "json") else response
    pem: str = body["data"]["certificate"]
    return pem.strip() + "\n"


def renewal(client: hvac.Client, root: str, current_chain: str | None, common_name: str,
            dns_names: Sequence[str], ip_addresses: Sequence[str]) -> TlsBundle | None:
    """A new certificate if the one on the host (``current_chain``, read over SSH) is
    missing, not under ``root`` (the platform CA), names other names, or is a third from
    its end; else None."""
    if is_current(current_chain, root, dns_names, ip_addresses):
        return None
    return issue(client, root, common_name, dns_names, ip_addresses)
