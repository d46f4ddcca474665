"""Routing and failover of sealed requests to admitted enclaves.

The broker reads the signed, unencrypted envelope header to route; it never holds a key that
opens the payload. Failover is safe only while nothing has reached the edge: a unary request may
go to the next candidate after any connection-level failure; a stream only until the first frame
has been relayed (after that, a second enclave would start a second, different reply).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import grpc
import grpc.experimental
from sqlalchemy.exc import SQLAlchemyError

from cloud_broker import db
from cloud_broker.config import Strategy, TenantPolicy
from cloud_broker.errors import BrokerError
from cloud_broker.policy import BrokerPolicy, QuotaStore, TenantRules
from cloud_broker.registry import Clock, Registry
from cloud_broker.request_log import RequestLog
from sovra.envelope import MAX_ENVELOPE_BYTES, BadSignature, Envelope, EnvelopeError, Header
from sovra.pki import Identity
from sovra.tls import TLSFiles, secure_channel
from sovra.v1 import enclave_pb2

log = logging.getLogger(__name__)

#: Codes meaning "this enclave could not take the request": another candidate may.
FAILOVER_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        # The enclave side went away (server shut down under the call), not the edge.
        grpc.StatusCode.CANCELLED,
    }
)
MAX_MESSAGE_BYTES: Final = MAX_ENVELOPE_BYTES + 64 * 1024  # room for the protobuf around it
_DETAIL_CHARS: Final = 300


class CallScope(Protocol):
    """The edge's call as dispatch sees it (a ``grpc.ServicerContext`` fits)."""

    def time_remaining(self) -> float | None: ...

    def add_callback(self, callback: Callable[[], None]) -> bool: ...

    def is_active(self) -> bool: ...


@dataclass(frozen=True)
class Candidate:
    enclave_id: str
    address: str


@dataclass(frozen=True, eq=False)
class _Link:
    address: str
    channel: grpc.Channel
    process: Any  # grpc.UnaryStreamMultiCallable for EnclaveService/Process (see EnclaveLinks)
    process_stream: Any  # grpc.UnaryStreamMultiCallable for EnclaveService/ProcessStream


class EnclaveLinks:
    """mTLS channels to enclaves, cached per enclave and address, pinned to the enclave identity.

    Calls run on the calling thread (gRPC's single-threaded unary-stream mode): the RPC worker
    that relays a request drives the enclave call itself instead of waking a channel thread
    (which a sync channel starts afresh whenever it goes idle), and ``call.cancel()`` from
    another thread still ends it. ``Process`` is unary; on the wire a unary reply is a stream
    of one message, so it is called the same way and exactly one message is required
    (:func:`_one_frame`).
    """

    def __init__(self, tls: TLSFiles) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._links: dict[str, _Link] = {}

    def link(self, candidate: Candidate) -> _Link:
        with self._lock:
            cached = self._links.get(candidate.enclave_id)
            if cached is not None and cached.address == candidate.address:
                return cached
            if cached is not None:  # re-registered elsewhere: the old address is dead to us
                cached.channel.close()
            channel = secure_channel(
                candidate.address,
                self._tls,
                server_identity=Identity.enclave(candidate.enclave_id),
                options=_CHANNEL_OPTIONS,
            )
            link = _Link(
                candidate.address,
                channel,
                channel.unary_stream(_PROCESS, *_FRAME_CODEC),
                channel.unary_stream(_PROCESS_STREAM, *_FRAME_CODEC),
            )
            self._links[candidate.enclave_id] = link
            return link

    def close(self) -> None:
        with self._lock:
            for link in self._links.values():
                link.channel.close()
            self._links.clear()


_ENCLAVE_SERVICE: Final = enclave_pb2.DESCRIPTOR.services_by_name["EnclaveService"].full_name
_PROCESS: Final = f"/{_ENCLAVE_SERVICE}/Process"
_PROCESS_STREAM: Final = f"/{_ENCLAVE_SERVICE}/ProcessStream"
_FRAME_CODEC: Final = (
    enclave_pb2.SealedRequest.SerializeToString,
    enclave_pb2.SealedFrame.FromString,
)
_CHANNEL_OPTIONS: Final = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A restarted enclave should be reachable again within seconds, not after minutes of backoff.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
    # Unary-stream calls run on the thread that iterates them (EnclaveLinks).
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
)


