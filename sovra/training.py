"""Confidential training wire contract: job spec, sealed chunks, authenticated acks, result
frames and signed training receipts (docs/training.md).

A training job travels as:

1. one *job envelope*: a sealed envelope v1 (``sovra.envelope``) with ``op = "train"`` whose
   payload is the canonical CBOR :class:`JobSpec`. It carries a random 256-bit *job key*,
   HPKE-wrapped (through the envelope's DEK) to the one enclave key the edge verified;
2. *chunks*: the transformed dataset cut into pieces, each AES-256-GCM under a key derived from
   the job key, with the job id, the chunk index and the end marker in the associated data, so
   a chunk cannot be moved to another job or position, duplicated silently, or the stream cut;
3. *acks* and *status*, MAC'd by the enclave with a key derived from the job key, so the broker
   cannot make the edge drop a chunk the enclave never stored;
4. *result frames*, sealed like envelope v1 replies under a key derived from the job key: the
   signed receipt, the artifact key, then the model artifact (encrypted under the artifact key).

Everything here is pure: no I/O, no clocks. Every failure raises a :class:`TrainingWireError`
subclass whose message never quotes payload bytes or key material.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Final

import cbor2
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sovra.envelope import ReplyKeys

JOB_ID_LEN: Final = 16
JOB_KEY_LEN: Final = 32
NONCE_LEN: Final = 12
CHUNK_MAGIC: Final = "sovra-chunk/1"
SPEC_VERSION: Final = 1
RECEIPT_VERSION: Final = 1
RECEIPT_TYPE: Final = "sovra-training-receipt"
DEFAULT_CHUNK_BYTES: Final = 4 * 1024 * 1024
MIN_CHUNK_BYTES: Final = 4 * 1024
MAX_CHUNK_BYTES: Final = 8 * 1024 * 1024
#: A sealed chunk is its plaintext plus at most this much framing (CBOR, ids, nonce, GCM tag).
CHUNK_OVERHEAD: Final = 128
#: Artifact ciphertext travels in result frames of at most this many bytes.
ARTIFACT_SLICE_BYTES: Final = 1024 * 1024

ALGORITHMS: Final = ("logistic_regression", "gradient_boosting", "text_embedding_classifier")
TASKS: Final = ("classification", "regression")
JOB_STATES: Final = ("queued", "uploading", "training", "completed", "failed", "cancelled")
TERMINAL_STATES: Final = ("completed", "failed", "cancelled")
#: What an enclave reports about a job (its own view; the edge keeps the full state machine).
ENCLAVE_STATES: Final = ("receiving", "training", "completed", "failed", "cancelled")

_CHUNK_INFO: Final = b"sovra/v1 training chunk"
_CONTROL_INFO: Final = b"sovra/v1 training control"
_RESULT_INFO: Final = b"sovra/v1 training result"
_CHUNK_AAD: Final = b"sovra/v1 training chunk\x00"
_ACK_CTX: Final = b"sovra/v1 training ack\x00"
_STATUS_CTX: Final = b"sovra/v1 training status\x00"
_CLOSE_CTX: Final = b"sovra/v1 training close\x00"
_RECEIPT_CTX: Final = b"sovra/v1 training receipt\x00"
_ARTIFACT_AAD: Final = b"sovra/v1 model artifact\x00"


class TrainingWireError(Exception):
    """Base of every training wire-format failure."""


class MalformedMessage(TrainingWireError):
    """Bytes that are not a well-formed chunk, spec, result frame or receipt."""


class ChunkRejected(TrainingWireError):
    """A chunk that does not authenticate for this job and position (tampered or foreign)."""


class BadProof(TrainingWireError):
    """An ack, status or close MAC that does not verify under this job's control key."""


class ReceiptInvalid(TrainingWireError):
    """A training receipt whose signature, encoding or binding does not verify."""


def new_job_id() -> bytes:
    return os.urandom(JOB_ID_LEN)


def new_job_key() -> bytes:
    return os.urandom(JOB_KEY_LEN)


def job_id_hex(job_id: bytes) -> str:
    return job_id.hex()


