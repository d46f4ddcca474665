"""Cloud broker: admission by attestation, directory, dispatch with failover, metadata-only DB.

Real gRPC with mTLS on 127.0.0.1 (port 0) everywhere: the broker, test enclaves that open
envelopes for real, and edge/enclave clients with dev PKI certificates.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from attestation import ear
from attestation.reference_values import ReferenceValues, ReferenceValuesFile
from attestation.sim import (
    DEFAULT_NPU_FIRMWARE,
    SIM_FORMAT,
    SimClaims,
    encode_evidence,
    npu_measurement,
    report_data,
)
from attestation.verifier import OfferedKey, verify_key
from cloud_broker import cli, db
from cloud_broker.config import BrokerConfig, ConfigError
from cloud_broker.db import open_database
from cloud_broker.server import RunningBroker, ServeError, serve
from edge_agent.trusted_set import NotAccepted, TrustedEnclaveSet
from sovra import suites
from sovra.audit import AuditLog
from sovra.envelope import (
    Constraints,
    Envelope,
    Header,
    Recipient,
    ReplyReader,
    ReplyWriter,
    new_request_id,
    seal_request,
)
from sovra.pki import Identity, IssuedCert, build_certificate, init_pki
from sovra.tls import TLSFiles, secure_channel, server_credentials
from sovra.v1 import broker_pb2, broker_pb2_grpc, enclave_pb2, enclave_pb2_grpc

pytestmark = pytest.mark.timeout(60)

RPC_TIMEOUT = 10.0
MEASUREMENT = "ab" * 48
REGION = "cn-north"
MODEL = "qwen-7b"
CANARY = "CANARY-7f3a9c-patient-Zhang-Wei"


# --------------------------------------------------------------------------------------------
# PKI, simulated vendor, reference values
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SimVendor:
    root_path: Path
    device_key: ec.EllipticCurvePrivateKey
    device_chain: tuple[Any, ...]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, IssuedCert]:
    directory = tmp_path_factory.mktemp("broker") / "pki"
    return init_pki(directory, tenants=("demo", "other"), enclaves=("e1", "e2", "e3"))


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> SimVendor:
    """A simulated vendor root (P-384, CA) and one device certificate it issued."""
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = build_certificate(
        subject_cn="SIMULATED Ascend vendor root", public_key=root_key.public_key(),
        issuer_cert=None, issuer_key=root_key, is_ca=True, path_length=0, days=30,
    )  # fmt: skip
    device_key = ec.generate_private_key(ec.SECP384R1())
    device = build_certificate(
        subject_cn="SIMULATED Ascend device", public_key=device_key.public_key(),
        issuer_cert=root, issuer_key=root_key, is_ca=False, days=30,
    )  # fmt: skip
    root_path = tmp_path_factory.mktemp("vendor") / "sim-vendor-root.pem"
    root_path.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return SimVendor(root_path, device_key, (device,))


@pytest.fixture(scope="module")
def rv_path(vendor: SimVendor) -> Path:
    path = vendor.root_path.parent / "reference-values.yaml"
    path.write_text(
        "version: 1\nsimulation: allow\ntee_types: [sim-ascend-cvm]\n"
        f"measurements: [{MEASUREMENT}]\nmax_evidence_age_s: 1800\n"
        f"trust_anchors:\n  sim_vendor_roots: [{vendor.root_path.name}]\n"
        f"npu_measurements: [{npu_measurement(DEFAULT_NPU_FIRMWARE)}]\n"
    )
    return path


def tls_for(pki: dict[str, IssuedCert], identity: Identity) -> TLSFiles:
    return TLSFiles.from_issued(pki[identity.file_stem])


# --------------------------------------------------------------------------------------------
# Broker
# --------------------------------------------------------------------------------------------


class FakeClock:
    """Real time plus an offset the test moves forward: deterministic jumps, no sleeps."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Capture(grpc.ServerInterceptor):
    """Records the serialized bytes of every message the broker receives and sends."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request: Any, context: Any) -> Any:
                self.seen.append(request.SerializeToString())
                reply = inner(request, context)
                self.seen.append(reply.SerializeToString())
                return reply

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: Any) -> Iterator[Any]:
                self.seen.append(request.SerializeToString())
                for reply in inner_stream(request, context):
                    self.seen.append(reply.SerializeToString())
                    yield reply

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


def write_config(
    directory: Path, pki: dict[str, IssuedCert], rv_path: Path, extra: str = "", **top: Any
) -> Path:
    broker = pki["broker-broker"]
    settings = {
        "listen": '"127.0.0.1:0"', "database": '"sqlite:///broker.db"',
        "reference_values": f'"{rv_path}"', "strategy": '"ordered"',
        "enclave_call_timeout_s": 10,
    }  # fmt: skip
    settings.update({k: v for k, v in top.items()})
    lines = [f"{k} = {v}" for k, v in settings.items()]
    lines += [
        "[tls]", f'cert = "{broker.cert_path}"', f'key = "{broker.key_path}"',
        f'ca = "{broker.ca_path}"', "[tenants.demo]",
    ]  # fmt: skip
    path = directory / "broker.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@dataclasses.dataclass
class BrokerRig:
    broker: RunningBroker
    config: BrokerConfig
    clock: FakeClock
    capture: Capture
    channels: list[grpc.Channel]
    pki: dict[str, IssuedCert]

    def channel(self, identity: Identity) -> grpc.Channel:
        channel = secure_channel(
            self.broker.address, tls_for(self.pki, identity), server_identity=Identity.broker()
        )
        self.channels.append(channel)
        return channel

    def edge(self, tenant: str = "demo") -> broker_pb2_grpc.EdgeGatewayStub:
        return broker_pb2_grpc.EdgeGatewayStub(self.channel(Identity.edge(tenant)))

    def registry_stub(self, identity: Identity) -> broker_pb2_grpc.EnclaveRegistryStub:
        return broker_pb2_grpc.EnclaveRegistryStub(self.channel(identity))

    def db_bytes(self) -> bytes:
        db = Path(self.config.database.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())

    def enclave_status(self, enclave_id: str) -> tuple[str, str]:
        db = self.config.database.removeprefix("sqlite:///")
        with sqlite3.connect(db) as conn:
            sql = "SELECT status, status_reason FROM enclaves WHERE enclave_id = ?"
            return tuple(conn.execute(sql, (enclave_id,)).fetchone())

    def request_rows(self) -> list[dict[str, Any]]:
        # Rows are written behind the reply (cloud_broker/request_log.py): wait for them first.
        assert self.broker.dispatcher.flush_records(timeout=10)
        db = self.config.database.removeprefix("sqlite:///")
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY id")]


@pytest.fixture
def make_broker(
    tmp_path: Path, pki: dict[str, IssuedCert], rv_path: Path
) -> Iterator[Callable[..., BrokerRig]]:
    rigs: list[BrokerRig] = []

    def make(extra: str = "", **top: Any) -> BrokerRig:
        config = BrokerConfig.from_toml(write_config(tmp_path, pki, rv_path, extra, **top))
        clock, capture = FakeClock(), Capture()
        broker = serve(config, interceptors=[capture], clock=clock)
        rigs.append(BrokerRig(broker, config, clock, capture, [], pki))
        return rigs[-1]

    yield make
    for rig in rigs:
        for channel in rig.channels:
            channel.close()
        rig.broker.stop(0)


@pytest.fixture
def rig(make_broker: Callable[..., BrokerRig]) -> BrokerRig:
    return make_broker()


# --------------------------------------------------------------------------------------------
# Test enclave: a real EnclaveService that opens envelopes and seals replies
# --------------------------------------------------------------------------------------------


class TestEnclave(enclave_pb2_grpc.EnclaveServiceServicer):
    """``mode``: ok | busy (RESOURCE_EXHAUSTED) | refuse (PERMISSION_DENIED) | hang (stream
    sends one frame, then waits for ``release``; unary waits for ``release`` before answering).
    ``cancelled`` is set when the broker cancels a call it made to this enclave."""

    __test__ = False

    def __init__(self, enclave_id: str, pki: dict[str, IssuedCert], vendor: SimVendor) -> None:
        self.id = enclave_id
        self.identity = Identity.enclave(enclave_id)
        self.tls = tls_for(pki, self.identity)
        self.vendor = vendor
        self.keys = {1: suites.KeyPair.generate()}
        self.mode = "ok"
        self.release = threading.Event()
        self.cancelled = threading.Event()
        self.calls = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        enclave_pb2_grpc.add_EnclaveServiceServicer_to_server(self, self.server)
        port = self.server.add_secure_port("127.0.0.1:0", server_credentials(self.tls))
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    # --- attestation -------------------------------------------------------------------------

    def offered_key(
        self, nonce: bytes, epoch: int = 1, *, bind: bytes | None = None,
        not_after_s: float = 3600, region: str = REGION, now: float | None = None,
    ) -> broker_pb2.EnclaveKey:  # fmt: skip
        """Key ``epoch`` with evidence binding ``bind`` (default: that key's own public bytes)."""
        now = time.time() if now is None else now
        pub = self.keys[epoch].public_bytes
        receipt = self.receipt_key(epoch)
        not_after_ms = int((now + not_after_s) * 1000)
        claims = SimClaims(
            enclave_id=self.id, region=region, measurement=MEASUREMENT,
            report_data=report_data(bind if bind is not None else pub, epoch, nonce, receipt),
            nonce=nonce, epoch=epoch, kem=suites.KEM_HYBRID, key_not_after_ms=not_after_ms,
            issued_at_ms=int(now * 1000), receipt_key=receipt,
        )  # fmt: skip
        evidence = encode_evidence(claims, self.vendor.device_key, list(self.vendor.device_chain))
        return broker_pb2.EnclaveKey(
            epoch=epoch, kem=suites.KEM_HYBRID, public_key=pub, not_after_ms=not_after_ms,
            evidence_format=SIM_FORMAT, evidence=evidence, nonce=nonce,
            receipt_public_key=receipt,
        )  # fmt: skip

    def receipt_key(self, epoch: int) -> bytes:
        """The (stand-in) receipt public key of ``epoch``: 32 bytes, distinct per enclave."""
        return hashlib.sha256(f"receipt/{self.id}/{epoch}".encode()).digest()

    def register_request(
        self, nonce: bytes, *, models: tuple[str, ...] = (MODEL,), enclave_id: str | None = None,
        region: str = REGION, **key_args: Any,
    ) -> broker_pb2.RegisterRequest:  # fmt: skip
        descriptor = broker_pb2.EnclaveDescriptor(
            enclave_id=enclave_id or self.id, region=region, tee_type="sim-ascend-cvm",
            simulated=True, models=list(models), keys=[self.offered_key(nonce, **key_args)],
        )  # fmt: skip
        return broker_pb2.RegisterRequest(enclave=descriptor, address=self.address, nonce=nonce)

    def admit(self, rig: BrokerRig, models: tuple[str, ...] = (MODEL,)) -> None:
        stub = rig.registry_stub(self.identity)
        nonce = stub.Challenge(broker_pb2.ChallengeRequest(), timeout=RPC_TIMEOUT).nonce
        reply = stub.Register(self.register_request(nonce, models=models), timeout=RPC_TIMEOUT)
        assert reply.status == "admitted"

    # --- EnclaveService ----------------------------------------------------------------------

    def _open(self, request: enclave_pb2.SealedRequest, context: Any) -> tuple[bytes, ReplyWriter]:
        self.calls += 1
        if self.mode == "busy":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "enclave busy")
        if self.mode == "refuse":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "sealed constraints not satisfied")
        envelope = Envelope.decode(request.envelope)
        envelope.verify()
        epoch = next(r.epoch for r in envelope.header.recipients if r.enclave_id == self.id)
        payload, reply_keys = envelope.open(Recipient(self.id, epoch), self.keys[epoch].private_key)
        return payload, ReplyWriter(reply_keys)

    def Process(self, request: enclave_pb2.SealedRequest, context: Any) -> enclave_pb2.SealedFrame:
        payload, writer = self._open(request, context)
        if self.mode == "hang":
            context.add_callback(lambda: None if context.is_active() else self.cancelled.set())
            self.release.wait(RPC_TIMEOUT)
        return enclave_pb2.SealedFrame(frame=writer.frame(b"echo:" + payload, final=True))

    def ProcessStream(
        self, request: enclave_pb2.SealedRequest, context: Any
    ) -> Iterator[enclave_pb2.SealedFrame]:
        payload, writer = self._open(request, context)
        yield enclave_pb2.SealedFrame(frame=writer.frame(b"part0:" + payload))
        if self.mode == "hang":
            self.release.wait(RPC_TIMEOUT)
        yield enclave_pb2.SealedFrame(frame=writer.frame(b"part1"))
        yield enclave_pb2.SealedFrame(frame=writer.frame(b"", final=True))


