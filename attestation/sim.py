"""Simulated Ascend CVM + NPU composite evidence (format ``sovra-sim-tee/2``). SIMULATION, NOT
HARDWARE.

No Ascend NPU or virtCCA machine exists in development and CI, so software "devices" sign
evidence with keys whose certificates chain to a simulated vendor root CA. Every claim set says
``simulated: true``; verifiers accept it only where reference values allow simulation.

The evidence is a composite, the way CPU + GPU confidential computing attests a VM and its
accelerators together: one CVM report (binds the enclave's HPKE key and its Ed25519 receipt key
through ``report_data``, and names the receipt key as a claim) and one device report per NPU
(firmware version and measurement). Each NPU report's nonce is derived
from the CVM report data, so a genuine NPU report of another CVM cannot be mixed in::

    npu_nonce(i) = SHA-256("sovra-sim-npu" 0x00 || cvm report_data || be32(i))

Wire form (CBOR)::

    [ "sovra-sim-tee/2", cvm_report, [npu_report_0, ...] ]
    report = [ claims_bytes, signature, [device_cert_der, ..., up to the root] ]

``claims_bytes`` are canonical CBOR maps; signatures are ECDSA P-384/SHA-384 (DER) over
``"sovra-sim-tee/2 cvm" 0x00 || claims_bytes`` (CVM) or ``"sovra-sim-tee/2 npu" 0x00 ||
claims_bytes`` (NPU), so one report can never pass for the other. Each report carries its own
certificate chain and is verified on its own; the simulated enclave signs its NPU reports with
the same simulated device key as its CVM report (see ``docs/attestation.md`` for why).

``sovra-sim-tee/1`` (a CVM report without NPU reports) is refused: it could not show NPU firmware
or measurements, so accepting it would bypass those checks.
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

from attestation.errors import (
    CompositeBindingMismatch,
    EvidenceMalformed,
    EvidenceSignatureInvalid,
    KeyBindingMismatch,
    UntrustedChain,
)

SIM_FORMAT: Final = "sovra-sim-tee/2"
SIM_FORMAT_V1: Final = "sovra-sim-tee/1"  # retired: refused with RETIRED_V1_REASON
RETIRED_V1_REASON: Final = (
    "evidence format 'sovra-sim-tee/1' is retired: it carries no NPU reports, so NPU firmware "
    "and measurements cannot be appraised; the enclave must send 'sovra-sim-tee/2'"
)
SIM_TEE_TYPE: Final = "sim-ascend-cvm"
SIM_NPU_TYPE: Final = "sim-ascend-npu"
SIM_PLATFORM_LABEL: Final = "SIMULATED Ascend CVM+NPU (software, no hardware protection)"
SIM_NPU_LABEL: Final = "SIMULATED Ascend NPU (software, no hardware protection)"
DEFAULT_NPU_FIRMWARE: Final = "7.1.0"
MAX_NPUS: Final = 16
#: Length of the Ed25519 receipt public key every key binding includes.
RECEIPT_KEY_LEN: Final = 32
_CVM_CONTEXT: Final = SIM_FORMAT.encode() + b" cvm\x00"
_NPU_CONTEXT: Final = SIM_FORMAT.encode() + b" npu\x00"
_NPU_NONCE_DOMAIN: Final = b"sovra-sim-npu\x00"
_NPU_FIRMWARE_DOMAIN: Final = b"sovra-sim-npu-firmware\x00"
_CLAIM_KEYS: Final = frozenset(
    {"simulated", "platform", "tee_type", "enclave_id", "region", "measurement", "report_data",
     "nonce", "epoch", "kem", "key_not_after_ms", "issued_at_ms", "npus", "receipt_key"}
)  # fmt: skip
_NPU_CLAIM_KEYS: Final = frozenset(
    {"simulated", "platform", "device_type", "index", "firmware_version", "measurement", "nonce"}
)


def report_data(public_key: bytes, epoch: int, nonce: bytes, receipt_public_key: bytes) -> bytes:
    """The value evidence binds, for every format (sim ``report_data``, CCA realm challenge,
    configfs-tsm inblob)::

        SHA-512(HPKE public key || be64(epoch) || nonce || Ed25519 receipt public key (32 bytes))

    The receipt key is fixed-length and last, so the split of the hashed bytes stays unambiguous
    for a given KEM. Raises ValueError for a receipt key that is not 32 bytes: there is no key
    binding without one.
    """
    if len(receipt_public_key) != RECEIPT_KEY_LEN:
        raise ValueError(
            f"a key binding needs the {RECEIPT_KEY_LEN}-byte Ed25519 receipt public key, "
            f"got {len(receipt_public_key)} bytes"
        )
    return hashlib.sha512(
        public_key + struct.pack(">Q", epoch) + nonce + receipt_public_key
    ).digest()


def npu_nonce(cvm_report_data: bytes, index: int) -> bytes:
    """The nonce NPU ``index`` must sign: binds its report to this CVM report's data."""
    return hashlib.sha256(_NPU_NONCE_DOMAIN + cvm_report_data + struct.pack(">I", index)).digest()