class InFlight:
    """Requests currently at each enclave, for the least-inflight strategy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    @contextmanager
    def track(self, enclave_id: str) -> Iterator[None]:
        with self._lock:
            self._counts[enclave_id] = self._counts.get(enclave_id, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._counts[enclave_id] -= 1

    def count(self, enclave_id: str) -> int:
        with self._lock:
            return self._counts.get(enclave_id, 0)

    def order(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        with self._lock:
            counts = dict(self._counts)
        # sorted() is stable: ties keep the edge's order, which is its preference.
        return sorted(candidates, key=lambda c: counts.get(c.enclave_id, 0))


@dataclass
class _Outcome:
    """Metadata of one dispatch, written to the requests table and the log when it ends."""

    header: Header
    tenant: str
    stream: bool
    bytes_in: int
    created_at_ms: int
    candidates: int = 0
    attempts: int = 0
    enclave_id: str | None = None
    bytes_out: int = 0
    frames: int = 0
    started: float = field(default_factory=time.monotonic)
    rules: TenantRules | None = None  # the broker policy's rules for the tenant, if any

    def row(self, status: grpc.StatusCode) -> db.RequestRecord:
        h = self.header
        return db.RequestRecord(
            request_id=h.request_id_hex,
            tenant=self.tenant,
            app=h.app,
            model=h.model,
            op=h.operation,
            stream=self.stream,
            candidates=self.candidates,
            enclave_id=self.enclave_id,
            attempts=self.attempts,
            status=status.name,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            frames=self.frames,
            created_at_ms=self.created_at_ms,
            duration_ms=int((time.monotonic() - self.started) * 1000),
        )


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        links: EnclaveLinks,
        *,
        strategy: Strategy,
        timeout_s: float,
        clock: Clock = time.time,
        policy: BrokerPolicy | None = None,
        quotas: QuotaStore | None = None,
    ) -> None:
        self._registry = registry
        self._links = links
        self._strategy = strategy
        self._timeout_s = timeout_s
        self._clock = clock
        self._policy = policy
        self._quotas = quotas
        self.inflight = InFlight()
        # requests rows are written behind the reply (cloud_broker/request_log.py).
        self.request_log = RequestLog(registry.engine)

    def flush_records(self, timeout: float | None = None) -> bool:
        """Wait until the requests rows of every dispatch that ended so far are committed."""
        return self.request_log.flush(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Write the queued requests rows and stop their writer (after the server stopped)."""
        if not self.request_log.close(timeout):
            log.error("request log writer did not finish within %ss", timeout)

    def dispatch(
        self, tenant: TenantPolicy, envelope: bytes, scope: CallScope
    ) -> tuple[str, bytes]:
        """Forward to one candidate after another; return (enclave id, sealed reply frame)."""
        parsed = _decode_or_log(envelope, tenant, stream=False)
        outcome = self._outcome(parsed, tenant, stream=False, size=len(envelope))
        try:
            candidates = self._admit(parsed, tenant, outcome)
            enclave_id, frame = self._unary(candidates, envelope, parsed.header, outcome, scope)
        except BrokerError as exc:
            self._finish(outcome, exc.code)
            raise
        self._finish(outcome, grpc.StatusCode.OK)
        return enclave_id, frame

    def dispatch_stream(
        self, tenant: TenantPolicy, envelope: bytes, scope: CallScope
    ) -> Iterator[tuple[str, bytes]]:
        """Relay the reply frames of one candidate; fail over only before the first frame."""
        parsed = _decode_or_log(envelope, tenant, stream=True)
        outcome = self._outcome(parsed, tenant, stream=True, size=len(envelope))
        status = grpc.StatusCode.CANCELLED  # if the edge walks away, the generator just stops
        try:
            candidates = self._admit(parsed, tenant, outcome)
            yield from self._streamed(candidates, envelope, parsed.header, outcome, scope)
            status = grpc.StatusCode.OK
        except BrokerError as exc:
            status = exc.code
            raise
        finally:
            self._finish(outcome, status)

    def _outcome(
        self, parsed: Envelope, tenant: TenantPolicy, *, stream: bool, size: int
    ) -> _Outcome:
        return _Outcome(parsed.header, tenant.name, stream, size, int(self._clock() * 1000))

    def _admit(self, parsed: Envelope, tenant: TenantPolicy, outcome: _Outcome) -> list[Candidate]:
        """Broker-side checks; the candidates to try, in strategy order."""
        header = parsed.header
        if header.tenant != tenant.name:
            raise BrokerError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"envelope header names tenant {header.tenant!r} but the client certificate "
                f"is tenant {tenant.name!r}",
            )
        try:
            parsed.verify()
        except (BadSignature, ValueError) as exc:
            raise BrokerError(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        if not tenant.allows_edge_key(header.edge_key):
            raise BrokerError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"edge key {header.edge_key.hex()[:16]}... is not allowed for tenant "
                f"{tenant.name!r}",
            )
        self._remaining_s(header)  # refuse an expired request before looking for enclaves
        rules = self._policy.rules_for(tenant.name) if self._policy is not None else None
        outcome.rules = rules
        try:
            candidates = self._candidates(header, tenant, rules)
            outcome.candidates = len(candidates)
            if rules is not None and self._quotas is not None:
                self._quotas.admit(rules)  # after routing: a refused request costs no quota
        except BrokerError as exc:
            if rules is not None and exc.code != grpc.StatusCode.NOT_FOUND:
                log.info(
                    "dispatch refused by broker policy rid=%s tenant=%s rule=%s status=%s: %s",
                    header.request_id_hex, tenant.name, rules.rule_id, exc.code.name,
                    exc.message,
                )  # fmt: skip
            raise
        if self._strategy == "least-inflight":
            return self.inflight.order(candidates)
        return candidates

    def _candidates(
        self, header: Header, tenant: TenantPolicy, rules: TenantRules | None = None
    ) -> list[Candidate]:
        live = self._registry.dispatch_targets([r.enclave_id for r in header.recipients])
        admitted: list[Candidate] = []
        outside = 0
        excluded: list[str] = []  # candidates the broker policy does not allow, and why
        for recipient in header.recipients:
            target = live.get(recipient.enclave_id)
            if target is None or recipient.epoch not in target.epochs:
                continue
            if not tenant.allows_region(target.region):
                outside += 1
                continue
            if rules is not None and self._policy is not None:
                why = self._policy.excludes(rules, recipient.enclave_id, target.region)
                if why is not None:
                    excluded.append(f"{recipient.enclave_id}: {why}")
                    continue
            if all(c.enclave_id != recipient.enclave_id for c in admitted):
                admitted.append(Candidate(recipient.enclave_id, target.address))
        if not admitted and excluded and rules is not None and self._policy is not None:
            raise BrokerError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"broker policy rule {rules.rule_id!r} ({self._policy.id}): none of the "
                f"{len(header.recipients)} candidate enclaves is allowed for tenant "
                f"{tenant.name!r} ({'; '.join(excluded)})",
            )
        if not admitted:
            n = len(header.recipients)
            why = (
                f" ({outside} outside the regions tenant {tenant.name!r} allows)" if outside else ""
            )
            raise BrokerError(
                grpc.StatusCode.NOT_FOUND,
                f"none of the {n} candidate enclaves is admitted{why}",
            )
        return admitted

    def _remaining_s(self, header: Header, tried: Sequence[str] = ()) -> float:
        remaining = header.expires_at_ms / 1000 - self._clock()
        if remaining <= 0:
            after = f" after {len(tried)} attempts: {'; '.join(tried)}" if tried else ""
            raise BrokerError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"request expired (header exp passed){after}"
            )
        return remaining

    def _timeout(self, header: Header, scope: CallScope, tried: Sequence[str]) -> float:
        timeout = min(self._timeout_s, self._remaining_s(header, tried))
        edge_left = scope.time_remaining()
        return timeout if edge_left is None else max(0.001, min(timeout, edge_left))

    def _unary(
        self,
        candidates: Sequence[Candidate],
        envelope: bytes,
        header: Header,
        outcome: _Outcome,
        scope: CallScope,
    ) -> tuple[str, bytes]:
        request = enclave_pb2.SealedRequest(envelope=envelope)
        failures: list[str] = []
        for candidate in candidates:
            timeout = self._timeout(header, scope, failures)
            outcome.attempts += 1
            call = self._links.link(candidate).process(request, timeout=timeout)
            scope.add_callback(call.cancel)  # edge gone: stop the enclave's work too
            try:
                with self.inflight.track(candidate.enclave_id):
                    frame = _one_frame(candidate, call)
            except grpc.RpcError as err:
                failures.append(self._failed(candidate, err, scope))
                continue
            outcome.enclave_id = candidate.enclave_id
            outcome.frames, outcome.bytes_out = 1, len(frame)
            return candidate.enclave_id, frame
        raise _all_failed(failures)

    def _streamed(
        self,
        candidates: Sequence[Candidate],
        envelope: bytes,
        header: Header,
        outcome: _Outcome,
        scope: CallScope,
    ) -> Iterator[tuple[str, bytes]]:
        request = enclave_pb2.SealedRequest(envelope=envelope)
        failures: list[str] = []
        for candidate in candidates:
            timeout = self._timeout(header, scope, failures)
            outcome.attempts += 1
            call = self._links.link(candidate).process_stream(request, timeout=timeout)
            scope.add_callback(call.cancel)
            try:
                with self.inflight.track(candidate.enclave_id):
                    for message in call:
                        outcome.enclave_id = candidate.enclave_id
                        outcome.frames += 1
                        outcome.bytes_out += len(message.frame)
                        yield candidate.enclave_id, message.frame
            except grpc.RpcError as err:
                if not scope.is_active():
                    raise _edge_gone() from None
                if outcome.frames:
                    raise _mid_stream(candidate, err, outcome.frames) from None
                failures.append(self._failed(candidate, err, scope))
                continue
            finally:
                call.cancel()  # no-op when finished; stops the enclave if the edge went away
            return
        raise _all_failed(failures)

    def _failed(self, candidate: Candidate, err: grpc.RpcError, scope: CallScope) -> str:
        """Log a failed attempt; relay non-transport refusals; else describe it for the summary."""
        if not scope.is_active():
            raise _edge_gone()
        code, details = _status(err)
        if code not in FAILOVER_CODES:
            raise BrokerError(code, f"enclave {candidate.enclave_id}: {details}")
        log.info("failover enclave=%s status=%s", candidate.enclave_id, code.name)
        return f"{candidate.enclave_id}: {code.name} {details}"

    def _finish(self, outcome: _Outcome, status: grpc.StatusCode) -> None:
        h = outcome.header
        row = outcome.row(status)
        log.info(
            "dispatch rid=%s tenant=%s app=%s model=%s op=%s stream=%s candidates=%d enclave=%s "
            "attempts=%d status=%s in=%d out=%d frames=%d ms=%d",
            row.request_id, row.tenant, h.app, h.model, h.operation, row.stream, row.candidates,
            row.enclave_id or "-", row.attempts, row.status, row.bytes_in, row.bytes_out,
            row.frames, row.duration_ms,
        )  # fmt: skip
        if outcome.rules is not None and self._quotas is not None and outcome.frames:
            try:  # synchronous: the next admission of this tenant must see these frames
                self._quotas.record_frames(outcome.rules, outcome.frames)
            except SQLAlchemyError as exc:
                log.error("could not count quota usage rid=%s: %s", row.request_id,
                          type(exc).__name__)  # fmt: skip
        # The reply is already decided; the row is metadata, written behind it (bounded queue).
        self.request_log.submit(row)


