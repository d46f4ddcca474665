"""Opening one sealed request and sealing its reply, without any gRPC around it.

Checks run in a fixed order, cheapest and least revealing first, and nothing is decrypted until
every check on the signed header has passed: structure, edge signature, recipient and key epoch,
freshness, replay, the sealed constraints against this enclave's own attested identity, model.
A refusal is a :class:`Refused` carrying the gRPC status the servicer returns. Once the request
is open, failures go back sealed (an OpenAI error object in a final frame), so only the edge
learns about them. Nothing about a request is kept afterwards except its id in the replay cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from enclave.config import ReplaySection
from enclave.keys import KeyRing
from enclave.replay import ReplayCache, ReplayCacheFull, Replayed
from enclave.tee_sim import sim_log
from enclave.workloads import INVALID_REQUEST, Workload, WorkloadError
from sovra.envelope import (
    INFERENCE_OPERATIONS,
    MAX_FRAME_BYTES,
    BadSignature,
    DecryptionFailed,
    Envelope,
    EnvelopeError,
    Header,
    NotARecipient,
    Recipient,
    ReplyKeys,
    ReplyWriter,
)
from sovra.suites import UnknownSuite, suite_by_name

log = sim_log(__name__)

_FRAME_OVERHEAD: Final = 64  # CBOR array, seq, flag and the AES-GCM tag around a plaintext
INTERNAL_ERROR: Final = "internal_error"


class Refused(Exception):
    """The request is refused before opening; ``code`` is the gRPC status to return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class OwnIdentity:
    """What this enclave attests to; sealed constraints are checked against exactly this."""

    enclave_id: str
    region: str
    tee_type: str
    simulated: bool
    measurement: str


@dataclass(frozen=True, eq=False)
class _Opened:
    header: Header
    op: str
    body: dict[str, Any] | None  # None: the payload was unusable, ``error`` says why
    writer: ReplyWriter = field(repr=False)
    error: WorkloadError | None = None


class RequestProcessor:
    def __init__(
        self,
        identity: OwnIdentity,
        keys: KeyRing,
        replay: ReplayCache,
        workload: Workload,
        limits: ReplaySection,
        clock: Callable[[], float],
    ) -> None:
        self._id = identity
        self._keys = keys
        self._replay = replay
        self._workload = workload
        self._limits = limits
        self._clock = clock

    @property
    def identity(self) -> OwnIdentity:
        return self._id

    @property
    def workload(self) -> Workload:
        return self._workload

    @property
    def keys(self) -> KeyRing:
        return self._keys

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def process(self, data: bytes) -> bytes:
        """A unary request → its single, final reply frame."""
        opened = self._open(data, streaming=False)
        return _final(opened.writer, self._answer(opened))

    def process_stream(self, data: bytes) -> Iterator[bytes]:
        """A streamed request → reply frames in order, the last one final.

        Refusals are raised on the call (not on first iteration), so a servicer can turn them
        into a status before it starts streaming.
        """
        opened = self._open(data, streaming=True)
        if not opened.header.stream:
            return iter([_final(opened.writer, self._answer(opened))])
        return self._stream(opened)

    # -- before opening ------------------------------------------------------------------

    def _open(self, data: bytes, *, streaming: bool) -> _Opened:
        header, payload, reply_keys = self.open_sealed(data, streaming=streaming)
        return _parse_payload(header, payload, reply_keys)

    def open_sealed(
        self,
        data: bytes,
        *,
        operations: tuple[str, ...] = INFERENCE_OPERATIONS,
        streaming: bool = False,
        check_model: bool = True,
    ) -> tuple[Header, bytes, ReplyKeys]:
        """Run every check on a sealed envelope and open it: (header, payload, reply keys).

        Used for inference here and for training job envelopes and scoring requests
        (``enclave/training``), which name their own ``operations``.
        """
        envelope = _decode(data)
        header = envelope.header
        _verify(envelope)
        if header.operation not in operations:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"operation {header.operation!r} is not served by this call "
                f"(expected one of {', '.join(operations)})",
            )
        _check_reply_mode(header, streaming)
        recipient = self._recipient(header)
        key = self._keys.get(recipient.epoch)
        if key is None:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"key epoch {recipient.epoch} is not held (expired or rotated away); "
                "refresh the directory",
            )
        if suite_by_name(header.suite).kem != key.kem:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"suite {header.suite} does not fit key epoch {key.epoch} ({key.kem})",
            )
        self._check_fresh(header)
        self._admit_once(header)
        self._check_constraints(header)
        if check_model and header.model not in self._workload.models:
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"model {header.model!r} is not served by enclave {self._id.enclave_id}",
            )
        try:
            payload, reply_keys = envelope.open(recipient, key.pair.private_key)
        except (DecryptionFailed, NotARecipient) as exc:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None
        return header, payload, reply_keys

    def _recipient(self, header: Header) -> Recipient:
        for recipient in header.recipients:
            if recipient.enclave_id == self._id.enclave_id:
                return recipient
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"envelope names no key of enclave {self._id.enclave_id!r}",
        )

    def _check_fresh(self, header: Header) -> None:
        now = int(self._clock() * 1000)
        skew_ms = self._limits.max_skew_s * 1000
        if now < header.issued_at_ms - skew_ms:
            raise Refused(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request is issued {(header.issued_at_ms - now) // 1000}s in the future "
                f"(more than the allowed clock skew of {self._limits.max_skew_s}s)",
            )
        if now >= header.expires_at_ms:
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "request has expired (exp passed)")
        lifetime_s = (header.expires_at_ms - header.issued_at_ms) / 1000
        if lifetime_s > self._limits.max_lifetime_s:
            raise Refused(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request lifetime {lifetime_s:.0f}s exceeds the maximum of "
                f"{self._limits.max_lifetime_s}s",
            )

    def _admit_once(self, header: Header) -> None:
        try:
            self._replay.admit(header.request_id, header.expires_at_ms)
        except Replayed:
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, "replayed request id") from None
        except ReplayCacheFull:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "enclave busy: too many live request ids; retry later",
            ) from None

    def _check_constraints(self, header: Header) -> None:
        c = header.constraints
        me = self._id
        if c.regions and me.region not in c.regions:
            _deny(f"sealed constraint 'regions' excludes this enclave's region {me.region!r}")
        if c.tee_types and me.tee_type not in c.tee_types:
            _deny(f"sealed constraint 'tee_types' excludes this enclave's TEE type {me.tee_type!r}")
        if c.measurements and me.measurement not in {m.lower() for m in c.measurements}:
            _deny("sealed constraint 'measurements' does not include this enclave's measurement")
        if me.simulated and not c.allow_simulated:
            _deny("sealed constraint 'allow_simulated' is false and this enclave is SIMULATED")

    # -- after opening --------------------------------------------------------------------

    def _answer(self, opened: _Opened) -> dict[str, Any]:
        if opened.body is None:
            return _error_doc(opened.error)
        try:
            if opened.op == "embeddings":
                return self._workload.embeddings(opened.body)
            return self._workload.chat(opened.body)
        except WorkloadError as exc:
            return exc.to_json_dict()
        except Exception as exc:
            return _internal_error(exc)

    def _stream(self, opened: _Opened) -> Iterator[bytes]:
        if opened.body is None:
            yield _final(opened.writer, _error_doc(opened.error))
            return
        usage: Any = None
        try:
            for chunk in self._workload.chat_stream(opened.body):
                usage = chunk.get("usage") or usage
                yield opened.writer.frame(_encode_reply(chunk))
        except WorkloadError as exc:
            yield _final(opened.writer, exc.to_json_dict())
            return
        except Exception as exc:
            yield _final(opened.writer, _internal_error(exc))
            return
        done: dict[str, Any] = {"done": True}
        if usage:
            done["usage"] = usage
        yield _final(opened.writer, done)