@pytest.fixture
def enclaves(pki: dict[str, IssuedCert], vendor: SimVendor) -> Iterator[dict[str, TestEnclave]]:
    made = {eid: TestEnclave(eid, pki, vendor) for eid in ("e1", "e2", "e3")}
    yield made
    for enclave in made.values():
        enclave.release.set()
        enclave.server.stop(0)


# --------------------------------------------------------------------------------------------
# Edge side: sealing as an edge would
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sealed:
    envelope: bytes
    reader: ReplyReader
    request_id: bytes


EDGE_KEY = ed25519.Ed25519PrivateKey.generate()


def seal(
    recipients: list[TestEnclave], payload: bytes = b"hello", *, tenant: str = "demo",
    expires_in_ms: int = 60_000, issued_ago_ms: int = 0, stream: bool = False,
    epochs: dict[str, int] | None = None, signing_key: ed25519.Ed25519PrivateKey = EDGE_KEY,
    clock: Callable[[], float] = time.time,
) -> Sealed:  # fmt: skip
    now = int(clock() * 1000) - issued_ago_ms
    epochs = epochs or {}
    rcpts = [Recipient(e.id, epochs.get(e.id, 1)) for e in recipients]
    header = Header(
        suite=suites.DEFAULT_SUITE, request_id=new_request_id(), tenant=tenant, app="radiology",
        model=MODEL, operation="chat", stream=stream, labels=("phi",),
        constraints=Constraints(regions=(REGION,), allow_simulated=True), policy_id="abc123",
        issued_at_ms=now, expires_at_ms=now + expires_in_ms, recipients=tuple(rcpts),
        edge_key=signing_key.public_key().public_bytes_raw(),
    )  # fmt: skip
    keys = [(r, e.keys.get(r.epoch, e.keys[1]).public_bytes) for r, e in zip(rcpts, recipients)]
    envelope, secrets = seal_request(header, payload, keys, signing_key)
    return Sealed(envelope, ReplyReader(secrets.reply_keys), header.request_id)


