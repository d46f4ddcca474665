"""gRPC mutual-TLS glue: credentials from PEM files and the peer's Sovra identity.

Servers always require a client certificate chaining to the configured CA; the authenticated
peer is turned into a :class:`sovra.pki.Identity` with :func:`peer_identity` (from the verified
leaf certificate's URI SAN), which servicers use for authorization.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from sovra.pki import CA_CERT_FILE, Identity, IssuedCert, identities_from_certificate

__all__ = [
    "ChannelOptions",
    "TLSConfigError",
    "TLSFiles",
    "aio_secure_channel",
    "channel_credentials",
    "peer_identity",
    "secure_channel",
    "server_credentials",
]

ChannelOptions = Sequence[tuple[str, Any]]

_TARGET_NAME_OVERRIDE = "grpc.ssl_target_name_override"


class TLSConfigError(Exception):
    """The TLS cert/key/CA files are missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class TLSFiles:
    """Paths of a component's certificate (chain), private key and trusted CA bundle (PEM)."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_issued(cls, issued: IssuedCert) -> TLSFiles:
        return cls(cert=issued.cert_path, key=issued.key_path, ca=issued.ca_path)

    @classmethod
    def from_pki_dir(cls, directory: Path, identity: Identity) -> TLSFiles:
        """Files written by ``sovra pki init DIR`` for ``identity``."""
        directory = Path(directory)
        return cls(
            cert=directory / f"{identity.file_stem}.pem",
            key=directory / f"{identity.file_stem}.key",
            ca=directory / CA_CERT_FILE,
        )

    def load(self) -> tuple[bytes, bytes, bytes]:
        """Read and sanity-check the files; return ``(cert_pem, key_pem, ca_pem)``.

        Raises :class:`TLSConfigError` naming the offending file if one is missing, unreadable,
        not PEM of the right type, encrypted, or if the key does not match the certificate.
        (gRPC itself would only fail later with an opaque handshake error.)
        """
        cert_pem = _read(Path(self.cert), "TLS certificate")
        key_pem = _read(Path(self.key), "TLS private key")
        ca_pem = _read(Path(self.ca), "TLS CA bundle")

        try:
            chain = x509.load_pem_x509_certificates(cert_pem)
        except ValueError as exc:
            raise TLSConfigError(
                f"TLS certificate {self.cert} is not a PEM X.509 certificate: {exc}"
            ) from None
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise TLSConfigError(
                f"TLS CA bundle {self.ca} is not a PEM X.509 certificate bundle: {exc}"
            ) from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise TLSConfigError(
                f"TLS private key {self.key} is encrypted; gRPC needs an unencrypted PEM key"
            ) from None
        except ValueError as exc:
            raise TLSConfigError(
                f"TLS private key {self.key} is not a PEM private key: {exc}"
            ) from None
        except UnsupportedAlgorithm as exc:
            raise TLSConfigError(f"TLS private key {self.key} cannot be loaded: {exc}") from None
        if key.public_key() != chain[0].public_key():
            raise TLSConfigError(
                f"TLS private key {self.key} does not match certificate {self.cert}"
            )
        return cert_pem, key_pem, ca_pem


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise TLSConfigError(f"{what} file is empty: {path}")
    return data


def server_credentials(files: TLSFiles) -> grpc.ServerCredentials:
    """mTLS server credentials: present ``files.cert``; require a client cert from ``files.ca``."""
    cert_pem, key_pem, ca_pem = files.load()
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )


def channel_credentials(files: TLSFiles) -> grpc.ChannelCredentials:
    """mTLS channel credentials: trust ``files.ca``; present ``files.cert`` as client cert."""
    cert_pem, key_pem, ca_pem = files.load()
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def _auth_values(auth_context: Any, key: str) -> list[bytes]:
    if not auth_context:
        return []
    values = auth_context.get(key) or []
    return [v if isinstance(v, bytes) else str(v).encode() for v in values]


def peer_identity(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> Identity | None:
    """The authenticated peer's Sovra identity, or ``None``.

    Uses the peer leaf certificate that gRPC verified during the handshake (auth context key
    ``x509_pem_cert``) and its URI SANs. Returns ``None`` for plaintext/unauthenticated peers
    and for certificates naming no, or more than one, Sovra identity (ambiguous => no identity).
    Works with both sync and ``grpc.aio`` servicer contexts.
    """
    try:
        auth_context = context.auth_context()
    except Exception:
        return None
    pems = _auth_values(auth_context, "x509_pem_cert")
    if pems:
        return _identity_of_pem(pems[0])
    # Fallback: gRPC also exposes the verified URI SANs directly.
    found = []
    for raw in _auth_values(auth_context, "peer_uri"):
        try:
            found.append(Identity.from_uri(raw.decode()))
        except (ValueError, UnicodeDecodeError):
            continue
    unique = set(found)
    if len(unique) != 1:
        return None
    return unique.pop()


@functools.lru_cache(maxsize=256)
def _identity_of_pem(pem: bytes) -> Identity | None:
    """The one Sovra identity of a verified leaf certificate (PEM), or None. Cached by the exact
    bytes: peers present the same certificate on every call, and parsing it costs more than the
    rest of an authorization check."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    unique = set(identities_from_certificate(cert))
    return unique.pop() if len(unique) == 1 else None


def _channel_options(
    options: ChannelOptions, server_identity: Identity | None
) -> list[tuple[str, Any]]:
    opts = list(options)
    if server_identity is not None:
        if any(name == _TARGET_NAME_OVERRIDE for name, _ in opts):
            raise ValueError(f"pass either server_identity or {_TARGET_NAME_OVERRIDE}, not both")
        # gRPC verifies the server name against DNS/IP SANs only (not URI SANs), so pin the
        # identity through its DNS form, which Sovra certs carry next to the URI SAN.
        opts.append((_TARGET_NAME_OVERRIDE, server_identity.dns_name()))
    return opts


def secure_channel(
    target: str,
    files: TLSFiles,
    *,
    server_identity: Identity | None = None,
    options: ChannelOptions = (),
) -> grpc.Channel:
    """An mTLS channel to ``target`` (``host:port``).

    Without ``server_identity`` the server cert must chain to ``files.ca`` and match the host
    of ``target`` (dev certs carry ``localhost``, ``127.0.0.1`` and ``::1``). With
    ``server_identity`` the server must instead present a cert for that identity (checked in
    the handshake via the identity's DNS SAN, see :meth:`Identity.dns_name`); use it when
    several components share a host and a CA, e.g. to make sure you talk to the broker and
    not to an enclave.
    """
    return grpc.secure_channel(
        target, channel_credentials(files), options=_channel_options(options, server_identity)
    )


def aio_secure_channel(
    target: str,
    files: TLSFiles,
    *,
    server_identity: Identity | None = None,
    options: ChannelOptions = (),
    interceptors: Sequence[Any] | None = None,
) -> grpc.aio.Channel:
    """Same as :func:`secure_channel` for ``grpc.aio``."""
    return grpc.aio.secure_channel(
        target,
        channel_credentials(files),
        options=_channel_options(options, server_identity),
        interceptors=interceptors,
    )