def _decode(data: bytes) -> Envelope:
    try:
        return Envelope.decode(data)
    except (EnvelopeError, UnknownSuite) as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed envelope: {exc}") from None


def _verify(envelope: Envelope) -> None:
    try:
        envelope.verify()
    except BadSignature as exc:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
    except ValueError:  # an edge key that is not a valid Ed25519 point
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED, "edge key in the header is not a valid Ed25519 key"
        ) from None


def _check_reply_mode(header: Header, streaming: bool) -> None:
    if header.stream and header.operation != "chat":
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT, f"{header.operation} replies cannot be streamed"
        )
    if header.stream and not streaming:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT, "header asks for a streamed reply; call ProcessStream"
        )


def _deny(message: str) -> None:
    raise Refused(grpc.StatusCode.PERMISSION_DENIED, message)


def _parse_payload(header: Header, payload: bytes, keys: ReplyKeys) -> _Opened:
    writer = ReplyWriter(keys)
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict):
        error = WorkloadError(
            'payload must be a JSON object {"op": ..., "body": {...}}', code="invalid_payload"
        )
        return _Opened(header, header.operation, None, writer, error)
    if doc.get("op") != header.operation:
        error = WorkloadError("payload op does not match the signed header", code="op_mismatch")
        return _Opened(header, header.operation, None, writer, error)
    body = dict(doc["body"])
    body["model"] = header.model  # the signed header, not the body, names the model
    return _Opened(header, header.operation, body, writer)


def _error_doc(error: WorkloadError | None) -> dict[str, Any]:
    return (error or WorkloadError("request could not be served")).to_json_dict()


def _internal_error(exc: Exception) -> dict[str, Any]:
    # The exception text may quote the prompt, so only its type is logged.
    log.error("workload failed unexpectedly (%s)", type(exc).__name__)
    return WorkloadError(
        "the enclave workload failed (internal error)", type=INTERNAL_ERROR, code=INTERNAL_ERROR
    ).to_json_dict()


def _encode_reply(doc: dict[str, Any]) -> bytes:
    data = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) > MAX_FRAME_BYTES - _FRAME_OVERHEAD:
        too_big = WorkloadError(
            f"reply is larger than the {MAX_FRAME_BYTES} byte frame limit",
            type=INVALID_REQUEST,
            code="reply_too_large",
        )
        data = json.dumps(too_big.to_json_dict()).encode()
    return data


def _final(writer: ReplyWriter, doc: dict[str, Any]) -> bytes:
    return writer.frame(_encode_reply(doc), final=True)
