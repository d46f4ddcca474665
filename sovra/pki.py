"""Development PKI for Sovra (``sovra pki init DIR``).

Every Sovra component authenticates with an X.509 certificate that carries exactly one URI SAN
naming it (a SPIFFE-style identity in the ``sovra.local`` trust domain):

* ``spiffe://sovra.local/broker``
* ``spiffe://sovra.local/tenant/<tenant>/edge``
* ``spiffe://sovra.local/enclave/<enclave_id>``

plus DNS/IP SANs for the hosts it is reached at (``localhost``, ``127.0.0.1``, ``::1`` by
default). Component certificates are ECDSA P-256, valid for one year, ``CA:FALSE``, with both
``serverAuth`` and ``clientAuth`` extended key usage; the dev CA is valid for five years.

The dev CA private key and all component keys are written **unencrypted** (PKCS#8 PEM, mode
0600). This PKI is for development and tests only; production brings its own CA (see
``docs/pki.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

__all__ = [
    "CA_CERT_FILE",
    "CA_DAYS",
    "CA_KEY_FILE",
    "DEFAULT_HOSTS",
    "LEAF_DAYS",
    "TRUST_DOMAIN",
    "DevCA",
    "Identity",
    "IdentityKind",
    "IssuedCert",
    "PKIError",
    "add_init_arguments",
    "build_certificate",
    "generate_key",
    "identities_from_certificate",
    "init_pki",
    "main",
    "run_init",
]

TRUST_DOMAIN = "sovra.local"
_PREFIX = f"spiffe://{TRUST_DOMAIN}/"

IdentityKind = Literal["broker", "edge", "enclave"]
_KINDS: tuple[str, ...] = get_args(IdentityKind)

#: Tenant and enclave names end up in URI paths, file names and a DNS label (see
#: :meth:`Identity.dns_name`), so they are single lowercase labels: no dots, no case folding.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

#: DNS SAN values: ASCII labels, optional leading wildcard label.
_HOST_RE = re.compile(r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$")

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
LEAF_DAYS = 365
CA_DAYS = 5 * 365
#: Backdate ``notBefore`` a little so peers with slightly skewed clocks accept fresh certs.
_BACKDATE = dt.timedelta(minutes=5)

_DIR_MODE = 0o700
_KEY_MODE = 0o600
_CERT_MODE = 0o644


class PKIError(Exception):
    """A PKI operation failed (missing/corrupt files, refusing to overwrite, ...)."""


# --------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A Sovra component identity.

    ``name`` is the tenant for ``edge``, the enclave id for ``enclave`` and always ``"broker"``
    for ``broker``.
    """

    kind: IdentityKind
    name: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown identity kind {self.kind!r}; expected one of {_KINDS}")
        if self.kind == "broker":
            if self.name != "broker":
                raise ValueError(f"broker identity name must be 'broker', got {self.name!r}")
        elif not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            what = "tenant" if self.kind == "edge" else "enclave id"
            raise ValueError(
                f"invalid {what} {self.name!r}: use 1-63 characters from [a-z0-9_-], "
                "starting with a lowercase letter or digit"
            )

    @classmethod
    def broker(cls) -> Identity:
        return cls("broker", "broker")

    @classmethod
    def edge(cls, tenant: str) -> Identity:
        return cls("edge", tenant)

    @classmethod
    def enclave(cls, enclave_id: str) -> Identity:
        return cls("enclave", enclave_id)

    def uri(self) -> str:
        if self.kind == "broker":
            return f"{_PREFIX}broker"
        if self.kind == "edge":
            return f"{_PREFIX}tenant/{self.name}/edge"
        return f"{_PREFIX}enclave/{self.name}"

    def dns_name(self) -> str:
        """Identity host name, also put in the DNS SAN of dev certs.

        ``broker.sovra.local``, ``<tenant>.edge.sovra.local``, ``<id>.enclave.sovra.local``.
        gRPC's TLS stack can only pin a server by DNS/IP SAN (not URI SAN), so
        :func:`sovra.tls.secure_channel` uses this name to pin ``server_identity``.
        """
        if self.kind == "broker":
            return f"broker.{TRUST_DOMAIN}"
        return f"{self.name}.{self.kind}.{TRUST_DOMAIN}"

    @property
    def file_stem(self) -> str:
        """Base name of the cert/key files written by :meth:`DevCA.issue`: ``<kind>-<name>``."""
        return f"{self.kind}-{self.name}"

    @classmethod
    def from_uri(cls, uri: str) -> Identity:
        """Parse a Sovra identity URI; raise :class:`ValueError` for anything else."""
        if not isinstance(uri, str) or not uri.startswith(_PREFIX):
            raise ValueError(
                f"not a Sovra identity URI: {uri!r} (expected it to start with {_PREFIX!r})"
            )
        parts = uri[len(_PREFIX) :].split("/")
        try:
            if parts == ["broker"]:
                return cls.broker()
            if len(parts) == 3 and parts[0] == "tenant" and parts[2] == "edge":
                return cls.edge(parts[1])
            if len(parts) == 2 and parts[0] == "enclave":
                return cls.enclave(parts[1])
        except ValueError as exc:
            raise ValueError(f"not a valid Sovra identity URI: {uri!r}: {exc}") from None
        raise ValueError(
            f"not a Sovra identity URI: {uri!r} (expected {_PREFIX}broker, "
            f"{_PREFIX}tenant/<tenant>/edge or {_PREFIX}enclave/<enclave_id>)"
        )

    def __str__(self) -> str:
        return self.uri()


