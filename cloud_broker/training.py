"""Training relay: job envelopes, chunk uploads with acks, job status, results and scoring
(docs/training.md, "Broker").

The broker cannot open anything it relays here: job envelopes and scoring requests are sealed
envelopes (it reads their signed header to route), chunks are AES-GCM under a job key it never
sees, acks and status are MAC'd by the enclave, result frames and model artifacts are sealed.
It keeps one metadata row per job (``training_jobs``): ids, tenant, app, enclave, state, chunk
and byte counts, times. Nothing else.

Placement goes through :class:`TrainingScheduler`. :class:`InProcessScheduler` places a job on
the enclave its envelope names, if that enclave is admitted, live, holds the key epoch and lies in
a region the tenant allows. A Kubernetes backend (Volcano for gang-scheduled jobs) implements the
same three methods: ``place`` creates or picks the pod group and returns its enclave once the
enclave attested and registered, ``locate`` finds it again, ``release`` deletes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import grpc
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, select

from cloud_broker.config import BrokerConfig, TenantPolicy
from cloud_broker.errors import BrokerError, streaming_handler, unary_handler
from cloud_broker.registry import Registry
from sovra.envelope import BadSignature, Envelope, EnvelopeError
from sovra.pki import Identity
from sovra.tls import TLSFiles, peer_identity, secure_channel
from sovra.training import JOB_ID_LEN, MAX_CHUNK_BYTES
from sovra.v1 import training_pb2, training_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME: Final = training_pb2.DESCRIPTOR.services_by_name["TrainingGateway"].full_name
UPLOAD_TIMEOUT_S: Final = 6 * 3600.0
CONTROL_TIMEOUT_S: Final = 30.0
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024 + 64 * 1024
_DETAIL_CHARS: Final = 300
_CHANNEL_OPTIONS: Final = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
)
FAILOVER_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

Clock = Callable[[], float]


class TrainingJobRow(SQLModel, table=True):
    """One training job as the broker sees it: metadata only, by construction."""

    __tablename__ = "training_jobs"

    job_id: str = Field(primary_key=True)  # hex
    tenant: str = Field(index=True)
    app: str
    model: str
    policy_id: str
    enclave_id: str
    state: str  # opening | uploading | training | completed | failed | cancelled | closed
    chunks_acked: int = 0
    bytes_relayed: int = 0
    uploads: int = 0  # upload streams relayed (1 + resumptions)
    created_at_ms: int
    updated_at_ms: int


@dataclass(frozen=True)
class Placement:
    enclave_id: str
    address: str


class TrainingScheduler(Protocol):
    """Where training jobs run. In-process today; Kubernetes/Volcano could implement it."""

    def place(self, tenant: TenantPolicy, enclave_id: str, epoch: int) -> Placement: ...

    def locate(self, job: TrainingJobRow) -> Placement: ...

    def release(self, job: TrainingJobRow) -> None: ...


class InProcessScheduler:
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def place(self, tenant: TenantPolicy, enclave_id: str, epoch: int) -> Placement:
        entries = self._registry.live([enclave_id])
        if not entries or epoch not in {k.epoch for k in entries[0].keys}:
            raise BrokerError(
                grpc.StatusCode.NOT_FOUND,
                f"enclave {enclave_id} is not admitted with key epoch {epoch}",
            )
        enclave = entries[0].enclave
        if not tenant.allows_region(enclave.region):
            raise BrokerError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"enclave {enclave_id} is outside the regions tenant {tenant.name!r} allows",
            )
        return Placement(enclave_id, enclave.address)

    def locate(self, job: TrainingJobRow) -> Placement:
        entries = self._registry.live([job.enclave_id])
        if not entries:
            raise BrokerError(
                grpc.StatusCode.UNAVAILABLE,
                f"enclave {job.enclave_id} holding job {job.job_id} is not live",
            )
        return Placement(job.enclave_id, entries[0].enclave.address)

    def release(self, job: TrainingJobRow) -> None:
        """Nothing to free in process; a cluster backend deletes the job's pods here."""


