"""Training receipts verifiable by anyone: a receipt together with the attestation evidence that
binds its signing key (``docs/training.md``, "Receipt bundles").

An enclave signs a training receipt with the Ed25519 receipt key of the key epoch the job was
sealed to. The epoch's evidence binds that receipt key together with the HPKE key
(:func:`attestation.sim.report_data`), and the edge records the evidence it verified, with its
attestation result, in an *attestation record* whose SHA-256 (canonical CBOR) the job spec
carries and the receipt repeats (``attestation.result_sha256``). A *bundle* is the receipt, its
signature and that record, so a third party holding only the bundle and its own reference
values can check, without trusting the edge or the broker:

1. the evidence is genuine and accepted by its reference values, judged as of the moment the
   edge verified it (``result.verified_at_ms`` of the record, which the receipt's digest covers);
2. the evidence binds the receipt key (and the HPKE key whose digest the receipt names);
3. the receipt is signed by exactly that key;
4. the receipt names this record (digest), this enclave, epoch, measurement, TEE type and
   simulation flag, and the record's result repeats what the evidence says.

Bundle (JSON object, exactly these keys)::

    {"type": "sovra-training-receipt-bundle/1",
     "receipt": hex canonical CBOR receipt, "signature": hex Ed25519, "signer": hex public key,
     "attestation": {"enclave_id", "epoch", "kem", "key_sha256", "result": {...},
                     "evidence": {"format", "evidence" (hex), "public_key" (hex), "nonce" (hex),
                                  "not_after_ms", "receipt_public_key" (hex)}}}

No runtime imports: used by the edge (export, re-verification) and ``sovra attest
verify-receipt``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from attestation.errors import AttestationError
from attestation.reference_values import ReferenceValues
from attestation.verifier import AttestationResult, OfferedKey, verify_key
from sovra.training import ReceiptInvalid, attestation_digest, verify_receipt

BUNDLE_TYPE: Final = "sovra-training-receipt-bundle/1"
BUNDLE_FIELDS: Final = frozenset({"type", "receipt", "signature", "signer", "attestation"})
RECORD_FIELDS: Final = frozenset({"enclave_id", "epoch", "kem", "key_sha256", "result", "evidence"})
EVIDENCE_FIELDS: Final = frozenset(
    {"format", "evidence", "public_key", "nonce", "not_after_ms", "receipt_public_key"}
)
#: Clock difference tolerated between the edge (verified_at_ms) and the enclave (started_ms).
MAX_SKEW_MS: Final = 60_000
#: Result fields that the recorded result must repeat from the evidence, verified again.
_RESULT_FIELDS: Final = (
    "enclave_id", "epoch", "simulated", "tee_type", "region", "measurement", "receipt_public_key",
)  # fmt: skip


class BundleRefused(Exception):
    """The bundle does not verify; ``check`` names the step that failed."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(reason)
        self.check = check
        self.reason = reason


@dataclass(frozen=True)
class BundleVerification:
    """A bundle that verified: the receipt, the attestation result behind its key, the steps."""

    receipt: dict[str, Any]
    result: AttestationResult
    checks: tuple[dict[str, Any], ...]


def attestation_record(
    result: AttestationResult, *, kem: str, key_sha256: str, offer: OfferedKey | None
) -> dict[str, Any]:
    """The edge's record for a job's enclave key (JSON-ready; its digest goes into the job spec).

    ``offer``: the key exactly as verified, evidence included; without it the record has no
    ``evidence`` and its receipt cannot be exported for third parties.
    """
    record: dict[str, Any] = {
        "enclave_id": result.enclave_id,
        "epoch": result.epoch,
        "kem": kem,
        "key_sha256": key_sha256,
        "result": result.to_json_dict(),
    }
    if offer is not None:
        record["evidence"] = {
            "format": offer.evidence_format,
            "evidence": offer.evidence.hex(),
            "public_key": offer.public_key.hex(),
            "nonce": offer.nonce.hex(),
            "not_after_ms": offer.not_after_ms,
            "receipt_public_key": offer.receipt_public_key.hex(),
        }
    return record


def export_bundle(
    receipt: bytes, signature: bytes, signer: bytes, record: Mapping[str, Any]
) -> dict[str, Any]:
    """A bundle for a stored receipt and the attestation record of its job (ValueError if the
    record does not carry the evidence it was verified from)."""
    if "evidence" not in record:
        raise ValueError(
            "the job's attestation record holds no evidence (recorded before receipt keys were "
            "bound into evidence); its receipt cannot be exported for third parties"
        )
    return {
        "type": BUNDLE_TYPE,
        "receipt": receipt.hex(),
        "signature": signature.hex(),
        "signer": signer.hex(),
        "attestation": dict(record),
    }


def offered_key(record: Mapping[str, Any]) -> OfferedKey:
    """The enclave key offer a record holds (BundleRefused ``record`` if it is not well formed)."""
    if set(record) != RECORD_FIELDS:
        raise BundleRefused(
            "record", f"the attestation record does not have exactly {sorted(RECORD_FIELDS)}"
        )
    ev = record["evidence"]
    if not isinstance(ev, Mapping) or set(ev) != EVIDENCE_FIELDS:
        raise BundleRefused(
            "record", f"the recorded evidence does not have exactly {sorted(EVIDENCE_FIELDS)}"
        )
    try:
        return OfferedKey(
            enclave_id=_typed(record["enclave_id"], str),
            epoch=_typed(record["epoch"], int),
            kem=_typed(record["kem"], str),
            public_key=_hex(ev["public_key"]),
            not_after_ms=_typed(ev["not_after_ms"], int),
            evidence_format=_typed(ev["format"], str),
            evidence=_hex(ev["evidence"]),
            nonce=_hex(ev["nonce"]),
            receipt_public_key=_hex(ev["receipt_public_key"]),
        )
    except (TypeError, ValueError) as exc:
        raise BundleRefused("record", f"the attestation record is malformed: {exc}") from None


