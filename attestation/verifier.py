"""Judge one enclave key: evidence genuine, bound to this key, fresh, and accepted by reference
values. Returns an :class:`AttestationResult` or raises a typed :mod:`attestation.errors`.

:func:`verify_key` dispatches on the offered evidence format:

* ``sovra-sim-tee/2`` (SIMULATED composite CVM + NPU evidence, :mod:`attestation.sim`);
* ``arm-cca-token`` (an Arm CCA attestation token, as configfs-tsm's ``arm_cca_guest`` provider
  returns it; :mod:`attestation.cca_appraisal`), whose realm challenge must equal the key
  binding ``SHA-512(pk || be64(epoch) || nonce || receipt pk)``;
* ``sovra-sim-tee/1`` is refused as retired (it carries no NPU reports).

Every key binding includes the key epoch's Ed25519 *receipt* public key (training receipts are
signed with it, ``docs/training.md``). It is mandatory: an offer without one, or evidence that
binds another one or none, is refused (:class:`KeyBindingMismatch`). The verified receipt key is
part of the :class:`AttestationResult` (hex).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Final

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
#: Evidence format of an Arm CCA token (configfs-tsm provider ``arm_cca_guest``).
CCA_TOKEN_FORMAT: Final = "arm-cca-token"  # noqa: S105 - a format name, not a secret


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
    # The challenge the evidence binds. Needed for formats whose evidence carries only the
    # report data (CCA tokens); sim evidence carries its nonce inside and ignores an empty one.
    nonce: bytes = b""
    # The key epoch's Ed25519 receipt public key (32 bytes), bound into the report data with the
    # HPKE key. Mandatory: the default (empty) never verifies (KeyBindingMismatch).
    receipt_public_key: bytes = b""


@dataclass(frozen=True)
class NpuResult:
    """What the NPU report ``index`` of composite evidence showed, after appraisal."""

    index: int
    firmware_version: str
    measurement: str
    min_firmware: str | None = None  # the minimum the reference values enforced, if any

    def to_json_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "firmware_version": self.firmware_version,
            "measurement": self.measurement,
            "min_firmware": self.min_firmware,
        }


@dataclass(frozen=True)
class AttestationResult:
    enclave_id: str
    epoch: int
    status: str
    simulated: bool
    tee_type: str
    region: str  # "" when the evidence does not attest a region (CCA tokens)
    measurement: str
    verified_at_ms: int
    expires_at_ms: int  # the earlier of key expiry and evidence age limit
    verifier: str = "sovra-attestation/0.1"
    npus: tuple[NpuResult, ...] = ()  # appraised NPU reports; empty: no NPU evidence
    # hex Ed25519 receipt public key the evidence binds (training receipts); "" only for results
    # not produced by verify_key (e.g. a bare CCA appraisal)
    receipt_public_key: str = ""

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
            "npus": [n.to_json_dict() for n in self.npus],
            "receipt_public_key": self.receipt_public_key,
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
    fmt = offered.evidence_format
    if fmt in (sim.SIM_FORMAT, CCA_TOKEN_FORMAT) and (
        len(offered.receipt_public_key) != sim.RECEIPT_KEY_LEN
    ):
        raise KeyBindingMismatch(
            "no receipt public key (32 bytes) was offered with the key: every key binding must "
            "include the enclave's Ed25519 receipt key"
        )
    if fmt == sim.SIM_FORMAT:
        return _verify_sim(offered, rv, expected_nonce, now)
    if fmt == CCA_TOKEN_FORMAT:
        return _verify_cca(offered, rv, expected_nonce, now)
    if fmt == sim.SIM_FORMAT_V1:
        raise EvidenceMalformed(sim.RETIRED_V1_REASON)
    raise EvidenceMalformed(
        f"evidence format {fmt[:64]!r} is not supported (accepted: {sim.SIM_FORMAT!r}, "
        f"{CCA_TOKEN_FORMAT!r})"
    )


def _verify_sim(
    offered: OfferedKey, rv: ReferenceValues, expected_nonce: bytes | None, now: int
) -> AttestationResult:
    evidence = sim.verify_evidence(offered.evidence, rv.sim_vendor_roots)
    if rv.revoked_device_certs:
        revoked = appraisal.DeviceCertsNotRevoked(rv.revoked_device_certs).verify_certificates(
            evidence.certificates
        )
        if isinstance(revoked, appraisal.Failure):
            raise UntrustedChain(revoked.reason)
    claims = evidence.cvm
    if claims.enclave_id != offered.enclave_id:
        raise KeyBindingMismatch("evidence names another enclave than the directory entry")
    if expected_nonce is not None and claims.nonce != expected_nonce:
        raise KeyBindingMismatch("evidence does not bind the challenge nonce issued for it")
    if offered.nonce and offered.nonce != claims.nonce:
        raise KeyBindingMismatch("evidence binds another nonce than the one offered with it")
    if claims.key_not_after_ms != offered.not_after_ms:
        raise KeyBindingMismatch("evidence binds another key expiry than the one offered")
    bound = appraisal.KeyBound(
        offered.public_key, offered.epoch, offered.kem, offered.receipt_public_key
    ).verify(claims)
    if isinstance(bound, appraisal.Failure):
        raise KeyBindingMismatch(bound.reason)
    fresh = appraisal.Fresh(now, rv.max_evidence_age_s).verify(claims)
    if isinstance(fresh, appraisal.Failure):
        raise EvidenceStale(fresh.reason)
    verdict = appraisal.policy_for(rv).verify(claims)
    if isinstance(verdict, appraisal.Failure):
        raise AppraisalFailed(verdict.reason)
    npu_verdict = appraisal.npu_policy_for(rv).verify(evidence)
    if isinstance(npu_verdict, appraisal.Failure):
        raise AppraisalFailed(npu_verdict.reason)
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
        npus=tuple(
            NpuResult(n.index, n.firmware_version, n.measurement, rv.min_npu_firmware)
            for n in evidence.npus
        ),
        receipt_public_key=claims.receipt_key.hex(),
    )


def _verify_cca(
    offered: OfferedKey, rv: ReferenceValues, expected_nonce: bytes | None, now: int
) -> AttestationResult:
    """A CCA token binds the key through its realm challenge (64 bytes) = the key binding hash.

    The token carries no enclave id, region, key expiry or time: the enclave id is the offer's
    (a relabelled key is refused by the enclave, which only opens envelopes naming itself), the
    region is left empty (not attested), and the result expires at the earlier of the offered
    key expiry and ``max_evidence_age_s`` from now.
    """
    from attestation.cca_appraisal import verify_and_appraise_cca  # imports this module

    if expected_nonce is not None and offered.nonce and offered.nonce != expected_nonce:
        raise KeyBindingMismatch("evidence does not bind the challenge nonce issued for it")
    nonce = expected_nonce if expected_nonce is not None else offered.nonce
    if not nonce:
        raise KeyBindingMismatch(
            "a CCA token binds its key through the challenge nonce, and none came with the offer"
        )
    if offered.not_after_ms <= now:
        raise EvidenceStale("the offered key has expired")
    binding = sim.report_data(offered.public_key, offered.epoch, nonce, offered.receipt_public_key)
    _token, judged = verify_and_appraise_cca(
        offered.evidence, rv, expected_challenge=binding, now_ms=now
    )
    result = judged.to_attestation_result(
        enclave_id=offered.enclave_id,
        epoch=offered.epoch,
        region="",
        expires_at_ms=min(offered.not_after_ms, now + rv.max_evidence_age_s * 1000),
    )
    return replace(result, receipt_public_key=offered.receipt_public_key.hex())
