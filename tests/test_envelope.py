"""Sealed envelope v1: round trips, and every tampering the protocol promises to detect."""

from __future__ import annotations

import dataclasses

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from sovra import envelope as env
from sovra.suites import (
    DEFAULT_SUITE,
    KEM_X25519,
    KeyPair,
    UnknownSuite,
    decode_public_key,
    suite_for_kem,
)


def make_header(
    signing_key: ed25519.Ed25519PrivateKey, recipients: tuple[env.Recipient, ...], **kw: object
) -> env.Header:
    fields: dict[str, object] = {
        "suite": DEFAULT_SUITE,
        "request_id": env.new_request_id(),
        "tenant": "demo",
        "app": "demo-app",
        "model": "m",
        "operation": "chat",
        "stream": False,
        "labels": ("internal",),
        "constraints": env.Constraints(regions=("cn-north-1",), allow_simulated=True),
        "policy_id": "config:abc",
        "issued_at_ms": 1_000,
        "expires_at_ms": 61_000,
        "recipients": recipients,
        "edge_key": signing_key.public_key().public_bytes_raw(),
    }
    fields.update(kw)
    return env.Header(**fields)  # type: ignore[arg-type]


@pytest.fixture
def sealed() -> tuple[bytes, env.RequestSecrets, list[KeyPair], tuple[env.Recipient, ...]]:
    sk = ed25519.Ed25519PrivateKey.generate()
    keys = [KeyPair.generate() for _ in range(3)]
    recipients = tuple(env.Recipient(f"enclave-{i}", 7) for i in range(3))
    header = make_header(sk, recipients)
    data, secrets = env.seal_request(
        header, b"secret payload", [(r, k.public_bytes) for r, k in zip(recipients, keys)], sk
    )
    return data, secrets, keys, recipients


def test_each_candidate_opens_the_same_payload(sealed) -> None:
    data, secrets, keys, recipients = sealed
    parsed = env.Envelope.decode(data)
    parsed.verify()
    for recipient, key in zip(recipients, keys):
        payload, reply_keys = parsed.open(recipient, key.private_key)
        assert payload == b"secret payload"
        frame = env.ReplyWriter(reply_keys).frame(b"answer", final=True)
        reader = env.ReplyReader(secrets.reply_keys)
        assert reader.open(frame) == b"answer"
        reader.finish()


def test_payload_is_not_in_the_envelope_bytes(sealed) -> None:
    data, *_ = sealed
    assert b"secret payload" not in data


def test_x25519_suite_round_trip() -> None:
    sk = ed25519.Ed25519PrivateKey.generate()
    kp = KeyPair.generate(KEM_X25519)
    rcpt = (env.Recipient("e", 1),)
    header = make_header(sk, rcpt, suite=suite_for_kem(KEM_X25519).name)
    data, _ = env.seal_request(header, b"x", [(rcpt[0], kp.public_bytes)], sk)
    parsed = env.Envelope.decode(data)
    assert parsed.open(rcpt[0], kp.private_key)[0] == b"x"


def test_downgrading_the_suite_breaks_the_signature(sealed) -> None:
    data, _, keys, recipients = sealed
    parsed = env.Envelope.decode(data)
    downgraded = dataclasses.replace(parsed.header, suite=suite_for_kem(KEM_X25519).name)
    forged = dataclasses.replace(parsed, header=downgraded, header_bytes=downgraded.encode())
    with pytest.raises(env.BadSignature):
        env.Envelope.decode(forged.encode()).verify()


@pytest.mark.parametrize("field", ["model", "tenant", "app", "policy_id"])
def test_header_field_change_is_detected(sealed, field: str) -> None:
    data, *_ = sealed
    parsed = env.Envelope.decode(data)
    changed = dataclasses.replace(parsed.header, **{field: "evil"})
    forged = dataclasses.replace(parsed, header=changed, header_bytes=changed.encode())
    with pytest.raises(env.BadSignature):
        env.Envelope.decode(forged.encode()).verify()


def test_changed_header_under_valid_signature_fails_decryption(sealed) -> None:
    """Even a broker that could re-sign could not reuse the payload under a new header."""
    data, _, keys, recipients = sealed
    parsed = env.Envelope.decode(data)
    changed = dataclasses.replace(parsed.header, expires_at_ms=parsed.header.expires_at_ms + 1)
    forged = dataclasses.replace(parsed, header=changed, header_bytes=changed.encode())
    with pytest.raises(env.DecryptionFailed):
        forged.open(recipients[0], keys[0].private_key)