def identities_from_certificate(cert: x509.Certificate) -> list[Identity]:
    """All Sovra identities named by the certificate's URI SANs (foreign URIs are ignored)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[Identity] = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        with contextlib.suppress(ValueError):
            out.append(Identity.from_uri(uri))
    return out


@dataclass(frozen=True)
class IssuedCert:
    """Paths of an issued certificate, its private key and the CA bundle that verifies it."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    identity: Identity


# --------------------------------------------------------------------------------------------
# Generic certificate building
# --------------------------------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _common_name(identity: Identity) -> str:
    """Informational subject CN: the identity URI, unless it exceeds the 64-char CN limit."""
    uri = identity.uri()
    return uri if len(uri) <= 64 else f"{identity.kind} {identity.name}"[:64]


def _split_hosts(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    dns: list[str] = []
    ips: list[str] = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOST_RE.fullmatch(host):
                raise PKIError(
                    f"invalid host {host!r}: expected an IP address or an ASCII DNS name "
                    "(use the IDNA/punycode form for internationalized names)"
                ) from None
            dns.append(host)
        else:
            ips.append(host)
    return dns, ips


def build_certificate(
    *,
    subject_cn: str,
    public_key: CertificatePublicKeyTypes,
    issuer_cert: x509.Certificate | None,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    is_ca: bool,
    path_length: int | None = None,
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int,
    key_usage_ca: bool | None = None,
    eku: Sequence[ObjectIdentifier] = (),
    organization: str | None = "Sovra",
) -> x509.Certificate:
    """Build and sign an X.509 v3 certificate.

    Self-signed when ``issuer_cert`` is ``None`` (then ``issuer_key`` must be the private key of
    ``public_key``). ``key_usage_ca`` selects the KeyUsage profile: ``keyCertSign``/``cRLSign``
    (CA) or ``digitalSignature`` (end entity); it defaults to ``is_ca``. Adds SKI and AKI,
    BasicConstraints (critical), KeyUsage (critical), SAN from ``uris``/``dns``/``ips`` and EKU
    from ``eku`` when given. ``notBefore`` is backdated five minutes to tolerate clock skew.
    """
    if days <= 0:
        raise ValueError("days must be positive")
    if path_length is not None and not is_ca:
        raise ValueError("path_length only applies to CA certificates")
    if key_usage_ca is None:
        key_usage_ca = is_ca

    if issuer_cert is None:
        if issuer_key.public_key() != public_key:
            raise ValueError("self-signed certificate: issuer_key does not match public_key")
    elif issuer_key.public_key() != issuer_cert.public_key():
        raise ValueError("issuer_key does not match issuer_cert's public key")

    name_attrs = [x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]
    if organization:
        name_attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    subject = x509.Name(name_attrs)
    issuer_name = subject if issuer_cert is None else issuer_cert.subject

    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)
    if issuer_cert is not None and not_after > issuer_cert.not_valid_after_utc:
        # Never outlive the issuer: such a chain would fail validation before the leaf expires.
        not_after = issuer_cert.not_valid_after_utc

    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not key_usage_ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_usage_ca,
                crl_sign=key_usage_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )

    if issuer_cert is None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    else:
        try:
            issuer_ski = issuer_cert.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
        else:
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)
    builder = builder.add_extension(aki, critical=False)

    general_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    general_names += [x509.DNSName(d) for d in dns]
    general_names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)

    algorithm: hashes.SHA256 | None = hashes.SHA256()
    if isinstance(issuer_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        algorithm = None
    return builder.sign(issuer_key, algorithm)


# --------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------


def _ensure_dir(directory: Path) -> None:
    directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(directory, _DIR_MODE)  # mkdir's mode is subject to umask / pre-existing dirs


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``, atomically (temp file + rename).

    The temp file is created 0600 by :func:`tempfile.mkstemp`, so key material is never
    readable by others, not even briefly.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(
            f"{what} not found: {path} (create a dev PKI with `sovra pki init {path.parent}`)"
        ) from None
    except OSError as exc:
        raise PKIError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------------------------
# Dev CA
# --------------------------------------------------------------------------------------------


class DevCA:
    """A single-level development CA stored as ``ca.pem`` / ``ca.key`` in ``directory``."""

    def __init__(
        self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> None:
        self.directory = Path(directory)
        self.cert = cert
        self.key = key

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / CA_KEY_FILE

    @classmethod
    def exists(cls, directory: Path) -> bool:
        directory = Path(directory)
        return (directory / CA_CERT_FILE).exists() or (directory / CA_KEY_FILE).exists()

    @classmethod
    def create(cls, directory: Path, name: str = "Sovra Dev CA", *, force: bool = False) -> DevCA:
        """Create a new CA (P-256, 5 years, pathlen 0) and write ``ca.pem`` and ``ca.key``.

        Raises :class:`PKIError` if a CA already exists there, unless ``force`` is true.
        """
        directory = Path(directory)
        if not force and cls.exists(directory):
            raise PKIError(
                f"a CA already exists in {directory} ({CA_CERT_FILE}/{CA_KEY_FILE}); "
                "refusing to overwrite it (use force to replace it and re-issue all certs)"
            )
        key = generate_key()
        cert = build_certificate(
            subject_cn=name,
            public_key=key.public_key(),
            issuer_cert=None,
            issuer_key=key,
            is_ca=True,
            path_length=0,
            days=CA_DAYS,
        )
        try:
            _ensure_dir(directory)
            # Key first: a ca.pem without its key would be unusable.
            _write_atomic(directory / CA_KEY_FILE, _key_pem(key), _KEY_MODE)
            _write_atomic(directory / CA_CERT_FILE, _cert_pem(cert), _CERT_MODE)
        except OSError as exc:
            raise PKIError(f"cannot write CA to {directory}: {exc}") from exc
        return cls(directory, cert, key)

    @classmethod
    def load(cls, directory: Path) -> DevCA:
        """Load ``ca.pem`` / ``ca.key`` from ``directory``; :class:`PKIError` if unusable."""
        directory = Path(directory)
        cert_path = directory / CA_CERT_FILE
        key_path = directory / CA_KEY_FILE
        cert_pem = _read(cert_path, "CA certificate")
        key_pem = _read(key_path, "CA private key")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise PKIError(
                f"CA certificate {cert_path} is corrupt: not a PEM X.509 certificate ({exc})"
            ) from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise PKIError(
                f"CA private key {key_path} is encrypted; the dev CA expects an unencrypted key"
            ) from None
        except ValueError as exc:
            raise PKIError(
                f"CA private key {key_path} is corrupt: not a PEM private key ({exc})"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"CA private key {key_path} is not an EC key")
        if key.public_key() != cert.public_key():
            raise PKIError(f"CA private key {key_path} does not match CA certificate {cert_path}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise PKIError(f"{cert_path} is not a CA certificate (BasicConstraints CA:TRUE)")
        return cls(directory, cert, key)

    def issue(self, identity: Identity, *, hosts: Sequence[str] = DEFAULT_HOSTS) -> IssuedCert:
        """Issue a component certificate for ``identity``.

        Writes ``<directory>/<kind>-<name>.pem`` (0644) and ``.key`` (0600, unencrypted PKCS#8).
        SANs: the identity URI, the DNS/IP ``hosts`` and :meth:`Identity.dns_name`.
        """
        if isinstance(hosts, str):
            raise TypeError("hosts must be a sequence of strings, not a string")
        dns, ips = _split_hosts(hosts)
        if identity.dns_name() not in dns:
            dns.append(identity.dns_name())
        key = generate_key()
        cert = build_certificate(
            subject_cn=_common_name(identity),
            public_key=key.public_key(),
            issuer_cert=self.cert,
            issuer_key=self.key,
            is_ca=False,
            uris=(identity.uri(),),
            dns=dns,
            ips=ips,
            days=LEAF_DAYS,
            eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        )
        cert_path = self.directory / f"{identity.file_stem}.pem"
        key_path = self.directory / f"{identity.file_stem}.key"
        try:
            _ensure_dir(self.directory)
            _write_atomic(key_path, _key_pem(key), _KEY_MODE)
            _write_atomic(cert_path, _cert_pem(cert), _CERT_MODE)
        except OSError as exc:
            raise PKIError(f"cannot write certificate for {identity}: {exc}") from exc
        return IssuedCert(
            cert_path=cert_path, key_path=key_path, ca_path=self.cert_path, identity=identity
        )

    def verify(self, cert: x509.Certificate) -> None:
        """Check that ``cert`` was issued by this CA and is currently valid (PKIError if not)."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise PKIError(f"certificate was not issued by this CA: {exc}") from None
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise PKIError("certificate is expired or not yet valid")


# --------------------------------------------------------------------------------------------
# init
# --------------------------------------------------------------------------------------------


def init_pki(
    directory: Path,
    *,
    tenants: Sequence[str] = ("demo",),
    enclaves: Sequence[str] = ("enclave-1", "enclave-2"),
    hosts: Sequence[str] = DEFAULT_HOSTS,
    force: bool = False,
    ca_name: str = "Sovra Dev CA",
) -> dict[str, IssuedCert]:
    """Create a dev CA plus broker, one edge per tenant and one cert per enclave.

    Returns the issued certs keyed by file stem (``broker-broker``, ``edge-<tenant>``,
    ``enclave-<id>``). Raises :class:`PKIError` if ``directory`` already holds a CA, unless
    ``force`` is true. All names are validated before anything is written.
    """
    directory = Path(directory)
    if isinstance(tenants, str) or isinstance(enclaves, str) or isinstance(hosts, str):
        raise TypeError("tenants, enclaves and hosts must be sequences of strings")
    try:
        identities = [Identity.broker()]
        identities += [Identity.edge(t) for t in tenants]
        identities += [Identity.enclave(e) for e in enclaves]
    except ValueError as exc:
        raise PKIError(str(exc)) from None
    seen: set[Identity] = set()
    for ident in identities:
        if ident in seen:
            raise PKIError(f"duplicate identity {ident.uri()}")
        seen.add(ident)
    if not hosts:
        raise PKIError("at least one host (DNS name or IP address) is required")
    _split_hosts(hosts)  # validate before writing anything

    ca = DevCA.create(directory, ca_name, force=force)
    return {ident.file_stem: ca.issue(ident, hosts=hosts) for ident in identities}


# --------------------------------------------------------------------------------------------
# CLI entry point (``sovra pki init`` delegates here; also ``python -m sovra.pki init DIR``)
# --------------------------------------------------------------------------------------------


def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pki init``, for reuse by the top-level ``sovra`` CLI."""
    parser.add_argument("directory", type=Path, help="output directory (created 0700)")
    parser.add_argument(
        "--tenant",
        dest="tenants",
        action="append",
        metavar="TENANT",
        help="issue an edge cert for TENANT (repeatable; default: demo)",
    )
    parser.add_argument(
        "--enclave",
        dest="enclaves",
        action="append",
        metavar="ID",
        help="issue an enclave cert for ID (repeatable; default: enclave-1, enclave-2)",
    )
    parser.add_argument(
        "--host",
        dest="hosts",
        action="append",
        metavar="HOST",
        help="DNS name or IP put in every cert's SAN (repeatable; default: localhost, "
        "127.0.0.1, ::1)",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite an existing CA and re-issue all certs"
    )


def run_init(args: argparse.Namespace) -> int:
    """Execute ``pki init`` from parsed arguments; prints a summary, returns an exit code."""
    try:
        issued = init_pki(
            args.directory,
            tenants=tuple(args.tenants or ("demo",)),
            enclaves=tuple(args.enclaves or ("enclave-1", "enclave-2")),
            hosts=tuple(args.hosts or DEFAULT_HOSTS),
            force=args.force,
        )
    except PKIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    directory = Path(args.directory)
    ca_key = directory / CA_KEY_FILE
    print(f"CA:  {directory / CA_CERT_FILE}  (key {ca_key}: UNENCRYPTED, development only)")
    for item in issued.values():
        print(f"{item.identity.uri()}\n     cert {item.cert_path}\n     key  {item.key_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sovra pki", description="Sovra development PKI")
    sub = parser.add_subparsers(dest="command", required=True)
    add_init_arguments(sub.add_parser("init", help="create a dev CA and component certs"))
    args = parser.parse_args(argv)
    return run_init(args)


if __name__ == "__main__":
    raise SystemExit(main())