def _decode_or_log(envelope: bytes, tenant: TenantPolicy, *, stream: bool) -> Envelope:
    try:
        return _decode(envelope)
    except BrokerError as exc:
        # Envelope errors name the field at fault, never its bytes, so the reason is loggable.
        log.info(
            "dispatch refused tenant=%s stream=%s status=%s in=%d reason=%s",
            tenant.name, stream, exc.code.name, len(envelope), exc.message,
        )  # fmt: skip
        raise


def _decode(envelope: bytes) -> Envelope:
    if not envelope:
        raise BrokerError(grpc.StatusCode.INVALID_ARGUMENT, "envelope is empty")
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise BrokerError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"envelope is {len(envelope)} bytes, larger than the {MAX_ENVELOPE_BYTES} byte limit",
        )
    try:
        return Envelope.decode(envelope)
    except (EnvelopeError, ValueError) as exc:
        raise BrokerError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed envelope: {exc}") from None


def _one_frame(candidate: Candidate, call: Iterable[enclave_pb2.SealedFrame]) -> bytes:
    """The reply of a unary ``Process`` call (read to its status: RpcError unless OK)."""
    replies = list(call)
    if len(replies) != 1:  # a conforming unary server sends exactly one
        raise BrokerError(
            grpc.StatusCode.INTERNAL,
            f"enclave {candidate.enclave_id}: a unary reply must be one message, got "
            f"{len(replies)}",
        )
    return replies[0].frame


def _edge_gone() -> BrokerError:
    return BrokerError(grpc.StatusCode.CANCELLED, "the edge cancelled the request")


def _status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    call: Any = err  # errors raised by calls are also grpc.Call objects with code() and details()
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    details = (call.details() if hasattr(call, "details") else "") or ""
    return code, details[:_DETAIL_CHARS]


def _all_failed(failures: Sequence[str]) -> BrokerError:
    return BrokerError(
        grpc.StatusCode.UNAVAILABLE,
        f"all {len(failures)} candidates failed: {'; '.join(failures)}",
    )


def _mid_stream(candidate: Candidate, err: grpc.RpcError, frames: int) -> BrokerError:
    code, details = _status(err)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # slow, not dead: the deadline is the news
        return BrokerError(
            code,
            f"enclave {candidate.enclave_id} did not finish before the deadline "
            f"({frames} frames relayed)",
        )
    if code in FAILOVER_CODES:
        return BrokerError(
            grpc.StatusCode.UNAVAILABLE,
            f"enclave {candidate.enclave_id} failed mid-stream after {frames} frames "
            f"({code.name} {details})",
        )
    return BrokerError(code, f"enclave {candidate.enclave_id}: {details}")