def sealed_request(sealed: Sealed) -> enclave_pb2.SealedRequest:
    return enclave_pb2.SealedRequest(envelope=sealed.envelope)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_status(err: grpc.RpcError, code: grpc.StatusCode, fragment: str = "") -> None:
    assert err.code() == code, (err.code(), err.details())
    assert fragment in (err.details() or ""), err.details()


# --------------------------------------------------------------------------------------------
# Admission
# --------------------------------------------------------------------------------------------


def test_admission_directory_models_and_health(
    rig: BrokerRig, enclaves: dict[str, TestEnclave], rv_path: Path
) -> None:
    enclaves["e1"].admit(rig, models=(MODEL,))
    enclaves["e2"].admit(rig, models=("bge-m3",))
    edge = rig.edge()

    listing = edge.ListEnclaves(broker_pb2.ListEnclavesRequest(), timeout=RPC_TIMEOUT)
    assert [d.enclave_id for d in listing.enclaves] == ["e1", "e2"]
    e1 = listing.enclaves[0]
    assert (e1.region, e1.tee_type, e1.simulated, e1.broker_status) == (
        REGION, "sim-ascend-cvm", True, "admitted",
    )  # fmt: skip
    # The directory carries what an edge needs to verify the key itself, without the broker.
    key = e1.keys[0]
    offered = OfferedKey("e1", key.epoch, key.kem, key.public_key, key.not_after_ms,
                         key.evidence_format, key.evidence,
                         receipt_public_key=key.receipt_public_key)  # fmt: skip
    assert key.receipt_public_key == enclaves["e1"].receipt_key(key.epoch)
    assert verify_key(offered, ReferenceValues.load(rv_path)).status == "affirming"

    only = edge.ListEnclaves(broker_pb2.ListEnclavesRequest(model="bge-m3"), timeout=RPC_TIMEOUT)
    assert [d.enclave_id for d in only.enclaves] == ["e2"]
    models = edge.ListModels(broker_pb2.ListModelsRequest(), timeout=RPC_TIMEOUT)
    assert list(models.models) == ["bge-m3", MODEL]

    reflected = ProtoReflectionDescriptorDatabase(rig.channel(Identity.edge("demo")))
    assert {"sovra.v1.EdgeGateway", "sovra.v1.EnclaveRegistry"} <= set(reflected.get_services())
    health = health_pb2_grpc.HealthStub(rig.channel(Identity.edge("demo")))
    for service in ("", "sovra.v1.EdgeGateway", "sovra.v1.EnclaveRegistry"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_register_refuses_unknown_and_reused_nonces(
    rig: BrokerRig, enclaves: dict[str, TestEnclave]
) -> None:
    e1 = enclaves["e1"]
    stub = rig.registry_stub(e1.identity)
    err = rpc_error(lambda: stub.Register(e1.register_request(os.urandom(32)), timeout=RPC_TIMEOUT))
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "unknown or expired challenge")

    nonce = stub.Challenge(broker_pb2.ChallengeRequest(), timeout=RPC_TIMEOUT).nonce
    assert len(nonce) == 32
    stub.Register(e1.register_request(nonce), timeout=RPC_TIMEOUT)
    err = rpc_error(lambda: stub.Register(e1.register_request(nonce), timeout=RPC_TIMEOUT))
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "call Challenge again")

    # A nonce issued to another enclave is not this enclave's to use.
    e2 = enclaves["e2"]
    foreign = stub.Challenge(broker_pb2.ChallengeRequest(), timeout=RPC_TIMEOUT).nonce
    stub2 = rig.registry_stub(e2.identity)
    err = rpc_error(lambda: stub2.Register(e2.register_request(foreign), timeout=RPC_TIMEOUT))
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION)


def test_register_refuses_expired_challenge(
    rig: BrokerRig, enclaves: dict[str, TestEnclave]
) -> None:
    e1 = enclaves["e1"]
    stub = rig.registry_stub(e1.identity)
    nonce = stub.Challenge(broker_pb2.ChallengeRequest(), timeout=RPC_TIMEOUT).nonce
    rig.clock.advance(rig.config.challenge_ttl_s + 1)
    request = e1.register_request(nonce, now=rig.clock())
    err = rpc_error(lambda: stub.Register(request, timeout=RPC_TIMEOUT))
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "expired challenge")