def parse_job_id(text: str) -> bytes:
    """``job-<32 hex>`` or ``<32 hex>`` → 16 bytes; ValueError otherwise."""
    raw = text.removeprefix("job-")
    try:
        job_id = bytes.fromhex(raw)
    except ValueError:
        raise ValueError(f"{text[:48]!r} is not a job id (job-<32 hex digits>)") from None
    if len(job_id) != JOB_ID_LEN:
        raise ValueError(f"{text[:48]!r} is not a job id (job-<32 hex digits>)")
    return job_id


def model_id(job_id: bytes) -> str:
    """The name under which a trained model is listed (``/v1/models``)."""
    return "job-" + job_id.hex()


# -- keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class JobKeys:
    """Everything derived from one job key. Held by the edge and the enclave that opened the job."""

    job_id: bytes
    chunk_key: bytes = field(repr=False)
    control_key: bytes = field(repr=False)
    result: ReplyKeys = field(repr=False)

    @classmethod
    def derive(cls, job_id: bytes, job_key: bytes) -> JobKeys:
        if len(job_id) != JOB_ID_LEN or len(job_key) != JOB_KEY_LEN:
            raise ValueError("job id must be 16 bytes and job key 32 bytes")
        chunk = _hkdf(job_key, job_id, _CHUNK_INFO, 32)
        control = _hkdf(job_key, job_id, _CONTROL_INFO, 32)
        okm = _hkdf(job_key, job_id, _RESULT_INFO, 32 + NONCE_LEN)
        return cls(job_id, chunk, control, ReplyKeys(job_id, okm[:32], okm[32:]))

    # chunks

    def seal_chunk(self, index: int, final: bool, plaintext: bytes) -> bytes:
        return b"".join(self.seal_chunk_parts(index, final, plaintext))

    def seal_chunk_parts(self, index: int, final: bool, plaintext: bytes) -> tuple[bytes, bytes]:
        """:meth:`seal_chunk` as (CBOR head, ciphertext), whose concatenation is the sealed
        chunk: a writer can write both without joining them (a 4 MiB copy less)."""
        nonce = os.urandom(NONCE_LEN)
        ct = AESGCM(self.chunk_key).encrypt(nonce, plaintext, _chunk_aad(self.job_id, index, final))
        return _chunk_head(self.job_id, index, final, nonce, len(ct)), ct

    def open_chunk(self, chunk: bytes | memoryview | ChunkHeader) -> tuple[int, bool, bytes]:
        """(index, final, plaintext); ChunkRejected if it is not this job's or was altered."""
        header = chunk if isinstance(chunk, ChunkHeader) else parse_chunk(chunk)
        if header.job_id != self.job_id:
            raise ChunkRejected("chunk belongs to another job")
        try:
            plaintext = AESGCM(self.chunk_key).decrypt(
                header.nonce, header.ciphertext, _chunk_aad(self.job_id, header.index, header.final)
            )
        except InvalidTag:
            raise ChunkRejected(
                f"chunk {header.index} failed authentication (tampered, or sealed for another "
                "job or position)"
            ) from None
        return header.index, header.final, plaintext

    # control MACs

    def ack_mac(self, next_chunk: int, complete: bool) -> bytes:
        return self._mac(_ACK_CTX + self.job_id + struct.pack(">QB", next_chunk, int(complete)))

    def check_ack(self, next_chunk: int, complete: bool, mac: bytes) -> None:
        if not hmac.compare_digest(self.ack_mac(next_chunk, complete), mac):
            raise BadProof("chunk acknowledgement does not verify (not from the job's enclave)")

    def status_mac(self, state: str, next_chunk: int) -> bytes:
        s = state.encode()
        return self._mac(
            _STATUS_CTX + self.job_id + bytes([len(s)]) + s + struct.pack(">Q", next_chunk)
        )

    def check_status(self, state: str, next_chunk: int, mac: bytes) -> None:
        if not hmac.compare_digest(self.status_mac(state, next_chunk), mac):
            raise BadProof("job status does not verify (not from the job's enclave)")

    def close_proof(self, cancel: bool) -> bytes:
        return self._mac(_CLOSE_CTX + self.job_id + bytes([int(cancel)]))

    def check_close(self, cancel: bool, proof: bytes) -> None:
        if not hmac.compare_digest(self.close_proof(cancel), proof):
            raise BadProof("close request does not verify (not from the job's edge)")

    def _mac(self, data: bytes) -> bytes:
        return hmac.new(self.control_key, data, hashlib.sha256).digest()


