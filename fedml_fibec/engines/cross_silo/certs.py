"""Certificates for mutually authenticated TLS between the server and the silos.

One private CA signs one certificate per process (rank). A certificate names its rank twice: in
its common name and as a DNS name `rank-<R>.fedml-fibec` in its subject alternative names, beside
the host's own address. Every process is both a TLS server (it listens: the server dials the silos
too) and a TLS client, so each certificate carries both extended key usages. A sender dials its
peer with the peer's rank name as the TLS target name, so the handshake proves that whoever
listens at that address holds that rank's key; the receiver reads the sender's rank from the
client certificate and refuses a message that claims another rank.

No FedML import here: `run_scripts/make_certs.py` uses it before anything heavy is loaded.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ...atomic import atomic_write_text
from ...errors import ConfigError
from .ipconfig import Endpoint

RANK_NAME_SUFFIX = ".fedml-fibec"
_RANK_CN = re.compile(r"^rank-(\d+)\.fedml-fibec$")
CA_NAME = "fedml-fibec federation CA"


def rank_name(rank: int) -> str:
    """The name a rank's certificate carries (common name and DNS SAN), and the TLS target name."""
    return f"rank-{int(rank)}{RANK_NAME_SUFFIX}"


def rank_of_common_name(common_name: str) -> Optional[int]:
    """The rank a certificate's common name names, or None if it names none."""
    m = _RANK_CN.match(common_name or "")
    return int(m.group(1)) if m else None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_ca(days: int = 3650, name: str = CA_NAME) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that may only sign end-entity certificates (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_host_cert(ca_cert: x509.Certificate, ca_key, rank: int, addresses: list[str], days: int = 365,
                   not_before: Optional[dt.datetime] = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for one rank: its rank name plus the addresses it is reached at, server+client use."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(rank_name(rank))]
    for a in dict.fromkeys(addresses):  # keep order, drop repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(a)))
        except ValueError:
            names.append(x509.DNSName(a))
    start = not_before or (_now() - dt.timedelta(minutes=5))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, rank_name(rank))]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def write_key(path: Path, key) -> None:
    """A private key, readable by its owner only (0600) from the moment it exists."""
    atomic_write_text(path, _key_pem(key), mode=0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write_text(path, _cert_pem(cert), mode=0o644)


def ca_paths(out: Path) -> tuple[Path, Path]:
    return out / "ca.crt", out / "ca.key"


def host_paths(out: Path, rank: int) -> tuple[Path, Path]:
    return out / f"rank{rank}.crt", out / f"rank{rank}.key"


def make_federation_certs(endpoints: list[Endpoint], out: Path, days: int = 365, new_ca: bool = False,
                          ca_days: int = 3650) -> list[Path]:
    """The CA (made once, reused unless new_ca) and a fresh certificate and key for every rank.

    Running it again with the same CA is the rotation of the host certificates: the hosts get new
    files, the CA certificate they trust stays the same.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca_crt, ca_key_path = ca_paths(out)
    if ca_key_path.exists() and not new_ca:
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    else:
        ca_cert, ca_key = make_ca(ca_days)
        write_key(ca_key_path, ca_key)
        write_cert(ca_crt, ca_cert)
    written = [ca_crt]
    for e in endpoints:
        # The address others dial, and a specific bind address (not a wildcard such as 0.0.0.0).
        extra = [e.bind] if e.bind and e.bind not in ("0.0.0.0", "::") else []
        cert, key = make_host_cert(ca_cert, ca_key, e.rank, [e.address] + extra, days)
        crt_path, key_path = host_paths(out, e.rank)
        write_key(key_path, key)
        write_cert(crt_path, cert)
        written += [crt_path, key_path]
    return written


# loading and checking, at start-up ------------------------------------------------------------------
@dataclass(frozen=True)
class TlsIdentity:
    """What a process needs for mutual TLS: the CA it trusts, its own certificate chain and key (PEM)."""

    rank: int
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    not_after: dt.datetime


def rank_path(template: str, rank: int) -> Path:
    """A configured path with `{rank}` replaced by this process's rank."""
    return Path(str(template).replace("{rank}", str(rank)))


def load_identity(ca: str, cert: str, key: str, rank: int) -> TlsIdentity:
    """Read and check this process's TLS files before any work: CA-signed, valid now, naming this rank."""
    paths = {"tls_ca_cert": rank_path(ca, rank), "tls_cert": rank_path(cert, rank), "tls_key": rank_path(key, rank)}
    data = {}
    for k, p in paths.items():
        try:
            data[k] = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"comm_args.{k}: cannot read {p} ({exc.strerror}); make the files with "
                              "run_scripts/make_certs.py (docs/DEPLOYMENT.md)") from None
    try:
        ca_cert = x509.load_pem_x509_certificate(data["tls_ca_cert"])
    except ValueError as exc:
        raise ConfigError(f"comm_args.tls_ca_cert: {paths['tls_ca_cert']} is not a PEM certificate ({exc})") from None
    try:
        host = x509.load_pem_x509_certificate(data["tls_cert"])
    except ValueError as exc:
        raise ConfigError(f"comm_args.tls_cert: {paths['tls_cert']} is not a PEM certificate ({exc})") from None
    try:
        own_key = serialization.load_pem_private_key(data["tls_key"], password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"comm_args.tls_key: {paths['tls_key']} is not an unencrypted PEM private key "
                          f"({exc})") from None
    where = f"comm_args.tls_cert: {paths['tls_cert']}"
    try:
        host.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no common base
        raise ConfigError(f"{where} is not signed by the CA in {paths['tls_ca_cert']} ({type(exc).__name__})") from None
    now = _now()
    if not host.not_valid_before_utc <= now <= host.not_valid_after_utc:
        raise ConfigError(f"{where} is valid from {host.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                          f"{host.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now; make a new one "
                          "(run_scripts/make_certs.py)")
    cn = host.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    named = rank_of_common_name(cn[0].value if cn else "")
    if named != rank:
        raise ConfigError(f"{where} names {'rank ' + str(named) if named is not None else 'no rank'} "
                          f"(common name {cn[0].value if cn else None!r}), but this process is rank {rank}")
    pub = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if pub(own_key.public_key()) != pub(host.public_key()):
        raise ConfigError(f"comm_args.tls_key: {paths['tls_key']} is not the key of {paths['tls_cert']}")
    mode = paths["tls_key"].stat().st_mode & 0o077
    if mode:
        raise ConfigError(f"comm_args.tls_key: {paths['tls_key']} can be read by others (mode "
                          f"{paths['tls_key'].stat().st_mode & 0o777:o}); a private key must be 0600: "
                          f"chmod 600 {paths['tls_key']}")
    return TlsIdentity(rank, data["tls_ca_cert"], data["tls_cert"], data["tls_key"], host.not_valid_after_utc)


def rank_of_peer_certificate(pem: bytes) -> Optional[int]:
    """The rank a verified peer certificate (PEM, from the TLS handshake) names, or None."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return rank_of_common_name(cn[0].value) if cn else None