def verify_bundle(bundle: Mapping[str, Any], rv: ReferenceValues) -> BundleVerification:
    """Verify evidence -> receipt key -> receipt signature -> receipt binding; BundleRefused at
    the first step that fails."""
    checks: list[dict[str, Any]] = []

    def passed(name: str, detail: str) -> None:
        checks.append({"check": name, "ok": True, "detail": detail})

    if set(bundle) != BUNDLE_FIELDS or bundle.get("type") != BUNDLE_TYPE:
        raise BundleRefused("bundle", f"not a {BUNDLE_TYPE} document with exactly its fields")
    record = bundle["attestation"]
    if not isinstance(record, Mapping):
        raise BundleRefused("record", "the attestation record is not an object")
    try:
        receipt_bytes = _hex(bundle["receipt"])
        signature = _hex(bundle["signature"])
        signer = _hex(bundle["signer"])
    except (TypeError, ValueError) as exc:
        raise BundleRefused("bundle", f"receipt, signature or signer is malformed: {exc}") from None
    offer = offered_key(record)
    recorded = record["result"]
    if not isinstance(recorded, Mapping):
        raise BundleRefused("record", "the recorded attestation result is not an object")
    verified_at = recorded.get("verified_at_ms")
    if not isinstance(verified_at, int) or isinstance(verified_at, bool):
        raise BundleRefused("record", "the recorded result has no verification time")

    # 1. the evidence, judged as of the moment the edge verified it
    try:
        result = verify_key(offer, rv, now_ms=verified_at)
    except AttestationError as exc:
        raise BundleRefused("evidence", f"{type(exc).__name__}: {exc}") from None
    passed(
        "evidence",
        f"{offer.evidence_format} evidence of enclave {result.enclave_id} epoch {result.epoch} "
        f"verified and appraised against {rv.source or 'the reference values'} as of "
        f"{verified_at} ms" + (" (SIMULATED TEE)" if result.simulated else ""),
    )
    mismatched = [f for f in _RESULT_FIELDS if recorded.get(f) != getattr(result, f)]
    if mismatched:
        raise BundleRefused(
            "record",
            f"the recorded attestation result differs from the evidence in {mismatched}",
        )
    if record["key_sha256"] != hashlib.sha256(offer.public_key).hexdigest():
        raise BundleRefused("record", "the recorded key digest is not the evidence's HPKE key")

    # 2. the receipt key is the one the evidence binds
    receipt_key = bytes.fromhex(result.receipt_public_key)
    if signer != receipt_key:
        raise BundleRefused(
            "receipt_key", "the receipt's signer is not the receipt key the evidence binds"
        )
    passed("receipt_key", f"the evidence binds receipt key {result.receipt_public_key}")

    # 3. the signature, under exactly that key
    try:
        receipt = verify_receipt(receipt_bytes, signature, receipt_key)
    except ReceiptInvalid as exc:
        raise BundleRefused("signature", str(exc)) from None
    passed("signature", "Ed25519 by the attested receipt key")

    # 4. the receipt names this record and says what the evidence says
    problems = receipt_binding_problems(receipt, record, result)
    if problems:
        raise BundleRefused("binding", "; ".join(problems))
    passed("binding", "the receipt names this attestation record, enclave, epoch and identity")
    return BundleVerification(receipt, result, tuple(checks))


def receipt_binding_problems(
    receipt: Mapping[str, Any], record: Mapping[str, Any], result: AttestationResult
) -> list[str]:
    """Differences between a signed receipt and the attestation record / verified result."""
    try:
        att = receipt["attestation"]
        pairs = [
            ("attestation.enclave_id", att["enclave_id"], result.enclave_id),
            ("attestation.epoch", att["epoch"], result.epoch),
            ("attestation.measurement", att["measurement"], result.measurement),
            ("attestation.tee_type", att["tee_type"], result.tee_type),
            ("attestation.simulated", att["simulated"], result.simulated),
            ("attestation.key_sha256", att["key_sha256"], record.get("key_sha256")),
            ("attestation.result_sha256", att["result_sha256"], _record_digest(record)),
            ("measurement.enclave", receipt["measurement"]["enclave"], result.measurement),
            ("signer", receipt["signer"], result.receipt_public_key),
        ]
    except (KeyError, TypeError):
        return ["the receipt does not have the expected structure"]
    problems = [f"{name} differs from the attestation record" for name, a, b in pairs if a != b]
    started = receipt["started_ms"]
    recorded = record.get("result")
    verified_at = recorded.get("verified_at_ms") if isinstance(recorded, Mapping) else None
    if not isinstance(started, int) or not isinstance(verified_at, int):
        problems.append("the receipt or the record has no usable time")
    elif verified_at > started + MAX_SKEW_MS:
        problems.append("the evidence was verified after the receipt's training started")
    return problems


def _record_digest(record: Mapping[str, Any]) -> str:
    try:
        return attestation_digest(dict(record)).hex()
    except Exception:  # a record that does not encode cannot match any digest
        return ""


def _hex(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError("expected a hex string")
    return bytes.fromhex(value)


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value