@dataclass(frozen=True)
class ChunkHeader:
    job_id: bytes
    index: int
    final: bool
    nonce: bytes
    #: A view into the sealed chunk when it was parsed without copying (:func:`parse_chunk`).
    ciphertext: bytes | memoryview = field(repr=False)


def parse_chunk(chunk: bytes | memoryview) -> ChunkHeader:
    """The unauthenticated routing fields of a sealed chunk (structure checks only).

    A chunk laid out as :meth:`JobKeys.seal_chunk` writes it is read in place: the ciphertext
    is a view into ``chunk``, not a copy (a generic CBOR decode copies a 4 MiB chunk in 64 KiB
    pieces). Any other encoding goes through the generic decoder, with the same result."""
    if len(chunk) > MAX_CHUNK_BYTES + CHUNK_OVERHEAD:
        raise MalformedMessage(f"chunk is larger than {MAX_CHUNK_BYTES + CHUNK_OVERHEAD} bytes")
    fast = _parse_chunk_in_place(memoryview(chunk))
    if fast is not None:
        return fast
    obj = _loads(bytes(chunk), "chunk")
    if not isinstance(obj, list) or len(obj) != 6 or obj[0] != CHUNK_MAGIC:
        raise MalformedMessage(f"not a {CHUNK_MAGIC} chunk (expected a 6-item array)")
    return ChunkHeader(
        job_id=_bytes(obj[1], "chunk job id", JOB_ID_LEN),
        index=_uint(obj[2], "chunk index"),
        final=_bool(obj[3], "chunk end marker"),
        nonce=_bytes(obj[4], "chunk nonce", NONCE_LEN),
        ciphertext=_bytes(obj[5], "chunk ciphertext"),
    )


def _chunk_aad(job_id: bytes, index: int, final: bool) -> bytes:
    return _CHUNK_AAD + job_id + struct.pack(">QB", index, int(final))


# The fixed start of a sealed chunk: array(6), text(13) magic, bytes(16) job id header.
_CHUNK_START: Final = b"\x86\x6d" + CHUNK_MAGIC.encode() + b"\x50"
_UINT_FORMS: Final = ((1 << 8, 0x18, ">B"), (1 << 16, 0x19, ">H"), (1 << 32, 0x1A, ">I"))


def _cbor_head(major: int, value: int) -> bytes:
    """The head of a CBOR data item, shortest form (as cbor2 and RFC 8949 deterministic)."""
    if value < 24:
        return bytes([major << 5 | value])
    for limit, info, fmt in _UINT_FORMS:
        if value < limit:
            return bytes([major << 5 | info]) + struct.pack(fmt, value)
    return bytes([major << 5 | 0x1B]) + struct.pack(">Q", value)


def _chunk_head(job_id: bytes, index: int, final: bool, nonce: bytes, ct_len: int) -> bytes:
    """Everything of ``cbor2.dumps([CHUNK_MAGIC, job_id, index, final, nonce, ct])`` before
    ``ct`` itself (the same bytes: tests/test_training.py checks it)."""
    return (
        _CHUNK_START
        + job_id
        + _cbor_head(0, index)
        + (b"\xf5" if final else b"\xf4")
        + _cbor_head(2, len(nonce))
        + nonce
        + _cbor_head(2, ct_len)
    )


def _read_head(view: memoryview, pos: int, major: int) -> tuple[int, int] | None:
    """(argument, position after the head) of a definite-length CBOR head, or None."""
    if pos >= len(view) or view[pos] >> 5 != major:
        return None
    info = view[pos] & 0x1F
    if info < 24:
        return info, pos + 1
    size = {24: 1, 25: 2, 26: 4, 27: 8}.get(info)
    if size is None or pos + 1 + size > len(view):
        return None
    return int.from_bytes(view[pos + 1 : pos + 1 + size], "big"), pos + 1 + size


