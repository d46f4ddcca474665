"""The committed envelope v1 vectors still open, and reply frames are byte-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from sovra import envelope as env

VECTORS = json.loads(
    (Path(__file__).resolve().parents[1] / "docs" / "vectors" / "envelope-v1.json").read_text()
)["vectors"]


def _private_key(doc: dict[str, str]) -> object:
    x_priv = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(doc["x25519_private"]))
    if "mlkem768_seed" not in doc:
        return x_priv
    m_priv = mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes.fromhex(doc["mlkem768_seed"]))
    return hpke.MLKEM768X25519PrivateKey(m_priv, x_priv)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["suite"])
def test_vector_opens_and_replies_match(vector: dict) -> None:
    parsed = env.Envelope.decode(bytes.fromhex(vector["envelope"]))
    parsed.verify()
    assert parsed.header_bytes.hex() == vector["header_cbor"]
    assert parsed.header.suite == vector["suite"]
    rcpt = vector["recipient"]
    payload, reply_keys = parsed.open(
        env.Recipient(rcpt["enclave_id"], rcpt["epoch"]),
        _private_key(rcpt),  # type: ignore[arg-type]
    )
    assert payload.hex() == vector["payload"]
    assert reply_keys.key.hex() == vector["reply_key"]
    assert reply_keys.base_nonce.hex() == vector["reply_base_nonce"]
    writer = env.ReplyWriter(reply_keys)
    plain = [bytes.fromhex(p) for p in vector["reply_plaintexts"]]
    frames = [writer.frame(p, final=i == len(plain) - 1) for i, p in enumerate(plain)]
    assert [f.hex() for f in frames] == vector["reply_frames"]
