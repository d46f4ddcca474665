"""Write docs/vectors/envelope-v1.json: interoperability vectors for sealed envelope v1.

HPKE encryption is randomised, so the vectors give the recipient's private key: another
implementation must open the envelope, derive the same reply keys, and produce byte-identical
reply frames (those are deterministic). Run: python scripts/make_vectors.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sovra import envelope as env
from sovra.suites import KEM_HYBRID, KEM_X25519, suite_for_kem


def _recipient(kem: str) -> tuple[dict[str, str], object, bytes]:
    x_priv = x25519.X25519PrivateKey.generate()
    x_raw = x_priv.private_bytes_raw()
    if kem == KEM_X25519:
        return {"x25519_private": x_raw.hex()}, x_priv, x_priv.public_key().public_bytes_raw()
    seed = os.urandom(64)
    m_priv = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
    public = m_priv.public_key().public_bytes_raw() + x_priv.public_key().public_bytes_raw()
    private = hpke.MLKEM768X25519PrivateKey(m_priv, x_priv)
    return {"mlkem768_seed": seed.hex(), "x25519_private": x_raw.hex()}, private, public


def _vector(kem: str, *, stream: bool) -> dict[str, object]:
    edge_seed = os.urandom(32)
    edge = ed25519.Ed25519PrivateKey.from_private_bytes(edge_seed)
    priv_doc, _private, public = _recipient(kem)
    recipients = (env.Recipient("enclave-1", 3), env.Recipient("enclave-2", 5))
    header = env.Header(
        suite=suite_for_kem(kem).name,
        request_id=bytes(range(16)),
        tenant="demo",
        app="demo-app",
        model="smollm2-135m",
        operation="chat",
        stream=stream,
        labels=("internal",),
        constraints=env.Constraints(("cn-north-1",), ("sim-ascend-cvm",), (), True),
        policy_id="config:0123456789ab",
        issued_at_ms=1_790_000_000_000,
        expires_at_ms=1_790_000_120_000,
        recipients=recipients,
        edge_key=edge.public_key().public_bytes_raw(),
    )
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hello"}]}
    payload = json.dumps({"op": "chat", "body": body}).encode()
    # The second recipient's key is unrelated; only recipient 0 is given a private key.
    _, _, other_public = _recipient(kem)
    data, secrets = env.seal_request(
        header, payload, [(recipients[0], public), (recipients[1], other_public)], edge
    )
    writer = env.ReplyWriter(secrets.reply_keys)
    plain = [b'{"delta":"Hel"}', b'{"delta":"lo"}', b'{"done":true}']
    frames = [writer.frame(p, final=i == len(plain) - 1) for i, p in enumerate(plain)]
    return {
        "suite": header.suite,
        "edge_ed25519_seed": edge_seed.hex(),
        "recipient": {
            "enclave_id": "enclave-1",
            "epoch": 3,
            "public_key": public.hex(),
            **priv_doc,
        },
        "header_cbor": header.encode().hex(),
        "envelope": data.hex(),
        "payload": payload.hex(),
        "reply_key": secrets.reply_keys.key.hex(),
        "reply_base_nonce": secrets.reply_keys.base_nonce.hex(),
        "reply_plaintexts": [p.hex() for p in plain],
        "reply_frames": [f.hex() for f in frames],
    }


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "docs" / "vectors" / "envelope-v1.json"
    doc = {
        "description": "Sovra sealed envelope v1 vectors; see docs/protocol.md",
        "vectors": [
            _vector(KEM_HYBRID, stream=False),
            _vector(KEM_HYBRID, stream=True),
            _vector(KEM_X25519, stream=True),
        ],
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