@pytest.mark.parametrize(
    ("tamper", "code", "fragment"),
    [
        ("other_key", grpc.StatusCode.PERMISSION_DENIED, "does not bind the offered public key"),
        ("other_id", grpc.StatusCode.PERMISSION_DENIED, "client certificate is enclave 'e1'"),
        ("region", grpc.StatusCode.PERMISSION_DENIED, "descriptor says region"),
        ("no_keys", grpc.StatusCode.INVALID_ARGUMENT, "at least one key"),
        ("bad_address", grpc.StatusCode.INVALID_ARGUMENT, "not host:port"),
    ],
)
def test_register_refusals(
    rig: BrokerRig, enclaves: dict[str, TestEnclave], tamper: str, code: grpc.StatusCode,
    fragment: str,
) -> None:  # fmt: skip
    e1 = enclaves["e1"]
    stub = rig.registry_stub(e1.identity)
    nonce = stub.Challenge(broker_pb2.ChallengeRequest(), timeout=RPC_TIMEOUT).nonce
    if tamper == "other_key":
        request = e1.register_request(nonce, bind=suites.KeyPair.generate().public_bytes)
    elif tamper == "other_id":
        request = e1.register_request(nonce, enclave_id="e2")
    elif tamper == "region":
        request = e1.register_request(nonce, region="eu-west")
    else:
        request = e1.register_request(nonce)
        if tamper == "no_keys":
            del request.enclave.keys[:]
        else:
            request.address = "no-port"
    assert_status(rpc_error(lambda: stub.Register(request, timeout=RPC_TIMEOUT)), code, fragment)
    listing = rig.edge().ListEnclaves(broker_pb2.ListEnclavesRequest(), timeout=RPC_TIMEOUT)
    assert not listing.enclaves


def test_registry_is_for_enclaves_and_gateway_for_edges(rig: BrokerRig) -> None:
    from_edge = rig.registry_stub(Identity.edge("demo"))
    err = rpc_error(lambda: from_edge.Challenge(broker_pb2.ChallengeRequest(), timeout=5))
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "enclave identities only")

    from_enclave = broker_pb2_grpc.EdgeGatewayStub(rig.channel(Identity.enclave("e1")))
    err = rpc_error(lambda: from_enclave.ListModels(broker_pb2.ListModelsRequest(), timeout=5))
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "edge identities only")

    # "other" has an edge certificate but no [tenants.other] table on this broker.
    err = rpc_error(lambda: rig.edge("other").ListModels(broker_pb2.ListModelsRequest(), timeout=5))
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "not configured")


# --------------------------------------------------------------------------------------------
# Heartbeats, rotation, eviction
# --------------------------------------------------------------------------------------------


def test_eviction_after_missed_heartbeats(rig: BrokerRig, enclaves: dict[str, TestEnclave]) -> None:
    e1 = enclaves["e1"]
    e1.admit(rig)
    stub = rig.registry_stub(e1.identity)
    beat = broker_pb2.HeartbeatRequest(enclave_id="e1")
    assert stub.Heartbeat(beat, timeout=RPC_TIMEOUT).heartbeat_interval_s == 5

    rig.clock.advance(5 * 3 - 1)
    assert rig.broker.registry.evict_stale() == []
    rig.clock.advance(2)
    rig.broker.registry.evict_stale(rig.clock())
    # State, not the return value: the background sweep may have evicted it first.
    assert rig.enclave_status("e1") == ("evicted", "no heartbeat for 16s")

    listing = rig.edge().ListEnclaves(broker_pb2.ListEnclavesRequest(), timeout=RPC_TIMEOUT)
    assert not listing.enclaves
    err = rpc_error(lambda: stub.Heartbeat(beat, timeout=RPC_TIMEOUT))
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "not admitted; register again")
    err = rpc_error(lambda: rig.edge().Dispatch(sealed_request(seal([e1])), timeout=RPC_TIMEOUT))
    assert_status(err, grpc.StatusCode.NOT_FOUND, "none of the 1 candidate enclaves is admitted")

    nonce = stub.Challenge(broker_pb2.ChallengeRequest(), timeout=RPC_TIMEOUT).nonce
    stub.Register(e1.register_request(nonce, now=rig.clock()), timeout=RPC_TIMEOUT)
    assert rig.edge().Dispatch(sealed_request(seal([e1])), timeout=RPC_TIMEOUT).enclave_id == "e1"


