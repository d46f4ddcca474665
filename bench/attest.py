"""Benchmark attestation verification; prints one JSON object.

* ``cca_verify_p50_ms``: :func:`attestation.cca.verify_cca_token` on the real TF-RMM token from
  ../shared/vectors/cca when present, else an ES384 token built with generated keys
  (tests/cca_tokens.py);
* ``sim_verify_key_p50_ms``: :func:`attestation.verifier.verify_key` on ``sovra-sim-tee/2``
  composite evidence with ``NPUS`` NPU reports (P-384 root CA + device certificate from
  sovra.pki; every report's chain and signature, NPU binding, key binding, freshness and
  appraisal) - SIMULATED evidence, timed because every edge runs this per key.

    python bench/attest.py [runs]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attestation import sim  # noqa: E402
from attestation.cca import parse_trust_anchor, verify_cca_token  # noqa: E402
from attestation.reference_values import ReferenceValues  # noqa: E402
from attestation.verifier import OfferedKey, verify_key  # noqa: E402
from sovra.pki import build_certificate  # noqa: E402

VECTORS = ROOT.parent / "shared" / "vectors" / "cca"
MEASUREMENT = "ab" * 48
NPUS = 1  # the enclave default ([tee] npus)


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    for _ in range(min(10, runs)):  # warm-up
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(samples), 4)


def _cca_case() -> tuple[Callable[[], object], str]:
    token_path = VECTORS / "tfrmm-token.cbor"
    if token_path.is_file():
        anchors = parse_trust_anchor((VECTORS / "tfrmm-platform.pub.pem").read_bytes())
        token, source = token_path.read_bytes(), "tfrmm-token.cbor (real vector, ES384)"
    else:
        from tests.cca_tokens import build_cca_token

        built = build_cca_token(curve="P-384")
        token, anchors, source = built.token, [built.platform_public_key], "built ES384 token"
    return (lambda: verify_cca_token(token, anchors)), source


def _sim_case() -> Callable[[], object]:
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = build_certificate(
        subject_cn="SIMULATED bench vendor root",
        public_key=root_key.public_key(),
        issuer_cert=None,
        issuer_key=root_key,
        is_ca=True,
        path_length=0,
        days=1,
    )
    device_key = ec.generate_private_key(ec.SECP384R1())
    device = build_certificate(
        subject_cn="SIMULATED bench device",
        public_key=device_key.public_key(),
        issuer_cert=root,
        issuer_key=root_key,
        is_ca=False,
        days=1,
    )
    now_ms = int(time.time() * 1000)
    public_key, nonce, receipt_key = os.urandom(32), os.urandom(32), os.urandom(32)
    claims = sim.SimClaims(
        enclave_id="bench-1",
        region="eu-west",
        measurement=MEASUREMENT,
        report_data=sim.report_data(public_key, 1, nonce, receipt_key),
        nonce=nonce,
        epoch=1,
        kem="X25519",
        key_not_after_ms=now_ms + 3_600_000,
        issued_at_ms=now_ms,
        npus=NPUS,
        receipt_key=receipt_key,
    )
    offered = OfferedKey(
        enclave_id="bench-1",
        epoch=1,
        kem="X25519",
        public_key=public_key,
        not_after_ms=claims.key_not_after_ms,
        evidence_format=sim.SIM_FORMAT,
        evidence=sim.encode_evidence(claims, device_key, [device]),
        receipt_public_key=receipt_key,
    )
    rv = ReferenceValues(
        allow_simulation=True,
        tee_types=frozenset({sim.SIM_TEE_TYPE}),
        measurements=frozenset({MEASUREMENT}),
        max_evidence_age_s=1800,
        sim_vendor_roots=(root,),
        min_npu_firmware=sim.DEFAULT_NPU_FIRMWARE,
        npu_measurements=frozenset({sim.npu_measurement(sim.DEFAULT_NPU_FIRMWARE)}),
    )
    return lambda: verify_key(offered, rv, expected_nonce=nonce)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    cca_fn, source = _cca_case()
    sim_fn = _sim_case()
    print(
        json.dumps(
            {
                "cca_verify_p50_ms": _median_ms(cca_fn, runs),
                "sim_verify_key_p50_ms": _median_ms(sim_fn, runs),
                "n": runs,
                "cca_token": source,
                "sim_evidence": (
                    f"{sim.SIM_FORMAT} (SIMULATED CVM + {NPUS} NPU report(s), P-384 device "
                    "cert + root)"
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