def npu_measurement(firmware_version: str) -> str:
    """The SIMULATED NPU's measurement: hex SHA-384 standing in for its firmware image digest."""
    return hashlib.sha384(_NPU_FIRMWARE_DOMAIN + firmware_version.encode()).hexdigest()


@dataclass(frozen=True)
class SimClaims:
    """The CVM report: who the enclave is and which keys it binds (HPKE and receipt key)."""

    enclave_id: str
    region: str
    measurement: str  # lowercase hex SHA-384 of enclave code and model
    report_data: bytes
    nonce: bytes
    epoch: int
    kem: str
    key_not_after_ms: int
    issued_at_ms: int
    receipt_key: bytes  # the epoch's Ed25519 receipt public key (32 bytes), also in report_data
    tee_type: str = SIM_TEE_TYPE
    simulated: bool = True
    npus: int = 1  # NPU reports that must accompany this CVM report

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
                "npus": self.npus,
                "receipt_key": self.receipt_key,
            },
            canonical=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> SimClaims:
        m = _cbor(data, "CVM claims")
        if isinstance(m, dict) and set(m) == _CLAIM_KEYS - {"receipt_key"}:
            raise KeyBindingMismatch(
                "evidence binds no receipt key: every key binding must include the enclave's "
                "Ed25519 receipt public key (the enclave predates receipt-key binding)"
            )
        if not isinstance(m, dict) or set(m) != _CLAIM_KEYS:
            raise EvidenceMalformed("sim CVM claims are not the expected map")
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
                npus=_typed(m["npus"], int),
                receipt_key=_typed(m["receipt_key"], bytes),
            )
        except TypeError as exc:
            raise EvidenceMalformed(f"sim CVM claim has the wrong type: {exc}") from None
        if len(claims.receipt_key) != RECEIPT_KEY_LEN:
            raise EvidenceMalformed(f"sim CVM claim receipt_key must be {RECEIPT_KEY_LEN} bytes")
        if claims.encode() != data:
            raise EvidenceMalformed("sim CVM claims are not canonical CBOR")
        if not 0 <= claims.npus <= MAX_NPUS:
            raise EvidenceMalformed(f"sim CVM claims declare {claims.npus} NPUs (0..{MAX_NPUS})")
        return claims