class _Links:
    """mTLS channels to enclaves for EnclaveTraining, pinned to each enclave's identity."""

    def __init__(self, tls: TLSFiles) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._links: dict[str, tuple[str, grpc.Channel, training_pb2_grpc.EnclaveTrainingStub]] = {}

    def stub(self, placement: Placement) -> training_pb2_grpc.EnclaveTrainingStub:
        with self._lock:
            cached = self._links.get(placement.enclave_id)
            if cached is not None and cached[0] == placement.address:
                return cached[2]
            if cached is not None:
                cached[1].close()
            channel = secure_channel(
                placement.address,
                self._tls,
                server_identity=Identity.enclave(placement.enclave_id),
                options=_CHANNEL_OPTIONS,
            )
            stub = training_pb2_grpc.EnclaveTrainingStub(channel)
            self._links[placement.enclave_id] = (placement.address, channel, stub)
            return stub

    def raw_upload(self, placement: Placement) -> Any:
        """EnclaveTraining/Upload on the enclave's channel, bytes in and bytes out."""
        self.stub(placement)
        with self._lock:
            channel = self._links[placement.enclave_id][1]
        return channel.stream_stream("/sovra.v1.EnclaveTraining/Upload")

    def close(self) -> None:
        with self._lock:
            for _, channel, _ in self._links.values():
                channel.close()
            self._links.clear()


def _status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    call: Any = err
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    details = (call.details() if hasattr(call, "details") else "") or ""
    return code, details[:_DETAIL_CHARS]


def _relay_error(enclave_id: str, err: grpc.RpcError) -> BrokerError:
    code, details = _status(err)
    if code == grpc.StatusCode.CANCELLED:
        code = grpc.StatusCode.UNAVAILABLE
    return BrokerError(code, f"enclave {enclave_id}: {details}")


