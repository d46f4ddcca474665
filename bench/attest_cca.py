"""Benchmark verify_cca_token; prints JSON {"cca_verify_p50_ms", "cca_verify_p99_ms", "n", ...}.

Uses the real TF-RMM token from ../shared/vectors/cca when present, else an ES384 token built
with generated keys (tests/cca_tokens.py).

    python bench/attest_cca.py [runs]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attestation.cca import parse_trust_anchor, verify_cca_token  # noqa: E402

VECTORS = ROOT.parent / "shared" / "vectors" / "cca"


def _load() -> tuple[bytes, list[EllipticCurvePublicKey], str]:
    token_path = VECTORS / "tfrmm-token.cbor"
    if token_path.is_file():
        anchors = parse_trust_anchor((VECTORS / "tfrmm-platform.pub.pem").read_bytes())
        return token_path.read_bytes(), anchors, "tfrmm-token.cbor (ES384)"
    from tests.cca_tokens import build_cca_token

    built = build_cca_token(curve="P-384")
    return built.token, [built.platform_public_key], "built ES384 token"


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    token, anchors, source = _load()
    for _ in range(10):  # warm-up
        verify_cca_token(token, anchors)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        verify_cca_token(token, anchors)
        samples.append((time.perf_counter() - start) * 1000.0)
    samples.sort()
    p99_index = min(len(samples) - 1, max(0, round(0.99 * len(samples)) - 1))
    print(
        json.dumps(
            {
                "cca_verify_p50_ms": round(statistics.median(samples), 4),
                "cca_verify_p99_ms": round(samples[p99_index], 4),
                "n": runs,
                "token": source,
            }
        )
    )


if __name__ == "__main__":
    main()