def test_rotated_key_in_heartbeat_and_expired_key_dropped(
    make_broker: Callable[..., BrokerRig], enclaves: dict[str, TestEnclave]
) -> None:
    rig = make_broker(heartbeat_interval_s=60)
    e1 = enclaves["e1"]
    stub = rig.registry_stub(e1.identity)
    nonce = stub.Challenge(broker_pb2.ChallengeRequest(), timeout=RPC_TIMEOUT).nonce
    stub.Register(e1.register_request(nonce, not_after_s=100), timeout=RPC_TIMEOUT)

    e1.keys[2] = suites.KeyPair.generate()
    nonce = stub.Challenge(broker_pb2.ChallengeRequest(), timeout=RPC_TIMEOUT).nonce
    beat = broker_pb2.HeartbeatRequest(
        enclave_id="e1", keys=[e1.offered_key(nonce, 2)], nonce=nonce
    )
    stub.Heartbeat(beat, timeout=RPC_TIMEOUT)
    err = rpc_error(lambda: stub.Heartbeat(beat, timeout=RPC_TIMEOUT))  # nonce is used up
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "unknown or expired challenge")

    def epochs() -> list[int]:
        listing = rig.edge().ListEnclaves(broker_pb2.ListEnclavesRequest(), timeout=RPC_TIMEOUT)
        return [k.epoch for d in listing.enclaves for k in d.keys]

    assert epochs() == [1, 2]
    rig.clock.advance(101)  # key 1 expires; the enclave is still within 3 x 60 s
    assert rig.broker.registry.evict_stale() == []
    assert epochs() == [2]
    to_epoch_1 = seal([e1], clock=rig.clock)  # sealed to epoch 1, which is gone
    err = rpc_error(lambda: rig.edge().Dispatch(sealed_request(to_epoch_1), timeout=RPC_TIMEOUT))
    assert_status(err, grpc.StatusCode.NOT_FOUND)
    to_epoch_2 = seal([e1], epochs={"e1": 2}, clock=rig.clock)
    reply = rig.edge().Dispatch(sealed_request(to_epoch_2), timeout=RPC_TIMEOUT)
    assert reply.enclave_id == "e1"


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def test_dispatch_relays_sealed_bytes_and_records_metadata_only(
    rig: BrokerRig, enclaves: dict[str, TestEnclave], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cloud_broker")
    e1, e2 = enclaves["e1"], enclaves["e2"]
    e1.admit(rig)
    e2.admit(rig)
    payload = f'{{"messages":[{{"role":"user","content":"{CANARY}"}}]}}'.encode()
    sealed = seal([e1, e2], payload)

    reply = rig.edge().Dispatch(sealed_request(sealed), timeout=RPC_TIMEOUT)
    assert reply.enclave_id == "e1"
    assert sealed.reader.open(reply.frame) == b"echo:" + payload
    sealed.reader.finish()

    # The capture really saw the traffic, yet no plaintext: the broker only ever held ciphertext.
    ciphertext = Envelope.decode(sealed.envelope).ciphertext
    assert any(ciphertext in raw for raw in rig.capture.seen)
    assert not any(CANARY.encode() in raw for raw in rig.capture.seen)

    [row] = rig.request_rows()
    assert row["request_id"] == sealed.request_id.hex()
    assert (row["tenant"], row["app"], row["model"], row["op"]) == (
        "demo",
        "radiology",
        MODEL,
        "chat",
    )
    assert (row["enclave_id"], row["attempts"], row["candidates"]) == ("e1", 1, 2)
    assert (row["status"], row["stream"], row["frames"]) == ("OK", 0, 1)
    assert row["bytes_in"] == len(sealed.envelope) and row["bytes_out"] == len(reply.frame)
    assert row["created_at_ms"] > 0 and row["duration_ms"] >= 0

    rig.broker.stop(0)  # flush the WAL and release the file before reading its bytes
    stored = rig.db_bytes()
    assert CANARY.encode() not in stored
    for chunk in (ciphertext[i : i + 16] for i in range(0, len(ciphertext) - 16, 16)):
        assert chunk not in stored
    assert reply.frame[:32] not in stored
    assert CANARY not in caplog.text
    assert sealed.request_id.hex() in caplog.text


def test_least_inflight_prefers_idle_enclave(
    make_broker: Callable[..., BrokerRig], enclaves: dict[str, TestEnclave]
) -> None:
    rig = make_broker(strategy='"least-inflight"')
    e1, e2 = enclaves["e1"], enclaves["e2"]
    e1.admit(rig)
    e2.admit(rig)
    e1.mode = "hang"
    held = rig.edge().DispatchStream(sealed_request(seal([e1, e2])), timeout=RPC_TIMEOUT)
    assert next(held).enclave_id == "e1"  # e1 is now busy with one stream
    reply = rig.edge().Dispatch(sealed_request(seal([e1, e2])), timeout=RPC_TIMEOUT)
    assert reply.enclave_id == "e2"
    e1.release.set()
    assert [r.enclave_id for r in held] == ["e1", "e1"]


def test_failover_to_second_candidate_when_first_is_down(
    rig: BrokerRig, enclaves: dict[str, TestEnclave]
) -> None:
    e1, e2 = enclaves["e1"], enclaves["e2"]
    e1.admit(rig)
    e2.admit(rig)
    e1.server.stop(0)
    sealed = seal([e1, e2])
    reply = rig.edge().Dispatch(sealed_request(sealed), timeout=RPC_TIMEOUT)
    assert reply.enclave_id == "e2"
    assert sealed.reader.open(reply.frame) == b"echo:hello"
    [row] = rig.request_rows()
    assert (row["enclave_id"], row["attempts"], row["status"]) == ("e2", 2, "OK")

    e2.server.stop(0)
    err = rpc_error(lambda: rig.edge().Dispatch(sealed_request(seal([e1, e2])), timeout=10))
    assert_status(err, grpc.StatusCode.UNAVAILABLE, "all 2 candidates failed: e1: UNAVAILABLE")
    assert "; e2: UNAVAILABLE" in (err.details() or "")


def test_stream_fails_over_before_first_frame(
    rig: BrokerRig, enclaves: dict[str, TestEnclave]
) -> None:
    e1, e2 = enclaves["e1"], enclaves["e2"]
    e1.admit(rig)
    e2.admit(rig)
    e1.mode = "busy"
    sealed = seal([e1, e2], stream=True)
    replies = list(rig.edge().DispatchStream(sealed_request(sealed), timeout=RPC_TIMEOUT))
    assert {r.enclave_id for r in replies} == {"e2"}
    assert [sealed.reader.open(r.frame) for r in replies] == [b"part0:hello", b"part1", b""]
    sealed.reader.finish()
    [row] = rig.request_rows()
    assert (row["enclave_id"], row["attempts"], row["frames"], row["stream"]) == ("e2", 2, 3, 1)


def test_stream_enclave_dies_mid_stream(rig: BrokerRig, enclaves: dict[str, TestEnclave]) -> None:
    e1, e2 = enclaves["e1"], enclaves["e2"]
    e1.admit(rig)
    e2.admit(rig)
    e1.mode = "hang"
    stream = rig.edge().DispatchStream(sealed_request(seal([e1, e2])), timeout=RPC_TIMEOUT)
    assert next(stream).enclave_id == "e1"
    e1.server.stop(0)
    err = rpc_error(lambda: next(stream))
    assert_status(err, grpc.StatusCode.UNAVAILABLE, "enclave e1 failed mid-stream after 1 frames")
    assert e2.calls == 0  # a second enclave would have started a different reply
    [row] = rig.request_rows()
    assert (row["status"], row["frames"], row["attempts"]) == ("UNAVAILABLE", 1, 1)


def test_edge_cancel_stops_enclave_call_and_is_recorded(
    rig: BrokerRig, enclaves: dict[str, TestEnclave]
) -> None:
    e1 = enclaves["e1"]
    e1.admit(rig)
    e1.mode = "hang"
    stream = rig.edge().DispatchStream(sealed_request(seal([e1])), timeout=RPC_TIMEOUT)
    assert next(stream).enclave_id == "e1"
    stream.cancel()
    deadline = time.monotonic() + 5  # the broker notices the cancel on its own thread
    while not rig.request_rows() and time.monotonic() < deadline:
        time.sleep(0.01)
    [row] = rig.request_rows()
    assert (row["status"], row["frames"]) == ("CANCELLED", 1)
    assert rig.broker.dispatcher.inflight.count("e1") == 0


def test_edge_cancel_of_a_unary_dispatch_cancels_the_enclave_call(
    rig: BrokerRig, enclaves: dict[str, TestEnclave]
) -> None:
    e1 = enclaves["e1"]
    e1.admit(rig)
    e1.mode = "hang"  # Process waits for release
    sealed = seal([e1])
    pending = rig.edge().Dispatch.future(sealed_request(sealed), timeout=RPC_TIMEOUT)
    deadline = time.monotonic() + 5
    while e1.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting for the broker to reach the enclave
    assert e1.calls == 1
    pending.cancel()
    assert e1.cancelled.wait(5), "the broker did not cancel its call to the enclave"
    e1.release.set()
    deadline = time.monotonic() + 5
    while rig.broker.dispatcher.inflight.count("e1") and time.monotonic() < deadline:
        time.sleep(0.01)  # the broker notices the cancel on its own thread
    [row] = rig.request_rows()
    assert (row["request_id"], row["status"], row["frames"]) == (
        sealed.request_id.hex(),
        "CANCELLED",
        0,
    )
    assert rig.broker.dispatcher.inflight.count("e1") == 0


def test_unary_reply_of_more_than_one_message_is_refused(
    rig: BrokerRig, enclaves: dict[str, TestEnclave]
) -> None:
    """Process is unary: the broker reads its reply as a stream (on its own thread), so it
    insists on exactly one message, as a unary client would."""
    e3 = enclaves["e3"]

    def two_frames(
        request: enclave_pb2.SealedRequest, context: Any
    ) -> Iterator[enclave_pb2.SealedFrame]:
        payload, writer = e3._open(request, context)
        yield enclave_pb2.SealedFrame(frame=writer.frame(payload))
        yield enclave_pb2.SealedFrame(frame=writer.frame(b"", final=True))

    handler = grpc.unary_stream_rpc_method_handler(
        two_frames,
        request_deserializer=enclave_pb2.SealedRequest.FromString,
        response_serializer=enclave_pb2.SealedFrame.SerializeToString,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("sovra.v1.EnclaveService", {"Process": handler}),)
    )
    e3.address = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', server_credentials(e3.tls))}"
    server.start()
    try:
        e3.admit(rig)
        err = rpc_error(lambda: rig.edge().Dispatch(sealed_request(seal([e3])), timeout=10))
        assert_status(
            err, grpc.StatusCode.INTERNAL, "enclave e3: a unary reply must be one message, got 2"
        )
    finally:
        server.stop(0)


