"""``sovra attest``: verify attestation evidence from the command line.

    sovra attest verify --format cca|sim --evidence FILE [--trust-anchor FILE]
                        [--reference-values FILE] [--json]
    sovra attest verify-receipt --receipt FILE --reference-values FILE [--json]

* ``cca``: an Arm CCA token (CBOR). Trust anchor: the platform key(s) as PEM public key or
  certificate, JWK, JWK Set or Veraison trust-anchor list.
* ``sim``: ``sovra-sim-tee/2`` evidence (SIMULATED CVM + NPU composite, no hardware). Trust
  anchor: the simulated vendor root CA certificate (PEM).

``--trust-anchor`` may be left out when the reference values name anchors (``cca.platform_keys``
or ``trust_anchors.sim_vendor_roots``); when both are given the evidence must verify with both.
Without reference values only the signatures (and, for sim, the certificate chain) are checked
and the claims printed; with them the claims are appraised too. Simulated evidence cannot be
bound to an HPKE key here (no key is offered), so the key binding is not checked by this command.

``verify-receipt`` checks a training receipt bundle (``sovra edge jobs receipt ID --export``):
the evidence in it verifies and appraises against the reference values (as of the time the edge
verified it), binds the receipt key, the receipt is signed by exactly that key and names that
evidence's attestation record, enclave and identity (:mod:`attestation.receipts`).

Exit status: 0 the evidence (or receipt) verifies (and appraises, with reference values); 1 it
does not, with the reason; 2 usage error or unreadable/unparsable input file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from attestation import appraisal, sim
from attestation.cca import CCAError, InvalidTrustAnchor, parse_trust_anchor, verify_cca_token
from attestation.cca_appraisal import appraise_cca
from attestation.errors import (
    AppraisalFailed,
    AttestationError,
    EvidenceStale,
    ReferenceValuesInvalid,
    UntrustedChain,
)
from attestation.reference_values import ReferenceValues

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
SIM_BANNER: Final = "SIMULATED TEE EVIDENCE - software only, NO hardware protection"


class _UsageError(Exception):
    """Bad arguments or an input file that cannot be read or parsed (exit 2)."""


class _Refused(Exception):
    """The evidence was refused (exit 1)."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind


