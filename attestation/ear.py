"""EAT Attestation Results (EAR, draft-ietf-rats-ear) as a JWT signed ES256 by a verifier key.

An EAR says, in a standard shape, what a verifier concluded about an attester, so the conclusion
can be passed on, cached or audited without re-sending the evidence. Sovra issues one per
:class:`~attestation.verifier.AttestationResult`:

```json
{
  "eat_profile": "tag:github.com,2023:veraison/ear",
  "iat": 1760000000, "exp": 1760001800,
  "ear.verifier-id": {"developer": "sovra", "build": "sovra-attestation/0.1"},
  "submods": {
    "cpu":  {"ear.status": "warning", "ear.trustworthiness-vector": {...},
             "ear.appraisal-policy-id": "policy:reference-values.yaml"},
    "npu0": {"ear.status": "warning", "ear.trustworthiness-vector": {...}, ...}
  },
  "sovra": {"enclave_id": "enc-1", "epoch": 3, "simulated": true, "tee_type": "sim-ascend-cvm",
            "region": "eu-west", "measurement": "<hex>"}
}
```

``ear.raw-evidence`` is omitted. Trustworthiness claims (AR4SI) use the tier values 2 (affirming),
32 (warning), 96 (contraindicated) and 0 (no claim). A SIMULATED TEE never earns an affirming
``hardware`` or ``runtime-opaque`` claim: both are 32, so its submods are at best ``warning``.
A submod's ``ear.status`` is the worst tier of its vector; the overall status
(:attr:`EarClaims.status`) is the worst submod status, where "worst" orders
affirming < warning < none < contraindicated: a submod nothing was appraised for ("none") must
not let the whole result read as good.

:func:`verify_ear` refuses, each with its own exception: a token that is not a JWT
(:class:`EarMalformed`), any alg but ES256 including ``none`` (:class:`EarAlgorithmRejected`), a
bad signature or wrong key (:class:`EarSignatureInvalid`), an expired token (:class:`EarExpired`),
one issued in the future (:class:`EarNotYetValid`), missing claims (:class:`EarClaimsMissing`)
and claims of the wrong shape (:class:`EarClaimsInvalid`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.errors import AttestationError
from attestation.verifier import AttestationResult

EAR_PROFILE: Final = "tag:github.com,2023:veraison/ear"
EAR_ALG: Final = "ES256"
VERIFIER_ID: Final = {"developer": "sovra", "build": "sovra-attestation/0.1"}
CLOCK_SKEW_S: Final = 60

AFFIRMING: Final = "affirming"
WARNING: Final = "warning"
CONTRAINDICATED: Final = "contraindicated"
NONE: Final = "none"
STATUSES: Final = (AFFIRMING, WARNING, CONTRAINDICATED, NONE)

TIER_NONE: Final = 0
TIER_AFFIRMING: Final = 2
TIER_WARNING: Final = 32
TIER_CONTRAINDICATED: Final = 96

TRUST_CLAIMS: Final = (
    "instance-identity",
    "configuration",
    "executables",
    "file-system",
    "hardware",
    "runtime-opaque",
    "storage-opaque",
    "sourced-data",
)
SUBMODS: Final = ("cpu", "npu0")  # always present; more NPUs add npu1, npu2, ...

# Severity used for "worst": a submod nothing was appraised for ranks below a warning.
_SEVERITY: Final = {AFFIRMING: 0, WARNING: 1, NONE: 2, CONTRAINDICATED: 3}
_SOVRA_FIELDS: Final = {
    "enclave_id": str,
    "epoch": int,
    "simulated": bool,
    "tee_type": str,
    "region": str,
    "measurement": str,
}


# --------------------------------------------------------------------------- errors


class EarError(AttestationError):
    """Base of every refusal of an EAR attestation result."""


class EarMalformed(EarError):
    """The token is not a well-formed JWT (three base64url parts holding JSON)."""


class EarAlgorithmRejected(EarError):
    """The JWT header names an algorithm other than ES256 (including ``none``)."""


class EarSignatureInvalid(EarError):
    """The ES256 signature does not verify with the verifier key: tampered or signed by another."""


class EarExpired(EarError):
    """The result's ``exp`` has passed."""


class EarNotYetValid(EarError):
    """The result's ``iat`` lies in the future by more than the allowed clock skew."""


class EarClaimsInvalid(EarError):
    """A claim has the wrong type or value (profile, status, trustworthiness vector, ...)."""


class EarClaimsMissing(EarClaimsInvalid):
    """A mandatory claim is absent."""


# --------------------------------------------------------------------------- claims


