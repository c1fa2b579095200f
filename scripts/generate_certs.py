"""Generate the credentials of a TLS deployment: a CA, a server certificate, SuperNode keys.

Writes into OUT (default ``certificates/``), the layout the ``docker-compose.with-tls.yml``
and ``docker-compose.with-auth.yml`` overlays and ``docker-compose.server.yml`` mount
read-only (as Flower's own ``with-tls`` overlay does):

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (keep ``ca.key`` off the
  servers; only ``ca.crt`` is needed to verify);
* ``server.pem`` / ``server.key``: a server certificate signed by the CA, valid for every
  ``--san`` (DNS names and IP addresses), used by the SuperLink and by ``fedquant serve``;
* ``supernode-<i>`` / ``supernode-<i>.pub``: with ``--supernodes N``, one EC key pair
  (SECP384R1, OpenSSH format) per SuperNode for Flower's SuperNode authentication;
  register each public key with ``flwr supernode register certificates/supernode-<i>.pub``;
* ``tokens.json`` and ``client-<i>.token``: with ``--tokens N``, bearer tokens for
  ``fedquant serve --tokens`` (an ``operator`` admin token and N client tokens).

Private keys and tokens are written with mode 0600. For prototypes and tests; in
production use your organisation's CA. Uses the ``cryptography`` package only.

Usage::

    python scripts/generate_certs.py --out certificates --supernodes 2 --tokens 2 \\
        --san superlink --san fedquant-server --san my-host.example.org
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: names every certificate carries: the compose service names and the loopback addresses
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1", "superlink", "fedquant-server")


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"bad subject alternative name {name!r}") from None
        return x509.DNSName(name)


def make_ca(out: Path, *, days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Write ``ca.crt`` and ``ca.key`` (EC P-384) and return them."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedquant test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(key), private=True)
    return cert, key


def make_server_cert(out: Path, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
                     sans: list[str], *, days: int = 365) -> None:
    """Write ``server.pem`` and ``server.key``: a server certificate for `sans`, CA-signed."""
    if not sans:
        raise ValueError("a server certificate needs at least one subject alternative name")
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(key), private=True)


def make_supernode_keys(out: Path, count: int) -> list[Path]:
    """Write ``supernode-<i>`` (OpenSSH private key) and ``.pub`` for i = 1..count."""
    paths = []
    for i in range(1, count + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        path = out / f"supernode-{i}"
        _write(path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), private=True)
        _write(path.with_name(f"supernode-{i}.pub"), key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
        paths.append(path)
    return paths


def make_tokens(out: Path, count: int) -> dict[str, str]:
    """Write ``tokens.json`` ("operator" + client ids 1..count) and ``client-<i>.token``."""
    tokens = {"operator": secrets.token_urlsafe(32)}
    for i in range(1, count + 1):
        tokens[str(i)] = secrets.token_urlsafe(32)
        _write(out / f"client-{i}.token", tokens[str(i)].encode(), private=True)
    _write(out / "admin.token", tokens["operator"].encode(), private=True)
    _write(out / "tokens.json", json.dumps(tokens, indent=2).encode() + b"\n", private=True)
    return tokens


def generate(out: Path, *, sans: list[str] | None = None, supernodes: int = 0,
             tokens: int = 0, days: int = 365) -> None:
    """Everything the module docstring lists, into `out`."""
    if supernodes < 0 or tokens < 0 or days < 1:
        raise ValueError(f"need supernodes >= 0, tokens >= 0, days >= 1; got {supernodes}, "
                         f"{tokens}, {days}")
    out = Path(out)
    ca = make_ca(out, days=days)
    make_server_cert(out, ca, list(dict.fromkeys([*DEFAULT_SANS, *(sans or [])])), days=days)
    make_supernode_keys(out, supernodes)
    if tokens:
        make_tokens(out, tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("certificates"),
                        help="directory to write into (created if missing)")
    parser.add_argument("--san", action="append", default=[], metavar="NAME",
                        help="extra DNS name or IP address of the server certificate "
                             f"(repeatable; always included: {', '.join(DEFAULT_SANS)})")
    parser.add_argument("--supernodes", type=int, default=2,
                        help="SuperNode authentication key pairs to generate")
    parser.add_argument("--tokens", type=int, default=2,
                        help="client bearer tokens for `fedquant serve --tokens` (0: none)")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates")
    args = parser.parse_args(argv)
    generate(args.out, sans=args.san, supernodes=args.supernodes, tokens=args.tokens,
             days=args.days)
    print(f"wrote credentials to {args.out}/")


if __name__ == "__main__":
    main()