def test_dispatch_reads_liveness_fresh_for_every_request(
    rig: BrokerRig, enclaves: dict[str, TestEnclave]
) -> None:
    """No cache between the registry and dispatch: an eviction written by anyone (here another
    broker replica's connection to the same database) and a heartbeat window that passed
    without a sweep both apply to the very next dispatch."""
    e1, e2 = enclaves["e1"], enclaves["e2"]
    e1.admit(rig)
    e2.admit(rig)
    assert rig.edge().Dispatch(sealed_request(seal([e1, e2])), timeout=10).enclave_id == "e1"

    other_replica = open_database(rig.config.database)
    try:
        assert db.evict(other_replica, "e1", "evicted by another replica")
    finally:
        other_replica.dispose()
    reply = rig.edge().Dispatch(sealed_request(seal([e1, e2])), timeout=10)
    assert reply.enclave_id == "e2" and e1.calls == 1  # e1 was not tried again
    err = rpc_error(lambda: rig.edge().Dispatch(sealed_request(seal([e1])), timeout=10))
    assert_status(err, grpc.StatusCode.NOT_FOUND, "none of the 1 candidate enclaves is admitted")

    rig.clock.advance(5 * 3 + 1)  # e2 went silent: past the window, no sweep has run
    err = rpc_error(
        lambda: rig.edge().Dispatch(sealed_request(seal([e2], clock=rig.clock)), timeout=10)
    )
    assert_status(err, grpc.StatusCode.NOT_FOUND)
    assert e2.calls == 1


def test_requests_rows_are_written_behind_and_survive_a_clean_stop(
    make_broker: Callable[..., BrokerRig], enclaves: dict[str, TestEnclave]
) -> None:
    rig = make_broker()
    e1 = enclaves["e1"]
    e1.admit(rig)
    edge = rig.edge()
    sent = [seal([e1]) for _ in range(20)]
    for sealed in sent:
        edge.Dispatch(sealed_request(sealed), timeout=RPC_TIMEOUT)
    rig.broker.stop(0)  # no flush first: stop itself must write what is still queued
    db_path = rig.config.database.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        stored = [r[0] for r in conn.execute("SELECT request_id FROM requests ORDER BY id")]
    assert stored == [s.request_id.hex() for s in sent]


def test_unexpected_error_is_internal_without_details(
    rig: BrokerRig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: Any) -> Any:
        raise RuntimeError(CANARY)

    monkeypatch.setattr(rig.broker.registry, "live", broken)
    err = rpc_error(lambda: rig.edge().ListModels(broker_pb2.ListModelsRequest(), timeout=5))
    assert_status(err, grpc.StatusCode.INTERNAL, "internal broker error (RuntimeError)")
    assert CANARY not in (err.details() or "")
    assert CANARY not in caplog.text
    assert "RuntimeError" in caplog.text


def test_enclave_refusal_is_relayed_without_failover(
    rig: BrokerRig, enclaves: dict[str, TestEnclave]
) -> None:
    e1, e2 = enclaves["e1"], enclaves["e2"]
    e1.admit(rig)
    e2.admit(rig)
    e1.mode = "refuse"
    err = rpc_error(lambda: rig.edge().Dispatch(sealed_request(seal([e1, e2])), timeout=10))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "enclave e1: sealed constraints")
    assert e2.calls == 0
    err = rpc_error(lambda: list(rig.edge().DispatchStream(sealed_request(seal([e1, e2])))))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "enclave e1: sealed constraints")


def _tampered_signature(sealed: Sealed) -> bytes:
    envelope = Envelope.decode(sealed.envelope)
    flipped = bytes([envelope.ciphertext[0] ^ 1]) + envelope.ciphertext[1:]
    return dataclasses.replace(envelope, ciphertext=flipped).encode()


