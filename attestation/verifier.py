"""Judge one enclave key: evidence genuine, bound to this key, fresh, and accepted by reference
values. Returns an :class:`AttestationResult` or raises a typed :mod:`attestation.errors`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from attestation import appraisal, sim
from attestation.errors import (
    AppraisalFailed,
    EvidenceMalformed,
    EvidenceStale,
    KeyBindingMismatch,
    UntrustedChain,
)
from attestation.reference_values import ReferenceValues

STATUS_AFFIRMING = "affirming"


@dataclass(frozen=True)
class OfferedKey:
    """What a directory says about one enclave key; nothing here is trusted yet."""

    enclave_id: str
    epoch: int
    kem: str
    public_key: bytes
    not_after_ms: int
    evidence_format: str
    evidence: bytes


@dataclass(frozen=True)
class AttestationResult:
    enclave_id: str
    epoch: int
    status: str
    simulated: bool
    tee_type: str
    region: str
    measurement: str
    verified_at_ms: int
    expires_at_ms: int  # the earlier of key expiry and evidence age limit
    verifier: str = "sovra-attestation/0.1"

    def to_json_dict(self) -> dict[str, object]:
        return {
            "enclave_id": self.enclave_id,
            "epoch": self.epoch,
            "status": self.status,
            "simulated": self.simulated,
            "tee_type": self.tee_type,
            "region": self.region,
            "measurement": self.measurement,
            "verified_at_ms": self.verified_at_ms,
            "expires_at_ms": self.expires_at_ms,
            "verifier": self.verifier,
        }


def verify_key(
    offered: OfferedKey,
    rv: ReferenceValues,
    *,
    expected_nonce: bytes | None = None,
    now_ms: int | None = None,
) -> AttestationResult:
    """``expected_nonce``: the challenge the caller issued (broker admission); the edge, which
    cannot challenge through the broker, relies on the evidence age instead."""
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    if offered.evidence_format != sim.SIM_FORMAT:
        raise EvidenceMalformed(f"evidence format {offered.evidence_format!r} is not supported")
    claims = sim.verify_evidence(offered.evidence, rv.sim_vendor_roots)
    if rv.revoked_device_certs:
        chain = appraisal.sim_device_chain(offered.evidence)
        revoked = appraisal.DeviceCertsNotRevoked(rv.revoked_device_certs).verify_certificates(
            chain
        )
        if isinstance(revoked, appraisal.Failure):
            raise UntrustedChain(revoked.reason)
    if claims.enclave_id != offered.enclave_id:
        raise KeyBindingMismatch("evidence names another enclave than the directory entry")
    if expected_nonce is not None and claims.nonce != expected_nonce:
        raise KeyBindingMismatch("evidence does not bind the challenge nonce issued for it")
    if claims.key_not_after_ms != offered.not_after_ms:
        raise KeyBindingMismatch("evidence binds another key expiry than the one offered")
    bound = appraisal.KeyBound(offered.public_key, offered.epoch, offered.kem).verify(claims)
    if isinstance(bound, appraisal.Failure):
        raise KeyBindingMismatch(bound.reason)
    fresh = appraisal.Fresh(now, rv.max_evidence_age_s).verify(claims)
    if isinstance(fresh, appraisal.Failure):
        raise EvidenceStale(fresh.reason)
    verdict = appraisal.policy_for(rv).verify(claims)
    if isinstance(verdict, appraisal.Failure):
        raise AppraisalFailed(verdict.reason)
    return AttestationResult(
        enclave_id=claims.enclave_id,
        epoch=claims.epoch,
        status=STATUS_AFFIRMING,
        simulated=claims.simulated,
        tee_type=claims.tee_type,
        region=claims.region,
        measurement=claims.measurement,
        verified_at_ms=now,
        expires_at_ms=min(
            claims.key_not_after_ms, claims.issued_at_ms + rv.max_evidence_age_s * 1000
        ),
    )
