"""Appraise verified Arm CCA (virtCCA) tokens against the ``cca`` section of reference values.

:func:`attestation.cca.verify_cca_token` answers "is this token genuine and internally bound?";
this module answers "is what it reports acceptable to *us*?". The checks are small objects with
one ``verify(token) -> Success | Failure`` and compose with the same :class:`AllOf` / :class:`AnyOf`
as the simulated-evidence checks in :mod:`attestation.appraisal`. In order:

1. realm initial measurement (RIM, claim 44238) is not revoked (``cca.revoked_realm_measurements``
   and the top-level ``revoked_measurements``);
2. the RIM is one of ``cca.realm_initial_measurements``;
3. the platform security lifecycle (claim 2395) is in ``cca.accepted_lifecycle`` (default: the
   secured states 0x3000-0x30ff);
4. the platform implementation id (claim 2396) is accepted, when ``platform_implementation_ids``
   is configured;
5. the realm personalization value (claim 44235) is accepted, when
   ``realm_personalization_values`` is configured.

A ``cca`` section in the reference values is the opt-in to CCA evidence: without it every token
is refused. :func:`verify_and_appraise_cca` does both steps with the section's platform keys and
maps :class:`~attestation.cca_errors.CCAError` onto :mod:`attestation.errors` so that callers
handle one exception family.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

from attestation.appraisal import AllOf, Check, Failure, Result, Success
from attestation.cca import (
    BindingMismatch,
    CCAError,
    CCAToken,
    ChallengeMismatch,
    SignatureInvalid,
    UntrustedPlatformKey,
    verify_cca_token,
)
from attestation.errors import (
    AppraisalFailed,
    AttestationError,
    EvidenceMalformed,
    EvidenceSignatureInvalid,
    KeyBindingMismatch,
    UntrustedChain,
)
from attestation.reference_values import CcaReferenceValues, ReferenceValues
from attestation.verifier import CCA_TOKEN_FORMAT, STATUS_AFFIRMING, AttestationResult

CCA_TEE_TYPE: Final = "arm-cca"
CCA_FORMAT: Final = CCA_TOKEN_FORMAT

# PSA / CCA security lifecycle major states (the low byte is implementation defined).
_LIFECYCLE_NAMES: Final = {
    0x0: "unknown",
    0x1: "assembly-and-test",
    0x2: "psa-rot-provisioning",
    0x3: "secured",
    0x4: "non-psa-rot-debug",
    0x5: "recoverable-psa-rot-debug",
    0x6: "decommissioned",
}


def lifecycle_name(value: int) -> str:
    """``0x3000`` -> ``"secured"``; unknown major states give ``"invalid"``."""
    return _LIFECYCLE_NAMES.get(value >> 12, "invalid") if 0 <= value <= 0xFFFF else "invalid"


def _short(value: bytes) -> str:
    text = value.hex()
    return text if len(text) <= 16 else text[:16] + "..."


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class RealmMeasurementNotRevoked:
    revoked: frozenset[str]

    def verify(self, token: CCAToken) -> Result:
        if token.realm.initial_measurement.hex() in self.revoked:
            return Failure(
                f"realm initial measurement {_short(token.realm.initial_measurement)} is revoked"
            )
        return Success()


@dataclass(frozen=True)
class RealmMeasurementAccepted:
    accepted: frozenset[str]

    def verify(self, token: CCAToken) -> Result:
        if token.realm.initial_measurement.hex() not in self.accepted:
            return Failure(
                f"realm initial measurement {_short(token.realm.initial_measurement)} is not a "
                "reference value"
            )
        return Success()


@dataclass(frozen=True)
class LifecycleSecured:
    accepted: tuple[tuple[int, int], ...]

    def verify(self, token: CCAToken) -> Result:
        value = token.platform.security_lifecycle
        if any(lo <= value <= hi for lo, hi in self.accepted):
            return Success()
        ranges = ", ".join(f"{lo:#06x}-{hi:#06x}" for lo, hi in self.accepted) or "none"
        return Failure(
            f"platform security lifecycle {value:#06x} ({lifecycle_name(value)}) is not an "
            f"accepted state (accepted: {ranges})"
        )


@dataclass(frozen=True)
class ImplementationIdAccepted:
    accepted: frozenset[str]

    def verify(self, token: CCAToken) -> Result:
        if token.platform.implementation_id.hex() not in self.accepted:
            return Failure(
                f"platform implementation id {_short(token.platform.implementation_id)} is not "
                "accepted"
            )
        return Success()


@dataclass(frozen=True)
class PersonalizationValueAccepted:
    accepted: frozenset[str]

    def verify(self, token: CCAToken) -> Result:
        if token.realm.personalization_value.hex() not in self.accepted:
            return Failure(
                f"realm personalization value {_short(token.realm.personalization_value)} is "
                "not accepted"
            )
        return Success()


def cca_policy_for(rv: ReferenceValues) -> AllOf[CCAToken]:
    """The CCA checks the reference values ask for. Without a ``cca`` section: empty (fails)."""
    cca = rv.cca
    if cca is None:
        return AllOf([])
    checks: list[Check[CCAToken]] = [
        RealmMeasurementNotRevoked(cca.revoked_realm_measurements | rv.revoked_measurements),
        RealmMeasurementAccepted(cca.realm_initial_measurements),
        LifecycleSecured(cca.accepted_lifecycle),
    ]
    if cca.platform_implementation_ids is not None:
        checks.append(ImplementationIdAccepted(cca.platform_implementation_ids))
    if cca.realm_personalization_values is not None:
        checks.append(PersonalizationValueAccepted(cca.realm_personalization_values))
    return AllOf(checks)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CcaAppraisal:
    """A CCA token that verified and that the reference values accept."""

    status: str
    realm_initial_measurement: str
    realm_personalization_value: str
    platform_implementation_id: str
    platform_instance_id: str
    security_lifecycle: int
    verified_at_ms: int
    tee_type: str = CCA_TEE_TYPE
    simulated: bool = False
    policy: str = "<memory>"

    def to_json_dict(self) -> dict[str, object]:
        return {
            "status": self.status,
            "tee_type": self.tee_type,
            "simulated": self.simulated,
            "realm_initial_measurement": self.realm_initial_measurement,
            "realm_personalization_value": self.realm_personalization_value,
            "platform_implementation_id": self.platform_implementation_id,
            "platform_instance_id": self.platform_instance_id,
            "security_lifecycle": self.security_lifecycle,
            "security_lifecycle_name": lifecycle_name(self.security_lifecycle),
            "verified_at_ms": self.verified_at_ms,
            "policy": self.policy,
        }

    def to_attestation_result(
        self, *, enclave_id: str, epoch: int, region: str, expires_at_ms: int
    ) -> AttestationResult:
        """The common result shape (for caches and :func:`attestation.ear.issue_ear`). The
        caller supplies what a CCA token does not carry: enclave id, key epoch, region."""
        return AttestationResult(
            enclave_id=enclave_id,
            epoch=epoch,
            status=self.status,
            simulated=self.simulated,
            tee_type=self.tee_type,
            region=region,
            measurement=self.realm_initial_measurement,
            verified_at_ms=self.verified_at_ms,
            expires_at_ms=expires_at_ms,
        )


def appraise_cca(
    token: CCAToken, rv: ReferenceValues, *, now_ms: int | None = None
) -> CcaAppraisal:
    """Appraise a token that :func:`attestation.cca.verify_cca_token` accepted.

    Raises :class:`AppraisalFailed` naming the first check that failed.
    """
    if rv.cca is None:
        raise AppraisalFailed(
            f"{rv.source}: reference values have no 'cca' section, so Arm CCA evidence is not "
            "accepted"
        )
    verdict = cca_policy_for(rv).verify(token)
    if isinstance(verdict, Failure):
        raise AppraisalFailed(verdict.reason)
    return CcaAppraisal(
        status=STATUS_AFFIRMING,
        realm_initial_measurement=token.realm.initial_measurement.hex(),
        realm_personalization_value=token.realm.personalization_value.hex(),
        platform_implementation_id=token.platform.implementation_id.hex(),
        platform_instance_id=token.platform.instance_id.hex(),
        security_lifecycle=token.platform.security_lifecycle,
        verified_at_ms=now_ms if now_ms is not None else int(time.time() * 1000),
        policy=rv.source,
    )


def verify_and_appraise_cca(
    token: bytes,
    rv: ReferenceValues,
    *,
    expected_challenge: bytes | None = None,
    now_ms: int | None = None,
) -> tuple[CCAToken, CcaAppraisal]:
    """Verify ``token`` with the reference values' ``cca.platform_keys``, then appraise it.

    Every refusal is an :class:`~attestation.errors.AttestationError`: untrusted platform key ->
    :class:`UntrustedChain`, other signature failures -> :class:`EvidenceSignatureInvalid`,
    binding or challenge mismatch -> :class:`KeyBindingMismatch`, malformed token or unsupported
    algorithm -> :class:`EvidenceMalformed`, appraisal -> :class:`AppraisalFailed`. The original
    :class:`~attestation.cca_errors.CCAError` is kept as ``__cause__``.
    """
    cca: CcaReferenceValues | None = rv.cca
    if cca is None:
        raise AppraisalFailed(
            f"{rv.source}: reference values have no 'cca' section, so Arm CCA evidence is not "
            "accepted"
        )
    try:
        claims = verify_cca_token(
            token, list(cca.platform_keys), expected_challenge=expected_challenge
        )
    except CCAError as exc:
        raise _as_attestation_error(exc) from exc
    return claims, appraise_cca(claims, rv, now_ms=now_ms)


def _as_attestation_error(exc: CCAError) -> AttestationError:
    reason = f"CCA token: {exc}"
    if isinstance(exc, UntrustedPlatformKey):
        return UntrustedChain(reason)
    if isinstance(exc, SignatureInvalid):
        return EvidenceSignatureInvalid(reason)
    if isinstance(exc, BindingMismatch | ChallengeMismatch):
        return KeyBindingMismatch(reason)
    return EvidenceMalformed(reason)