def _parse_chunk_in_place(view: memoryview) -> ChunkHeader | None:
    """A chunk in the layout ``seal_chunk`` writes, without copying its ciphertext; None for
    anything else (the caller then decodes it generically)."""
    start = len(_CHUNK_START)
    if view[:start] != _CHUNK_START or len(view) < start + JOB_ID_LEN:
        return None
    job_id = bytes(view[start : start + JOB_ID_LEN])
    index = _read_head(view, start + JOB_ID_LEN, 0)
    if index is None or index[1] >= len(view) or view[index[1]] not in (0xF4, 0xF5):
        return None
    final = view[index[1]] == 0xF5
    nonce_head = _read_head(view, index[1] + 1, 2)
    if nonce_head is None or nonce_head[0] != NONCE_LEN:
        return None
    nonce_end = nonce_head[1] + NONCE_LEN
    ct_head = _read_head(view, nonce_end, 2)
    if ct_head is None or ct_head[1] + ct_head[0] != len(view):
        return None
    return ChunkHeader(
        job_id=job_id,
        index=index[0],
        final=final,
        nonce=bytes(view[nonce_head[1] : nonce_end]),
        ciphertext=view[ct_head[1] :],
    )


def chunk_count(total_bytes: int, chunk_bytes: int) -> int:
    """Chunks for ``total_bytes`` of transformed data (an empty dataset is one empty chunk)."""
    return max(1, -(-total_bytes // chunk_bytes))


# -- job spec -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """What the enclave needs to run a job: the payload of the job envelope (canonical CBOR)."""

    job_id: bytes
    job_key: bytes = field(repr=False)
    algorithm: str = "logistic_regression"
    task: str = "classification"
    target: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    chunks: int = 1
    total_bytes: int = 0
    dataset_sha256: bytes = b""
    attestation_sha256: bytes = b""
    text_column: str = ""
    data_format: str = "csv"

    def validate(self) -> None:
        if len(self.job_id) != JOB_ID_LEN or len(self.job_key) != JOB_KEY_LEN:
            raise MalformedMessage("job spec: job id must be 16 bytes and job key 32 bytes")
        if self.algorithm not in ALGORITHMS:
            raise MalformedMessage(
                f"job spec: algorithm {self.algorithm!r} is not one of {ALGORITHMS}"
            )
        if self.task not in TASKS:
            raise MalformedMessage(f"job spec: task {self.task!r} is not one of {TASKS}")
        if not self.target:
            raise MalformedMessage("job spec: target column is empty")
        if self.chunks < 1 or self.total_bytes < 0:
            raise MalformedMessage("job spec: chunk count must be positive")
        if len(self.dataset_sha256) != 32 or len(self.attestation_sha256) != 32:
            raise MalformedMessage("job spec: digests must be 32 bytes")
        if self.data_format != "csv":
            raise MalformedMessage(f"job spec: data format {self.data_format!r} is not 'csv'")

    def encode(self) -> bytes:
        self.validate()
        return cbor2.dumps(
            {
                "v": SPEC_VERSION,
                "job": self.job_id,
                "jk": self.job_key,
                "alg": self.algorithm,
                "task": self.task,
                "target": self.target,
                "params": self.params,
                "chunks": self.chunks,
                "bytes": self.total_bytes,
                "ds": self.dataset_sha256,
                "att": self.attestation_sha256,
                "text": self.text_column,
                "fmt": self.data_format,
            },
            canonical=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> JobSpec:
        obj = _loads(data, "job spec")
        keys = {"v", "job", "jk", "alg", "task", "target", "params", "chunks", "bytes", "ds",
                "att", "text", "fmt"}  # fmt: skip
        m = _map(obj, "job spec", keys)
        if m["v"] != SPEC_VERSION:
            raise MalformedMessage(f"job spec version {m['v']!r} is not supported")
        params = m["params"]
        if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
            raise MalformedMessage("job spec: params must be a map with text keys")
        spec = cls(
            job_id=_bytes(m["job"], "job id", JOB_ID_LEN),
            job_key=_bytes(m["jk"], "job key", JOB_KEY_LEN),
            algorithm=_text(m["alg"], "algorithm"),
            task=_text(m["task"], "task"),
            target=_text(m["target"], "target"),
            params=dict(params),
            chunks=_uint(m["chunks"], "chunks"),
            total_bytes=_uint(m["bytes"], "bytes"),
            dataset_sha256=_bytes(m["ds"], "dataset digest", 32),
            attestation_sha256=_bytes(m["att"], "attestation digest", 32),
            text_column=_text(m["text"], "text column"),
            data_format=_text(m["fmt"], "format"),
        )
        spec.validate()
        return spec


# -- result frames ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultHead:
    """Frame 0 of a successful result: the signed receipt and what opens the artifact."""

    receipt: bytes
    signature: bytes
    signer: bytes
    artifact_key: bytes = field(repr=False)
    artifact_nonce: bytes = b""
    artifact_len: int = 0
    artifact_sha256: bytes = b""

    def encode(self) -> bytes:
        return cbor2.dumps(
            {
                "kind": "receipt",
                "receipt": self.receipt,
                "sig": self.signature,
                "pub": self.signer,
                "ak": self.artifact_key,
                "an": self.artifact_nonce,
                "alen": self.artifact_len,
                "asha": self.artifact_sha256,
            },
            canonical=True,
        )


def result_frame_kind(plaintext: bytes) -> tuple[str, dict[str, Any]]:
    """Parse one opened result frame: ("receipt" | "artifact" | "end" | "error", fields)."""
    obj = _loads(plaintext, "result frame")
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise MalformedMessage("result frame is not a map with a 'kind'")
    kind = obj["kind"]
    if kind == "receipt":
        m = _map(obj, "result head", {"kind", "receipt", "sig", "pub", "ak", "an", "alen", "asha"})
        head = ResultHead(
            receipt=_bytes(m["receipt"], "receipt"),
            signature=_bytes(m["sig"], "receipt signature", 64),
            signer=_bytes(m["pub"], "receipt signer", 32),
            artifact_key=_bytes(m["ak"], "artifact key", 32),
            artifact_nonce=_bytes(m["an"], "artifact nonce", NONCE_LEN),
            artifact_len=_uint(m["alen"], "artifact length"),
            artifact_sha256=_bytes(m["asha"], "artifact digest", 32),
        )
        return kind, {"head": head}
    if kind == "artifact":
        m = _map(obj, "artifact frame", {"kind", "data"})
        return kind, {"data": _bytes(m["data"], "artifact data")}
    if kind == "end":
        _map(obj, "end frame", {"kind"})
        return kind, {}
    if kind == "error":
        m = _map(obj, "error frame", {"kind", "code", "message"})
        return kind, {"code": _text(m["code"], "code"), "message": _text(m["message"], "message")}
    raise MalformedMessage(f"unknown result frame kind {kind[:32]!r}")


def artifact_frame(data: bytes) -> bytes:
    return cbor2.dumps({"kind": "artifact", "data": data}, canonical=True)


def end_frame() -> bytes:
    return cbor2.dumps({"kind": "end"}, canonical=True)


def error_frame(code: str, message: str) -> bytes:
    return cbor2.dumps({"kind": "error", "code": code, "message": message}, canonical=True)


# -- model artifacts ----------------------------------------------------------------------------


def seal_artifact(job_id: bytes, artifact: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Encrypt a model artifact under a fresh key: (key, nonce, ciphertext, sha256(artifact))."""
    key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(NONCE_LEN)
    digest = hashlib.sha256(artifact).digest()
    ct = AESGCM(key).encrypt(nonce, artifact, _ARTIFACT_AAD + job_id + digest)
    return key, nonce, ct, digest


def open_artifact(
    job_id: bytes, key: bytes, nonce: bytes, ciphertext: bytes, digest: bytes
) -> bytes:
    """Decrypt and check a model artifact; ChunkRejected-style failure if anything differs."""
    try:
        artifact = AESGCM(key).decrypt(nonce, ciphertext, _ARTIFACT_AAD + job_id + digest)
    except (InvalidTag, ValueError):
        raise TrainingWireError("model artifact failed authentication") from None
    if hashlib.sha256(artifact).digest() != digest:
        raise TrainingWireError("model artifact digest does not match")
    return artifact


# -- receipts -----------------------------------------------------------------------------------

RECEIPT_FIELDS: Final = (
    "v", "type", "job", "tenant", "app", "policy", "dataset", "algorithm", "task", "target",
    "params", "measurement", "metrics", "holdout", "attestation", "started_ms", "ended_ms",
    "signer",
)  # fmt: skip
ATTESTATION_FIELDS: Final = (
    "enclave_id", "epoch", "measurement", "tee_type", "simulated", "region", "key_sha256",
    "result_sha256",
)  # fmt: skip


def encode_receipt(receipt: dict[str, Any]) -> bytes:
    if set(receipt) != set(RECEIPT_FIELDS):
        missing = sorted(set(RECEIPT_FIELDS) - set(receipt))
        extra = sorted(set(receipt) - set(RECEIPT_FIELDS))
        raise MalformedMessage(f"receipt fields wrong: missing {missing}, unexpected {extra}")
    return cbor2.dumps(receipt, canonical=True)


def sign_receipt(receipt: dict[str, Any], key: ed25519.Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """(receipt bytes, signature); ``receipt['signer']`` must be the key's public half (hex)."""
    if receipt.get("signer") != key.public_key().public_bytes_raw().hex():
        raise ValueError("receipt 'signer' must be the signing key's public key (hex)")
    data = encode_receipt(receipt)
    return data, key.sign(_RECEIPT_CTX + data)


def verify_receipt(receipt: bytes, signature: bytes, signer: bytes) -> dict[str, Any]:
    """Check encoding, fields, signer and signature; return the receipt map (ReceiptInvalid)."""
    try:
        obj = cbor2.loads(receipt)
    except Exception:
        raise ReceiptInvalid("receipt is not valid CBOR") from None
    if not isinstance(obj, dict) or set(obj) != set(RECEIPT_FIELDS):
        raise ReceiptInvalid("receipt does not have exactly the receipt fields")
    if cbor2.dumps(obj, canonical=True) != receipt:
        raise ReceiptInvalid("receipt is not in canonical CBOR encoding")
    if obj["v"] != RECEIPT_VERSION or obj["type"] != RECEIPT_TYPE:
        raise ReceiptInvalid("receipt version or type is not supported")
    if obj["signer"] != signer.hex():
        raise ReceiptInvalid("receipt names another signer than the key it is checked with")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(signer).verify(signature, _RECEIPT_CTX + receipt)
    except (InvalidSignature, ValueError):
        raise ReceiptInvalid("receipt signature does not verify") from None
    att = obj["attestation"]
    if not isinstance(att, dict) or set(att) != set(ATTESTATION_FIELDS):
        raise ReceiptInvalid("receipt attestation block does not have the expected fields")
    return obj


def attestation_digest(record: dict[str, Any]) -> bytes:
    """SHA-256 of the canonical CBOR of the edge's attestation record for the job's enclave."""
    return hashlib.sha256(cbor2.dumps(record, canonical=True)).digest()


# -- helpers ------------------------------------------------------------------------------------


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _loads(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise MalformedMessage(f"{what} is not valid CBOR") from None


def _map(obj: Any, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != keys:
        raise MalformedMessage(f"{what} does not have exactly the fields {sorted(keys)}")
    return obj


def _bytes(value: Any, what: str, length: int | None = None) -> bytes:
    if not isinstance(value, bytes):
        raise MalformedMessage(f"{what} must be bytes")
    if length is not None and len(value) != length:
        raise MalformedMessage(f"{what} must be {length} bytes, got {len(value)}")
    return value


def _uint(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedMessage(f"{what} must be an unsigned integer")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise MalformedMessage(f"{what} must be a boolean")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedMessage(f"{what} must be text")
    return value
