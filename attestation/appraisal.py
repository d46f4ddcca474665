"""Appraisal policies: small checks composed with AllOf / AnyOf.

Each check has one ``verify(claims)`` returning :class:`Success` or :class:`Failure` with a reason.
An empty ``AllOf`` fails: a policy that checks nothing must never accept. ``UnsafeNoOp`` accepts
everything and warns on every use; it exists for experiments, never for deployments.

The combinators are generic over the claims type: the checks in this module judge simulated
evidence, the CVM report (:class:`~attestation.sim.SimClaims`, :func:`policy_for`) and the NPU
reports of the composite (:class:`~attestation.sim.SimEvidence`, :func:`npu_policy_for`);
:mod:`attestation.cca_appraisal` composes the same combinators over Arm CCA tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from attestation.errors import EvidenceMalformed
from attestation.reference_values import (
    ReferenceValues,
    firmware_at_least,
    is_revoked_certificate,
)
from attestation.sim import RECEIPT_KEY_LEN, SimClaims, SimEvidence, report_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Success:
    def __bool__(self) -> bool:
        return True


@dataclass(frozen=True)
class Failure:
    reason: str

    def __bool__(self) -> bool:
        return False


Result = Success | Failure


C = TypeVar("C")
C_contra = TypeVar("C_contra", contravariant=True)


class Check(Protocol[C_contra]):
    def verify(self, claims: C_contra) -> Result: ...


@dataclass(frozen=True)
class AllOf(Generic[C]):
    checks: Sequence[Check[C]]

    def verify(self, claims: C) -> Result:
        if not self.checks:
            return Failure("empty AllOf: no checks configured, refusing")
        for check in self.checks:
            result = check.verify(claims)
            if isinstance(result, Failure):
                return result
        return Success()


@dataclass(frozen=True)
class AnyOf(Generic[C]):
    checks: Sequence[Check[C]]

    def verify(self, claims: C) -> Result:
        reasons = []
        for check in self.checks:
            result = check.verify(claims)
            if isinstance(result, Success):
                return result
            reasons.append(result.reason)
        return Failure("none of: " + "; ".join(reasons) if reasons else "empty AnyOf")


class UnsafeNoOp:
    """Accepts any claims. Never use outside experiments."""

    def verify(self, claims: Any) -> Result:
        log.warning(
            "UnsafeNoOp appraisal accepted evidence of %s without checks", _describe(claims)
        )
        return Success()


def _describe(claims: object) -> str:
    enclave_id = getattr(claims, "enclave_id", None)
    return enclave_id if isinstance(enclave_id, str) else type(claims).__name__


@dataclass(frozen=True)
class SimulationAllowed:
    allowed: bool

    def verify(self, claims: SimClaims) -> Result:
        if claims.simulated and not self.allowed:
            return Failure(
                "evidence is from a SIMULATED TEE and reference values forbid simulation"
            )
        return Success()


@dataclass(frozen=True)
class TeeTypeAccepted:
    accepted: frozenset[str]

    def verify(self, claims: SimClaims) -> Result:
        if claims.tee_type not in self.accepted:
            return Failure(f"TEE type {claims.tee_type!r} is not in the accepted TEE types")
        return Success()


@dataclass(frozen=True)
class MeasurementAccepted:
    accepted: frozenset[str]

    def verify(self, claims: SimClaims) -> Result:
        if claims.measurement.lower() not in self.accepted:
            return Failure(f"measurement {claims.measurement[:16]}... is not a reference value")
        return Success()


@dataclass(frozen=True)
class KeyBound:
    """The evidence binds exactly this public key, epoch and receipt key
    (report data = H(pk || epoch || nonce || receipt key), :func:`attestation.sim.report_data`)."""

    public_key: bytes
    epoch: int
    kem: str
    receipt_public_key: bytes = b""

    def verify(self, claims: SimClaims) -> Result:
        if claims.epoch != self.epoch or claims.kem != self.kem:
            return Failure("evidence binds another key epoch or KEM than the one offered")
        if len(self.receipt_public_key) != RECEIPT_KEY_LEN:
            return Failure("no receipt public key was offered with the key (it is mandatory)")
        if claims.receipt_key != self.receipt_public_key:
            return Failure("evidence binds another receipt key than the one offered")
        bound = report_data(self.public_key, self.epoch, claims.nonce, self.receipt_public_key)
        if bound != claims.report_data:
            return Failure("evidence report data does not bind the offered public key")
        return Success()


@dataclass(frozen=True)
class Fresh:
    now_ms: int
    max_age_s: int

    def verify(self, claims: SimClaims) -> Result:
        age_ms = self.now_ms - claims.issued_at_ms
        if age_ms > self.max_age_s * 1000:
            return Failure(f"evidence is {age_ms // 1000}s old, older than {self.max_age_s}s")
        if age_ms < -60_000:
            return Failure("evidence is issued in the future (clock skew over 60s)")
        if claims.key_not_after_ms <= self.now_ms:
            return Failure("the bound key has expired")
        return Success()


@dataclass(frozen=True)
class NotRevoked:
    """The measurement is not on the reference values' revocation list (``revoked_measurements``).

    Runs before :class:`MeasurementAccepted` so a measurement that is both accepted and revoked
    is refused with the more telling reason.
    """

    revoked: frozenset[str]

    def verify(self, claims: SimClaims) -> Result:
        if claims.measurement.lower() in self.revoked:
            return Failure(f"measurement {claims.measurement[:16]}... is revoked")
        return Success()


@dataclass(frozen=True)
class DeviceCertsNotRevoked:
    """No certificate the evidence carries is on ``revoked_device_certs`` (hex serial numbers
    or SHA-256 fingerprints). Judges the certificate chain, not the claims, so it is applied by
    :func:`attestation.verifier.verify_key` right after the chain and signature verify."""

    revoked: frozenset[str]

    def verify_certificates(self, chain: Sequence[x509.Certificate]) -> Result:
        for cert in chain:
            why = is_revoked_certificate(
                self.revoked, cert.serial_number, cert.fingerprint(hashes.SHA256())
            )
            if why:
                return Failure(
                    f"device certificate {cert.subject.rfc4514_string()} is revoked by the "
                    f"reference values ({why})"
                )
        return Success()


def sim_device_chain(evidence: bytes) -> list[x509.Certificate]:
    """The certificates carried by the CVM report of ``sovra-sim-tee/2`` evidence, device
    certificate first (each NPU report carries its own; see ``SimEvidence.certificates``).

    Only parses; call it on evidence that :func:`attestation.sim.verify_evidence` accepted.
    """
    try:
        obj = cbor2.loads(evidence)
        ders = obj[1][2]
        return [x509.load_der_x509_certificate(d) for d in ders]
    except (cbor2.CBORDecodeError, ValueError, TypeError, IndexError, KeyError):
        raise EvidenceMalformed(
            "sim evidence does not carry a parsable certificate chain"
        ) from None


# --------------------------------------------------------------------------- NPU reports


@dataclass(frozen=True)
class NpuNotRevoked:
    """No NPU measurement is on ``revoked_measurements`` (the list covers every measurement)."""

    revoked: frozenset[str]

    def verify(self, evidence: SimEvidence) -> Result:
        for npu in evidence.npus:
            if npu.measurement.lower() in self.revoked:
                return Failure(f"NPU {npu.index} measurement {npu.measurement[:16]}... is revoked")
        return Success()


@dataclass(frozen=True)
class NpuFirmwareAtLeast:
    """Every NPU runs at least ``min_npu_firmware`` (numeric comparison; ``None``: no minimum)."""

    minimum: str | None

    def verify(self, evidence: SimEvidence) -> Result:
        if self.minimum is None:
            return Success()
        for npu in evidence.npus:
            ok = firmware_at_least(npu.firmware_version, self.minimum)
            if ok is None:
                return Failure(
                    f"NPU {npu.index} firmware version {npu.firmware_version[:32]!r} cannot be "
                    f"compared with min_npu_firmware {self.minimum!r}"
                )
            if not ok:
                return Failure(
                    f"NPU {npu.index} firmware {npu.firmware_version} is older than "
                    f"min_npu_firmware {self.minimum}"
                )
        return Success()


@dataclass(frozen=True)
class NpuMeasurementAccepted:
    """Every NPU's firmware measurement is one of ``npu_measurements``."""

    accepted: frozenset[str]

    def verify(self, evidence: SimEvidence) -> Result:
        for npu in evidence.npus:
            if npu.measurement.lower() not in self.accepted:
                return Failure(
                    f"NPU {npu.index} measurement {npu.measurement[:16]}... is not a reference "
                    "value (npu_measurements)"
                )
        return Success()


def policy_for(rv: ReferenceValues) -> AllOf[SimClaims]:
    """The appraisal of claims against reference values (binding and freshness added by caller)."""
    return AllOf(
        [
            SimulationAllowed(rv.allow_simulation),
            TeeTypeAccepted(rv.tee_types),
            NotRevoked(rv.revoked_measurements),
            MeasurementAccepted(rv.measurements),
        ]
    )


def npu_policy_for(rv: ReferenceValues) -> AllOf[SimEvidence]:
    """The appraisal of the NPU reports of composite sim evidence."""
    return AllOf(
        [
            NpuNotRevoked(rv.revoked_measurements),
            NpuFirmwareAtLeast(rv.min_npu_firmware),
            NpuMeasurementAccepted(rv.npu_measurements),
        ]
    )
