"""EAR attestation results: issuing, verifying, and every refusal with its own reason."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.ear import (
    EAR_PROFILE,
    TRUST_CLAIMS,
    EarAlgorithmRejected,
    EarClaimsInvalid,
    EarClaimsMissing,
    EarError,
    EarExpired,
    EarMalformed,
    EarNotYetValid,
    EarSignatureInvalid,
    issue_ear,
    tier_status,
    verify_ear,
    worst_status,
)
from attestation.errors import AttestationError
from attestation.verifier import AttestationResult, NpuResult

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def result(
    *, simulated: bool = True, status: str = "affirming", npus: int | None = None
) -> AttestationResult:
    count = (1 if simulated else 0) if npus is None else npus
    return AttestationResult(
        enclave_id="enc-1",
        epoch=3,
        status=status,
        simulated=simulated,
        tee_type="sim-ascend-cvm" if simulated else "arm-cca",
        region="eu-west",
        measurement="ab" * 48,
        verified_at_ms=NOW_MS,
        expires_at_ms=NOW_MS + 1_800_000,
        npus=tuple(NpuResult(i, "7.1.0", "cd" * 48, "7.1.0") for i in range(count)),
    )


def issue(key: ec.EllipticCurvePrivateKey, **kw: object) -> str:
    res = kw.pop("res", None) or result()
    return issue_ear(res, signing_key=key, policy_id="policy:rv.yaml", now=NOW, **kw)  # type: ignore[arg-type]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _parts(token: str) -> tuple[dict, dict, str]:
    h, p, s = token.split(".")
    pad = lambda x: x + "=" * (-len(x) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(h))),
        json.loads(base64.urlsafe_b64decode(pad(p))),
        s,
    )


def _forge(token: str, *, header: dict | None = None, payload: dict | None = None) -> str:
    h, p, s = _parts(token)
    return ".".join(
        [_b64(json.dumps(header or h).encode()), _b64(json.dumps(payload or p).encode()), s]
    )


# --------------------------------------------------------------------------- good path


def test_round_trip_sim_is_warning_and_labelled(key: ec.EllipticCurvePrivateKey) -> None:
    token = issue(key)
    claims = verify_ear(token, key.public_key(), now=NOW)
    assert claims.profile == EAR_PROFILE
    assert claims.verifier_id == {"developer": "sovra", "build": "sovra-attestation/0.1"}
    assert set(claims.submods) == {"cpu", "npu0"}
    cpu = claims.submods["cpu"]
    assert set(cpu.trust_vector) == set(TRUST_CLAIMS)
    assert cpu.trust_vector["hardware"] == 32 and cpu.trust_vector["executables"] == 2
    assert cpu.status == "warning" and cpu.policy_id == "policy:rv.yaml"
    assert claims.status == "warning" and claims.simulated
    assert claims.sovra.enclave_id == "enc-1" and claims.sovra.epoch == 3
    assert claims.issued_at == int(NOW.timestamp())
    assert claims.expires_at == claims.issued_at + 1800
    _, payload, _ = _parts(token)
    assert "ear.raw-evidence" not in payload
    assert (
        payload["sovra"]["simulated"] is True and payload["sovra"]["tee_type"] == "sim-ascend-cvm"
    )
    assert claims.to_json_dict() == payload


def test_real_hardware_cpu_affirming_npu_none(key: ec.EllipticCurvePrivateKey) -> None:
    claims = verify_ear(issue(key, res=result(simulated=False)), key.public_key(), now=NOW)
    assert claims.submods["cpu"].status == "affirming"
    assert claims.submods["npu0"].status == "none"
    assert claims.status == "none"  # nothing appraised the NPU: not affirming overall


def test_submods_extra_merges_and_cannot_improve(key: ec.EllipticCurvePrivateKey) -> None:
    extra = {
        "npu0": {"ear.trustworthiness-vector": {"hardware": 2, "executables": 2}, "fw": "7.1"},
        "cpu": {"ear.status": "contraindicated"},
    }
    token = issue(key, res=result(simulated=False), submods_extra=extra)
    claims = verify_ear(token, key.public_key(), now=NOW)
    assert claims.submods["npu0"].status == "affirming"
    assert claims.submods["npu0"].extra == {"fw": "7.1"}
    assert claims.submods["cpu"].status == "contraindicated"
    assert claims.status == "contraindicated"


def test_ttl_caps_exp(key: ec.EllipticCurvePrivateKey) -> None:
    claims = verify_ear(issue(key, ttl_s=60), key.public_key(), now=NOW)
    assert claims.expires_at - claims.issued_at == 60


def test_tiers_and_worst() -> None:
    assert [tier_status(v) for v in (0, 1, -1, 2, 31, 32, 95, 96, 127, -97)] == [
        "none", "none", "none", "affirming", "affirming", "warning", "warning",
        "contraindicated", "contraindicated", "contraindicated",
    ]  # fmt: skip
    assert worst_status(["affirming", "warning"]) == "warning"
    assert worst_status(["affirming", "none"]) == "none"
    assert worst_status(["none", "contraindicated"]) == "contraindicated"
    assert worst_status([]) == "none"


def test_issue_refuses_bad_inputs(key: ec.EllipticCurvePrivateKey) -> None:
    expired = AttestationResult(**{**result().__dict__, "expires_at_ms": NOW_MS - 1})
    with pytest.raises(EarExpired, match="not issuing an EAR"):
        issue(key, res=expired)
    with pytest.raises(ValueError, match="P-256"):
        issue_ear(result(), signing_key=ec.generate_private_key(ec.SECP384R1()), policy_id="p")
    with pytest.raises(ValueError, match="unknown trustworthiness claims"):
        issue(key, submods_extra={"cpu": {"ear.trustworthiness-vector": {"vibes": 2}}})


# --------------------------------------------------------------------------- refusals


def test_alg_none_refused(key: ec.EllipticCurvePrivateKey) -> None:
    _, payload, _ = _parts(issue(key))
    unsigned = jwt.encode(payload, None, algorithm="none")
    with pytest.raises(EarAlgorithmRejected, match="'none' is refused"):
        verify_ear(unsigned, key.public_key(), now=NOW)


def test_other_alg_refused(key: ec.EllipticCurvePrivateKey) -> None:
    _, payload, _ = _parts(issue(key))
    hs = jwt.encode(payload, "a-shared-secret-of-enough-length-32b", algorithm="HS256")
    with pytest.raises(EarAlgorithmRejected, match="'HS256' is refused; only ES256"):
        verify_ear(hs, key.public_key(), now=NOW)
    p384 = ec.generate_private_key(ec.SECP384R1())
    es384 = jwt.encode(payload, p384, algorithm="ES384")
    with pytest.raises(EarAlgorithmRejected, match="'ES384'"):
        verify_ear(es384, key.public_key(), now=NOW)


def test_wrong_key_refused(key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(EarSignatureInvalid, match="signed by another key"):
        verify_ear(issue(key), other, now=NOW)


def test_tampered_claim_refused(key: ec.EllipticCurvePrivateKey) -> None:
    token = issue(key)
    _, payload, _ = _parts(token)
    payload["submods"]["cpu"]["ear.status"] = "affirming"
    payload["sovra"]["simulated"] = False
    with pytest.raises(EarSignatureInvalid, match="altered"):
        verify_ear(_forge(token, payload=payload), key.public_key(), now=NOW)


def test_expired_refused(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(EarExpired, match="EAR expired at"):
        verify_ear(issue(key), key.public_key(), now=NOW + timedelta(seconds=1800))


def test_future_iat_refused(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(EarNotYetValid, match="in the future"):
        verify_ear(issue(key), key.public_key(), now=NOW - timedelta(minutes=5))


def test_malformed_refused(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(EarMalformed, match="not a well-formed JWT"):
        verify_ear("not.a.jwt", key.public_key(), now=NOW)
    with pytest.raises(EarMalformed):
        verify_ear("garbage", key.public_key(), now=NOW)


def _signed(key: ec.EllipticCurvePrivateKey, mutate: object) -> str:
    _, payload, _ = _parts(issue(key))
    mutate(payload)  # type: ignore[operator]
    return jwt.encode(payload, key, algorithm="ES256")


@pytest.mark.parametrize(
    "claim", ["eat_profile", "iat", "exp", "ear.verifier-id", "submods", "sovra"]
)
def test_missing_claim_refused(key: ec.EllipticCurvePrivateKey, claim: str) -> None:
    token = _signed(key, lambda p: p.pop(claim))
    with pytest.raises(EarClaimsMissing, match=f"mandatory claim '{claim}'"):
        verify_ear(token, key.public_key(), now=NOW)


def test_missing_nested_claims_refused(key: ec.EllipticCurvePrivateKey) -> None:
    token = _signed(key, lambda p: p["submods"]["cpu"].pop("ear.status"))
    with pytest.raises(EarClaimsMissing, match=r"submods\.cpu\.'ear.status'"):
        verify_ear(token, key.public_key(), now=NOW)
    token = _signed(key, lambda p: p["sovra"].pop("measurement"))
    with pytest.raises(EarClaimsMissing, match=r"sovra\.'measurement'"):
        verify_ear(token, key.public_key(), now=NOW)
    token = _signed(key, lambda p: p.update(submods={}))
    with pytest.raises(EarClaimsMissing, match="no submods"):
        verify_ear(token, key.public_key(), now=NOW)


def test_invalid_claims_refused(key: ec.EllipticCurvePrivateKey) -> None:
    cases = [
        (lambda p: p.update(eat_profile="tag:example.com,2024:other"), "profile"),
        (lambda p: p["submods"]["cpu"].update({"ear.status": "great"}), "is not one of"),
        (lambda p: p["sovra"].update(epoch="3"), "must be int"),
        (lambda p: p["sovra"].update(simulated=1), "must be bool"),
        (lambda p: p.update(exp=p["iat"]), "exp is not after iat"),
        (
            lambda p: p["submods"]["cpu"]["ear.trustworthiness-vector"].update(hardware=300),
            "-128..127",
        ),
        # a signer that claims a simulated TEE is affirming is refused even with a valid signature
        (
            lambda p: [
                s.update({"ear.status": "affirming", "ear.trustworthiness-vector": {"hardware": 2}})
                for s in p["submods"].values()
            ],
            "SIMULATED TEE claims an affirming",
        ),
        (lambda p: p["submods"]["npu0"].update({"ear.status": "affirming"}), "better than"),
    ]
    for mutate, match in cases:
        with pytest.raises(EarClaimsInvalid, match=match):
            verify_ear(_signed(key, mutate), key.public_key(), now=NOW)


def test_errors_are_attestation_errors() -> None:
    for cls in (EarMalformed, EarAlgorithmRejected, EarSignatureInvalid, EarExpired,
                EarNotYetValid, EarClaimsInvalid, EarClaimsMissing):  # fmt: skip
        assert issubclass(cls, EarError) and issubclass(cls, AttestationError)


def test_messages_hold_no_key_material(key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    try:
        verify_ear(issue(key), other.public_key(), now=NOW)
    except EarSignatureInvalid as exc:
        nums = other.public_key().public_numbers()
        assert f"{nums.x:x}" not in str(exc) and str(
            key.private_numbers().private_value
        ) not in str(exc)