def tier_status(value: int) -> str:
    """The status an AR4SI claim value falls in (standard and private-use ranges)."""
    if 96 <= value <= 127 or -128 <= value <= -97:
        return CONTRAINDICATED
    if 32 <= value <= 95 or -96 <= value <= -33:
        return WARNING
    if 2 <= value <= 31 or -32 <= value <= -2:
        return AFFIRMING
    return NONE


def worst_status(statuses: list[str] | tuple[str, ...]) -> str:
    """Worst of ``statuses`` (affirming < warning < none < contraindicated); empty -> none."""
    return max(statuses, key=_SEVERITY.__getitem__, default=NONE)


def _vector_status(vector: Mapping[str, int]) -> str:
    """A submod's status: the highest tier any of its claims reaches (all 0 -> none)."""
    tiers = [tier_status(v) for v in vector.values()]
    for status in (CONTRAINDICATED, WARNING, AFFIRMING):
        if status in tiers:
            return status
    return NONE


@dataclass(frozen=True)
class EarSubmod:
    status: str
    trust_vector: Mapping[str, int]
    policy_id: str | None
    extra: Mapping[str, Any] = field(default_factory=dict)  # any other claims, as received

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out["ear.status"] = self.status
        out["ear.trustworthiness-vector"] = dict(self.trust_vector)
        if self.policy_id is not None:
            out["ear.appraisal-policy-id"] = self.policy_id
        return out


@dataclass(frozen=True)
class SovraExtension:
    enclave_id: str
    epoch: int
    simulated: bool
    tee_type: str
    region: str
    measurement: str

    def to_json_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _SOVRA_FIELDS}


@dataclass(frozen=True)
class EarClaims:
    profile: str
    issued_at: int
    expires_at: int
    verifier_id: Mapping[str, str]
    submods: Mapping[str, EarSubmod]
    sovra: SovraExtension

    @property
    def status(self) -> str:
        """The overall status: the worst submod status."""
        return worst_status([s.status for s in self.submods.values()])

    @property
    def simulated(self) -> bool:
        return self.sovra.simulated

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "eat_profile": self.profile,
            "iat": self.issued_at,
            "exp": self.expires_at,
            "ear.verifier-id": dict(self.verifier_id),
            "submods": {name: s.to_json_dict() for name, s in self.submods.items()},
            "sovra": self.sovra.to_json_dict(),
        }


# --------------------------------------------------------------------------- issuing


def trust_vectors(result: AttestationResult) -> dict[str, dict[str, int]]:
    """The AR4SI vectors Sovra asserts for ``cpu`` and each ``npu<i>`` given one result.

    ``cpu`` (the confidential VM): the device/platform key chained to a vendor root
    (instance-identity), the reference values accepted its TEE type and policy (configuration)
    and its measurement (executables); hardware and runtime-opaque are affirming only on real
    hardware. ``npu<i>``, one per NPU report the result carries (composite sim evidence): its
    device key chained to the vendor root and its report bound to the CVM report
    (instance-identity), its firmware measurement accepted (executables), its firmware at least
    ``min_npu_firmware`` (configuration, only when a minimum was enforced); hardware and
    runtime-opaque as for the CPU. A result without NPU evidence (real CCA tokens say nothing
    about the NPU) gets ``npu0`` with all claims 0 (none), unless the caller adds NPU evidence
    through ``submods_extra``.
    """
    blank = dict.fromkeys(TRUST_CLAIMS, TIER_NONE)
    cpu = dict(blank)
    hw = TIER_WARNING if result.simulated else TIER_AFFIRMING
    if result.status == AFFIRMING:
        cpu.update(
            {
                "instance-identity": TIER_AFFIRMING,
                "configuration": TIER_AFFIRMING,
                "executables": TIER_AFFIRMING,
                "hardware": hw,
                "runtime-opaque": hw,
            }
        )
    elif result.status in (WARNING, CONTRAINDICATED):
        tier = TIER_WARNING if result.status == WARNING else TIER_CONTRAINDICATED
        for claim in ("instance-identity", "configuration", "executables", "hardware"):
            cpu[claim] = tier
    vectors = {"cpu": cpu}
    if not result.npus:
        vectors["npu0"] = dict(blank)
    for npu in result.npus:
        vector = dict(blank)
        if result.status == AFFIRMING:
            vector.update(
                {
                    "instance-identity": TIER_AFFIRMING,
                    "executables": TIER_AFFIRMING,
                    "hardware": hw,
                    "runtime-opaque": hw,
                }
            )
            if npu.min_firmware:
                vector["configuration"] = TIER_AFFIRMING
        elif result.status in (WARNING, CONTRAINDICATED):
            tier = TIER_WARNING if result.status == WARNING else TIER_CONTRAINDICATED
            for claim in ("instance-identity", "executables", "hardware"):
                vector[claim] = tier
        vectors[f"npu{npu.index}"] = vector
    return vectors