class TrainingGatewayServicer(training_pb2_grpc.TrainingGatewayServicer):
    def __init__(
        self,
        config: BrokerConfig,
        registry: Registry,
        *,
        scheduler: TrainingScheduler | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._tenants = config.tenants
        self._registry = registry
        self._engine: Engine = registry.engine
        self._scheduler = scheduler or InProcessScheduler(registry)
        self._links = _Links(config.tls)
        self._clock = clock
        TrainingJobRow.metadata.create_all(self._engine, tables=[TrainingJobRow.__table__])  # type: ignore[attr-defined]

    def close(self) -> None:
        self._links.close()

    # -- identity and rows ----------------------------------------------------------------

    def _tenant(self, context: grpc.ServicerContext) -> TenantPolicy:
        identity = peer_identity(context)
        if identity is None or identity.kind != "edge":
            who = identity.uri() if identity else "no Sovra identity"
            raise BrokerError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"TrainingGateway accepts edge identities only; caller is {who}",
            )
        policy = self._tenants.get(identity.name)
        if policy is None:
            raise BrokerError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"tenant {identity.name!r} is not configured on this broker",
            )
        return policy

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _row(self, tenant: TenantPolicy, job_id: bytes) -> TrainingJobRow:
        if len(job_id) != JOB_ID_LEN:
            raise BrokerError(grpc.StatusCode.INVALID_ARGUMENT, "job id must be 16 bytes")
        with Session(self._engine) as session:
            row = session.get(TrainingJobRow, job_id.hex())
        if row is None or row.tenant != tenant.name:
            raise BrokerError(grpc.StatusCode.NOT_FOUND, f"no job {job_id.hex()} for this tenant")
        return row

    def _update(self, job_id: str, **changes: Any) -> None:
        try:
            with Session(self._engine) as session:
                row = session.get(TrainingJobRow, job_id)
                if row is None:
                    return
                for name, value in changes.items():
                    if name.startswith("add_"):
                        name = name[4:]
                        value = getattr(row, name) + value
                    setattr(row, name, value)
                row.updated_at_ms = self._now_ms()
                session.add(row)
                session.commit()
        except SQLAlchemyError as exc:
            # Metadata only: losing a row update must not lose the relayed bytes.
            log.error("could not update training job %s: %s", job_id, type(exc).__name__)

    def _envelope(self, tenant: TenantPolicy, data: bytes, op: str) -> Envelope:
        if not data:
            raise BrokerError(grpc.StatusCode.INVALID_ARGUMENT, "envelope is empty")
        try:
            parsed = Envelope.decode(data)
        except (EnvelopeError, ValueError) as exc:
            raise BrokerError(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed envelope: {exc}"
            ) from None
        header = parsed.header
        if header.operation != op:
            raise BrokerError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"expected an {op!r} envelope, got {header.operation!r}",
            )
        if header.tenant != tenant.name:
            raise BrokerError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"envelope header names tenant {header.tenant!r} but the client certificate is "
                f"tenant {tenant.name!r}",
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
        if header.expires_at_ms <= self._now_ms():
            raise BrokerError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "request expired (header exp passed)"
            )
        return parsed

    # -- jobs -----------------------------------------------------------------------------

    @unary_handler
    def OpenJob(
        self, request: training_pb2.OpenJobRequest, context: grpc.ServicerContext
    ) -> training_pb2.JobAck:
        tenant = self._tenant(context)
        if len(request.job_id) != JOB_ID_LEN:
            raise BrokerError(grpc.StatusCode.INVALID_ARGUMENT, "job id must be 16 bytes")
        header = self._envelope(tenant, request.envelope, "train").header
        if len(header.recipients) != 1:
            raise BrokerError(grpc.StatusCode.INVALID_ARGUMENT, "a job envelope names one enclave")
        recipient = header.recipients[0]
        job_hex = request.job_id.hex()
        with Session(self._engine) as session:
            existing = session.get(TrainingJobRow, job_hex)
        if existing is not None and existing.tenant != tenant.name:
            raise BrokerError(
                grpc.StatusCode.PERMISSION_DENIED, "job id is taken by another tenant"
            )
        placement = self._scheduler.place(tenant, recipient.enclave_id, recipient.epoch)
        now = self._now_ms()
        row = TrainingJobRow(
            job_id=job_hex,
            tenant=tenant.name,
            app=header.app,
            model=header.model,
            policy_id=header.policy_id,
            enclave_id=placement.enclave_id,
            state="opening",
            created_at_ms=existing.created_at_ms if existing else now,
            updated_at_ms=now,
        )
        with Session(self._engine) as session:
            session.merge(row)
            session.commit()
        try:
            ack = self._links.stub(placement).OpenJob(request, timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError as err:
            self._update(job_hex, state="failed")
            raise _relay_error(placement.enclave_id, err) from None
        self._update(
            job_hex,
            state="training" if ack.complete else "uploading",
            chunks_acked=ack.next_chunk,
        )
        log.info(
            "training job opened job=%s tenant=%s app=%s enclave=%s next_chunk=%d",
            job_hex, tenant.name, header.app, placement.enclave_id, ack.next_chunk,
        )  # fmt: skip
        return ack

    @streaming_handler
    def Upload(  # type: ignore[override]  # bytes in and out: see _register
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Relay an upload stream as bytes: the broker never parses (or copies) a chunk into a
        message; it checks each request's job id prefix and size, and reads the (small) acks."""
        tenant = self._tenant(context)
        first_raw = next(request_iterator, None)
        if first_raw is None:
            return
        first = _parse(training_pb2.UploadRequest, first_raw, "upload request")
        row = self._row(tenant, first.job_id)
        placement = self._scheduler.locate(row)
        prefix = training_pb2.UploadRequest(job_id=first.job_id).SerializeToString()
        relayed = {"bytes": 0, "chunks": 0}

        def forward() -> Iterator[bytes]:
            for raw in _chain(first_raw, request_iterator):
                if len(raw) > MAX_CHUNK_BYTES + 1024:
                    return  # the enclave would refuse it anyway; don't spend the bandwidth
                if not raw.startswith(prefix):  # another encoding: check the job id properly
                    request = _parse(training_pb2.UploadRequest, raw, "upload request")
                    if request.job_id != first.job_id:
                        return  # one stream, one job
                relayed["bytes"] += len(raw)
                relayed["chunks"] += 1 if len(raw) > len(prefix) else 0
                yield raw

        remaining = context.time_remaining()
        timeout = UPLOAD_TIMEOUT_S if remaining is None else min(UPLOAD_TIMEOUT_S, remaining)
        call = self._links.raw_upload(placement)(forward(), timeout=timeout)
        context.add_callback(call.cancel)
        self._update(row.job_id, add_uploads=1, state="uploading")
        acked = row.chunks_acked
        complete = False
        recorded = time.monotonic()
        try:
            for raw_ack in call:
                ack = _parse(training_pb2.JobAck, raw_ack, "enclave ack")
                acked, complete = ack.next_chunk, ack.complete
                if complete or time.monotonic() - recorded > 0.5:  # metadata, not per chunk
                    recorded = time.monotonic()
                    self._update(
                        row.job_id,
                        chunks_acked=acked,
                        state="training" if complete else "uploading",
                    )
                yield raw_ack
        except grpc.RpcError as err:
            if not context.is_active():
                return
            raise _relay_error(placement.enclave_id, err) from None
        finally:
            call.cancel()
            self._update(row.job_id, add_bytes_relayed=relayed["bytes"], chunks_acked=acked)
            log.info(
                "training upload job=%s tenant=%s enclave=%s chunks=%d bytes=%d acked=%d "
                "complete=%s",
                row.job_id, tenant.name, placement.enclave_id, relayed["chunks"],
                relayed["bytes"], acked, complete,
            )  # fmt: skip

    @unary_handler
    def GetJob(
        self, request: training_pb2.JobRef, context: grpc.ServicerContext
    ) -> training_pb2.JobStatus:
        tenant = self._tenant(context)
        row = self._row(tenant, request.job_id)
        placement = self._scheduler.locate(row)
        try:
            status = self._links.stub(placement).GetJob(request, timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError as err:
            raise _relay_error(placement.enclave_id, err) from None
        state = "uploading" if status.state == "receiving" else status.state
        self._update(row.job_id, state=state, chunks_acked=status.next_chunk)
        return status

    @streaming_handler
    def FetchResult(
        self, request: training_pb2.JobRef, context: grpc.ServicerContext
    ) -> Iterator[training_pb2.TrainingReply]:
        tenant = self._tenant(context)
        row = self._row(tenant, request.job_id)
        placement = self._scheduler.locate(row)
        call = self._links.stub(placement).FetchResult(request, timeout=CONTROL_TIMEOUT_S)
        context.add_callback(call.cancel)
        frames = size = 0
        try:
            for message in call:
                frames += 1
                size += len(message.frame)
                yield training_pb2.TrainingReply(
                    enclave_id=placement.enclave_id, frame=message.frame
                )
        except grpc.RpcError as err:
            if not context.is_active():
                return
            raise _relay_error(placement.enclave_id, err) from None
        log.info(
            "training result relayed job=%s tenant=%s frames=%d bytes=%d",
            row.job_id, tenant.name, frames, size,
        )  # fmt: skip

    @unary_handler
    def CloseJob(
        self, request: training_pb2.CloseJobRequest, context: grpc.ServicerContext
    ) -> training_pb2.CloseJobResponse:
        tenant = self._tenant(context)
        row = self._row(tenant, request.job_id)
        try:
            placement = self._scheduler.locate(row)
            self._links.stub(placement).CloseJob(request, timeout=CONTROL_TIMEOUT_S)
        except BrokerError:
            pass  # the enclave is gone, and the job with it
        except grpc.RpcError as err:
            code, _ = _status(err)
            if code != grpc.StatusCode.NOT_FOUND:  # not found: already gone, nothing to clean
                raise _relay_error(row.enclave_id, err) from None
        self._update(row.job_id, state="cancelled" if request.cancel else "closed")
        self._scheduler.release(row)
        log.info(
            "training job closed job=%s tenant=%s cancel=%s",
            row.job_id,
            tenant.name,
            request.cancel,
        )
        return training_pb2.CloseJobResponse()

    # -- scoring --------------------------------------------------------------------------

    @unary_handler
    def Score(
        self, request: training_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> training_pb2.TrainingReply:
        tenant = self._tenant(context)
        header = self._envelope(tenant, request.envelope, "score").header
        failures: list[str] = []
        started = time.monotonic()
        for recipient in header.recipients:
            try:
                placement = self._scheduler.place(tenant, recipient.enclave_id, recipient.epoch)
            except BrokerError as exc:
                failures.append(f"{recipient.enclave_id}: {exc.message}")
                continue
            try:
                reply = self._links.stub(placement).Score(request, timeout=CONTROL_TIMEOUT_S)
            except grpc.RpcError as err:
                code, details = _status(err)
                if code not in FAILOVER_CODES:
                    raise _relay_error(placement.enclave_id, err) from None
                failures.append(f"{placement.enclave_id}: {code.name} {details}")
                continue
            log.info(
                "score rid=%s tenant=%s app=%s enclave=%s in=%d out=%d ms=%d",
                header.request_id_hex, tenant.name, header.app, placement.enclave_id,
                len(request.envelope) + len(request.artifact), len(reply.frame),
                int((time.monotonic() - started) * 1000),
            )  # fmt: skip
            return training_pb2.TrainingReply(enclave_id=placement.enclave_id, frame=reply.frame)
        raise BrokerError(
            grpc.StatusCode.UNAVAILABLE,
            f"no candidate could score: {'; '.join(failures) or 'none'}",
        )


def _parse(kind: Any, raw: bytes, what: str) -> Any:
    try:
        return kind.FromString(raw)
    except Exception:  # protobuf DecodeError
        raise BrokerError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {what}") from None


def _chain(first: T, rest: Iterator[T]) -> Iterator[T]:
    yield first
    yield from rest


def jobs(engine: Engine) -> list[TrainingJobRow]:
    """Every job row, newest first (operators, tests)."""
    with Session(engine) as session:
        stmt = select(TrainingJobRow).order_by(TrainingJobRow.created_at_ms.desc())  # type: ignore[attr-defined]
        return list(session.exec(stmt).all())


def _register(servicer: TrainingGatewayServicer, server: grpc.Server) -> None:
    """Like the generated ``add_TrainingGatewayServicer_to_server``, but ``Upload`` takes and
    yields serialized bytes (the broker relays chunks without parsing them)."""
    pb = training_pb2
    handlers = {
        "OpenJob": grpc.unary_unary_rpc_method_handler(
            servicer.OpenJob, pb.OpenJobRequest.FromString, pb.JobAck.SerializeToString
        ),
        "Upload": grpc.stream_stream_rpc_method_handler(servicer.Upload),
        "GetJob": grpc.unary_unary_rpc_method_handler(
            servicer.GetJob, pb.JobRef.FromString, pb.JobStatus.SerializeToString
        ),
        "FetchResult": grpc.unary_stream_rpc_method_handler(
            servicer.FetchResult, pb.JobRef.FromString, pb.TrainingReply.SerializeToString
        ),
        "CloseJob": grpc.unary_unary_rpc_method_handler(
            servicer.CloseJob, pb.CloseJobRequest.FromString, pb.CloseJobResponse.SerializeToString
        ),
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score, pb.ScoreRequest.FromString, pb.TrainingReply.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def add_training_service(
    server: grpc.Server, config: BrokerConfig, registry: Registry
) -> TrainingGatewayServicer:
    """Register TrainingGateway on ``server``; its enclave links close when the server ends."""
    servicer = TrainingGatewayServicer(config, registry)
    _register(servicer, server)

    def close_when_done() -> None:
        server.wait_for_termination()
        servicer.close()

    threading.Thread(target=close_when_done, name="broker-training-links", daemon=True).start()
    return servicer
