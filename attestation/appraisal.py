"""Appraisal policies: small checks composed with AllOf / AnyOf.

Each check has one ``verify(claims)`` returning :class:`Success` or :class:`Failure` with a reason.
An empty ``AllOf`` fails: a policy that checks nothing must never accept. ``UnsafeNoOp`` accepts
everything and warns on every use; it exists for experiments, never for deployments.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from attestation.reference_values import ReferenceValues
from attestation.sim import SimClaims, report_data

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


class Check(Protocol):
    def verify(self, claims: SimClaims) -> Result: ...


@dataclass(frozen=True)
class AllOf:
    checks: Sequence[Check]

    def verify(self, claims: SimClaims) -> Result:
        if not self.checks:
            return Failure("empty AllOf: no checks configured, refusing")
        for check in self.checks:
            result = check.verify(claims)
            if isinstance(result, Failure):
                return result
        return Success()


@dataclass(frozen=True)
class AnyOf:
    checks: Sequence[Check]

    def verify(self, claims: SimClaims) -> Result:
        reasons = []
        for check in self.checks:
            result = check.verify(claims)
            if isinstance(result, Success):
                return result
            reasons.append(result.reason)
        return Failure("none of: " + "; ".join(reasons) if reasons else "empty AnyOf")


class UnsafeNoOp:
    """Accepts any claims. Never use outside experiments."""

    def verify(self, claims: SimClaims) -> Result:
        log.warning(
            "UnsafeNoOp appraisal accepted evidence of %s without checks", claims.enclave_id
        )
        return Success()


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
    """The evidence binds exactly this public key and epoch (report data = H(pk||epoch||nonce))."""

    public_key: bytes
    epoch: int
    kem: str

    def verify(self, claims: SimClaims) -> Result:
        if claims.epoch != self.epoch or claims.kem != self.kem:
            return Failure("evidence binds another key epoch or KEM than the one offered")
        if report_data(self.public_key, self.epoch, claims.nonce) != claims.report_data:
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


def policy_for(rv: ReferenceValues) -> AllOf:
    """The appraisal of claims against reference values (binding and freshness added by caller)."""
    return AllOf(
        [
            SimulationAllowed(rv.allow_simulation),
            TeeTypeAccepted(rv.tee_types),
            MeasurementAccepted(rv.measurements),
        ]
    )
