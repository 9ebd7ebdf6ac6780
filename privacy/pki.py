"""The consortium's keys and certificates, made with ``cryptography`` (no home-made crypto).

Three kinds of material, in the formats Flower 1.42's deployment engine reads:

- the consortium certificate authority: a self-signed CA certificate and its key (PEM). Hospitals
  trust it with ``flower-supernode --root-certificates ca.pem``; the SuperLink serves
  ``--ssl-ca-certfile ca.pem``.
- the coordinator's TLS server certificate, signed by that CA, with subject alternative names for
  ``localhost``, ``127.0.0.1`` and the hostnames it is reached by (``--ssl-certfile`` /
  ``--ssl-keyfile``).
- a hospital's node-authentication key pair: an EC key on NIST P-384 (Flower's own curve), the
  private key in OpenSSH format (``flower-supernode --auth-supernode-private-key``, read by
  ``load_ssh_private_key``) and the public key as one OpenSSH line (what ``flwr supernode
  register`` reads with ``load_ssh_public_key``). Only the public key ever leaves the hospital.

Private keys are written with mode 0600 (created so, never widened after the fact).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.errors import MedfedError

CURVE = ec.SECP384R1
"""Flower generates SuperNode keys on P-384; the CA and TLS keys use it too."""

CA_DAYS = 3650
"""The CA outlives many server certificates: ten years."""
SERVER_DAYS = 825
"""TLS server certificates: the common maximum lifetime clients accept."""


class KeyFileError(MedfedError, ValueError):
    """A key or certificate file that is missing or not in the expected format."""


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file readable by its owner only (mode 0600).

    The file is created with that mode (``os.open``), so there is no moment it is readable by
    others; an existing file is refused rather than overwritten, as losing a key is not undoable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise FileExistsError(f"{path} exists already: remove it first to make a new key") from err
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _now() -> dt.datetime:
    # Backdated a little so that a peer whose clock is slightly behind accepts a fresh cert.
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)


def make_ca(consortium: str, days: int = CA_DAYS) -> CertificateAuthority:
    """A new self-signed CA for ``consortium`` (its name goes into the subject)."""
    key = ec.generate_private_key(CURVE())
    name = _name(f"{consortium} consortium CA", consortium)
    start = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    return CertificateAuthority(cert, key)


def _san(hostnames: list[str]) -> x509.SubjectAlternativeName:
    """DNS names and IP addresses; ``localhost`` and ``127.0.0.1`` always (loopback tests)."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hostnames]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_certificate(ca: CertificateAuthority, hostnames: list[str],
                            days: int = SERVER_DAYS
                            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The coordinator's TLS server certificate signed by ``ca``, and its new key."""
    key = ec.generate_private_key(CURVE())
    organisation = ca.certificate.subject.get_attributes_for_oid(
        NameOID.ORGANIZATION_NAME)[0].value
    start = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostnames[0] if hostnames else "localhost", str(organisation)))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hostnames), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
        .sign(ca.key, hashes.SHA384())
    )
    return cert, key


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM: gRPC (the SuperLink) reads no passphrase; the file is 0600."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_ca(ca: CertificateAuthority, cert_path: Path, key_path: Path) -> None:
    Path(cert_path).write_bytes(certificate_pem(ca.certificate))
    write_private(key_path, private_key_pem(ca.key))


def load_ca(cert_path: Path, key_path: Path) -> CertificateAuthority:
    """Read a CA written by :func:`write_ca`."""
    cert = load_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"{key_path}: not a readable PEM private key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{key_path}: not an EC private key")
    return CertificateAuthority(cert, key)


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise KeyFileError(f"{path}: not a readable PEM certificate ({err})") from err


def verify_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    """Raise if ``cert`` was not issued and signed by ``ca`` or is outside its validity."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as err:
        raise KeyFileError(f"certificate '{cert.subject.rfc4514_string()}' is not signed by "
                           f"the CA '{ca.subject.rfc4514_string()}' ({err})") from err
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise KeyFileError(f"certificate '{cert.subject.rfc4514_string()}' is not valid now "
                           f"({cert.not_valid_before_utc} to {cert.not_valid_after_utc})")


# --- Hospital node-authentication keys (Flower SuperNode authentication) -----------------------

def make_node_key() -> ec.EllipticCurvePrivateKey:
    """A hospital's node-authentication key: EC P-384, as ``flwr`` generates them."""
    return ec.generate_private_key(CURVE())


def node_private_openssh(key: ec.EllipticCurvePrivateKey) -> bytes:
    """OpenSSH private key format: what ``flower-supernode --auth-supernode-private-key``
    reads (``load_ssh_private_key``, no passphrase)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


def node_public_openssh(key: ec.EllipticCurvePublicKey, comment: str = "") -> bytes:
    """One OpenSSH line (``ecdsa-sha2-nistp384 AAAA... comment``): what ``flwr supernode
    register`` reads."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + (b" " + comment.encode() if comment else b"") + b"\n"


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Read and check a hospital's public key file: OpenSSH line, EC on a NIST curve, as
    Flower's ``flwr supernode register`` requires."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except OSError as err:
        raise KeyFileError(f"{path}: cannot read the hospital's public key ({err})") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"{path}: not an OpenSSH public key line (make it with "
                           f"'medfed hospital init'): {err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1):
        raise KeyFileError(f"{path}: Flower node authentication needs an EC key on a NIST "
                           f"curve (P-256/384/521), got {type(key).__name__}")
    return key


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read the hospital's OpenSSH private key as ``flower-supernode`` does."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"{path}: not an OpenSSH private key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: not an EC private key")
    return key


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:<hex>`` of the DER SubjectPublicKeyInfo: a stable id for enrolment lists (the
    SuperLink keys nodes by the same SubjectPublicKeyInfo, in PEM)."""
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + hashlib.sha256(der).hexdigest()