@pytest.mark.parametrize(
    ("case", "code", "fragment"),
    [
        ("malformed", grpc.StatusCode.INVALID_ARGUMENT, "malformed envelope"),
        ("empty", grpc.StatusCode.INVALID_ARGUMENT, "envelope is empty"),
        ("tenant", grpc.StatusCode.PERMISSION_DENIED, "names tenant 'other'"),
        ("signature", grpc.StatusCode.UNAUTHENTICATED, "edge signature does not verify"),
        ("expired", grpc.StatusCode.DEADLINE_EXCEEDED, "request expired"),
        ("unadmitted", grpc.StatusCode.NOT_FOUND, "none of the 2 candidate enclaves is admitted"),
        ("epoch", grpc.StatusCode.NOT_FOUND, "none of the 1 candidate enclaves is admitted"),
    ],
)
def test_dispatch_refusals(
    rig: BrokerRig, enclaves: dict[str, TestEnclave], case: str, code: grpc.StatusCode,
    fragment: str,
) -> None:  # fmt: skip
    e1, e3 = enclaves["e1"], enclaves["e3"]
    e1.admit(rig)
    envelope = {
        "malformed": lambda: b"\xa1not an envelope",
        "empty": lambda: b"",
        "tenant": lambda: seal([e1], tenant="other").envelope,
        "signature": lambda: _tampered_signature(seal([e1])),
        "expired": lambda: seal([e1], issued_ago_ms=120_000, expires_in_ms=60_000).envelope,
        "unadmitted": lambda: seal([e3, enclaves["e2"]]).envelope,
        "epoch": lambda: seal([e1], epochs={"e1": 7}).envelope,
    }[case]()
    request = enclave_pb2.SealedRequest(envelope=envelope)
    for call in (rig.edge().Dispatch, lambda r, **kw: list(rig.edge().DispatchStream(r, **kw))):
        err = rpc_error(lambda: call(request, timeout=RPC_TIMEOUT))  # noqa: B023
        assert_status(err, code, fragment)
    assert e1.calls == 0


def test_tenant_rules_edge_keys_and_regions(
    make_broker: Callable[..., BrokerRig], enclaves: dict[str, TestEnclave]
) -> None:
    allowed = ed25519.Ed25519PrivateKey.generate()
    key_hex = allowed.public_key().public_bytes_raw().hex()
    extra = (
        f'[tenants.other]\nallowed_edge_keys = ["{key_hex}"]\n[tenants.eu]\nregions = ["eu-west"]\n'
    )
    rig = make_broker(extra=extra)
    e1 = enclaves["e1"]
    e1.admit(rig)
    other = rig.edge("other")
    err = rpc_error(lambda: other.Dispatch(sealed_request(seal([e1], tenant="other")), timeout=10))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "is not allowed for tenant 'other'")
    ok = seal([e1], tenant="other", signing_key=allowed)
    assert other.Dispatch(sealed_request(ok), timeout=RPC_TIMEOUT).enclave_id == "e1"

    # Tenant "eu" only sees enclaves in eu-west; e1 is in cn-north. (Config-only check here:
    # no edge certificate is issued for "eu" in this PKI.)
    assert rig.broker.registry.directory(rig.config.tenants["eu"]) == []
    assert len(rig.broker.registry.directory(rig.config.tenants["demo"])) == 1


# --------------------------------------------------------------------------------------------
# Config and CLI
# --------------------------------------------------------------------------------------------


def test_config_resolves_paths_and_rejects_bad_keys(
    tmp_path: Path, pki: dict[str, IssuedCert], rv_path: Path
) -> None:
    path = write_config(tmp_path, pki, rv_path)
    config = BrokerConfig.from_toml(path)
    assert config.database == f"sqlite:///{tmp_path / 'broker.db'}"
    assert (config.heartbeat_interval_s, config.evict_after_missed) == (5, 3)
    assert config.tenants["demo"].regions == ()

    path.write_text(path.read_text().replace("strategy", "strategie"))
    with pytest.raises(ConfigError, match=r"broker\.toml: strategie: unknown key"):
        BrokerConfig.from_toml(path)
    path = write_config(tmp_path, pki, rv_path)
    path.write_text(path.read_text().replace('listen = "127.0.0.1:0"\n', ""))
    with pytest.raises(ConfigError, match=r"broker\.toml: listen: missing required key"):
        BrokerConfig.from_toml(path)
    path = write_config(tmp_path, pki, rv_path, extra='allowed_edge_keys = ["zz"]\n')
    with pytest.raises(ConfigError, match=r"tenants\.demo\.allowed_edge_keys"):
        BrokerConfig.from_toml(path)
    path = write_config(tmp_path, pki, rv_path, extra="[tenants.demo.x]\n")
    with pytest.raises(ConfigError, match=r"tenants\.demo\.x: unknown key"):
        BrokerConfig.from_toml(path)
    with pytest.raises(ConfigError, match="not found"):
        BrokerConfig.from_toml(tmp_path / "missing.toml")


def test_cli_registers_broker_serve_and_reports_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="sovra")
    cli.register(parser.add_subparsers(dest="command", required=True))
    bad = tmp_path / "bad.toml"
    bad.write_text('listen = "127.0.0.1:0"\nbogus = 1\n')
    args = parser.parse_args(["broker", "serve", "--config", str(bad)])
    assert args.func(args) == 2
    assert "bogus: unknown key" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Attestation lifecycle: EARs, re-appraisal, revocation (broker and edge)
# --------------------------------------------------------------------------------------------


def own_rv(tmp_path: Path, rv_path: Path, **changes: Any) -> Path:
    """A private copy of the reference values (absolute root path) that a test may edit."""
    doc = yaml.safe_load(rv_path.read_text())
    doc["trust_anchors"]["sim_vendor_roots"] = [
        str(rv_path.parent / doc["trust_anchors"]["sim_vendor_roots"][0])
    ]
    doc.update(changes)
    path = tmp_path / "own-rv.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def listing(rig: BrokerRig) -> broker_pb2.ListEnclavesResponse:
    return rig.edge().ListEnclaves(broker_pb2.ListEnclavesRequest(), timeout=RPC_TIMEOUT)


def test_ear_issued_at_admission_and_published_with_the_verifier_key(
    make_broker: Callable[..., BrokerRig], enclaves: dict[str, TestEnclave], tmp_path: Path
) -> None:
    rig = make_broker()
    enclaves["e1"].admit(rig)
    reply = listing(rig)
    public = ear.load_public_key_pem(reply.ear_verifier_key)
    (entry,) = reply.enclaves
    (key,) = entry.keys
    assert len(key.nonce) == 32  # the challenge the evidence binds travels with the key
    claims = ear.verify_ear(key.ear, public, now=datetime.fromtimestamp(rig.clock(), UTC))
    assert (claims.sovra.enclave_id, claims.sovra.epoch) == ("e1", 1)
    assert claims.simulated and claims.status == "warning"
    assert list(claims.submods) == ["cpu", "npu0"]
    assert claims.submods["npu0"].trust_vector["executables"] == 2
    assert claims.expires_at - claims.issued_at == 2 * 60  # two re-appraisal intervals

    key_file = tmp_path / "ear-signing-key.pem"  # the state dir: next to the SQLite database
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    rig.broker.stop(0)
    again = make_broker()  # a restart keeps the verifier key
    assert listing(again).ear_verifier_key == reply.ear_verifier_key