def register(subparsers: Any) -> None:
    """Add the ``attest`` command group to a ``sovra`` sub-parser collection."""
    attest = subparsers.add_parser("attest", help="verify attestation evidence")
    attest_sub = attest.add_subparsers(dest="attest_command", required=True, metavar="COMMAND")
    verify = attest_sub.add_parser(
        "verify",
        help="verify CCA or simulated evidence, optionally appraise it against reference values",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("--format", required=True, choices=("cca", "sim"), dest="evidence_format")
    verify.add_argument("--evidence", required=True, type=Path, metavar="FILE")
    verify.add_argument(
        "--trust-anchor",
        type=Path,
        metavar="FILE",
        help="cca: platform key (PEM, JWK, JWK Set); sim: simulated vendor root CA (PEM)",
    )
    verify.add_argument("--reference-values", type=Path, metavar="FILE")
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.set_defaults(func=run_verify)
    receipt = attest_sub.add_parser(
        "verify-receipt",
        help="verify an exported training receipt: evidence -> receipt key -> signature",
    )
    receipt.add_argument(
        "--receipt",
        required=True,
        type=Path,
        metavar="FILE",
        help="receipt bundle (JSON) from `sovra edge jobs receipt ID --export FILE`",
    )
    receipt.add_argument("--reference-values", required=True, type=Path, metavar="FILE")
    receipt.add_argument("--json", action="store_true", help="print one JSON object")
    receipt.set_defaults(func=run_verify_receipt)


def run_verify(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {"format": args.evidence_format, "verified": False}
    try:
        evidence = _read(args.evidence, "evidence")
        rv = ReferenceValues.load(args.reference_values) if args.reference_values else None
        if args.evidence_format == "cca":
            _verify_cca(evidence, args.trust_anchor, rv, out)
        else:
            _verify_sim(evidence, args.trust_anchor, rv, out)
    except ReferenceValuesInvalid as exc:
        return _fail(args, out, EXIT_USAGE, "ReferenceValuesInvalid", str(exc))
    except _UsageError as exc:
        return _fail(args, out, EXIT_USAGE, "UsageError", str(exc))
    except _Refused as exc:
        return _fail(args, out, EXIT_REFUSED, exc.kind, str(exc))
    except AttestationError as exc:  # any other refusal from the verifiers
        return _fail(args, out, EXIT_REFUSED, type(exc).__name__, str(exc))
    _emit(args, out)
    return EXIT_OK


def run_verify_receipt(args: argparse.Namespace) -> int:
    from attestation import receipts  # imports the training wire contract; only needed here

    out: dict[str, Any] = {"format": "training-receipt", "verified": False}
    try:
        try:
            bundle = json.loads(_read(args.receipt, "receipt bundle"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _UsageError(f"receipt bundle {args.receipt} is not JSON") from None
        if not isinstance(bundle, dict) or bundle.get("type") != receipts.BUNDLE_TYPE:
            raise _UsageError(
                f"receipt bundle {args.receipt} is not a {receipts.BUNDLE_TYPE} document"
            )
        rv = ReferenceValues.load(args.reference_values)
        out["reference_values"] = rv.source
        verified = receipts.verify_bundle(bundle, rv)
    except ReferenceValuesInvalid as exc:
        return _fail(args, out, EXIT_USAGE, "ReferenceValuesInvalid", str(exc))
    except _UsageError as exc:
        return _fail(args, out, EXIT_USAGE, "UsageError", str(exc))
    except receipts.BundleRefused as exc:
        out["failed_check"] = exc.check
        return _fail(args, out, EXIT_REFUSED, f"ReceiptRefused[{exc.check}]", exc.reason)
    r = verified.result
    out.update(
        verified=True,
        appraised=True,
        status=r.status,
        simulated=r.simulated,
        checks=list(verified.checks),
        receipt=verified.receipt,
        attestation=r.to_json_dict(),
    )
    if r.simulated:
        out["label"] = SIM_BANNER
    _emit_receipt(args, out)
    return EXIT_OK


def _emit_receipt(args: argparse.Namespace, out: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return
    if out.get("simulated"):
        print(f"*** {SIM_BANNER} ***")
    receipt, att = out["receipt"], out["attestation"]
    print(f"receipt: job {receipt['job']}, tenant {receipt['tenant']}, app {receipt['app']}")
    print(f"  dataset sha256 {receipt['dataset']['sha256']}, {receipt['algorithm']}")
    print(f"  enclave {att['enclave_id']} epoch {att['epoch']}, measurement {att['measurement']}")
    for check in out["checks"]:
        print(f"ok   {check['check']:12} {check['detail']}")
    print(f"result: RECEIPT VERIFIED against {out['reference_values']}")


# --------------------------------------------------------------------------- cca


def _verify_cca(
    evidence: bytes, anchor_path: Path | None, rv: ReferenceValues | None, out: dict[str, Any]
) -> None:
    rv_keys = list(rv.cca.platform_keys) if rv is not None and rv.cca is not None else []
    anchor_sets: list[tuple[str, list[ec.EllipticCurvePublicKey]]] = []
    if anchor_path is not None:
        try:
            keys = parse_trust_anchor(_read(anchor_path, "trust anchor"))
        except InvalidTrustAnchor as exc:
            raise _UsageError(f"trust anchor {anchor_path}: {exc}") from None
        anchor_sets.append((str(anchor_path), keys))
    if rv_keys:
        anchor_sets.append(("reference values cca.platform_keys", rv_keys))
    if not anchor_sets:
        raise _UsageError(
            "no trust anchor: give --trust-anchor, or reference values with cca.platform_keys"
        )
    token = None
    for source, keys in anchor_sets:
        try:
            token = verify_cca_token(evidence, keys)
        except CCAError as exc:
            raise _Refused(f"{exc} [trust anchors: {source}]", type(exc).__name__) from None
    assert token is not None
    out.update(verified=True, simulated=False, claims=token.to_json_dict())
    if rv is not None:
        out["reference_values"] = rv.source
        try:
            result = appraise_cca(token, rv)
        except AppraisalFailed as exc:
            raise _Refused(str(exc), type(exc).__name__) from None
        out.update(appraised=True, status=result.status, result=result.to_json_dict())


# --------------------------------------------------------------------------- sim


def _verify_sim(
    evidence: bytes, anchor_path: Path | None, rv: ReferenceValues | None, out: dict[str, Any]
) -> None:
    out.update(simulated=True, label=SIM_BANNER)
    root_sets: list[tuple[str, list[x509.Certificate]]] = []
    if anchor_path is not None:
        root_sets.append((str(anchor_path), _load_roots(anchor_path)))
    if rv is not None and rv.sim_vendor_roots:
        root_sets.append(("reference values trust_anchors", list(rv.sim_vendor_roots)))
    if not root_sets:
        raise _UsageError(
            "no trust anchor: give --trust-anchor, or reference values with "
            "trust_anchors.sim_vendor_roots"
        )
    evidence_claims = None
    for source, roots in root_sets:
        try:
            evidence_claims = sim.verify_evidence(evidence, roots)
        except AttestationError as exc:
            raise _Refused(f"{exc} [trust anchors: {source}]", type(exc).__name__) from None
    assert evidence_claims is not None
    claims = evidence_claims.cvm
    out.update(verified=True, claims=_sim_claims_json(evidence_claims))
    if rv is None:
        return
    out["reference_values"] = rv.source
    if rv.revoked_device_certs:
        revoked = appraisal.DeviceCertsNotRevoked(rv.revoked_device_certs).verify_certificates(
            evidence_claims.certificates
        )
        if isinstance(revoked, appraisal.Failure):
            raise _Refused(revoked.reason, UntrustedChain.__name__)
    now_ms = int(time.time() * 1000)
    fresh = appraisal.Fresh(now_ms, rv.max_evidence_age_s).verify(claims)
    if isinstance(fresh, appraisal.Failure):
        raise _Refused(fresh.reason, EvidenceStale.__name__)
    verdict = appraisal.policy_for(rv).verify(claims)
    if isinstance(verdict, appraisal.Failure):
        raise _Refused(verdict.reason, AppraisalFailed.__name__)
    npu_verdict = appraisal.npu_policy_for(rv).verify(evidence_claims)
    if isinstance(npu_verdict, appraisal.Failure):
        raise _Refused(npu_verdict.reason, AppraisalFailed.__name__)
    out.update(
        appraised=True,
        status="affirming",
        key_binding="not checked (no offered key on the command line)",
    )


def _sim_claims_json(evidence: sim.SimEvidence) -> dict[str, Any]:
    data = asdict(evidence.cvm)
    data["platform"] = sim.SIM_PLATFORM_LABEL
    out = {k: v.hex() if isinstance(v, bytes) else v for k, v in data.items()}
    out["npu_reports"] = [
        {k: v.hex() if isinstance(v, bytes) else v for k, v in asdict(npu).items()}
        for npu in evidence.npus
    ]
    return out


def _load_roots(path: Path) -> list[x509.Certificate]:
    data = _read(path, "trust anchor")
    try:
        roots = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise _UsageError(
            f"trust anchor {path}: not a PEM certificate (sim needs the simulated vendor root CA)"
        ) from None
    return roots


# --------------------------------------------------------------------------- output


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _fail(args: argparse.Namespace, out: dict[str, Any], code: int, kind: str, reason: str) -> int:
    out["error"] = {"type": kind, "reason": reason}
    if code == EXIT_REFUSED:
        out["status"] = "refused"
    if args.json:
        _emit(args, out)
    else:
        if out.get("verified") or out.get("simulated"):
            _emit(args, out)
        label = "REFUSED" if code == EXIT_REFUSED else "ERROR"
        print(f"{label}: {reason}", file=sys.stderr)
    return code


def _emit(args: argparse.Namespace, out: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return
    if out.get("simulated"):
        print(f"*** {SIM_BANNER} ***")
    print(f"format: {out['format']}")
    if "claims" in out:
        print("claims:")
        for line in json.dumps(out["claims"], indent=2, sort_keys=True).splitlines():
            print(f"  {line}")
    if "error" in out or not out.get("verified"):
        return
    if out.get("appraised"):
        print(f"result: VERIFIED and APPRAISED against {out['reference_values']}")
        print(f"  status: {out['status']}")
        if "key_binding" in out:
            print(f"  key binding: {out['key_binding']}")
    else:
        print("result: VERIFIED (signatures only; no reference values given, not appraised)")
    if out.get("simulated"):
        print("  SIMULATED: accept only where reference values allow simulation")