def test_flipped_ciphertext_byte_is_detected(sealed) -> None:
    data, _, keys, recipients = sealed
    parsed = env.Envelope.decode(data)
    flipped = bytes([parsed.ciphertext[0] ^ 1]) + parsed.ciphertext[1:]
    forged = dataclasses.replace(parsed, ciphertext=flipped)
    with pytest.raises(env.BadSignature):
        forged.verify()
    with pytest.raises(env.DecryptionFailed):
        forged.open(recipients[0], keys[0].private_key)


def test_wrong_key_and_non_recipient(sealed) -> None:
    data, _, keys, recipients = sealed
    parsed = env.Envelope.decode(data)
    with pytest.raises(env.DecryptionFailed):
        parsed.open(recipients[0], keys[1].private_key)
    with pytest.raises(env.NotARecipient):
        parsed.open(env.Recipient("enclave-9", 7), keys[0].private_key)
    with pytest.raises(env.NotARecipient):
        parsed.open(env.Recipient("enclave-0", 8), keys[0].private_key)


def test_wrapped_keys_swapped_between_recipients_fail(sealed) -> None:
    data, _, keys, recipients = sealed
    parsed = env.Envelope.decode(data)
    w = parsed.wrapped_keys
    swapped = (
        env.WrappedKey(w[0].recipient, w[1].blob),
        env.WrappedKey(w[1].recipient, w[0].blob),
        w[2],
    )
    forged = dataclasses.replace(parsed, wrapped_keys=swapped)
    with pytest.raises(env.DecryptionFailed):
        forged.open(recipients[0], keys[0].private_key)


@pytest.mark.parametrize("cut", [0, 1, 10, 100, -1])
def test_truncated_envelope_is_malformed(sealed, cut: int) -> None:
    data, *_ = sealed
    with pytest.raises(env.MalformedEnvelope):
        env.Envelope.decode(data[:cut])


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x00", b"garbage", cbor2.dumps([]), cbor2.dumps(["sovra-env/1", 1, 2, 3, 4, 5]),
     cbor2.dumps({"a": 1}), b"\xff" * 64],
)  # fmt: skip
def test_garbage_is_malformed(blob: bytes) -> None:
    with pytest.raises(env.MalformedEnvelope):
        env.Envelope.decode(blob)


def test_non_canonical_header_is_refused(sealed) -> None:
    data, *_ = sealed
    obj = cbor2.loads(data)
    header = cbor2.loads(obj[1])
    reordered = dict(reversed(list(header.items())))
    obj[1] = cbor2.dumps(reordered, canonical=False)  # insertion order, not canonical
    assert obj[1] != cbor2.dumps(header, canonical=True)
    with pytest.raises(env.MalformedEnvelope, match="canonical"):
        env.Envelope.decode(cbor2.dumps(obj))


def test_extra_header_field_is_refused(sealed) -> None:
    data, *_ = sealed
    obj = cbor2.loads(data)
    header = cbor2.loads(obj[1])
    header["extra"] = 1
    obj[1] = cbor2.dumps(header, canonical=True)
    with pytest.raises(env.MalformedEnvelope, match="unexpected"):
        env.Envelope.decode(cbor2.dumps(obj))


def test_unknown_suite_is_refused(sealed) -> None:
    data, *_ = sealed
    obj = cbor2.loads(data)
    header = cbor2.loads(obj[1])
    header["suite"] = "RSA/SHA1/DES"
    obj[1] = cbor2.dumps(header, canonical=True)
    with pytest.raises(UnknownSuite):
        env.Envelope.decode(cbor2.dumps(obj))


def test_wrapped_keys_must_match_recipients(sealed) -> None:
    data, *_ = sealed
    obj = cbor2.loads(data)
    obj[3] = obj[3][:2]
    with pytest.raises(env.MalformedEnvelope, match="recipients"):
        env.Envelope.decode(cbor2.dumps(obj))


def test_oversized_envelope_is_refused() -> None:
    with pytest.raises(env.MalformedEnvelope, match="limit"):
        env.Envelope.decode(b"\x00" * (env.MAX_ENVELOPE_BYTES + 1))


def test_seal_refuses_mismatched_keys() -> None:
    sk = ed25519.Ed25519PrivateKey.generate()
    kp = KeyPair.generate()
    rcpt = (env.Recipient("e", 1),)
    header = make_header(sk, rcpt)
    with pytest.raises(ValueError, match="match the header"):
        env.seal_request(header, b"x", [(env.Recipient("other", 1), kp.public_bytes)], sk)
    with pytest.raises(ValueError, match="signing key"):
        env.seal_request(header, b"x", [(rcpt[0], kp.public_bytes)],
                         ed25519.Ed25519PrivateKey.generate())  # fmt: skip


