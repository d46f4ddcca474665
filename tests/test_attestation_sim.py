"""Simulated TEE evidence and the first-cut verifier: each refusal has its own reason."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attestation import errors, sim, sim_vendor
from attestation.reference_values import ReferenceValues
from attestation.verifier import OfferedKey, verify_key
from sovra.suites import KeyPair

NOW = 1_800_000_000_000
MEAS = "ab" * 48
RECEIPT_KEY = b"r" * 32


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, x509.Certificate]:
    root = tmp_path_factory.mktemp("vendor")
    sim_vendor.create_root(root)
    key_path, cert_path = sim_vendor.issue_device(root, "e1", root / "dev")
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    return root, key, x509.load_pem_x509_certificate(cert_path.read_bytes())


def rv(root: Path, **kw: object) -> ReferenceValues:
    doc = {
        "version": 1,
        "simulation": "allow",
        "tee_types": [sim.SIM_TEE_TYPE],
        "measurements": [MEAS],
        "max_evidence_age_s": 600,
        "trust_anchors": {"sim_vendor_roots": [sim_vendor.ROOT_CERT_FILE]},
        "npu_measurements": [sim.npu_measurement(sim.DEFAULT_NPU_FIRMWARE)],
    }
    doc.update(kw)
    return ReferenceValues.from_document(doc, base=root, source="test")


def offer(vendor, *, claims_kw: dict | None = None, key: KeyPair | None = None, **kw) -> OfferedKey:
    _root, device_key, cert = vendor
    kp = key or KeyPair.generate()
    nonce = b"n" * 32
    claims = sim.SimClaims(
        enclave_id="e1",
        region="cn-north-1",
        measurement=MEAS,
        report_data=sim.report_data(kp.public_bytes, 1, nonce, RECEIPT_KEY),
        nonce=nonce,
        epoch=1,
        kem=kp.kem,
        key_not_after_ms=NOW + 600_000,
        issued_at_ms=NOW - 1_000,
        receipt_key=RECEIPT_KEY,
    )
    claims = dataclasses.replace(claims, **(claims_kw or {}))
    fields = {
        "enclave_id": "e1",
        "epoch": 1,
        "kem": kp.kem,
        "public_key": kp.public_bytes,
        "not_after_ms": claims.key_not_after_ms,
        "evidence_format": sim.SIM_FORMAT,
        "evidence": sim.encode_evidence(claims, device_key, [cert]),  # type: ignore[arg-type]
        "receipt_public_key": RECEIPT_KEY,
    }
    fields.update(kw)
    return OfferedKey(**fields)  # type: ignore[arg-type]


def test_valid_evidence_affirms_and_says_simulated(vendor) -> None:
    result = verify_key(offer(vendor), rv(vendor[0]), expected_nonce=b"n" * 32, now_ms=NOW)
    assert result.status == "affirming"
    assert result.simulated is True
    assert result.tee_type == "sim-ascend-cvm"
    # the earlier of key expiry (NOW + 600 s) and evidence age limit (issued NOW - 1 s, + 600 s)
    assert result.expires_at_ms == NOW + 599_000


def test_simulation_forbidden_by_default(vendor) -> None:
    values = rv(vendor[0], simulation="forbid")
    with pytest.raises(errors.AppraisalFailed, match="SIMULATED"):
        verify_key(offer(vendor), values, now_ms=NOW)
    doc_without = ReferenceValues.from_document(
        {"version": 1, "trust_anchors": {"sim_vendor_roots": [sim_vendor.ROOT_CERT_FILE]}},
        base=vendor[0],
        source="t",
    )
    assert doc_without.allow_simulation is False


def test_unknown_measurement(vendor) -> None:
    with pytest.raises(errors.AppraisalFailed, match="measurement"):
        verify_key(offer(vendor, claims_kw={"measurement": "cd" * 48}), rv(vendor[0]), now_ms=NOW)


def test_tee_type_not_accepted(vendor) -> None:
    with pytest.raises(errors.AppraisalFailed, match="TEE type"):
        verify_key(offer(vendor), rv(vendor[0], tee_types=["virtcca"]), now_ms=NOW)


def test_key_not_bound(vendor) -> None:
    other = KeyPair.generate()
    with pytest.raises(errors.KeyBindingMismatch, match="public key"):
        verify_key(offer(vendor, public_key=other.public_bytes), rv(vendor[0]), now_ms=NOW)


def test_other_epoch(vendor) -> None:
    with pytest.raises(errors.KeyBindingMismatch, match="epoch"):
        verify_key(offer(vendor, epoch=2), rv(vendor[0]), now_ms=NOW)


def test_evidence_of_another_enclave(vendor) -> None:
    with pytest.raises(errors.KeyBindingMismatch, match="another enclave"):
        verify_key(offer(vendor, enclave_id="e2"), rv(vendor[0]), now_ms=NOW)


def test_wrong_nonce(vendor) -> None:
    with pytest.raises(errors.KeyBindingMismatch, match="challenge"):
        verify_key(offer(vendor), rv(vendor[0]), expected_nonce=b"x" * 32, now_ms=NOW)


def test_stale_and_expired(vendor) -> None:
    with pytest.raises(errors.EvidenceStale, match="old"):
        verify_key(offer(vendor), rv(vendor[0], max_evidence_age_s=1), now_ms=NOW + 5_000)
    with pytest.raises(errors.EvidenceStale, match="expired"):
        verify_key(offer(vendor), rv(vendor[0], max_evidence_age_s=3600), now_ms=NOW + 600_001)
    with pytest.raises(errors.EvidenceStale, match="future"):
        verify_key(offer(vendor), rv(vendor[0]), now_ms=NOW - 120_000)


def test_untrusted_root(vendor, tmp_path: Path) -> None:
    sim_vendor.create_root(tmp_path)
    with pytest.raises(errors.UntrustedChain):
        verify_key(offer(vendor), rv(tmp_path), now_ms=NOW)


def test_tampered_claims(vendor) -> None:
    good = offer(vendor)
    fmt, (claims_bytes, sig, chain), npus = cbor2.loads(good.evidence)
    claims = cbor2.loads(claims_bytes)
    claims["region"] = "us-east-1"
    forged = cbor2.dumps([fmt, [cbor2.dumps(claims, canonical=True), sig, chain], npus])
    with pytest.raises(errors.EvidenceSignatureInvalid):
        verify_key(dataclasses.replace(good, evidence=forged), rv(vendor[0]), now_ms=NOW)


@pytest.mark.parametrize("blob", [b"", b"\x00", cbor2.dumps(["sovra-sim-tee/1"]), b"\xff" * 9])
def test_malformed_evidence(vendor, blob: bytes) -> None:
    with pytest.raises(errors.EvidenceMalformed):
        verify_key(dataclasses.replace(offer(vendor), evidence=blob), rv(vendor[0]), now_ms=NOW)


def test_unknown_format(vendor) -> None:
    with pytest.raises(errors.EvidenceMalformed, match="format"):
        verify_key(offer(vendor, evidence_format="tdx"), rv(vendor[0]), now_ms=NOW)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "mapping"),
        ({"version": 2}, "version"),
        ({"version": 1, "simulation": "maybe"}, "simulation"),
        ({"version": 1, "measurements": ["zz"]}, "hex"),
        ({"version": 1, "surprise": 1}, "unknown"),
        ({"version": 1, "trust_anchors": {"sim_vendor_roots": ["missing.pem"]}}, "cannot read"),
    ],
)
def test_reference_values_errors(tmp_path: Path, doc: object, message: str) -> None:
    with pytest.raises(errors.ReferenceValuesInvalid, match=message):
        ReferenceValues.from_document(doc, base=tmp_path, source="rv.yaml")


def test_reference_values_file_errors(tmp_path: Path) -> None:
    with pytest.raises(errors.ReferenceValuesInvalid, match="cannot read"):
        ReferenceValues.load(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [1\n")
    with pytest.raises(errors.ReferenceValuesInvalid, match="not valid"):
        ReferenceValues.load(bad)
