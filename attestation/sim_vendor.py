"""The SIMULATED vendor root CA and the simulated device certificates it issues.

Stands in for the Ascend / virtCCA platform vendor, whose root would sign real device
attestation keys. Nothing here is hardware-backed: the root key is a file on disk. Reference
values name this root under ``trust_anchors.sim_vendor_roots`` only where simulation is allowed.

Files: ``<root_dir>/sim-vendor-root.pem`` and ``.key`` (both 0600), and per device
``<out_dir>/sim-device-<enclave_id>.pem`` (0644) and ``.key`` (0600). EC P-384 throughout, the
curve the simulated evidence signs with.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sovra.pki import Identity, build_certificate

ROOT_CERT_FILE: Final = "sim-vendor-root.pem"
ROOT_KEY_FILE: Final = "sim-vendor-root.key"
ROOT_NAME: Final = "SIMULATED Ascend Vendor Root CA (sovra sim, no hardware)"
ROOT_DAYS: Final = 10 * 365
DEVICE_DAYS: Final = 3 * 365
_DIR_MODE: Final = 0o700
_SECRET_MODE: Final = 0o600
_PUBLIC_MODE: Final = 0o644


class SimVendorError(Exception):
    """The simulated vendor root is missing, unreadable or would be overwritten."""


def create_root(root_dir: Path, *, force: bool = False) -> Path:
    """Create the simulated vendor root in ``root_dir``; returns the certificate path."""
    root_dir = Path(root_dir)
    cert_path, key_path = root_dir / ROOT_CERT_FILE, root_dir / ROOT_KEY_FILE
    if not force and (cert_path.exists() or key_path.exists()):
        raise SimVendorError(f"a simulated vendor root already exists in {root_dir}")
    key = ec.generate_private_key(ec.SECP384R1())
    cert = build_certificate(
        subject_cn=ROOT_NAME,
        public_key=key.public_key(),
        issuer_cert=None,
        issuer_key=key,
        is_ca=True,
        path_length=0,
        days=ROOT_DAYS,
        organization="Sovra SIMULATED vendor",
    )
    _ensure_dir(root_dir)
    _write(key_path, _key_pem(key), _SECRET_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), _SECRET_MODE)
    return cert_path


def ensure_root(root_dir: Path) -> Path:
    """The root certificate path, creating the root first if ``root_dir`` has none."""
    cert_path = Path(root_dir) / ROOT_CERT_FILE
    return cert_path if cert_path.exists() else create_root(root_dir)


def issue_device(root_dir: Path, enclave_id: str, out_dir: Path) -> tuple[Path, Path]:
    """Issue a simulated device key and certificate for ``enclave_id``; (key_path, cert_path)."""
    try:
        Identity.enclave(enclave_id)  # the id becomes part of a file name: keep it a plain label
    except ValueError as exc:
        raise SimVendorError(str(exc)) from None
    root_cert, root_key = load_root(root_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = build_certificate(
        subject_cn=f"SIMULATED Ascend CVM+NPU device {enclave_id}",
        public_key=key.public_key(),
        issuer_cert=root_cert,
        issuer_key=root_key,
        is_ca=False,
        days=DEVICE_DAYS,
        organization="Sovra SIMULATED vendor",
    )
    out_dir = Path(out_dir)
    _ensure_dir(out_dir)
    key_path = out_dir / f"sim-device-{enclave_id}.key"
    cert_path = out_dir / f"sim-device-{enclave_id}.pem"
    _write(key_path, _key_pem(key), _SECRET_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE)
    return key_path, cert_path


def load_root(root_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    root_dir = Path(root_dir)
    try:
        cert = x509.load_pem_x509_certificate((root_dir / ROOT_CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key(
            (root_dir / ROOT_KEY_FILE).read_bytes(), password=None
        )
    except OSError as exc:
        raise SimVendorError(
            f"cannot read the simulated vendor root in {root_dir}: {exc.strerror or exc}"
        ) from None
    except (ValueError, TypeError):
        raise SimVendorError(f"the simulated vendor root in {root_dir} is corrupt") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise SimVendorError(f"the simulated vendor root key in {root_dir} does not match its cert")
    return cert, key


def _ensure_dir(directory: Path) -> None:
    directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomic write; the temp file is 0600 from the start so a key is never world-readable."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
