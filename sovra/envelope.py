"""Sealed envelope v1: the only form in which a request leaves the edge (docs/protocol.md).

Rules this module enforces (read these before changing anything here):

1. One fresh 256-bit data key (DEK) per request. The payload is AES-256-GCM under the DEK with the
   canonical header bytes as associated data, so the header cannot change without detection.
2. The DEK is HPKE-wrapped (RFC 9180) to each candidate enclave key named in the header, with the
   header digest in HPKE ``info``: a wrapped key cannot be moved to another header.
3. The edge signs (Ed25519) the digests of the header, the wrapped keys and the payload. The suite
   is a header field, so a downgrade changes the signed bytes; a broker that alters a wrapped key
   is refused before the enclave spends the request id on it.
4. Headers are canonical CBOR (RFC 8949 deterministic encoding). A decoder re-encodes what it
   parsed and refuses bytes that differ, so there is exactly one valid encoding of each header.
5. Replies are sealed under keys derived from the DEK and the request id; frames carry a sequence
   number and an end marker in their associated data, so truncation, reordering, splicing and
   replies to another request are detected.

Every failure raises a subclass of :class:`EnvelopeError` whose message says what is wrong and
never contains payload bytes or key material.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sovra import suites

ENVELOPE_MAGIC: Final = "sovra-env/1"
HEADER_VERSION: Final = 1
#: Operations served by ``EnclaveService`` (inference).
INFERENCE_OPERATIONS: Final = ("chat", "embeddings")
#: Operations served by ``EnclaveTraining`` (docs/training.md): a job envelope, a scoring request.
TRAINING_OPERATIONS: Final = ("train", "score")
OPERATIONS: Final = INFERENCE_OPERATIONS + TRAINING_OPERATIONS
MAX_ENVELOPE_BYTES: Final = 16 * 1024 * 1024
MAX_RECIPIENTS: Final = 8
MAX_FRAME_BYTES: Final = 4 * 1024 * 1024

_SIG_CONTEXT: Final = b"sovra/v1 request signature\x00"
_DEK_INFO: Final = b"sovra/v1 dek\x00"
_REPLY_INFO: Final = b"sovra/v1 reply"
_REPLY_AAD: Final = b"sovra/v1 reply frame\x00"
_NONCE_LEN: Final = 12
_DEK_LEN: Final = 32


class EnvelopeError(Exception):
    """Base of every envelope failure."""


class MalformedEnvelope(EnvelopeError):
    """Bytes that are not a well-formed v1 envelope, header or frame."""


class BadSignature(EnvelopeError):
    """The edge signature does not verify over this header and payload."""


class NotARecipient(EnvelopeError):
    """The envelope carries no data key for this enclave key."""


class DecryptionFailed(EnvelopeError):
    """A wrapped key, payload or reply frame failed authenticated decryption."""


class StreamViolation(EnvelopeError):
    """Reply frames out of order, after the end marker, or missing the end marker."""


@dataclass(frozen=True)
class Recipient:
    enclave_id: str
    epoch: int


@dataclass(frozen=True)
class Constraints:
    """Obligations the enclave checks against its own attested identity before opening."""

    regions: tuple[str, ...] = ()
    tee_types: tuple[str, ...] = ()
    measurements: tuple[str, ...] = ()  # lowercase hex; empty = any the edge verified
    allow_simulated: bool = False

    def to_cbor(self) -> dict[str, Any]:
        return {
            "regions": list(self.regions),
            "tee": list(self.tee_types),
            "meas": list(self.measurements),
            "sim": self.allow_simulated,
        }

    @classmethod
    def from_cbor(cls, obj: Any) -> Constraints:
        m = _expect_map(obj, "constraints", {"regions", "tee", "meas", "sim"})
        return cls(
            regions=_str_tuple(m["regions"], "constraints.regions"),
            tee_types=_str_tuple(m["tee"], "constraints.tee"),
            measurements=_str_tuple(m["meas"], "constraints.meas"),
            allow_simulated=_expect(m["sim"], bool, "constraints.sim"),
        )


@dataclass(frozen=True)
class Header:
    """Signed, unencrypted request metadata. The broker reads it to route; it holds no payload."""

    suite: str
    request_id: bytes
    tenant: str
    app: str
    model: str
    operation: str
    stream: bool
    labels: tuple[str, ...]
    constraints: Constraints
    policy_id: str
    issued_at_ms: int
    expires_at_ms: int
    recipients: tuple[Recipient, ...]
    edge_key: bytes
    version: int = HEADER_VERSION

    def encode(self) -> bytes:
        return cbor2.dumps(
            {
                "v": self.version,
                "suite": self.suite,
                "rid": self.request_id,
                "tenant": self.tenant,
                "app": self.app,
                "model": self.model,
                "op": self.operation,
                "stream": self.stream,
                "labels": list(self.labels),
                "cons": self.constraints.to_cbor(),
                "policy": self.policy_id,
                "iat": self.issued_at_ms,
                "exp": self.expires_at_ms,
                "rcpt": [[r.enclave_id, r.epoch] for r in self.recipients],
                "ek": self.edge_key,
            },
            canonical=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> Header:
        obj = _loads(data, "header")
        m = _expect_map(obj, "header", _HEADER_KEYS)
        if m["v"] != HEADER_VERSION:
            raise MalformedEnvelope(f"header version {m['v']!r} is not supported (expected 1)")
        header = cls(
            suite=_expect(m["suite"], str, "suite"),
            request_id=_expect_len(m["rid"], 16, "rid"),
            tenant=_expect(m["tenant"], str, "tenant"),
            app=_expect(m["app"], str, "app"),
            model=_expect(m["model"], str, "model"),
            operation=_expect(m["op"], str, "op"),
            stream=_expect(m["stream"], bool, "stream"),
            labels=_str_tuple(m["labels"], "labels"),
            constraints=Constraints.from_cbor(m["cons"]),
            policy_id=_expect(m["policy"], str, "policy"),
            issued_at_ms=_expect(m["iat"], int, "iat"),
            expires_at_ms=_expect(m["exp"], int, "exp"),
            recipients=_recipients(m["rcpt"]),
            edge_key=_expect_len(m["ek"], 32, "ek"),
        )
        header.validate()
        if header.encode() != data:
            raise MalformedEnvelope("header is not in canonical CBOR encoding")
        return header

    def validate(self) -> None:
        suites.suite_by_name(self.suite)  # raises UnknownSuite (a ValueError) with the reason
        if self.operation not in OPERATIONS:
            raise MalformedEnvelope(f"operation {self.operation!r} is not one of {OPERATIONS}")
        if not 1 <= len(self.recipients) <= MAX_RECIPIENTS:
            raise MalformedEnvelope(f"header must name 1 to {MAX_RECIPIENTS} recipients")
        if len(set(self.recipients)) != len(self.recipients):
            raise MalformedEnvelope("header names the same recipient key twice")
        if self.expires_at_ms <= self.issued_at_ms:
            raise MalformedEnvelope("header expiry is not after its issue time")

    @property
    def request_id_hex(self) -> str:
        return self.request_id.hex()


_HEADER_KEYS: Final = frozenset(
    {"v", "suite", "rid", "tenant", "app", "model", "op", "stream", "labels", "cons", "policy",
     "iat", "exp", "rcpt", "ek"}
)  # fmt: skip


@dataclass(frozen=True)
class WrappedKey:
    recipient: Recipient
    blob: bytes  # HPKE enc || ciphertext of the DEK


@dataclass(frozen=True)
class Envelope:
    """A parsed envelope whose structure is valid; the signature is checked by ``verify``."""

    header: Header
    header_bytes: bytes
    signature: bytes
    wrapped_keys: tuple[WrappedKey, ...]
    nonce: bytes
    ciphertext: bytes

    def encode(self) -> bytes:
        return cbor2.dumps(
            [
                ENVELOPE_MAGIC,
                self.header_bytes,
                self.signature,
                _wrapped_list(self.wrapped_keys),
                self.nonce,
                self.ciphertext,
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        if len(data) > MAX_ENVELOPE_BYTES:
            raise MalformedEnvelope(
                f"envelope is {len(data)} bytes, larger than the {MAX_ENVELOPE_BYTES} byte limit"
            )
        obj = _loads(data, "envelope")
        if not isinstance(obj, list) or len(obj) != 6 or obj[0] != ENVELOPE_MAGIC:
            raise MalformedEnvelope(f"not a {ENVELOPE_MAGIC} envelope (expected a 6-item array)")
        header_bytes = _expect(obj[1], bytes, "header")
        header = Header.decode(header_bytes)
        wrapped = tuple(_wrapped_key(w) for w in _expect(obj[3], list, "wrapped keys"))
        if tuple(w.recipient for w in wrapped) != header.recipients:
            raise MalformedEnvelope("wrapped keys do not match the recipients the header names")
        return cls(
            header=header,
            header_bytes=header_bytes,
            signature=_expect_len(obj[2], 64, "signature"),
            wrapped_keys=wrapped,
            nonce=_expect_len(obj[4], _NONCE_LEN, "nonce"),
            ciphertext=_expect(obj[5], bytes, "ciphertext"),
        )

    def verify(self) -> None:
        """Check the edge signature with the key the header names; BadSignature if it fails."""
        key = ed25519.Ed25519PublicKey.from_public_bytes(self.header.edge_key)
        try:
            key.verify(
                self.signature,
                _to_be_signed(self.header_bytes, self.wrapped_keys, self.nonce, self.ciphertext),
            )
        except InvalidSignature:
            raise BadSignature("edge signature does not verify over header and payload") from None

    def open(self, recipient: Recipient, key: suites.HPKEPrivateKey) -> tuple[bytes, ReplyKeys]:
        """Unwrap the DEK for ``recipient`` and decrypt the payload. Call ``verify`` first."""
        wrapped = next((w for w in self.wrapped_keys if w.recipient == recipient), None)
        if wrapped is None:
            raise NotARecipient(
                f"envelope has no key for enclave {recipient.enclave_id!r} epoch {recipient.epoch}"
            )
        suite = suites.suite_by_name(self.header.suite)
        try:
            dek = suite.hpke().decrypt(wrapped.blob, key, info=_dek_info(self.header_bytes))
        except (InvalidTag, ValueError):
            raise DecryptionFailed("wrapped data key does not open with this enclave key") from None
        try:
            payload = AESGCM(dek).decrypt(self.nonce, self.ciphertext, self.header_bytes)
        except InvalidTag:
            raise DecryptionFailed("payload failed authentication under its header") from None
        return payload, ReplyKeys.derive(dek, self.header.request_id)


@dataclass(frozen=True, eq=False)
class RequestSecrets:
    """What the edge keeps in memory to open the reply: never leaves the process."""

    request_id: bytes
    reply_keys: ReplyKeys = field(repr=False)


def seal_request(
    header: Header,
    payload: bytes,
    recipient_keys: Sequence[tuple[Recipient, bytes | suites.HPKEPublicKey]],
    signing_key: ed25519.Ed25519PrivateKey,
) -> tuple[bytes, RequestSecrets]:
    """Seal ``payload`` for each verified recipient key; returns envelope bytes and secrets.

    ``recipient_keys`` pairs each recipient with its wire public key (or that key already
    parsed by ``suites.decode_public_key``, which must be of the suite's KEM), in header order.
    The caller must pass only keys it verified itself (edge trusted set).
    """
    header.validate()
    if tuple(r for r, _ in recipient_keys) != header.recipients:
        raise ValueError("recipient keys must match the header's recipients, in order")
    if header.edge_key != signing_key.public_key().public_bytes_raw():
        raise ValueError("header edge_key is not the public half of the signing key")
    suite = suites.suite_by_name(header.suite)
    header_bytes = header.encode()
    dek = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(_NONCE_LEN)
    ciphertext = AESGCM(dek).encrypt(nonce, payload, header_bytes)
    info = _dek_info(header_bytes)
    wrapped = tuple(
        WrappedKey(
            recipient,
            suite.hpke().encrypt(dek, _public_key(suite.kem, pub), info=info),
        )
        for recipient, pub in recipient_keys
    )
    signature = signing_key.sign(_to_be_signed(header_bytes, wrapped, nonce, ciphertext))
    envelope = Envelope(header, header_bytes, signature, wrapped, nonce, ciphertext)
    return envelope.encode(), RequestSecrets(
        header.request_id, ReplyKeys.derive(dek, header.request_id)
    )


def _public_key(kem: str, key: bytes | suites.HPKEPublicKey) -> suites.HPKEPublicKey:
    if isinstance(key, bytes):
        return suites.decode_public_key(kem, key)
    return suites.check_public_key(kem, key)


@dataclass(frozen=True, eq=False)
class ReplyKeys:
    """AEAD key and base nonce for the replies to one request, derived from its DEK."""

    request_id: bytes
    key: bytes = field(repr=False)
    base_nonce: bytes = field(repr=False)

    @classmethod
    def derive(cls, dek: bytes, request_id: bytes) -> ReplyKeys:
        okm = HKDF(
            algorithm=hashes.SHA256(), length=_DEK_LEN + _NONCE_LEN, salt=request_id,
            info=_REPLY_INFO,
        ).derive(dek)  # fmt: skip
        return cls(request_id, okm[:_DEK_LEN], okm[_DEK_LEN:])

    def _nonce(self, seq: int) -> bytes:
        counter = seq.to_bytes(_NONCE_LEN, "big")
        return bytes(a ^ b for a, b in zip(self.base_nonce, counter, strict=True))

    def _aad(self, seq: int, final: bool) -> bytes:
        return _REPLY_AAD + self.request_id + struct.pack(">QB", seq, int(final))

    def seal_frame(self, seq: int, final: bool, plaintext: bytes) -> bytes:
        ct = AESGCM(self.key).encrypt(self._nonce(seq), plaintext, self._aad(seq, final))
        return cbor2.dumps([seq, final, ct])

    def open_frame(self, frame: bytes, expected_seq: int) -> tuple[bytes, bool]:
        if len(frame) > MAX_FRAME_BYTES:
            raise MalformedEnvelope(f"reply frame larger than {MAX_FRAME_BYTES} bytes")
        obj = _loads(frame, "reply frame")
        if not isinstance(obj, list) or len(obj) != 3:
            raise MalformedEnvelope("reply frame is not a 3-item array")
        seq = _expect(obj[0], int, "frame seq")
        final = _expect(obj[1], bool, "frame end marker")
        ct = _expect(obj[2], bytes, "frame ciphertext")
        if seq != expected_seq:
            raise StreamViolation(f"reply frame {seq} arrived where frame {expected_seq} was due")
        try:
            return AESGCM(self.key).decrypt(self._nonce(seq), ct, self._aad(seq, final)), final
        except InvalidTag:
            raise DecryptionFailed(
                "reply frame failed authentication (tampered, or not a reply to this request)"
            ) from None


class ReplyReader:
    """Opens the reply frames of one request in order and insists on the end marker."""

    def __init__(self, keys: ReplyKeys) -> None:
        self._keys = keys
        self._next = 0
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def open(self, frame: bytes) -> bytes:
        if self._done:
            raise StreamViolation("reply frame after the end marker")
        plaintext, final = self._keys.open_frame(frame, self._next)
        self._next += 1
        self._done = final
        return plaintext

    def finish(self) -> None:
        if not self._done:
            raise StreamViolation(
                f"reply stream ended after {self._next} frames without end marker"
            )


class ReplyWriter:
    """Seals the reply frames of one request, numbering them from zero."""

    def __init__(self, keys: ReplyKeys) -> None:
        self._keys = keys
        self._next = 0

    def frame(self, plaintext: bytes, *, final: bool = False) -> bytes:
        frame = self._keys.seal_frame(self._next, final, plaintext)
        self._next += 1
        return frame


def new_request_id() -> bytes:
    return os.urandom(16)


def _to_be_signed(
    header_bytes: bytes, wrapped: Sequence[WrappedKey], nonce: bytes, ciphertext: bytes
) -> bytes:
    return (
        _SIG_CONTEXT
        + hashlib.sha256(header_bytes).digest()
        + hashlib.sha256(cbor2.dumps(_wrapped_list(wrapped))).digest()
        + hashlib.sha256(nonce + ciphertext).digest()
    )


def _wrapped_list(wrapped: Sequence[WrappedKey]) -> list[list[Any]]:
    return [[w.recipient.enclave_id, w.recipient.epoch, w.blob] for w in wrapped]


def _dek_info(header_bytes: bytes) -> bytes:
    return _DEK_INFO + hashlib.sha256(header_bytes).digest()


def _loads(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise MalformedEnvelope(f"{what} is not valid CBOR") from None


def _expect(value: Any, kind: type, what: str) -> Any:
    # bool is an int subclass in Python; keep the two apart so true is never read as 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedEnvelope(f"{what} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _expect_len(value: Any, length: int, what: str) -> bytes:
    data: bytes = _expect(value, bytes, what)
    if len(data) != length:
        raise MalformedEnvelope(f"{what} must be {length} bytes, got {len(data)}")
    return data


def _expect_map(value: Any, what: str, keys: frozenset[str] | set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedEnvelope(f"{what} must be a map")
    if set(value) != set(keys):
        missing = sorted(set(keys) - set(value))
        extra = sorted(str(k) for k in set(value) - set(keys))
        raise MalformedEnvelope(f"{what} fields wrong: missing {missing}, unexpected {extra}")
    return value


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    items = _expect(value, list, what)
    return tuple(_expect(v, str, what) for v in items)


def _recipients(value: Any) -> tuple[Recipient, ...]:
    out = []
    for item in _expect(value, list, "rcpt"):
        if not isinstance(item, list) or len(item) != 2:
            raise MalformedEnvelope("each recipient must be [enclave_id, epoch]")
        out.append(Recipient(_expect(item[0], str, "rcpt id"), _expect(item[1], int, "rcpt epoch")))
    return tuple(out)


def _wrapped_key(value: Any) -> WrappedKey:
    if not isinstance(value, list) or len(value) != 3:
        raise MalformedEnvelope("each wrapped key must be [enclave_id, epoch, blob]")
    recipient = Recipient(_expect(value[0], str, "wrap id"), _expect(value[1], int, "wrap epoch"))
    return WrappedKey(recipient, _expect(value[2], bytes, "wrapped key"))
