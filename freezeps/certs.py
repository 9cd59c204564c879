"""`freezeps certs`: a CA, a PS certificate, client certificates and a token for a small cluster.

Written with the `cryptography` library (ECDSA P-256 keys, SHA-256 signatures), so no openssl
recipe is needed. Files in OUT:
  ca.pem, ca.key          the run's certificate authority (keep ca.key off the nodes)
  ps.pem, ps.key          the PS's certificate: the given host names and addresses, plus
                          localhost and 127.0.0.1 (health checks on the PS node itself)
  NAME.pem, NAME.key      one client certificate per --client (mutual TLS)
  token                   a random shared-secret token (token_file)
Keys and the token are written 0600. An existing CA in OUT is reused, so a node can be added
later; any other existing file is left alone, and the command says so.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "freezeps"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _issue(common_name: str, issuer: _Issued | None, days: int, *, hosts: list[str] = (),
           usages: tuple = ()) -> _Issued:
    """A certificate for `common_name` signed by `issuer` (self-signed CA when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name))
               .issuer_name(issuer.cert.subject if issuer else _name(common_name))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clocks a little behind
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is None:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = (builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                                  critical=False))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    cert = builder.sign((issuer.key if issuer else key), hashes.SHA256())
    return _Issued(cert, key)


def _write(path: Path, data: bytes, secret: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem(issued: _Issued) -> tuple[bytes, bytes]:
    return (issued.cert.public_bytes(serialization.Encoding.PEM),
            issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))


def _load_ca(out: Path) -> _Issued | None:
    if not (out / "ca.pem").exists():
        return None
    cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    return _Issued(cert, key)


def make_secrets(out: Path, ps_hosts: list[str], clients: list[str], days: int = 365,
                 token: bool = True) -> tuple[list[Path], list[Path]]:
    """Write the files described above into `out` (the token only with `token`); returns
    (written, left alone)."""
    for name in clients:
        if not name.replace("-", "").replace("_", "").isalnum() or name in ("ca", "ps", "token"):
            raise ValueError(f"client name {name!r}: use letters, digits, - and _, and not ca, ps or token")
    if days <= 0:
        raise ValueError(f"days must be > 0, got {days}")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    kept: list[Path] = []
    ca = _load_ca(out)
    if ca is None:
        ca = _issue("freezeps CA", None, days)
        _write_pair(out, "ca", ca, written)
    else:
        kept.append(out / "ca.pem")
    # The PS's certificate also serves as a client one, so its own node can ask it for its
    # status under mutual TLS (the health check).
    hosts = list(dict.fromkeys([*ps_hosts, "localhost", "127.0.0.1"]))
    wanted = {"ps": lambda: _issue("freezeps-ps", ca, days, hosts=hosts, usages=(
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH))}
    for name in clients:
        wanted[name] = lambda name=name: _issue(f"freezeps-{name}", ca, days, usages=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    for name, issue in wanted.items():
        if (out / f"{name}.pem").exists() or (out / f"{name}.key").exists():
            kept.append(out / f"{name}.pem")  # a key and its certificate are replaced together or not at all
        else:
            _write_pair(out, name, issue(), written)
    if token and (out / "token").exists():
        kept.append(out / "token")
    elif token:
        _write(out / "token", secrets.token_urlsafe(32).encode() + b"\n", True)
        written.append(out / "token")
    return written, kept


def _write_pair(out: Path, name: str, issued: _Issued, written: list[Path]) -> None:
    cert, key = _pem(issued)
    _write(out / f"{name}.key", key, True)
    _write(out / f"{name}.pem", cert, False)
    written += [out / f"{name}.pem", out / f"{name}.key"]