def test_revocation_evicts_at_the_broker_and_is_refused_by_the_edge(
    make_broker: Callable[..., BrokerRig],
    enclaves: dict[str, TestEnclave],
    tmp_path: Path,
    rv_path: Path,
) -> None:
    rv_file = own_rv(tmp_path, rv_path)
    rig = make_broker(reference_values=f'"{rv_file}"')
    enclaves["e1"].admit(rig)
    audit = AuditLog(tmp_path / "edge-audit.db")
    edge_set = TrustedEnclaveSet(
        ReferenceValuesFile(rv_file), lambda: int(rig.clock() * 1000), audit=audit
    )

    def edge_refresh() -> list[str]:
        reply = listing(rig)
        edge_set.sync(reply.enclaves, broker_ear_key=reply.ear_verifier_key)
        return [
            k.enclave_id for k in edge_set.candidates(MODEL, 3, Constraints(allow_simulated=True))
        ]

    assert edge_refresh() == ["e1"]
    (admitted,) = [e.record for e in audit.tail(10)]
    assert admitted["result"] == "admitted" and admitted["edge_verdict"] == "affirming"
    assert admitted["broker_ear"] == "warning"

    first_ear = listing(rig).enclaves[0].keys[0].ear
    rig.clock.advance(10)
    assert rig.broker.registry.reappraise() == []  # nothing changed: still admitted
    assert listing(rig).enclaves[0].keys[0].ear != first_ear  # ... with a fresh EAR

    stale_listing = listing(rig)  # what a broker that ignores the revocation would keep serving
    rv_file.write_text(rv_file.read_text() + f"revoked_measurements: [{MEASUREMENT}]\n")

    # The edge: one refresh later the key is refused under its own reference values, even
    # though the listing still offers it.
    edge_set.sync(stale_listing.enclaves, broker_ear_key=stale_listing.ear_verifier_key)
    assert edge_set.candidates(MODEL, 3, Constraints(allow_simulated=True)) == []
    (row,) = edge_set.snapshot(details=True)
    assert row["status"] == "refused" and row["reason"] == NotAccepted.code
    assert "is revoked" in row["detail"]
    refused = audit.tail(1)[0].record
    assert refused["result"] == "refused" and refused["edge_verdict"] == "refused"
    assert refused["broker_ear"] == "warning"  # the broker still vouched; the edge decided

    # The broker: one re-appraisal later the enclave is evicted and no longer listed.
    assert rig.broker.registry.reappraise() == ["e1"]
    status, reason = rig.enclave_status("e1")
    assert status == "evicted" and reason.startswith("re-appraisal: key epoch 1:")
    assert "is revoked" in reason
    assert not listing(rig).enclaves
    assert edge_refresh() == []
    err = rpc_error(
        lambda: rig.edge().Dispatch(sealed_request(seal([enclaves["e1"]])), timeout=RPC_TIMEOUT)
    )
    assert_status(err, grpc.StatusCode.NOT_FOUND)

    # and it cannot come back while revoked
    stub = rig.registry_stub(enclaves["e1"].identity)
    nonce = stub.Challenge(broker_pb2.ChallengeRequest(), timeout=RPC_TIMEOUT).nonce
    request = enclaves["e1"].register_request(nonce, now=rig.clock())
    err = rpc_error(lambda: stub.Register(request, timeout=RPC_TIMEOUT))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "is revoked")


def test_reappraisal_drops_aged_keys_without_evicting_for_them(
    make_broker: Callable[..., BrokerRig], enclaves: dict[str, TestEnclave]
) -> None:
    rig = make_broker(heartbeat_interval_s=3600)
    enclaves["e1"].admit(rig)
    rig.clock.advance(1801)  # older than max_evidence_age_s; the enclave is still live
    assert rig.broker.registry.reappraise() == []
    assert rig.enclave_status("e1") == ("admitted", "")
    assert not listing(rig).enclaves  # no attested key left to list
    assert rig.broker.registry.evict_stale() == ["e1"]


def test_broken_reference_values_edit_keeps_the_last_good_values(
    make_broker: Callable[..., BrokerRig],
    enclaves: dict[str, TestEnclave],
    tmp_path: Path,
    rv_path: Path,
) -> None:
    rv_file = own_rv(tmp_path, rv_path)
    rig = make_broker(reference_values=f'"{rv_file}"')
    enclaves["e1"].admit(rig)
    rv_file.write_text("version: [1\n")
    assert rig.broker.registry.reappraise() == []
    assert rig.enclave_status("e1") == ("admitted", "")


def test_ear_key_config_and_database_migration(
    tmp_path: Path, pki: dict[str, IssuedCert], rv_path: Path
) -> None:
    path = write_config(
        tmp_path, pki, rv_path, ear_signing_key='"keys/ear.pem"', reappraise_interval_s=15
    )
    config = BrokerConfig.from_toml(path)
    assert config.ear_signing_key_path == tmp_path / "keys" / "ear.pem"
    assert config.reappraise_interval_s == 15
    defaults = BrokerConfig.from_toml(write_config(tmp_path, pki, rv_path))
    assert defaults.reappraise_interval_s == 60
    assert defaults.ear_signing_key_path == tmp_path / "ear-signing-key.pem"
    with pytest.raises(ConfigError, match="reappraise_interval_s"):
        BrokerConfig.from_toml(write_config(tmp_path, pki, rv_path, reappraise_interval_s=0))

    config.ear_signing_key_path.parent.mkdir()
    config.ear_signing_key_path.write_text("junk")
    config.ear_signing_key_path.chmod(0o644)
    with pytest.raises(ServeError, match="chmod 600"):
        serve(config)
    config.ear_signing_key_path.chmod(0o600)
    with pytest.raises(ServeError, match="not an unencrypted PEM"):
        serve(config)

    # A database created before the ear/nonce columns existed gains them on open.
    url = f"sqlite:///{tmp_path / 'old.db'}"
    open_database(url).dispose()
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("ALTER TABLE enclave_keys DROP COLUMN ear")
        conn.execute("ALTER TABLE enclave_keys DROP COLUMN nonce")
    open_database(url).dispose()
    with sqlite3.connect(tmp_path / "old.db") as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(enclave_keys)")}
    assert {"ear", "nonce"} <= columns
