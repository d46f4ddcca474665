"""Composite SIMULATED CVM + NPU evidence (``sovra-sim-tee/2``): NPU reports bound to the CVM
report, NPU firmware minimum, NPU measurements, the retired ``/1`` format, EAR submods per NPU,
and reference values that reload when their file changes. Each refusal has its own reason."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from attestation import ear, sim
from attestation.errors import (
    AppraisalFailed,
    CompositeBindingMismatch,
    EvidenceMalformed,
    EvidenceSignatureInvalid,
    KeyBindingMismatch,
    ReferenceValuesInvalid,
    UntrustedChain,
)
from attestation.reference_values import (
    ReferenceValues,
    ReferenceValuesFile,
    firmware_at_least,
    parse_firmware_version,
)
from attestation.verifier import OfferedKey, verify_key
from sovra.pki import build_certificate

MEASUREMENT = "ab" * 48
FW = sim.DEFAULT_NPU_FIRMWARE
NPU_MEAS = sim.npu_measurement(FW)
NOW_MS = int(time.time() * 1000)


class Board:
    """A simulated vendor root and a device key (one simulated CVM + NPU board)."""

    def __init__(self, root: Any = None, root_key: Any = None) -> None:
        if root is None:
            root_key = ec.generate_private_key(ec.SECP384R1())
            root = build_certificate(
                subject_cn="SIMULATED composite test root", public_key=root_key.public_key(),
                issuer_cert=None, issuer_key=root_key, is_ca=True, path_length=0, days=30,
            )  # fmt: skip
        self.root, self.root_key = root, root_key
        self.key = ec.generate_private_key(ec.SECP384R1())
        self.cert = build_certificate(
            subject_cn="SIMULATED composite test device", public_key=self.key.public_key(),
            issuer_cert=root, issuer_key=root_key, is_ca=False, days=30,
        )  # fmt: skip

    def sibling(self) -> Board:
        """Another genuine board under the same simulated root."""
        return Board(self.root, self.root_key)

    def offer(
        self, *, npus: int = 1, firmware: str = FW, npu_claims: Any = None,
        npu_signers: Any = None, **claims_kw: Any,
    ) -> OfferedKey:  # fmt: skip
        public_key, nonce, receipt_key = os.urandom(32), os.urandom(32), os.urandom(32)
        claims = sim.SimClaims(
            enclave_id="enc-1", region="eu-west", measurement=MEASUREMENT,
            report_data=sim.report_data(public_key, 1, nonce, receipt_key), nonce=nonce, epoch=1,
            kem="X25519", key_not_after_ms=NOW_MS + 600_000, issued_at_ms=NOW_MS, npus=npus,
            receipt_key=receipt_key,
        )  # fmt: skip
        claims = dataclasses.replace(claims, **claims_kw)
        npu_list = sim.npu_claims_for(claims, firmware) if npu_claims is None else npu_claims
        evidence = sim.encode_evidence(
            claims, self.key, [self.cert], npus=npu_list, npu_signers=npu_signers
        )
        return OfferedKey(
            enclave_id="enc-1", epoch=1, kem="X25519", public_key=public_key,
            not_after_ms=claims.key_not_after_ms, evidence_format=sim.SIM_FORMAT,
            evidence=evidence, receipt_public_key=receipt_key,
        )  # fmt: skip

    def rv(self, **overrides: Any) -> ReferenceValues:
        fields: dict[str, Any] = {
            "allow_simulation": True,
            "tee_types": frozenset({sim.SIM_TEE_TYPE}),
            "measurements": frozenset({MEASUREMENT}),
            "max_evidence_age_s": 1800,
            "sim_vendor_roots": (self.root,),
            "min_npu_firmware": FW,
            "npu_measurements": frozenset({NPU_MEAS}),
        }
        fields.update(overrides)
        return ReferenceValues(**fields)


@pytest.fixture(scope="module")
def board() -> Board:
    return Board()


def verify(offered: OfferedKey, rv: ReferenceValues) -> Any:
    return verify_key(offered, rv, now_ms=NOW_MS)


# --------------------------------------------------------------------------- good path


def test_two_npus_affirm_and_become_ear_submods(board: Board) -> None:
    result = verify(board.offer(npus=2), board.rv())
    assert result.status == "affirming" and result.simulated
    assert [(n.index, n.firmware_version, n.measurement) for n in result.npus] == [
        (0, FW, NPU_MEAS),
        (1, FW, NPU_MEAS),
    ]
    key = ec.generate_private_key(ec.SECP256R1())
    claims = ear.verify_ear(ear.issue_ear(result, signing_key=key, policy_id="p"), key.public_key())
    assert list(claims.submods) == ["cpu", "npu0", "npu1"]
    npu1 = claims.submods["npu1"]
    assert npu1.status == "warning"  # simulated: hardware and runtime-opaque stay at 32
    assert npu1.trust_vector["executables"] == 2 and npu1.trust_vector["configuration"] == 2
    assert npu1.trust_vector["hardware"] == 32
    assert claims.status == "warning"


def test_no_npus_is_allowed_and_npu0_reads_none(board: Board) -> None:
    result = verify(board.offer(npus=0), board.rv())
    assert result.npus == ()
    key = ec.generate_private_key(ec.SECP256R1())
    claims = ear.verify_ear(ear.issue_ear(result, signing_key=key, policy_id="p"), key.public_key())
    assert claims.submods["npu0"].status == "none" and claims.status == "none"


def test_npu_signed_by_its_own_device_key_under_the_same_root(board: Board) -> None:
    npu_board = board.sibling()
    offered = board.offer(npu_signers=[(npu_board.key, [npu_board.cert])])
    assert verify(offered, board.rv()).npus[0].index == 0
    serial = f"{npu_board.cert.serial_number:x}"
    with pytest.raises(UntrustedChain, match="revoked"):
        verify(offered, board.rv(revoked_device_certs=frozenset({serial})))


# --------------------------------------------------------------------------- refusals


def test_npu_report_of_another_cvm_is_refused(board: Board) -> None:
    mine = board.offer()
    theirs = board.sibling().offer()  # genuine, same root, another CVM's report data
    fmt, cvm_report, _ = cbor2.loads(mine.evidence)
    _, _, their_npus = cbor2.loads(theirs.evidence)
    spliced = dataclasses.replace(mine, evidence=cbor2.dumps([fmt, cvm_report, their_npus]))
    with pytest.raises(CompositeBindingMismatch, match="another CVM"):
        verify(spliced, board.rv())
    assert issubclass(CompositeBindingMismatch, KeyBindingMismatch)


def test_npu_firmware_below_minimum_is_refused(board: Board) -> None:
    old = board.offer(firmware="7.0.9")
    rv = board.rv(npu_measurements=frozenset({NPU_MEAS, sim.npu_measurement("7.0.9")}))
    with pytest.raises(AppraisalFailed, match=r"NPU 0 firmware 7\.0\.9 is older than .*7\.1\.0"):
        verify(old, rv)
    newer = board.offer(firmware="7.10")  # numeric, not string, comparison
    assert verify(newer, board.rv(npu_measurements=frozenset({sim.npu_measurement("7.10")})))


def test_unknown_npu_measurement_is_refused(board: Board) -> None:
    with pytest.raises(AppraisalFailed, match=r"NPU 0 measurement .* not a reference value"):
        verify(board.offer(firmware="7.2.0"), board.rv())


def test_reference_values_without_npu_measurements_accept_no_npu(board: Board) -> None:
    with pytest.raises(AppraisalFailed, match="npu_measurements"):
        verify(board.offer(), board.rv(npu_measurements=frozenset()))


def test_revoked_npu_measurement_is_refused(board: Board) -> None:
    with pytest.raises(AppraisalFailed, match=r"NPU 0 measurement .* is revoked"):
        verify(board.offer(), board.rv(revoked_measurements=frozenset({NPU_MEAS})))


def test_simulation_forbidden_refuses_composite(board: Board) -> None:
    with pytest.raises(AppraisalFailed, match="SIMULATED"):
        verify(board.offer(), board.rv(allow_simulation=False))


def test_stripped_npu_report_is_refused(board: Board) -> None:
    offered = board.offer(npus=2)
    fmt, cvm_report, npus = cbor2.loads(offered.evidence)
    stripped = dataclasses.replace(offered, evidence=cbor2.dumps([fmt, cvm_report, npus[:1]]))
    with pytest.raises(EvidenceMalformed, match="1 NPU reports but the CVM report declares 2"):
        verify(stripped, board.rv())


def test_reordered_npu_reports_are_refused(board: Board) -> None:
    offered = board.offer(npus=2)
    fmt, cvm_report, npus = cbor2.loads(offered.evidence)
    swapped = dataclasses.replace(offered, evidence=cbor2.dumps([fmt, cvm_report, npus[::-1]]))
    with pytest.raises(EvidenceMalformed, match="NPU report 0 says it is NPU 1"):
        verify(swapped, board.rv())


def test_a_cvm_report_cannot_pass_for_an_npu_report(board: Board) -> None:
    offered = board.offer(npus=1)
    fmt, cvm_report, _ = cbor2.loads(offered.evidence)
    forged = dataclasses.replace(offered, evidence=cbor2.dumps([fmt, cvm_report, [cvm_report]]))
    with pytest.raises(EvidenceSignatureInvalid, match="NPU report 0 signature"):
        verify(forged, board.rv())


def test_format_1_is_retired(board: Board) -> None:
    offered = board.offer()
    with pytest.raises(EvidenceMalformed, match="'sovra-sim-tee/1' is retired"):
        verify(dataclasses.replace(offered, evidence_format=sim.SIM_FORMAT_V1), board.rv())
    _, (claims, sig, chain), _ = cbor2.loads(offered.evidence)
    v1_bytes = cbor2.dumps([sim.SIM_FORMAT_V1, claims, sig, chain])
    with pytest.raises(EvidenceMalformed, match="retired"):
        verify(dataclasses.replace(offered, evidence=v1_bytes), board.rv())


# --------------------------------------------------------------------------- reference values


def test_firmware_versions() -> None:
    assert parse_firmware_version("7.1.0") == (7, 1, 0)
    assert parse_firmware_version("7.1.0-rc1") is None and parse_firmware_version("") is None
    assert firmware_at_least("7.1", "7.1.0") is True
    assert firmware_at_least("7.10.0", "7.9") is True
    assert firmware_at_least("7.0.99", "7.1") is False
    assert firmware_at_least("x", "7.1") is None


def test_min_npu_firmware_must_be_a_version(tmp_path: Path) -> None:
    with pytest.raises(ReferenceValuesInvalid, match="min_npu_firmware 'seven'"):
        ReferenceValues.from_document(
            {"version": 1, "min_npu_firmware": "seven"}, base=tmp_path, source="rv"
        )
    rv = ReferenceValues.from_document(
        {"version": 1, "npu_measurements": [NPU_MEAS.upper()]}, base=tmp_path, source="rv"
    )
    assert rv.npu_measurements == {NPU_MEAS}


def test_reference_values_file_reloads_on_change_and_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "rv.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "measurements": [MEASUREMENT]}))
    source = ReferenceValuesFile(path)
    assert source.generation == 1 and source.refresh() is False
    path.write_text(
        yaml.safe_dump(
            {"version": 1, "measurements": [MEASUREMENT], "revoked_measurements": [MEASUREMENT]}
        )
    )
    assert source.refresh() is True and source.generation == 2
    assert source.values.revoked_measurements == {MEASUREMENT}
    path.write_text("version: [broken\n")
    assert source.refresh() is False and source.generation == 2
    assert source.error is not None and "not valid" in source.error
    assert source.values.revoked_measurements == {MEASUREMENT}  # the last good values stay
    path.unlink()
    assert source.refresh() is False and "cannot read" in (source.error or "")
    with pytest.raises(ReferenceValuesInvalid):
        ReferenceValuesFile(path)