def test_seal_takes_keys_parsed_once_but_never_under_another_kem() -> None:
    """The edge parses a verified key once (trusted set) and seals with the parsed key; the
    envelope is the same to the enclave, and a parsed key of another KEM is refused."""
    sk = ed25519.Ed25519PrivateKey.generate()
    hybrid, classic = KeyPair.generate(), KeyPair.generate(KEM_X25519)
    rcpt = (env.Recipient("e", 1),)
    header = make_header(sk, rcpt)
    parsed = decode_public_key(hybrid.kem, hybrid.public_bytes)
    data, _ = env.seal_request(header, b"x", [(rcpt[0], parsed)], sk)
    assert env.Envelope.decode(data).open(rcpt[0], hybrid.private_key)[0] == b"x"
    wrong = decode_public_key(classic.kem, classic.public_bytes)
    with pytest.raises(ValueError, match="not a MLKEM768-X25519 key"):
        env.seal_request(header, b"x", [(rcpt[0], wrong)], sk)
    x25519_header = make_header(sk, rcpt, suite=suite_for_kem(KEM_X25519).name)
    with pytest.raises(ValueError, match="not a X25519 key"):
        env.seal_request(x25519_header, b"x", [(rcpt[0], parsed)], sk)


# --- replies ---------------------------------------------------------------------------------


def _reply_pair(sealed) -> tuple[env.ReplyWriter, env.ReplyReader]:
    data, secrets, keys, recipients = sealed
    _, reply_keys = env.Envelope.decode(data).open(recipients[0], keys[0].private_key)
    return env.ReplyWriter(reply_keys), env.ReplyReader(secrets.reply_keys)


def test_stream_in_order(sealed) -> None:
    writer, reader = _reply_pair(sealed)
    frames = [writer.frame(b"a"), writer.frame(b"b"), writer.frame(b"", final=True)]
    assert [reader.open(f) for f in frames] == [b"a", b"b", b""]
    reader.finish()


def test_stream_reordered_is_detected(sealed) -> None:
    writer, reader = _reply_pair(sealed)
    first, second = writer.frame(b"a"), writer.frame(b"b")
    with pytest.raises(env.StreamViolation):
        reader.open(second)
    del first


def test_stream_truncated_is_detected(sealed) -> None:
    writer, reader = _reply_pair(sealed)
    reader.open(writer.frame(b"a"))
    with pytest.raises(env.StreamViolation, match="end marker"):
        reader.finish()


def test_forged_end_marker_is_detected(sealed) -> None:
    writer, reader = _reply_pair(sealed)
    seq, _final, ct = cbor2.loads(writer.frame(b"a"))
    with pytest.raises(env.DecryptionFailed):
        reader.open(cbor2.dumps([seq, True, ct]))


def test_frame_after_end_is_refused(sealed) -> None:
    writer, reader = _reply_pair(sealed)
    reader.open(writer.frame(b"a", final=True))
    with pytest.raises(env.StreamViolation, match="after the end"):
        reader.open(writer.frame(b"b"))


def test_flipped_frame_byte_is_detected(sealed) -> None:
    writer, reader = _reply_pair(sealed)
    frame = bytearray(writer.frame(b"hello", final=True))
    frame[-1] ^= 1
    with pytest.raises(env.DecryptionFailed):
        reader.open(bytes(frame))


def test_frame_from_another_request_is_refused(sealed) -> None:
    """Splicing: a reply to request A never opens as a reply to request B."""
    _writer, reader = _reply_pair(sealed)
    other = env.ReplyKeys.derive(b"\x01" * 32, env.new_request_id())
    with pytest.raises(env.DecryptionFailed):
        reader.open(env.ReplyWriter(other).frame(b"x", final=True))


def test_malformed_frames(sealed) -> None:
    _writer, reader = _reply_pair(sealed)
    for blob in (b"", b"\x00", cbor2.dumps([0, True]), cbor2.dumps(["0", True, b""])):
        with pytest.raises(env.MalformedEnvelope):
            reader.open(blob)


def test_altered_wrapped_key_breaks_the_signature(sealed) -> None:
    """A broker that flips a wrapped key is refused before the enclave spends the request id."""
    data, *_ = sealed
    parsed = env.Envelope.decode(data)
    w = parsed.wrapped_keys
    blob = bytes([w[1].blob[0] ^ 1]) + w[1].blob[1:]
    forged = dataclasses.replace(
        parsed, wrapped_keys=(w[0], env.WrappedKey(w[1].recipient, blob), w[2])
    )
    with pytest.raises(env.BadSignature):
        env.Envelope.decode(forged.encode()).verify()
