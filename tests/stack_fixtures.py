"""The whole system in one process, for end-to-end tests: dev PKI, a SIMULATED vendor, reference
values pinning the enclaves' measurement, a real broker (gRPC + mTLS) with recording and hostile
interceptors, real enclaves and a real edge (uvicorn). Nothing is faked below the HTTP API.

``Recorder`` keeps ``SerializeToString()`` of every message the broker received or sent;
``Tamper`` makes the broker hostile on demand (flip a reply frame, swap directory keys);
``LogRecorder`` keeps every log record so tests can read what the broker logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import grpc
import httpx
import openai
import yaml

from attestation import sim, sim_vendor
from cloud_broker.config import BrokerConfig, TenantPolicy
from cloud_broker.server import RunningBroker
from cloud_broker.server import serve as serve_broker
from edge_agent.config import AppConfig, ConstraintsConfig, EdgeConfig
from edge_agent.server import RunningEdge
from edge_agent.server import serve as serve_edge
from enclave.config import EnclaveConfig, KeysSection, TEESection, TLSSection, WorkloadSection
from enclave.measurement import measure
from enclave.server import RunningEnclave
from enclave.server import serve as serve_enclave
from sovra.envelope import Envelope
from sovra.pki import Identity, IssuedCert, init_pki
from sovra.tls import TLSFiles, secure_channel
from sovra.v1 import broker_pb2, enclave_pb2, enclave_pb2_grpc

TENANT: Final = "demo"
APP: Final = "e2e-app"
REGION: Final = "cn-north-1"
ENCLAVE_IDS: Final = ("enclave-1", "enclave-2")
LLAMA_MODEL: Final = "smollm2-135m"
START_TIMEOUT_S: Final = 60.0

DISPATCH: Final = "/sovra.v1.EdgeGateway/Dispatch"
DISPATCH_STREAM: Final = "/sovra.v1.EdgeGateway/DispatchStream"
LIST_ENCLAVES: Final = "/sovra.v1.EdgeGateway/ListEnclaves"


# -- broker interceptors ---------------------------------------------------------------------


@dataclass(frozen=True)
class Captured:
    method: str
    direction: str  # "request" | "response"
    data: bytes


def _wrap_handler(
    handler: grpc.RpcMethodHandler,
    on_request: Callable[[Any, grpc.ServicerContext], Any],
    on_response: Callable[[Any, int], Any],
) -> grpc.RpcMethodHandler:
    """The same handler with hooks around each request and response message (unary,
    server-streaming and bidi; the broker has no client-streaming-only methods)."""
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            request = on_request(request, context)
            return on_response(inner(request, context), 0)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            request = on_request(request, context)
            for index, reply in enumerate(inner_stream(request, context)):
                yield on_response(reply, index)

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream is not None:  # training uploads (bidi)
        inner_bidi = handler.stream_stream

        def bidi(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            seen = (on_request(r, context) for r in requests)
            for index, reply in enumerate(inner_bidi(seen, context)):
                yield on_response(reply, index)

        return grpc.stream_stream_rpc_method_handler(
            bidi, handler.request_deserializer, handler.response_serializer
        )
    raise AssertionError(f"unexpected handler kind for {handler!r}")


class Recorder(grpc.ServerInterceptor):
    """Records the serialized bytes of every request and response message the broker handles."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[Captured] = []

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def on_request(request: Any, _context: grpc.ServicerContext) -> Any:
            self._add(Captured(method, "request", _wire(request)))
            return request

        def on_response(reply: Any, _index: int) -> Any:
            self._add(Captured(method, "response", _wire(reply)))
            return reply

        return _wrap_handler(handler, on_request, on_response)

    def _add(self, item: Captured) -> None:
        with self._lock:
            self._seen.append(item)

    @property
    def seen(self) -> list[Captured]:
        with self._lock:
            return list(self._seen)

    def raw(self) -> list[bytes]:
        return [c.data for c in self.seen]

    def envelopes(self) -> list[bytes]:
        """Every envelope edges sent through Dispatch / DispatchStream, in arrival order."""
        return [
            enclave_pb2.SealedRequest.FromString(c.data).envelope
            for c in self.seen
            if c.direction == "request" and c.method in (DISPATCH, DISPATCH_STREAM)
        ]

    def envelope_for(self, request_id_hex: str) -> bytes:
        for data in self.envelopes():
            if Envelope.decode(data).header.request_id_hex == request_id_hex:
                return data
        raise AssertionError(f"the broker relayed no envelope with request id {request_id_hex}")

    def envelopes_from(self, edge_key_hex: str) -> list[bytes]:
        """The envelopes signed by one edge identity key."""
        return [
            e for e in self.envelopes() if Envelope.decode(e).header.edge_key.hex() == edge_key_hex
        ]

    def count(self, method: str, direction: str = "request") -> int:
        return sum(1 for c in self.seen if c.method == method and c.direction == direction)


