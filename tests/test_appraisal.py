"""Appraisal: composable checks, reference values (sim and CCA sections), revocation, CCA appraisal.

Also holds :class:`SimWorld`, the simulated vendor root + device used by the EAR and CLI tests.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation import appraisal, sim
from attestation.appraisal import AllOf, AnyOf, Failure, Success, UnsafeNoOp
from attestation.cca import verify_cca_token
from attestation.cca_appraisal import (
    CCA_TEE_TYPE,
    LifecycleSecured,
    appraise_cca,
    cca_policy_for,
    lifecycle_name,
    verify_and_appraise_cca,
)
from attestation.errors import (
    AppraisalFailed,
    EvidenceStale,
    KeyBindingMismatch,
    ReferenceValuesInvalid,
    UntrustedChain,
)
from attestation.reference_values import SECURED_LIFECYCLE, ReferenceValues
from attestation.verifier import OfferedKey, verify_key
from sovra.pki import build_certificate

try:
    from tests import cca_tokens as ct
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import cca_tokens as ct  # type: ignore[no-redef]

MEASUREMENT = "ab" * 48
OTHER_MEASUREMENT = "cd" * 48
SIM_NPU_MEASUREMENT = sim.npu_measurement(sim.DEFAULT_NPU_FIRMWARE)


# --------------------------------------------------------------------------- sim world


class SimWorld:
    """A simulated vendor root CA (P-384) and one simulated device, made with sovra.pki."""

    def __init__(self, enclave_id: str = "enc-1") -> None:
        self.enclave_id = enclave_id
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        self.root = build_certificate(
            subject_cn="SIMULATED test vendor root",
            public_key=self.root_key.public_key(),
            issuer_cert=None,
            issuer_key=self.root_key,
            is_ca=True,
            path_length=0,
            days=30,
        )
        self.device_key = ec.generate_private_key(ec.SECP384R1())
        self.device = build_certificate(
            subject_cn=f"SIMULATED test device {enclave_id}",
            public_key=self.device_key.public_key(),
            issuer_cert=self.root,
            issuer_key=self.root_key,
            is_ca=False,
            days=30,
        )
        self.public_key = os.urandom(32)
        self.receipt_key = os.urandom(32)

    def claims(self, now_ms: int | None = None, **overrides: Any) -> sim.SimClaims:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        nonce = overrides.pop("nonce", b"\x07" * 32)
        epoch = overrides.pop("epoch", 1)
        base: dict[str, Any] = {
            "enclave_id": self.enclave_id,
            "region": "eu-west",
            "measurement": MEASUREMENT,
            "report_data": sim.report_data(self.public_key, epoch, nonce, self.receipt_key),
            "nonce": nonce,
            "epoch": epoch,
            "kem": "X25519",
            "key_not_after_ms": now_ms + 3_600_000,
            "issued_at_ms": now_ms,
            "receipt_key": self.receipt_key,
        }
        base.update(overrides)
        return sim.SimClaims(**base)

    def evidence(self, claims: sim.SimClaims | None = None) -> bytes:
        return sim.encode_evidence(claims or self.claims(), self.device_key, [self.device])

    def offered(self, claims: sim.SimClaims | None = None) -> OfferedKey:
        claims = claims or self.claims()
        return OfferedKey(
            enclave_id=claims.enclave_id,
            epoch=claims.epoch,
            kem=claims.kem,
            public_key=self.public_key,
            not_after_ms=claims.key_not_after_ms,
            evidence_format=sim.SIM_FORMAT,
            evidence=self.evidence(claims),
            receipt_public_key=self.receipt_key,
        )

    def rv(self, **overrides: Any) -> ReferenceValues:
        fields: dict[str, Any] = {
            "allow_simulation": True,
            "tee_types": frozenset({sim.SIM_TEE_TYPE}),
            "measurements": frozenset({MEASUREMENT}),
            "max_evidence_age_s": 1800,
            "sim_vendor_roots": (self.root,),
            "npu_measurements": frozenset({SIM_NPU_MEASUREMENT}),
        }
        fields.update(overrides)
        return ReferenceValues(**fields)

    def write_root(self, folder: Path) -> Path:
        path = folder / "sim-root.pem"
        path.write_bytes(self.root.public_bytes(serialization.Encoding.PEM))
        return path


@pytest.fixture(scope="module")
def world() -> SimWorld:
    return SimWorld()


# --------------------------------------------------------------------------- combinators


@dataclasses.dataclass(frozen=True)
class _Const:
    ok: bool
    reason: str = "nope"

    def verify(self, claims: object) -> appraisal.Result:
        return Success() if self.ok else Failure(self.reason)


def test_empty_allof_fails(world: SimWorld) -> None:
    result = AllOf([]).verify(world.claims())
    assert isinstance(result, Failure)
    assert "empty AllOf" in result.reason


def test_allof_returns_first_failure() -> None:
    result = AllOf([_Const(True), _Const(False, "first"), _Const(False, "second")]).verify(None)
    assert result == Failure("first")
    assert AllOf([_Const(True)]).verify(None) == Success()


def test_anyof_collects_reasons_and_empty_anyof_fails() -> None:
    assert AnyOf([_Const(False, "a"), _Const(True)]).verify(None) == Success()
    result = AnyOf([_Const(False, "a"), _Const(False, "b")]).verify(None)
    assert isinstance(result, Failure) and result.reason == "none of: a; b"
    assert isinstance(AnyOf([]).verify(None), Failure)


def test_unsafe_noop_accepts_but_warns(world: SimWorld, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="attestation.appraisal"):
        assert isinstance(UnsafeNoOp().verify(world.claims()), Success)
    assert any(
        r.levelno == logging.WARNING and "UnsafeNoOp" in r.getMessage() and "enc-1" in r.message
        for r in caplog.records
    )


def test_unsafe_noop_warns_for_cca_tokens_too(caplog: pytest.LogCaptureFixture) -> None:
    token = _verified(ct.build_cca_token(curve="P-256"))
    with caplog.at_level(logging.WARNING, logger="attestation.appraisal"):
        assert isinstance(AllOf([UnsafeNoOp()]).verify(token), Success)
    assert "CCAToken" in caplog.text


# --------------------------------------------------------------------------- sim policy


def test_sim_policy_accepts_good_evidence(world: SimWorld) -> None:
    result = verify_key(world.offered(), world.rv())
    assert result.status == "affirming" and result.simulated
    assert result.measurement == MEASUREMENT


def test_sim_forbidden(world: SimWorld) -> None:
    with pytest.raises(AppraisalFailed, match="SIMULATED TEE and reference values forbid"):
        verify_key(world.offered(), world.rv(allow_simulation=False))


def test_wrong_measurement(world: SimWorld) -> None:
    offered = world.offered(world.claims(measurement=OTHER_MEASUREMENT))
    with pytest.raises(AppraisalFailed, match=r"measurement cdcdcdcd.* is not a reference value"):
        verify_key(offered, world.rv())


def test_wrong_tee_type(world: SimWorld) -> None:
    with pytest.raises(AppraisalFailed, match="TEE type 'sim-ascend-cvm' is not in the accepted"):
        verify_key(world.offered(), world.rv(tee_types=frozenset({"arm-cca"})))


def test_revoked_measurement_refused_even_when_accepted(world: SimWorld) -> None:
    rv = world.rv(revoked_measurements=frozenset({MEASUREMENT}))
    with pytest.raises(AppraisalFailed, match=r"measurement abababab.* is revoked"):
        verify_key(world.offered(), rv)


def test_policy_for_includes_not_revoked(world: SimWorld) -> None:
    names = [type(c).__name__ for c in appraisal.policy_for(world.rv()).checks]
    assert names == ["SimulationAllowed", "TeeTypeAccepted", "NotRevoked", "MeasurementAccepted"]


def test_revoked_device_cert_by_serial(world: SimWorld) -> None:
    serial = f"{world.device.serial_number:x}"
    with pytest.raises(UntrustedChain, match=r"revoked by the reference values \(serial"):
        verify_key(world.offered(), world.rv(revoked_device_certs=frozenset({serial})))


def test_revoked_device_cert_by_fingerprint(world: SimWorld) -> None:
    fp = world.device.fingerprint(hashes.SHA256()).hex()
    with pytest.raises(UntrustedChain, match="SHA-256 fingerprint"):
        verify_key(world.offered(), world.rv(revoked_device_certs=frozenset({fp})))


def test_unrelated_revocation_does_not_refuse(world: SimWorld) -> None:
    rv = world.rv(revoked_device_certs=frozenset({"01", "ee" * 32}))
    assert verify_key(world.offered(), rv).status == "affirming"


def test_stale_and_binding_still_refused(world: SimWorld) -> None:
    old = world.claims(now_ms=int(time.time() * 1000) - 3_600_000)
    with pytest.raises(EvidenceStale):
        verify_key(world.offered(old), world.rv())
    with pytest.raises(KeyBindingMismatch, match="challenge nonce"):
        verify_key(world.offered(), world.rv(), expected_nonce=b"\x00" * 32)


# --------------------------------------------------------------------------- reference values file


def _write_rv(folder: Path, doc: dict[str, Any]) -> Path:
    path = folder / "rv.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_old_reference_values_files_still_load(tmp_path: Path, world: SimWorld) -> None:
    world.write_root(tmp_path)
    rv = ReferenceValues.load(
        _write_rv(
            tmp_path,
            {
                "version": 1,
                "simulation": "allow",
                "tee_types": [sim.SIM_TEE_TYPE],
                "measurements": [MEASUREMENT.upper()],
                "trust_anchors": {"sim_vendor_roots": ["sim-root.pem"]},
            },
        )
    )
    assert rv.measurements == {MEASUREMENT}
    assert rv.cca is None and rv.revoked_measurements == frozenset()
    assert rv.revoked_device_certs == frozenset() and rv.min_npu_firmware is None


def test_full_reference_values_file(tmp_path: Path) -> None:
    key = ct.generate_key("P-384")
    (tmp_path / "cca.pem").write_bytes(ct.public_pem(key))
    rv = ReferenceValues.load(
        _write_rv(
            tmp_path,
            {
                "version": 1,
                "revoked_measurements": ["AA" * 32],
                "revoked_device_certs": ["0x0A:1B", "FF" * 32],
                "min_npu_firmware": "7.1.0",
                "cca": {
                    "platform_keys": ["cca.pem"],
                    "realm_initial_measurements": ["11" * 32],
                    "platform_implementation_ids": ["00" * 32],
                    "accepted_lifecycle": [0x3000, "0x3001-0x30ff", "16384"],
                    "revoked_realm_measurements": ["22" * 32],
                },
            },
        )
    )
    assert rv.revoked_measurements == {"aa" * 32}
    assert rv.revoked_device_certs == {"0a1b", "ff" * 32}
    assert rv.min_npu_firmware == "7.1.0"
    assert rv.cca is not None
    assert rv.cca.platform_keys[0].public_numbers() == key.public_key().public_numbers()
    assert rv.cca.accepted_lifecycle == ((0x3000, 0x3000), (0x3001, 0x30FF), (0x4000, 0x4000))
    assert rv.cca.realm_personalization_values is None
    assert rv.cca.platform_implementation_ids == {"00" * 32}


def test_cca_lifecycle_defaults_to_secured(tmp_path: Path) -> None:
    rv = ReferenceValues.from_document(
        {"version": 1, "cca": {"realm_initial_measurements": []}}, base=tmp_path, source="t"
    )
    assert rv.cca is not None and rv.cca.accepted_lifecycle == (SECURED_LIFECYCLE,)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"cca": {"bogus": 1}}, r"unknown keys cca\."),
        ({"cca": None}, "cca must be a mapping"),
        ({"cca": {"platform_keys": ["missing.pem"]}}, "cannot read"),
        ({"cca": {"realm_initial_measurements": ["xyz"]}}, "realm_initial_measurements"),
        ({"cca": {"accepted_lifecycle": ["secured"]}}, "not an integer or 'lo-hi' range"),
        ({"cca": {"accepted_lifecycle": ["0x30ff-0x3000"]}}, "not a range within"),
        ({"cca": {"accepted_lifecycle": []}}, "non-empty list"),
        ({"revoked_measurements": "ab"}, "revoked_measurements must be a list"),
        ({"revoked_device_certs": ["zz"]}, "neither a hex serial number"),
        ({"revoked_device_certs": ["ab" * 24]}, "neither a hex serial number"),
        ({"min_npu_firmware": 7}, "min_npu_firmware must be a non-empty string"),
    ],
)
def test_bad_reference_values_refused(tmp_path: Path, doc: dict[str, Any], match: str) -> None:
    with pytest.raises(ReferenceValuesInvalid, match=match):
        ReferenceValues.from_document({"version": 1, **doc}, base=tmp_path, source="rv.yaml")


def test_cca_platform_key_must_parse(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ReferenceValuesInvalid, match=r"cca platform key .*bad\.pem"):
        ReferenceValues.from_document(
            {"version": 1, "cca": {"platform_keys": ["bad.pem"]}}, base=tmp_path, source="t"
        )


# --------------------------------------------------------------------------- CCA appraisal


def _verified(built: ct.BuiltToken) -> Any:
    return verify_cca_token(built.token, [built.platform_public_key])


def _cca_rv(built: ct.BuiltToken, **cca: Any) -> ReferenceValues:
    section: dict[str, Any] = {"realm_initial_measurements": [built.realm_claims[44238].hex()]}
    section.update(cca)
    top = {k: section.pop(k) for k in list(section) if k == "revoked_measurements"}
    rv = ReferenceValues.from_document(
        {"version": 1, "cca": section, **top}, base=Path("."), source="cca-rv"
    )
    return dataclasses.replace(
        rv, cca=dataclasses.replace(rv.cca, platform_keys=(built.platform_public_key,))
    )


@pytest.fixture(scope="module")
def built() -> ct.BuiltToken:
    return ct.build_cca_token(curve="P-256")


def test_cca_appraisal_accepts(built: ct.BuiltToken) -> None:
    result = appraise_cca(_verified(built), _cca_rv(built), now_ms=1234)
    assert result.status == "affirming" and not result.simulated
    assert result.tee_type == CCA_TEE_TYPE
    assert result.realm_initial_measurement == "11" * 32
    assert result.to_json_dict()["security_lifecycle_name"] == "secured"
    ar = result.to_attestation_result(enclave_id="e", epoch=2, region="eu", expires_at_ms=9)
    assert ar.measurement == "11" * 32 and ar.tee_type == CCA_TEE_TYPE and ar.verified_at_ms == 1234


def test_cca_wrong_measurement(built: ct.BuiltToken) -> None:
    rv = _cca_rv(built, realm_initial_measurements=["33" * 32])
    with pytest.raises(AppraisalFailed, match=r"realm initial measurement 1111.* not a reference"):
        appraise_cca(_verified(built), rv)


def test_cca_revoked_realm_measurement(built: ct.BuiltToken) -> None:
    rv = _cca_rv(built, revoked_realm_measurements=["11" * 32])
    with pytest.raises(AppraisalFailed, match="is revoked"):
        appraise_cca(_verified(built), rv)


def test_cca_top_level_revocation_applies(built: ct.BuiltToken) -> None:
    rv = _cca_rv(built, revoked_measurements=["11" * 32])
    with pytest.raises(AppraisalFailed, match="is revoked"):
        appraise_cca(_verified(built), rv)


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (0x5000, "recoverable-psa-rot-debug"),
        (0x6000, "decommissioned"),
        (0x2000, "psa-rot-provisioning"),
    ],
)
def test_cca_lifecycle_not_secured(value: int, name: str) -> None:
    built = ct.build_cca_token(curve="P-256", platform_claims={2395: value})
    with pytest.raises(AppraisalFailed, match=rf"lifecycle {value:#06x} \({name}\) is not an"):
        appraise_cca(_verified(built), _cca_rv(built))


def test_cca_lifecycle_custom_range_and_names() -> None:
    built = ct.build_cca_token(curve="P-256", platform_claims={2395: 0x4001})
    assert appraise_cca(_verified(built), _cca_rv(built, accepted_lifecycle=["0x4000-0x40ff"]))
    assert lifecycle_name(0x30FF) == "secured" and lifecycle_name(0x9000) == "invalid"
    assert isinstance(LifecycleSecured(()).verify(_verified(built)), Failure)


def test_cca_implementation_id(built: ct.BuiltToken) -> None:
    good = _cca_rv(built, platform_implementation_ids=[bytes(range(32)).hex()])
    assert appraise_cca(_verified(built), good).status == "affirming"
    bad = _cca_rv(built, platform_implementation_ids=["ee" * 32])
    with pytest.raises(AppraisalFailed, match=r"implementation id .* is not accepted"):
        appraise_cca(_verified(built), bad)


def test_cca_personalization_value(built: ct.BuiltToken) -> None:
    bad = _cca_rv(built, realm_personalization_values=["ee" * 64])
    with pytest.raises(AppraisalFailed, match=r"personalization value .* is not accepted"):
        appraise_cca(_verified(built), bad)


def test_cca_without_section_refused(built: ct.BuiltToken, world: SimWorld) -> None:
    with pytest.raises(AppraisalFailed, match="no 'cca' section"):
        appraise_cca(_verified(built), world.rv())
    assert isinstance(cca_policy_for(world.rv()).verify(_verified(built)), Failure)


def test_verify_and_appraise_maps_errors(built: ct.BuiltToken) -> None:
    rv = _cca_rv(built)
    token, result = verify_and_appraise_cca(built.token, rv, expected_challenge=built.challenge)
    assert result.status == "affirming" and token.realm.challenge == built.challenge
    other = dataclasses.replace(
        rv, cca=dataclasses.replace(rv.cca, platform_keys=(ct.generate_key("P-256").public_key(),))
    )
    with pytest.raises(UntrustedChain, match="CCA token: platform token signature"):
        verify_and_appraise_cca(built.token, other)
    with pytest.raises(KeyBindingMismatch, match="does not equal the expected challenge"):
        verify_and_appraise_cca(built.token, rv, expected_challenge=b"\x00" * 64)


@pytest.mark.vectors
def test_cca_vector_appraises(tmp_path: Path) -> None:
    vectors = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "cca"
    if not vectors.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the external test vectors are missing: {vectors}")
        pytest.skip(f"external CCA vectors not present at {vectors}")
    rv = ReferenceValues.from_document(
        {
            "version": 1,
            "cca": {
                "platform_keys": [str(vectors / "tfrmm-platform.pub.pem")],
                "realm_initial_measurements": ["00" * 32],
                "platform_implementation_ids": [
                    "7f454c4602010100000000000000000003003e00010000005058000000000000"
                ],
            },
        },
        base=tmp_path,
        source="vector-rv",
    )
    _, result = verify_and_appraise_cca((vectors / "tfrmm-token.cbor").read_bytes(), rv)
    assert result.security_lifecycle == 0x3003 and result.status == "affirming"


def test_device_chain_helper(world: SimWorld) -> None:
    chain = appraisal.sim_device_chain(world.evidence())
    assert chain == [world.device]
    assert isinstance(chain[0], x509.Certificate)