def issue_ear(
    result: AttestationResult,
    *,
    signing_key: ec.EllipticCurvePrivateKey,
    policy_id: str,
    submods_extra: Mapping[str, Mapping[str, Any]] | None = None,
    now: datetime | None = None,
    ttl_s: int | None = None,
) -> str:
    """Sign an EAR JWT (ES256) for ``result``.

    ``submods_extra`` maps a submod name (``cpu``, ``npu<i>`` or a new one) to extra claims merged
    into it; an ``ear.trustworthiness-vector`` there is merged claim by claim. A submod's
    ``ear.status`` is recomputed from its vector and can only be made worse, never better, by an
    explicit ``ear.status`` in the extras. ``exp`` is the result's expiry, capped at
    ``iat + ttl_s`` when given. Raises :class:`EarExpired` if the result has already expired.
    """
    if not isinstance(signing_key, ec.EllipticCurvePrivateKey) or not isinstance(
        signing_key.curve, ec.SECP256R1
    ):
        raise ValueError("the EAR signing key must be an EC P-256 private key (ES256)")
    if not policy_id:
        raise ValueError("policy_id must name the appraisal policy")
    iat = int((now or datetime.now(UTC)).timestamp())
    exp = result.expires_at_ms // 1000
    if ttl_s is not None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        exp = min(exp, iat + ttl_s)
    if exp <= iat:
        raise EarExpired(
            f"the attestation result of {result.enclave_id} expired at {exp}, not issuing an EAR"
        )

    vectors = trust_vectors(result)
    submods: dict[str, dict[str, Any]] = {}
    names = list(vectors) + [n for n in (submods_extra or {}) if n not in vectors]
    for name in names:
        vector = dict(vectors.get(name, dict.fromkeys(TRUST_CLAIMS, TIER_NONE)))
        extra = copy.deepcopy(dict((submods_extra or {}).get(name, {})))
        extra_vector = extra.pop("ear.trustworthiness-vector", {})
        if not isinstance(extra_vector, Mapping):
            raise ValueError(f"submods_extra[{name!r}]: trustworthiness vector must be a mapping")
        vector.update(extra_vector)
        _check_vector(vector, f"submods_extra[{name!r}]", ValueError)
        status = _vector_status(vector)
        explicit = extra.pop("ear.status", None)
        if explicit is not None:
            if explicit not in STATUSES:
                raise ValueError(f"submods_extra[{name!r}]: unknown ear.status {explicit!r}")
            status = worst_status([status, explicit])
        extra.pop("ear.appraisal-policy-id", None)
        submods[name] = {
            **extra,
            "ear.status": status,
            "ear.trustworthiness-vector": vector,
            "ear.appraisal-policy-id": policy_id,
        }
    claims = {
        "eat_profile": EAR_PROFILE,
        "iat": iat,
        "exp": exp,
        "ear.verifier-id": dict(VERIFIER_ID),
        "submods": submods,
        "sovra": {
            "enclave_id": result.enclave_id,
            "epoch": result.epoch,
            "simulated": result.simulated,
            "tee_type": result.tee_type,
            "region": result.region,
            "measurement": result.measurement,
        },
    }
    return jwt.encode(claims, signing_key, algorithm=EAR_ALG, headers={"typ": "JWT"})