@dataclass(frozen=True)
class NpuClaims:
    """One NPU's device report: its firmware, its measurement, and the nonce binding it."""

    index: int
    firmware_version: str
    measurement: str  # lowercase hex SHA-384 of the NPU firmware image
    nonce: bytes  # npu_nonce(cvm report data, index)
    simulated: bool = True

    def encode(self) -> bytes:
        return cbor2.dumps(
            {
                "simulated": self.simulated,
                "platform": SIM_NPU_LABEL,
                "device_type": SIM_NPU_TYPE,
                "index": self.index,
                "firmware_version": self.firmware_version,
                "measurement": self.measurement,
                "nonce": self.nonce,
            },
            canonical=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> NpuClaims:
        m = _cbor(data, "NPU claims")
        if not isinstance(m, dict) or set(m) != _NPU_CLAIM_KEYS:
            raise EvidenceMalformed("sim NPU claims are not the expected map")
        if m["simulated"] is not True or m["device_type"] != SIM_NPU_TYPE:
            raise EvidenceMalformed(
                f"sim NPU claims must declare simulated: true and device_type {SIM_NPU_TYPE!r}"
            )
        try:
            claims = cls(
                index=_typed(m["index"], int),
                firmware_version=_typed(m["firmware_version"], str),
                measurement=_typed(m["measurement"], str),
                nonce=_typed(m["nonce"], bytes),
            )
        except TypeError as exc:
            raise EvidenceMalformed(f"sim NPU claim has the wrong type: {exc}") from None
        if claims.encode() != data:
            raise EvidenceMalformed("sim NPU claims are not canonical CBOR")
        return claims


def npu_claims_for(
    cvm: SimClaims, firmware_version: str = DEFAULT_NPU_FIRMWARE
) -> tuple[NpuClaims, ...]:
    """The NPU reports a simulated CVM with ``cvm.npus`` NPUs of one firmware produces."""
    return tuple(
        NpuClaims(
            index=i,
            firmware_version=firmware_version,
            measurement=npu_measurement(firmware_version),
            nonce=npu_nonce(cvm.report_data, i),
        )
        for i in range(cvm.npus)
    )


@dataclass(frozen=True)
class SimEvidence:
    """Verified composite evidence: CVM claims, NPU claims in index order, and every chain."""

    cvm: SimClaims
    npus: tuple[NpuClaims, ...]
    chains: tuple[tuple[x509.Certificate, ...], ...]  # CVM report's first, then each NPU's

    @property
    def certificates(self) -> list[x509.Certificate]:
        """Every distinct certificate the reports carry (for revocation checks)."""
        seen: list[x509.Certificate] = []
        for cert in itertools.chain.from_iterable(self.chains):
            if cert not in seen:
                seen.append(cert)
        return seen


Signer = tuple[ec.EllipticCurvePrivateKey, Sequence[x509.Certificate]]


def encode_evidence(
    claims: SimClaims,
    device_key: ec.EllipticCurvePrivateKey,
    chain: Sequence[x509.Certificate],
    *,
    npus: Sequence[NpuClaims] | None = None,
    npu_signers: Sequence[Signer] | None = None,
) -> bytes:
    """Sign a composite as the simulated devices would. Used by the enclave's sim backend.

    ``npus`` defaults to :func:`npu_claims_for` (``claims.npus`` NPUs at the default firmware);
    each NPU report is signed by ``npu_signers[i]`` or, by default, the CVM's device key.
    """
    npu_list = npu_claims_for(claims) if npus is None else tuple(npus)
    signers = list(npu_signers or [(device_key, chain)] * len(npu_list))
    if len(signers) != len(npu_list):
        raise ValueError("one NPU signer per NPU report")
    cvm_report = _report(_CVM_CONTEXT, claims.encode(), device_key, chain)
    npu_reports = [
        _report(_NPU_CONTEXT, npu.encode(), key, certs)
        for npu, (key, certs) in zip(npu_list, signers, strict=True)
    ]
    return cbor2.dumps([SIM_FORMAT, cvm_report, npu_reports])


def _report(
    context: bytes, claims_bytes: bytes, key: ec.EllipticCurvePrivateKey,
    chain: Sequence[x509.Certificate],
) -> list[Any]:  # fmt: skip
    signature = key.sign(context + claims_bytes, ec.ECDSA(hashes.SHA384()))
    return [claims_bytes, signature, [c.public_bytes(Encoding.DER) for c in chain]]


def verify_evidence(
    evidence: bytes, roots: Sequence[x509.Certificate], now: datetime | None = None
) -> SimEvidence:
    """Check structure, every report's chain to a simulated vendor root and signature, and that
    every NPU report is bound to the CVM report; return the claims.

    Key binding, freshness and reference values are appraised by the caller
    (:mod:`attestation.verifier`).
    """
    obj = _cbor(evidence, "evidence")
    if isinstance(obj, list) and obj and obj[0] == SIM_FORMAT_V1:
        raise EvidenceMalformed(RETIRED_V1_REASON)
    if not isinstance(obj, list) or len(obj) != 3 or obj[0] != SIM_FORMAT:
        raise EvidenceMalformed(f"not {SIM_FORMAT} evidence (expected a 3-item array)")
    when = now or datetime.now(UTC)
    raw_npus = obj[2]
    if not isinstance(raw_npus, list):
        raise EvidenceMalformed("sim evidence must carry a list of NPU reports")
    cvm_bytes, cvm_chain = _verify_report(obj[1], _CVM_CONTEXT, roots, when, "CVM report")
    cvm = SimClaims.decode(cvm_bytes)
    if len(raw_npus) != cvm.npus:
        raise EvidenceMalformed(
            f"sim evidence carries {len(raw_npus)} NPU reports but the CVM report declares "
            f"{cvm.npus}"
        )
    npus: list[NpuClaims] = []
    chains = [cvm_chain]
    for position, raw in enumerate(raw_npus):
        npu_bytes, npu_chain = _verify_report(
            raw, _NPU_CONTEXT, roots, when, f"NPU report {position}"
        )
        npu = NpuClaims.decode(npu_bytes)
        if npu.index != position:
            raise EvidenceMalformed(f"NPU report {position} says it is NPU {npu.index}")
        if npu.nonce != npu_nonce(cvm.report_data, position):
            raise CompositeBindingMismatch(
                f"NPU report {position} is not bound to this CVM report (nonce mismatch): an NPU "
                "report of another CVM was mixed in"
            )
        npus.append(npu)
        chains.append(npu_chain)
    return SimEvidence(cvm, tuple(npus), tuple(chains))


def _verify_report(
    raw: Any, context: bytes, roots: Sequence[x509.Certificate], now: datetime, what: str
) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    if not isinstance(raw, list) or len(raw) != 3:
        raise EvidenceMalformed(f"sim {what} is not a 3-item array")
    claims_bytes, signature, ders = raw
    if not (isinstance(claims_bytes, bytes) and isinstance(signature, bytes)):
        raise EvidenceMalformed(f"sim {what} claims and signature must be byte strings")
    if not isinstance(ders, list) or not ders or not all(isinstance(d, bytes) for d in ders):
        raise EvidenceMalformed(f"sim {what} must carry the device certificate chain")
    try:
        chain = tuple(x509.load_der_x509_certificate(d) for d in ders)
    except ValueError:
        raise EvidenceMalformed(f"sim {what} carries an unparsable certificate") from None
    _verify_chain(chain, roots, now)
    device_key = chain[0].public_key()
    if not isinstance(device_key, ec.EllipticCurvePublicKey):
        raise EvidenceSignatureInvalid(f"{what}: device certificate key is not an EC key")
    try:
        device_key.verify(signature, context + claims_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceSignatureInvalid(f"sim {what} signature does not verify") from None
    return claims_bytes, chain


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
