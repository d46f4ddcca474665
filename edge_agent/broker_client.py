"""gRPC client of the broker's EdgeGateway over mTLS (the broker is pinned by its identity).

The broker is untrusted for data: this module only moves sealed bytes and the directory, which
the trusted set verifies. gRPC failures become :class:`BrokerCallError` (status + the broker's
message), which :mod:`edge_agent.dispatcher` maps to HTTP errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import grpc
import grpc.aio

from sovra.envelope import MAX_ENVELOPE_BYTES, MAX_FRAME_BYTES
from sovra.pki import Identity
from sovra.tls import TLSFiles, aio_secure_channel
from sovra.v1 import broker_pb2, broker_pb2_grpc, enclave_pb2

LIST_TIMEOUT_S: Final = 10.0
_MAX_DETAILS: Final = 300
# Reply frames are at most MAX_FRAME_BYTES; leave room for the protobuf wrapper.
_CHANNEL_OPTIONS: Final = (
    ("grpc.max_send_message_length", MAX_ENVELOPE_BYTES + 64 * 1024),
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES + 64 * 1024),
)


class BrokerCallError(Exception):
    """A broker RPC failed with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"broker call failed: {code.name}: {details}")
        self.code = code
        self.details = details[:_MAX_DETAILS]


@dataclass(frozen=True)
class Listing:
    """One directory answer; ``generation`` grows with every fetch."""

    generation: int
    descriptors: tuple[broker_pb2.EnclaveDescriptor, ...]
    ear_verifier_key: str = ""  # the broker's EAR key (PEM), to record its view of each key


class StreamCall:
    """An open DispatchStream: read replies one by one; cancel when done early."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call

    async def read(self) -> broker_pb2.DispatchReply | None:
        """The next reply, or None at the end of the stream."""
        try:
            reply = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _call_error(exc) from None
        if reply is grpc.aio.EOF:
            return None
        assert isinstance(reply, broker_pb2.DispatchReply)
        return reply

    def cancel(self) -> None:
        self._call.cancel()


class BrokerClient:
    def __init__(
        self,
        target: str,
        tls: TLSFiles,
        *,
        refresh_s: float,
        request_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target
        self._tls = tls
        self._refresh_s = refresh_s
        self._timeout_s = request_timeout_s
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._stub: broker_pb2_grpc.EdgeGatewayAsyncStub | None = None
        self._listing = Listing(0, ())
        self._fetched_at: float | None = None
        self._lock: asyncio.Lock | None = None

    async def open(self) -> None:
        """Create the channel; must run inside the event loop that will use it."""
        self._channel = aio_secure_channel(
            self._target,
            self._tls,
            server_identity=Identity.broker(),
            options=_CHANNEL_OPTIONS,
        )
        self._stub = broker_pb2_grpc.EdgeGatewayStub(self._channel)  # type: ignore[assignment]
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    def _require_stub(self) -> broker_pb2_grpc.EdgeGatewayAsyncStub:
        if self._stub is None:
            raise RuntimeError("BrokerClient.open() was not awaited")
        return self._stub

    @property
    def listing(self) -> Listing:
        return self._listing

    def is_fresh(self) -> bool:
        return self._fetched_at is not None and self._clock() - self._fetched_at < self._refresh_s

    async def list_enclaves(self, *, force: bool = False) -> Listing:
        """The directory, from cache while fresh; ``force`` fetches unless a fetch just ran."""
        if not force and self.is_fresh():
            return self._listing
        assert self._lock is not None
        seen = self._listing.generation
        async with self._lock:
            # Single flight: callers that queued behind a fetch use its answer.
            if self._listing.generation != seen or (not force and self.is_fresh()):
                return self._listing
            try:
                reply = await self._require_stub().ListEnclaves(
                    broker_pb2.ListEnclavesRequest(), timeout=LIST_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                raise _call_error(exc) from None
            self._listing = Listing(seen + 1, tuple(reply.enclaves), reply.ear_verifier_key)
            self._fetched_at = self._clock()
        return self._listing

    async def dispatch(self, envelope: bytes) -> broker_pb2.DispatchReply:
        try:
            return await self._require_stub().Dispatch(
                enclave_pb2.SealedRequest(envelope=envelope), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise _call_error(exc) from None

    def dispatch_stream(self, envelope: bytes) -> StreamCall:
        call = self._require_stub().DispatchStream(
            enclave_pb2.SealedRequest(envelope=envelope), timeout=self._timeout_s
        )
        return StreamCall(call)


def _call_error(exc: grpc.aio.AioRpcError) -> BrokerCallError:
    return BrokerCallError(exc.code(), exc.details() or "")