def _wire(message: Any) -> bytes:
    """A message as it went over the wire (handlers relaying raw bytes get bytes)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def flip_byte(data: bytes, index: int = -1) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


class Tamper(grpc.ServerInterceptor):
    """A hostile broker on demand. ``flip_frame``: index of the reply frame whose last byte is
    flipped on the way back to the edge (unary replies are frame 0). ``swap_keys``: in
    ListEnclaves replies, exchange the ``keys`` (or only their ``public_key``) of two enclaves.
    Everything is off by default; use :meth:`active` so a test always switches it off again."""

    def __init__(self) -> None:
        self.flip_frame: int | None = None
        self.swap_keys: tuple[str, str] | None = None
        self.swap_what = "keys"  # "keys" | "public_key"
        self.flipped = 0
        self.swapped = 0

    @contextlib.contextmanager
    def active(self, **settings: Any) -> Iterator[Tamper]:
        for name, value in settings.items():
            if not hasattr(self, name):
                raise AttributeError(name)
            setattr(self, name, value)
        self.flipped = self.swapped = 0
        try:
            yield self
        finally:
            self.flip_frame, self.swap_keys, self.swap_what = None, None, "keys"

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if method in (DISPATCH, DISPATCH_STREAM):
            return _wrap_handler(handler, lambda r, _c: r, self._tamper_reply)
        if method == LIST_ENCLAVES:
            return _wrap_handler(handler, lambda r, _c: r, self._tamper_directory)
        return handler

    def _tamper_reply(self, reply: broker_pb2.DispatchReply, index: int) -> Any:
        if self.flip_frame is None or index != self.flip_frame:
            return reply
        self.flipped += 1
        return broker_pb2.DispatchReply(enclave_id=reply.enclave_id, frame=flip_byte(reply.frame))

    def _tamper_directory(self, reply: broker_pb2.ListEnclavesResponse, _index: int) -> Any:
        if self.swap_keys is None:
            return reply
        first, second = self.swap_keys
        out = broker_pb2.ListEnclavesResponse()
        out.CopyFrom(reply)
        by_id = {d.enclave_id: d for d in out.enclaves}
        a, b = by_id[first], by_id[second]
        if self.swap_what == "keys":
            keys_a, keys_b = list(a.keys), list(b.keys)
            del a.keys[:], b.keys[:]
            a.keys.extend(keys_b)
            b.keys.extend(keys_a)
        else:
            for key_a, key_b in zip(a.keys, b.keys, strict=False):
                key_a.public_key, key_b.public_key = key_b.public_key, key_a.public_key
        self.swapped += 1
        return out


# -- logs ------------------------------------------------------------------------------------


class LogRecorder(logging.Handler):
    """Every record, formatted with its traceback, tagged with logger and thread name."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s [%(threadName)s] %(message)s"))
        self._records_lock = threading.Lock()
        self.records: list[tuple[str, str, str]] = []  # logger, thread, formatted text

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a broken record must not break the system under test
            text = f"<unformattable record from {record.name}>"
        with self._records_lock:
            self.records.append((record.name, record.threadName or "", text))

    def text(self, predicate: Callable[[str, str], bool] = lambda _n, _t: True) -> str:
        with self._records_lock:
            return "\n".join(t for name, thread, t in self.records if predicate(name, thread))

    def broker_text(self) -> str:
        """What the broker logged: its own loggers, and anything logged on its RPC threads
        (gRPC's own handler-exception logs included)."""
        return self.text(lambda n, t: n.startswith("cloud_broker") or t.startswith("broker-rpc"))

    def edge_text(self) -> str:
        return self.text(lambda n, _t: n.startswith(("sovra.edge", "edge_agent")))


@contextlib.contextmanager
def recording_logs() -> Iterator[LogRecorder]:
    root = logging.getLogger()
    recorder = LogRecorder()
    previous = root.level
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)
    try:
        yield recorder
    finally:
        root.removeHandler(recorder)
        root.setLevel(previous)


# -- the stack -------------------------------------------------------------------------------


