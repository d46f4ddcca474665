"""Synchronous gRPC client of the broker for training: the directory (EdgeGateway) and
TrainingGateway. Used by the edge's training worker thread and by CLI processes; the broker is
pinned by its identity, as for inference."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import grpc

from sovra.pki import Identity
from sovra.tls import TLSFiles, secure_channel
from sovra.v1 import broker_pb2, broker_pb2_grpc, training_pb2, training_pb2_grpc

MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024 + 64 * 1024
CONTROL_TIMEOUT_S: Final = 30.0
UPLOAD_TIMEOUT_S: Final = 6 * 3600.0
_MAX_DETAILS: Final = 300
_OPTIONS: Final = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


class TrainingCallError(Exception):
    """A broker call failed with a gRPC status (the broker's or the enclave's message)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details[:_MAX_DETAILS]


def _error(exc: grpc.RpcError) -> TrainingCallError:
    call: Any = exc
    return TrainingCallError(call.code(), call.details() or "")


def upload_request(job_id: bytes, chunk: bytes = b"") -> bytes:
    """``UploadRequest{job_id, chunk}`` in protobuf wire format (field 1, then field 2)."""
    return upload_request_prefix(job_id, len(chunk)) + chunk


def upload_request_prefix(job_id: bytes, chunk_len: int) -> bytes:
    """The bytes of :func:`upload_request` before the chunk: written in front of a chunk, they
    make it the serialized request without building one (the outbox stores chunks this way)."""
    out = b"\x0a" + _varint(len(job_id)) + job_id
    if chunk_len:
        out += b"\x12" + _varint(chunk_len)
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class UploadCall:
    """An open Upload stream: iterate acks; ``cancel`` ends it."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[training_pb2.JobAck]:
        try:
            yield from self._call
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def cancel(self) -> None:
        self._call.cancel()


class TrainingClient:
    def __init__(self, target: str, tls: TLSFiles) -> None:
        self._channel = secure_channel(
            target, tls, server_identity=Identity.broker(), options=_OPTIONS
        )
        self._gateway = broker_pb2_grpc.EdgeGatewayStub(self._channel)
        self._training = training_pb2_grpc.TrainingGatewayStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_enclaves(self) -> broker_pb2.ListEnclavesResponse:
        try:
            return self._gateway.ListEnclaves(
                broker_pb2.ListEnclavesRequest(), timeout=CONTROL_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def open_job(self, job_id: bytes, envelope: bytes) -> training_pb2.JobAck:
        try:
            return self._training.OpenJob(
                training_pb2.OpenJobRequest(job_id=job_id, envelope=envelope),
                timeout=CONTROL_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def upload(self, requests: Iterator[bytes]) -> UploadCall:
        """Upload serialized ``UploadRequest`` messages (:func:`upload_request`): a chunk is
        copied once into its message, not built and then serialized."""
        call = self._channel.stream_stream(
            "/sovra.v1.TrainingGateway/Upload",
            request_serializer=None,
            response_deserializer=training_pb2.JobAck.FromString,
        )
        return UploadCall(call(requests, timeout=UPLOAD_TIMEOUT_S))

    def get_job(self, job_id: bytes) -> training_pb2.JobStatus:
        try:
            return self._training.GetJob(
                training_pb2.JobRef(job_id=job_id), timeout=CONTROL_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def fetch_result(self, job_id: bytes) -> Iterator[training_pb2.TrainingReply]:
        try:
            yield from self._training.FetchResult(
                training_pb2.JobRef(job_id=job_id), timeout=CONTROL_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def close_job(self, job_id: bytes, cancel: bool, proof: bytes) -> None:
        try:
            self._training.CloseJob(
                training_pb2.CloseJobRequest(job_id=job_id, cancel=cancel, proof=proof),
                timeout=CONTROL_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def score(self, envelope: bytes, artifact: bytes) -> training_pb2.TrainingReply:
        try:
            return self._training.Score(
                training_pb2.ScoreRequest(envelope=envelope, artifact=artifact),
                timeout=CONTROL_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
