"""Simulated Ascend CVM + NPU evidence (format ``sovra-sim-tee/1``). SIMULATION, NOT HARDWARE.

No Ascend NPU or virtCCA machine exists in development and CI, so a software "device" signs
evidence with a key whose certificate chains to a simulated vendor root CA. Every claim set says
``simulated: true``; verifiers accept it only where reference values allow simulation.

Wire form: CBOR array ``[format, claims_bytes, signature, [device_cert_der, ...]]`` where
``claims_bytes`` is a canonical CBOR map and ``signature`` is ECDSA P-384/SHA-384 (DER) by the
device key over ``b"sovra-sim-tee/1\\x00" || claims_bytes``.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.errors import EvidenceMalformed, EvidenceSignatureInvalid, UntrustedChain

SIM_FORMAT: Final = "sovra-sim-tee/1"
SIM_TEE_TYPE: Final = "sim-ascend-cvm"
SIM_PLATFORM_LABEL: Final = "SIMULATED Ascend CVM+NPU (software, no hardware protection)"
_SIG_CONTEXT: Final = SIM_FORMAT.encode() + b"\x00"
_CLAIM_KEYS: Final = frozenset(
    {"simulated", "platform", "tee_type", "enclave_id", "region", "measurement", "report_data",
     "nonce", "epoch", "kem", "key_not_after_ms", "issued_at_ms"}
)  # fmt: skip


def report_data(public_key: bytes, epoch: int, nonce: bytes) -> bytes:
    """The value evidence binds: SHA-512(public key || epoch as u64 big-endian || nonce)."""
    return hashlib.sha512(public_key + struct.pack(">Q", epoch) + nonce).digest()


@dataclass(frozen=True)
class SimClaims:
    enclave_id: str
    region: str
    measurement: str  # lowercase hex SHA-384 of enclave code and model
    report_data: bytes
    nonce: bytes
    epoch: int
    kem: str
    key_not_after_ms: int
    issued_at_ms: int
    tee_type: str = SIM_TEE_TYPE
    simulated: bool = True

    def encode(self) -> bytes:
        return cbor2.dumps(
            {
                "simulated": self.simulated,
                "platform": SIM_PLATFORM_LABEL,
                "tee_type": self.tee_type,
                "enclave_id": self.enclave_id,
                "region": self.region,
                "measurement": self.measurement,
                "report_data": self.report_data,
                "nonce": self.nonce,
                "epoch": self.epoch,
                "kem": self.kem,
                "key_not_after_ms": self.key_not_after_ms,
                "issued_at_ms": self.issued_at_ms,
            },
            canonical=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> SimClaims:
        m = _cbor(data, "claims")
        if not isinstance(m, dict) or set(m) != _CLAIM_KEYS:
            raise EvidenceMalformed("sim evidence claims are not the expected map")
        if m["simulated"] is not True:
            raise EvidenceMalformed("sim evidence must declare simulated: true")
        try:
            claims = cls(
                enclave_id=_typed(m["enclave_id"], str),
                region=_typed(m["region"], str),
                measurement=_typed(m["measurement"], str),
                report_data=_typed(m["report_data"], bytes),
                nonce=_typed(m["nonce"], bytes),
                epoch=_typed(m["epoch"], int),
                kem=_typed(m["kem"], str),
                key_not_after_ms=_typed(m["key_not_after_ms"], int),
                issued_at_ms=_typed(m["issued_at_ms"], int),
                tee_type=_typed(m["tee_type"], str),
            )
        except TypeError as exc:
            raise EvidenceMalformed(f"sim evidence claim has the wrong type: {exc}") from None
        if claims.encode() != data:
            raise EvidenceMalformed("sim evidence claims are not canonical CBOR")
        return claims


def encode_evidence(
    claims: SimClaims, device_key: ec.EllipticCurvePrivateKey, chain: Sequence[x509.Certificate]
) -> bytes:
    """Sign claims as the simulated device would. Used by the enclave's sim backend."""
    claims_bytes = claims.encode()
    signature = device_key.sign(_SIG_CONTEXT + claims_bytes, ec.ECDSA(hashes.SHA384()))
    ders = [c.public_bytes(Encoding.DER) for c in chain]
    return cbor2.dumps([SIM_FORMAT, claims_bytes, signature, ders])


def verify_evidence(
    evidence: bytes, roots: Sequence[x509.Certificate], now: datetime | None = None
) -> SimClaims:
    """Check structure, the chain to a simulated vendor root and the signature; return claims.

    Binding, freshness and reference values are appraised by the caller (attestation.verifier).
    """
    obj = _cbor(evidence, "evidence")
    if not isinstance(obj, list) or len(obj) != 4 or obj[0] != SIM_FORMAT:
        raise EvidenceMalformed(f"not {SIM_FORMAT} evidence (expected a 4-item array)")
    claims_bytes, signature, ders = obj[1], obj[2], obj[3]
    if not (isinstance(claims_bytes, bytes) and isinstance(signature, bytes)):
        raise EvidenceMalformed("sim evidence claims and signature must be byte strings")
    if not isinstance(ders, list) or not ders or not all(isinstance(d, bytes) for d in ders):
        raise EvidenceMalformed("sim evidence must carry the device certificate chain")
    try:
        chain = [x509.load_der_x509_certificate(d) for d in ders]
    except ValueError:
        raise EvidenceMalformed("sim evidence carries an unparsable certificate") from None
    _verify_chain(chain, roots, now or datetime.now(UTC))
    device_key = chain[0].public_key()
    if not isinstance(device_key, ec.EllipticCurvePublicKey):
        raise EvidenceSignatureInvalid("device certificate key is not an EC key")
    try:
        device_key.verify(signature, _SIG_CONTEXT + claims_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceSignatureInvalid("sim evidence signature does not verify") from None
    return SimClaims.decode(claims_bytes)


def _verify_chain(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], now: datetime
) -> None:
    if not roots:
        raise UntrustedChain("no simulated vendor root is configured in the reference values")
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise UntrustedChain(f"certificate {cert.subject.rfc4514_string()} is not valid now")
    for child, parent in itertools.pairwise(chain):
        _check_issued(child, parent)
    top = chain[-1]
    for root in roots:
        if top == root:
            return
        if top.issuer == root.subject:
            try:
                _check_issued(top, root)
            except UntrustedChain:
                continue
            return
    raise UntrustedChain("device certificate does not chain to a configured simulated vendor root")


def _check_issued(child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        raise UntrustedChain(
            f"{child.subject.rfc4514_string()} is not issued by {parent.subject.rfc4514_string()}"
        ) from None
    try:
        bc = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise UntrustedChain(f"{parent.subject.rfc4514_string()} is not a CA certificate")


def _cbor(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise EvidenceMalformed(f"sim {what} is not valid CBOR") from None


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value
