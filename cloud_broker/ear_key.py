"""The broker's EAR signing key: ES256 (EC P-256), signs the attestation results it publishes.

Created on first start (PKCS#8 PEM, mode 0600, never overwritten) at ``ear_signing_key``, by
default in the broker's state directory. A key file readable by group or others is refused.
The key signs statements about enclaves, never payloads: it opens nothing. Broker replicas
that share a database must share this file, or edges see EARs signed by another replica's key
(and record them as invalid).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from sovra import keyfiles


class EarKeyError(keyfiles.KeyFileError):
    """The EAR signing key file cannot be created or is unusable."""


def load_or_create(path: Path) -> ec.EllipticCurvePrivateKey:
    return keyfiles.load_or_create(
        path,
        what="EAR signing key",
        kind="an EC P-256 key (ES256)",
        generate=lambda: ec.generate_private_key(ec.SECP256R1()),
        accept=lambda k: (
            isinstance(k, ec.EllipticCurvePrivateKey) and isinstance(k.curve, ec.SECP256R1)
        ),
        error=EarKeyError,
    )