@dataclass
class InProcessStack:
    root: Path
    pki: dict[str, IssuedCert]
    reference_values: Path
    broker_config: BrokerConfig
    broker: RunningBroker
    recorder: Recorder
    tamper: Tamper
    logs: LogRecorder
    enclaves: dict[str, RunningEnclave]
    edge: RunningEdge
    api_key: str
    model: str
    extra_edges: list[RunningEdge] = field(default_factory=list)
    _channels: list[grpc.Channel] = field(default_factory=list)

    # clients

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.edge.url + "/v1", api_key=self.api_key, max_retries=0, **kwargs
        )

    def http(self, *, api_key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        key = self.api_key if api_key is None else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.edge.url, headers=headers, timeout=timeout)

    def tls(self, identity: Identity) -> TLSFiles:
        return TLSFiles.from_issued(self.pki[identity.file_stem])

    def enclave_stub_as_broker(self, enclave_id: str) -> enclave_pb2_grpc.EnclaveServiceStub:
        """EnclaveService of ``enclave_id``, called with the BROKER's mTLS identity."""
        channel = secure_channel(
            self.enclaves[enclave_id].address,
            self.tls(Identity.broker()),
            server_identity=Identity.enclave(enclave_id),
        )
        self._channels.append(channel)
        return enclave_pb2_grpc.EnclaveServiceStub(channel)

    # the broker's database

    @property
    def db_path(self) -> Path:
        return Path(self.broker_config.database.removeprefix("sqlite:///"))

    def db_files(self) -> list[Path]:
        db = self.db_path
        return [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]

    def db_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.db_files())

    def request_rows(self) -> list[dict[str, Any]]:
        # Rows are written behind the reply (cloud_broker/request_log.py): wait for them first.
        assert self.broker.dispatcher.flush_records(timeout=10)
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=10)) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY id")]

    def request_row(self, request_id_hex: str, timeout: float = 10.0) -> dict[str, Any]:
        """The broker's row for one request. A stream's row is written when the broker's relay
        ends, which may be just after the edge has answered, so wait for it (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            rows = [r for r in self.request_rows() if r["request_id"] == request_id_hex]
            if rows or time.monotonic() > deadline:
                break
            time.sleep(0.02)  # polling the real broker's database, not timing anything
        assert len(rows) == 1, f"expected one broker row for {request_id_hex}, got {rows}"
        return rows[0]

    # the edge's audit log

    def audit(self, kind: str = "request", edge: RunningEdge | None = None) -> list[dict[str, Any]]:
        runtime = (edge or self.edge).runtime
        return [e.record for e in runtime.audit.tail(10_000) if e.kind == kind]

    def audit_for(self, request_id_hex: str) -> dict[str, Any]:
        records = [r for r in self.audit() if r["request_id"] == request_id_hex]
        assert len(records) == 1, f"expected one audit record for {request_id_hex}: {records}"
        return records[0]

    # more edges against the same broker

    def start_edge(self, name: str, **overrides: Any) -> RunningEdge:
        """Another edge of the same tenant (own state dir and identity key), same API key."""
        config = _edge_config(
            self.root / name,
            broker_address=self.broker.address,
            reference_values=self.reference_values,
            tls=self.tls(Identity.edge(TENANT)),
            api_key=self.api_key,
            model=self.model,
            **overrides,
        )
        edge = serve_edge(config)
        self.extra_edges.append(edge)
        return edge

    def stop(self) -> None:
        for channel in self._channels:
            channel.close()
        for edge in [*self.extra_edges, self.edge]:
            edge.stop()
        for running in self.enclaves.values():
            running.stop(grace=0)
        self.broker.stop(0)


def _write_reference_values(path: Path, measurements: list[str], root_cert: Path) -> None:
    doc = {
        "version": 1,
        "simulation": "allow",
        "tee_types": [sim.SIM_TEE_TYPE],
        "measurements": sorted(set(measurements)),
        "max_evidence_age_s": 1800,
        "trust_anchors": {"sim_vendor_roots": [str(root_cert)]},
        **_npu_reference_values(),
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _npu_reference_values() -> dict[str, Any]:
    """Simulated evidence that reports NPUs (``sovra-sim-tee/2``) needs their firmware
    measurement listed; older attestation code has neither NPUs nor the key."""
    npu_measurement = getattr(sim, "npu_measurement", None)
    firmware = getattr(sim, "DEFAULT_NPU_FIRMWARE", None)
    if npu_measurement is None or firmware is None:
        return {}
    return {"npu_measurements": [npu_measurement(firmware)]}


def _edge_config(
    state_dir: Path,
    *,
    broker_address: str,
    reference_values: Path,
    tls: TLSFiles,
    api_key: str,
    model: str,
    **overrides: Any,
) -> EdgeConfig:
    fields: dict[str, Any] = {
        "tenant": TENANT,
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "state_dir": state_dir,
        "broker": broker_address,
        "reference_values": reference_values,
        "tls": tls,
        "constraints": ConstraintsConfig(regions=(REGION,), allow_simulated=True),
        "apps": (AppConfig(APP, hashlib.sha256(api_key.encode()).hexdigest(), (model,)),),
    }
    fields.update(overrides)
    return EdgeConfig(**fields)


def workload_section(kind: str, model: str, upstream_url: str = "") -> WorkloadSection:
    if kind == "llama":
        return WorkloadSection(kind="llama", models=(model,), n_ctx=512, n_threads=2)
    return WorkloadSection(
        kind="openai-upstream", models=(model,), upstream_url=upstream_url, upstream_model=model
    )


@contextlib.contextmanager
def inprocess_stack(
    root: Path,
    *,
    workload: str = "openai-upstream",
    model: str = "stub-model",
    upstream_url: str = "",
    enclave_ids: tuple[str, ...] = ENCLAVE_IDS,
) -> Iterator[InProcessStack]:
    """Start broker, enclaves and edge in this process; stop all of them on exit."""
    with recording_logs() as logs:
        stack = _start(root, logs, workload, model, upstream_url, enclave_ids)
        try:
            yield stack
        finally:
            stack.stop()


def _start(
    root: Path,
    logs: LogRecorder,
    workload: str,
    model: str,
    upstream_url: str,
    enclave_ids: tuple[str, ...],
) -> InProcessStack:
    pki = init_pki(root / "pki", tenants=(TENANT,), enclaves=enclave_ids)
    vendor_dir = root / "sim-vendor"
    root_cert = sim_vendor.create_root(vendor_dir)
    section = workload_section(workload, model, upstream_url)
    reference_values = root / "reference-values.yaml"
    _write_reference_values(reference_values, [measure(section)], root_cert)
    broker_config = BrokerConfig(
        listen="127.0.0.1:0",
        database=f"sqlite:///{root / 'broker' / 'broker.db'}",
        reference_values=reference_values,
        tls=TLSFiles.from_issued(pki[Identity.broker().file_stem]),
        strategy="least-inflight",
        enclave_call_timeout_s=60,
        tenants=MappingProxyType({TENANT: TenantPolicy(TENANT)}),
    )
    recorder, tamper = Recorder(), Tamper()
    with contextlib.ExitStack() as on_failure:
        # The recorder is outermost: it records what really went over the wire (after tamper).
        broker = serve_broker(broker_config, interceptors=[recorder, tamper])
        on_failure.callback(broker.stop, 0)
        enclaves: dict[str, RunningEnclave] = {}
        for enclave_id in enclave_ids:
            device_key, device_cert = sim_vendor.issue_device(vendor_dir, enclave_id, root / "dev")
            cert = pki[Identity.enclave(enclave_id).file_stem]
            config = EnclaveConfig(
                enclave_id=enclave_id,
                region=REGION,
                broker=broker.address,
                state_dir=root / enclave_id,
                tls=TLSSection(cert.cert_path, cert.key_path, cert.ca_path),
                tee=TEESection(device_key, device_cert),
                workload=section,
                keys=KeysSection(rotate_s=600, overlap_s=120),
            )
            enclaves[enclave_id] = serve_enclave(config)
            on_failure.callback(enclaves[enclave_id].stop, 0)
        for enclave_id, running in enclaves.items():
            if not running.registered.wait(START_TIMEOUT_S):
                raise RuntimeError(f"{enclave_id} did not register with the broker")
        api_key = "sk-e2e-" + secrets.token_urlsafe(24)
        edge = serve_edge(
            _edge_config(
                root / "edge",
                broker_address=broker.address,
                reference_values=reference_values,
                tls=TLSFiles.from_issued(pki[Identity.edge(TENANT).file_stem]),
                api_key=api_key,
                model=model,
            )
        )
        on_failure.pop_all()  # started: from here on InProcessStack.stop() owns everything
    return InProcessStack(
        root=root,
        pki=pki,
        reference_values=reference_values,
        broker_config=broker_config,
        broker=broker,
        recorder=recorder,
        tamper=tamper,
        logs=logs,
        enclaves=enclaves,
        edge=edge,
        api_key=api_key,
        model=model,
    )
