"""The training receipt key is bound into attestation evidence (docs/training.md, "receipt
trust"): report data = SHA-512(pk || be64(epoch) || nonce || receipt pk), the sim CVM claims name
the receipt key, the edge's trusted set refuses a swapped one, and a receipt exported with its
evidence verifies for anyone holding reference values (``sovra attest verify-receipt``).

The enclave side is real: keys from ``enclave.keys.KeyRing`` and evidence from the SIMULATED
``enclave.tee_sim.SimTEE``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from attestation import receipts, sim
from attestation.errors import KeyBindingMismatch
from attestation.reference_values import ReferenceValues
from attestation.verifier import AttestationResult, OfferedKey, verify_key
from edge_agent.trusted_set import TrustedEnclaveSet
from enclave.keys import EpochKey, KeyRing
from enclave.tee_sim import SimTEE
from sovra import cli
from sovra.pki import build_certificate
from sovra.training import RECEIPT_TYPE, RECEIPT_VERSION, attestation_digest, sign_receipt
from sovra.v1 import broker_pb2

MEASUREMENT = "5e" * 48
ENCLAVE_ID = "enc-r1"


@dataclass
class World:
    rv_path: Path
    rv: ReferenceValues
    tee: SimTEE
    ring: KeyRing
    key: EpochKey
    device_key: ec.EllipticCurvePrivateKey
    device: x509.Certificate

    def wire(
        self, key: EpochKey | None = None, nonce: bytes | None = None
    ) -> broker_pb2.EnclaveKey:
        """A directory entry as an enclave announces it (enclave/registration.py)."""
        key = key or self.key
        nonce = nonce or os.urandom(32)
        att = self.tee.attest(key, nonce)
        return broker_pb2.EnclaveKey(
            epoch=key.epoch,
            kem=key.kem,
            public_key=key.public_bytes,
            not_after_ms=key.not_after_ms,
            evidence_format=att.evidence_format,
            evidence=att.evidence,
            nonce=nonce,
            receipt_public_key=key.receipt_public_bytes,
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    directory = tmp_path_factory.mktemp("receipt-binding")
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = build_certificate(
        subject_cn="receipt test sim vendor root", public_key=root_key.public_key(),
        issuer_cert=None, issuer_key=root_key, is_ca=True, days=30,
    )  # fmt: skip
    device_key = ec.generate_private_key(ec.SECP384R1())
    device = build_certificate(
        subject_cn="receipt test sim device", public_key=device_key.public_key(),
        issuer_cert=root, issuer_key=root_key, is_ca=False, days=30,
    )  # fmt: skip
    (directory / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    rv_path = directory / "reference-values.yaml"
    rv_path.write_text(
        "version: 1\nsimulation: allow\n"
        f"tee_types: [{sim.SIM_TEE_TYPE}]\nmeasurements: [{MEASUREMENT}]\n"
        "max_evidence_age_s: 600\ntrust_anchors:\n  sim_vendor_roots: [root.pem]\n"
        f"npu_measurements: [{sim.npu_measurement(sim.DEFAULT_NPU_FIRMWARE)}]\n"
    )
    tee = SimTEE(ENCLAVE_ID, "eu-west", MEASUREMENT, device_key, (device,), time.time)
    ring = KeyRing("X25519", 600, 120, time.time)
    key = ring.rotate()
    return World(rv_path, ReferenceValues.load(rv_path), tee, ring, key, device_key, device)


def _offer(wire: broker_pb2.EnclaveKey, **changes: Any) -> OfferedKey:
    offer = OfferedKey(
        ENCLAVE_ID, wire.epoch, wire.kem, wire.public_key, wire.not_after_ms,
        wire.evidence_format, wire.evidence, wire.nonce, wire.receipt_public_key,
    )  # fmt: skip
    return replace(offer, **changes)


# -- the binding --------------------------------------------------------------------------------


def test_report_data_binds_the_receipt_key() -> None:
    pk, nonce = os.urandom(32), os.urandom(32)
    a, b = os.urandom(32), os.urandom(32)
    assert sim.report_data(pk, 1, nonce, a) != sim.report_data(pk, 1, nonce, b)
    expected = hashlib.sha512(pk + (1).to_bytes(8, "big") + nonce + a).digest()
    assert sim.report_data(pk, 1, nonce, a) == expected
    for bad in (b"", b"x" * 31, b"x" * 33):
        with pytest.raises(ValueError, match="receipt public key"):
            sim.report_data(pk, 1, nonce, bad)


def test_evidence_carries_and_binds_the_epochs_receipt_key(world: World) -> None:
    wire = world.wire()
    result = verify_key(_offer(wire), world.rv)
    assert result.receipt_public_key == world.key.receipt_public_bytes.hex()
    assert result.to_json_dict()["receipt_public_key"] == result.receipt_public_key
    claims = sim.verify_evidence(wire.evidence, world.rv.sim_vendor_roots).cvm
    assert claims.receipt_key == world.key.receipt_public_bytes
    # a new epoch has a new receipt key
    assert world.ring.rotate().receipt_public_bytes != world.key.receipt_public_bytes


def test_evidence_binding_another_receipt_key_is_refused(world: World) -> None:
    wire = world.wire()
    other = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(KeyBindingMismatch, match="another receipt key"):
        verify_key(_offer(wire, receipt_public_key=other), world.rv)
    with pytest.raises(KeyBindingMismatch, match="receipt public key"):
        verify_key(_offer(wire, receipt_public_key=b""), world.rv)
    # Genuine device signature over claims that name the offered receipt key but whose report
    # data binds another one: refused.
    claims = sim.verify_evidence(wire.evidence, world.rv.sim_vendor_roots).cvm
    forged = replace(
        claims,
        report_data=sim.report_data(wire.public_key, wire.epoch, wire.nonce, other),
    )
    evidence = sim.encode_evidence(forged, world.device_key, [world.device])
    with pytest.raises(KeyBindingMismatch, match="does not bind"):
        verify_key(_offer(wire, evidence=evidence), world.rv)


def test_evidence_without_a_receipt_key_claim_is_refused(world: World) -> None:
    wire = world.wire()
    claims = sim.verify_evidence(wire.evidence, world.rv.sim_vendor_roots).cvm
    old = cbor2.loads(claims.encode())
    del old["receipt_key"]
    old["report_data"] = hashlib.sha512(
        wire.public_key + wire.epoch.to_bytes(8, "big") + wire.nonce
    ).digest()  # the layout before receipt keys were bound
    cvm = sim._report(sim._CVM_CONTEXT, cbor2.dumps(old, canonical=True), world.device_key,
                      [world.device])  # fmt: skip
    npus = sim.npu_claims_for(replace(claims, report_data=old["report_data"]))
    npu_reports = [
        sim._report(sim._NPU_CONTEXT, n.encode(), world.device_key, [world.device]) for n in npus
    ]
    evidence = cbor2.dumps([sim.SIM_FORMAT, cvm, npu_reports])
    with pytest.raises(KeyBindingMismatch, match="binds no receipt key"):
        verify_key(_offer(wire, evidence=evidence), world.rv)


def test_trusted_set_refuses_a_swapped_receipt_key(world: World) -> None:
    trusted = TrustedEnclaveSet(world.rv)
    wire = world.wire()

    def listing(key: broker_pb2.EnclaveKey) -> broker_pb2.EnclaveDescriptor:
        return broker_pb2.EnclaveDescriptor(
            enclave_id=ENCLAVE_ID, region="eu-west", tee_type=sim.SIM_TEE_TYPE, simulated=True,
            models=["m"], keys=[key],
        )  # fmt: skip

    (admitted,) = trusted.sync([listing(wire)])
    assert admitted.receipt_public_key == world.key.receipt_public_bytes.hex()
    assert admitted.offer is not None and admitted.offer.evidence == wire.evidence
    # The broker swaps in a receipt key it holds, keeping the HPKE key and the evidence: the
    # verdict cached for the genuine entry must not carry over to it.
    swapped = broker_pb2.EnclaveKey()
    swapped.CopyFrom(wire)
    swapped.receipt_public_key = (
        ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    )
    assert trusted.sync([listing(swapped)]) == []
    assert trusted.candidates("m", 3, _no_constraints()) == []
    (row,) = trusted.snapshot(details=True)
    assert row["status"] == "refused" and row["reason"] == "key_not_bound"
    assert "receipt key" in row["detail"]
    assert len(trusted.sync([listing(wire)])) == 1  # the genuine entry is still fine


def _no_constraints() -> Any:
    from sovra.envelope import Constraints

    return Constraints()


# -- receipts and bundles -----------------------------------------------------------------------


def _receipt(result: AttestationResult, record: dict[str, Any], signer: bytes) -> dict[str, Any]:
    now = int(time.time() * 1000)
    return {
        "v": RECEIPT_VERSION,
        "type": RECEIPT_TYPE,
        "job": "ab" * 16,
        "tenant": "demo",
        "app": "research",
        "policy": "config:1",
        "dataset": {"sha256": "cd" * 32, "bytes": 10, "chunks": 1, "rows": 2, "format": "csv"},
        "algorithm": "logistic_regression",
        "task": "classification",
        "target": "y",
        "params": {"C": 1.0},
        "measurement": {"enclave": MEASUREMENT, "base_model": "m", "artifact_sha256": "ef" * 32},
        "metrics": {"roc_auc": 0.9},
        "holdout": {"fraction": 0.25, "seed": 0},
        "attestation": {
            "enclave_id": result.enclave_id,
            "epoch": result.epoch,
            "measurement": result.measurement,
            "tee_type": result.tee_type,
            "simulated": result.simulated,
            "region": result.region,
            "key_sha256": record["key_sha256"],
            "result_sha256": attestation_digest(record).hex(),
        },
        "started_ms": now,
        "ended_ms": now + 5,
        "signer": signer.hex(),
    }


def _bundle(world: World, signing_key: ed25519.Ed25519PrivateKey | None = None) -> dict[str, Any]:
    """What the edge exports for a job whose enclave key ``world.key`` it verified."""
    wire = world.wire()
    offer = _offer(wire)
    result = verify_key(offer, world.rv)
    record = receipts.attestation_record(
        result, kem=offer.kem, key_sha256=hashlib.sha256(offer.public_key).hexdigest(),
        offer=offer,
    )  # fmt: skip
    record = json.loads(json.dumps(record))  # as stored by the edge (JSON)
    key = signing_key or world.key.receipt_key
    signer = key.public_key().public_bytes_raw()
    receipt_bytes, signature = sign_receipt(_receipt(result, record, signer), key)
    return receipts.export_bundle(receipt_bytes, signature, signer, record)


def test_exported_receipt_verifies_for_a_third_party(world: World) -> None:
    verified = receipts.verify_bundle(_bundle(world), world.rv)
    assert [c["check"] for c in verified.checks] == [
        "evidence",
        "receipt_key",
        "signature",
        "binding",
    ]
    assert verified.result.receipt_public_key == world.key.receipt_public_bytes.hex()
    assert verified.receipt["attestation"]["enclave_id"] == ENCLAVE_ID


def test_receipt_signed_by_a_key_not_bound_in_evidence_is_refused(world: World) -> None:
    mallory = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(receipts.BundleRefused) as refused:
        receipts.verify_bundle(_bundle(world, mallory), world.rv)
    assert refused.value.check == "receipt_key"
    # Claiming the attested key as signer does not help: the signature is checked under it.
    bundle = _bundle(world, mallory)
    bundle["signer"] = world.key.receipt_public_bytes.hex()
    with pytest.raises(receipts.BundleRefused) as refused:
        receipts.verify_bundle(bundle, world.rv)
    assert refused.value.check == "signature"


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in _paths(v, (*prefix, k))]
    if isinstance(doc, list) and doc:
        return [p for i, v in enumerate(doc) for p in _paths(v, (*prefix, i))]
    return [prefix]


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str) and value and all(c in "0123456789abcdef" for c in value):
        return ("0" if value[0] != "0" else "1") + value[1:]  # still hex, another value
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, 1]
    return 1


def _set(doc: Any, path: tuple[Any, ...], change: Callable[[Any], Any]) -> None:
    for step in path[:-1]:
        doc = doc[step]
    doc[path[-1]] = change(doc[path[-1]])


def test_tampering_any_field_fails(world: World) -> None:
    good = _bundle(world)
    rv = world.rv
    receipts.verify_bundle(good, rv)
    receipt_map = cbor2.loads(bytes.fromhex(good["receipt"]))
    tried = 0
    # every field of the signed receipt (re-encoded canonically, signature kept)
    for path in _paths(receipt_map):
        forged = copy.deepcopy(receipt_map)
        _set(forged, path, _changed)
        bundle = {**good, "receipt": cbor2.dumps(forged, canonical=True).hex()}
        with pytest.raises(receipts.BundleRefused):
            receipts.verify_bundle(bundle, rv)
        tried += 1
    # every field of the bundle and of the attestation record it carries
    for path in _paths({k: v for k, v in good.items() if k != "type"}):
        bundle = copy.deepcopy(good)
        _set(bundle, path, _changed)
        with pytest.raises(receipts.BundleRefused):
            receipts.verify_bundle(bundle, rv)
        tried += 1
    assert tried > 50
    # a receipt re-signed by the genuine key still fails when it names another record
    record = copy.deepcopy(good["attestation"])
    record["result"]["region"] = "elsewhere"
    with pytest.raises(receipts.BundleRefused):
        receipts.verify_bundle({**good, "attestation": record}, rv)


def test_verify_receipt_cli_exit_codes(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(_bundle(world)))
    base = ["attest", "verify-receipt", "--receipt", str(path), "--reference-values"]
    assert cli.main([*base, str(world.rv_path)]) == 0
    out = capsys.readouterr().out
    assert "RECEIPT VERIFIED" in out and "SIMULATED" in out
    assert cli.main([*base, str(world.rv_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] is True
    assert doc["attestation"]["receipt_public_key"] == world.key.receipt_public_bytes.hex()

    tampered = json.loads(path.read_text())
    tampered["attestation"]["evidence"]["receipt_public_key"] = os.urandom(32).hex()
    path.write_text(json.dumps(tampered))
    assert cli.main([*base, str(world.rv_path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "refused" and doc["failed_check"] == "evidence"

    path.write_text("not json")
    assert cli.main([*base, str(world.rv_path)]) == 2
    path.write_text(json.dumps({"type": "something else"}))
    assert cli.main([*base, str(world.rv_path)]) == 2
    assert cli.main([*base, str(tmp_path / "missing.yaml")]) == 2
    capsys.readouterr()