def public_key_pem(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> str:
    """The verifier's EAR public key as PEM (SubjectPublicKeyInfo), for publishing."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key_pem(text: str | bytes) -> ec.EllipticCurvePublicKey:
    """Parse a published EAR verifier key; ``ValueError`` unless it is a P-256 public key."""
    data = text.encode("ascii", "replace") if isinstance(text, str) else text
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ValueError("the EAR verifier key is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the EAR verifier key must be an EC P-256 public key (ES256)")
    return key


# --------------------------------------------------------------------------- verifying


def verify_ear(
    token: str | bytes, public_key: ec.EllipticCurvePublicKey, *, now: datetime | None = None
) -> EarClaims:
    """Verify an EAR JWT with the verifier's P-256 public key and return its claims."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise ValueError("the EAR verification key must be an EC P-256 public key (ES256)")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError as exc:
        raise EarMalformed(f"EAR is not a well-formed JWT: {exc}") from None
    alg = header.get("alg")
    if alg != EAR_ALG:
        raise EarAlgorithmRejected(f"EAR alg {alg!r} is refused; only {EAR_ALG} is accepted")
    try:
        raw = jwt.decode(
            token,
            public_key,
            algorithms=[EAR_ALG],
            options={
                "verify_signature": True,
                "verify_exp": False,  # checked below against the caller's clock
                "verify_iat": False,
                "verify_nbf": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise EarSignatureInvalid(
            "EAR signature does not verify with the verifier key: altered, or signed by another key"
        ) from None
    except jwt.InvalidAlgorithmError as exc:
        raise EarAlgorithmRejected(f"EAR algorithm refused: {exc}") from None
    except jwt.PyJWTError as exc:
        raise EarMalformed(f"EAR cannot be decoded: {exc}") from None
    claims = _parse_claims(raw)
    now_s = int((now or datetime.now(UTC)).timestamp())
    if now_s >= claims.expires_at:
        raise EarExpired(f"EAR expired at {claims.expires_at} (now {now_s})")
    if claims.issued_at > now_s + CLOCK_SKEW_S:
        raise EarNotYetValid(
            f"EAR is issued at {claims.issued_at}, in the future (now {now_s}, allowed skew "
            f"{CLOCK_SKEW_S}s)"
        )
    return claims


def _require(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in raw:
        raise EarClaimsMissing(f"EAR is missing the mandatory claim {where}{key!r}")
    value = raw[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise EarClaimsInvalid(f"EAR claim {where}{key!r} must be {names}")
    return value


def _check_vector(vector: Mapping[str, Any], where: str, exc: type[Exception]) -> None:
    unknown = set(vector) - set(TRUST_CLAIMS)
    if unknown:
        raise exc(f"{where}: unknown trustworthiness claims {sorted(unknown)}")
    for name, value in vector.items():
        if not isinstance(value, int) or isinstance(value, bool) or not -128 <= value <= 127:
            raise exc(f"{where}: trustworthiness claim {name!r} must be an integer -128..127")


def _parse_claims(raw: Mapping[str, Any]) -> EarClaims:
    profile = _require(raw, "eat_profile", str, "")
    if profile != EAR_PROFILE:
        raise EarClaimsInvalid(f"EAR profile {profile!r} is not {EAR_PROFILE!r}")
    iat = _require(raw, "iat", int, "")
    exp = _require(raw, "exp", int, "")
    if exp <= iat:
        raise EarClaimsInvalid("EAR exp is not after iat")
    verifier = _require(raw, "ear.verifier-id", dict, "")
    for key in ("developer", "build"):
        _require(verifier, key, str, "ear.verifier-id.")
    raw_submods = _require(raw, "submods", dict, "")
    if not raw_submods:
        raise EarClaimsMissing("EAR has no submods")
    submods: dict[str, EarSubmod] = {}
    for name, body in raw_submods.items():
        where = f"submods.{name}."
        if not isinstance(body, dict):
            raise EarClaimsInvalid(f"EAR submod {name!r} must be an object")
        status = _require(body, "ear.status", str, where)
        if status not in STATUSES:
            raise EarClaimsInvalid(f"EAR {where}ear.status {status!r} is not one of {STATUSES}")
        vector = _require(body, "ear.trustworthiness-vector", dict, where)
        _check_vector(vector, f"EAR {where}ear.trustworthiness-vector", EarClaimsInvalid)
        policy = body.get("ear.appraisal-policy-id")
        if policy is not None and not isinstance(policy, str):
            raise EarClaimsInvalid(f"EAR {where}ear.appraisal-policy-id must be a string")
        extra = {
            k: v
            for k, v in body.items()
            if k not in ("ear.status", "ear.trustworthiness-vector", "ear.appraisal-policy-id")
        }
        if _SEVERITY[status] < _SEVERITY[_vector_status(vector)]:
            raise EarClaimsInvalid(
                f"EAR {where}ear.status {status!r} is better than its trustworthiness vector "
                f"allows ({_vector_status(vector)!r})"
            )
        submods[name] = EarSubmod(status, dict(vector), policy, extra)
    sovra_raw = _require(raw, "sovra", dict, "")
    sovra = SovraExtension(
        **{key: _require(sovra_raw, key, kind, "sovra.") for key, kind in _SOVRA_FIELDS.items()}
    )
    if sovra.simulated and worst_status([s.status for s in submods.values()]) == AFFIRMING:
        raise EarClaimsInvalid("EAR of a SIMULATED TEE claims an affirming status")
    return EarClaims(
        profile=profile,
        issued_at=iat,
        expires_at=exp,
        verifier_id=dict(verifier),
        submods=submods,
        sovra=sovra,
    )
