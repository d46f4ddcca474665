"""Edge agent end to end: a real uvicorn edge against a FAKE broker (a real gRPC server with the
broker's mTLS identity) that plays enclave: it opens the sealed request with the enclave's
private key and replies with ReplyWriter. The same fake broker is hostile on demand: it offers
keys without valid evidence, swapped keys, forbidden simulated TEEs, stale evidence, and
tampers with reply frames.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from attestation import ear
from attestation.reference_values import ReferenceValues, ReferenceValuesFile
from attestation.sim import (
    DEFAULT_NPU_FIRMWARE,
    SIM_FORMAT,
    SIM_TEE_TYPE,
    SimClaims,
    encode_evidence,
    npu_measurement,
    report_data,
)
from edge_agent import cli as edge_cli
from edge_agent.api_keys import ApiKeys, generate_api_key, hash_api_key
from edge_agent.app import create_app
from edge_agent.config import AppConfig, ConfigError, EdgeConfig
from edge_agent.errors import ApiError
from edge_agent.policy import ConfigPolicy
from edge_agent.runtime import EdgeRuntime, EdgeStartError
from edge_agent.server import RunningEdge, serve
from edge_agent.trusted_set import (
    KeyNotBound,
    MalformedEvidence,
    NotAccepted,
    StaleEvidence,
    TrustedEnclaveSet,
    UntrustedEvidence,
)
from sovra import suites
from sovra.audit import AuditLog
from sovra.envelope import Constraints, Envelope, Recipient, ReplyWriter
from sovra.pki import Identity, build_certificate, init_pki
from sovra.tls import TLSFiles, peer_identity, server_credentials
from sovra.v1 import broker_pb2, broker_pb2_grpc

CHAT_MODEL = "smollm2-135m"
EMBED_MODEL = "nomic-embed"
UNSERVED_MODEL = "allowed-but-unserved"
OTHER_APP_MODEL = "other-model"
MEASUREMENT = "ab" * 48
SECRET = "SECRET-PROMPT-7f3a"  # must never appear in logs or the audit log


def now_ms() -> int:
    return int(time.time() * 1000)


# -- simulated vendor and enclave keys -----------------------------------------------------------


@dataclass(frozen=True)
class Vendor:
    root_path: Path
    device_key: ec.EllipticCurvePrivateKey
    device_cert: x509.Certificate


def _make_vendor(directory: Path, name: str) -> Vendor:
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = build_certificate(
        subject_cn=f"{name} sim vendor root",
        public_key=root_key.public_key(),
        issuer_cert=None,
        issuer_key=root_key,
        is_ca=True,
        days=30,
    )
    device_key = ec.generate_private_key(ec.SECP384R1())
    device = build_certificate(
        subject_cn=f"{name} sim device",
        public_key=device_key.public_key(),
        issuer_cert=root,
        issuer_key=root_key,
        is_ca=False,
        days=30,
    )
    directory.mkdir(parents=True, exist_ok=True)
    root_path = directory / f"{name}-root.pem"
    root_path.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return Vendor(root_path, device_key, device)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory, tenants=("demo",), enclaves=("e1", "e2", "e3"))
    return directory


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Vendor:
    return _make_vendor(tmp_path_factory.mktemp("vendor"), "good")


@pytest.fixture(scope="module")
def rogue_vendor(tmp_path_factory: pytest.TempPathFactory) -> Vendor:
    return _make_vendor(tmp_path_factory.mktemp("rogue"), "rogue")


def write_reference_values(directory: Path, vendor: Vendor, simulation: str = "allow") -> Path:
    path = directory / "reference-values.yaml"
    path.write_text(
        "version: 1\n"
        f"simulation: {simulation}\n"
        f"tee_types: [{SIM_TEE_TYPE}]\n"
        f"measurements: [{MEASUREMENT}]\n"
        "max_evidence_age_s: 600\n"
        f"trust_anchors:\n  sim_vendor_roots: [{vendor.root_path}]\n"
        f"npu_measurements: [{npu_measurement(DEFAULT_NPU_FIRMWARE)}]\n"
    )
    return path


@dataclass
class EnclaveKeyOffer:
    enclave_id: str
    epoch: int
    keypair: suites.KeyPair
    wire: broker_pb2.EnclaveKey
    receipt_key: ed25519.Ed25519PrivateKey | None = None


def offer_key(
    vendor: Vendor,
    enclave_id: str,
    *,
    epoch: int = 1,
    region: str = "eu-west",
    kem: str = suites.KEM_HYBRID,
    issued_at_ms: int | None = None,
    key_ttl_ms: int = 3_600_000,
) -> EnclaveKeyOffer:
    keypair = suites.KeyPair.generate(kem)
    issued = issued_at_ms if issued_at_ms is not None else now_ms()
    not_after = max(issued, now_ms()) + key_ttl_ms
    nonce = os.urandom(32)
    receipt_key = ed25519.Ed25519PrivateKey.generate()
    receipt_public = receipt_key.public_key().public_bytes_raw()
    claims = SimClaims(
        enclave_id=enclave_id,
        region=region,
        measurement=MEASUREMENT,
        report_data=report_data(keypair.public_bytes, epoch, nonce, receipt_public),
        nonce=nonce,
        epoch=epoch,
        kem=kem,
        key_not_after_ms=not_after,
        issued_at_ms=issued,
        receipt_key=receipt_public,
    )
    evidence = encode_evidence(claims, vendor.device_key, [vendor.device_cert])
    wire = broker_pb2.EnclaveKey(
        epoch=epoch,
        kem=kem,
        public_key=keypair.public_bytes,
        not_after_ms=not_after,
        evidence_format=SIM_FORMAT,
        evidence=evidence,
        receipt_public_key=receipt_public,
    )
    return EnclaveKeyOffer(enclave_id, epoch, keypair, wire, receipt_key)


def descriptor(
    enclave_id: str,
    *keys: broker_pb2.EnclaveKey,
    models: tuple[str, ...] = (CHAT_MODEL, EMBED_MODEL),
    region: str = "eu-west",
    simulated: bool = True,
) -> broker_pb2.EnclaveDescriptor:
    return broker_pb2.EnclaveDescriptor(
        enclave_id=enclave_id,
        region=region,
        tee_type=SIM_TEE_TYPE,
        simulated=simulated,
        models=list(models),
        keys=list(keys),
        broker_status="admitted",
    )


# -- the fake (and hostile) broker ---------------------------------------------------------------


def chat_content(body: dict[str, Any]) -> str:
    return "echo: " + str(body["messages"][-1]["content"])


def chat_reply(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1,
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": chat_content(body)},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def chat_chunks(body: dict[str, Any]) -> list[dict[str, Any]]:
    words = chat_content(body).split(" ")
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    chunks = [
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": body["model"],
            "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}],
        }
        for p in pieces
    ]
    chunks[-1]["choices"][0]["finish_reason"] = "stop"
    return chunks


def embeddings_reply(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    return {
        "object": "list",
        "model": body["model"],
        "data": [
            {"object": "embedding", "index": i, "embedding": [float(len(text)), 0.5]}
            for i, text in enumerate(inputs)
        ],
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }


def flip_last_byte(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 0x01])


@dataclass
class Seen:
    tenant: str
    app: str
    model: str
    op: str
    stream: bool
    recipients: tuple[Recipient, ...]
    constraints: Constraints
    payload: dict[str, Any]


@dataclass
class FakeBroker(broker_pb2_grpc.EdgeGatewayServicer):
    """EdgeGateway that plays the enclaves it lists. ``mode`` makes it hostile."""

    directory: list[broker_pb2.EnclaveDescriptor] = field(default_factory=list)
    private: dict[tuple[str, int], suites.KeyPair] = field(default_factory=dict)
    mode: Any = "ok"
    error_doc: dict[str, Any] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    list_calls: int = 0
    last_frames: list[bytes] = field(default_factory=list)
    peers: list[Identity | None] = field(default_factory=list)
    port: int = 0

    def serve(self, offers: list[EnclaveKeyOffer]) -> None:
        for offer in offers:
            self.private[(offer.enclave_id, offer.epoch)] = offer.keypair

    def ListEnclaves(self, request: Any, context: Any) -> broker_pb2.ListEnclavesResponse:
        self.peers.append(peer_identity(context))
        self.list_calls += 1
        return broker_pb2.ListEnclavesResponse(enclaves=self.directory, generated_at_ms=now_ms())

    def ListModels(self, request: Any, context: Any) -> broker_pb2.ListModelsResponse:
        return broker_pb2.ListModelsResponse(models=[])

    def _open(self, data: bytes, context: Any) -> tuple[str, dict[str, Any], ReplyWriter]:
        if isinstance(self.mode, tuple):
            context.abort(self.mode[0], self.mode[1])
        envelope = Envelope.decode(data)
        envelope.verify()
        header = envelope.header
        recipient = next(r for r in header.recipients if (r.enclave_id, r.epoch) in self.private)
        keypair = self.private[(recipient.enclave_id, recipient.epoch)]
        payload, keys = envelope.open(recipient, keypair.private_key)
        doc = json.loads(payload)
        self.seen.append(
            Seen(
                header.tenant,
                header.app,
                header.model,
                header.operation,
                header.stream,
                header.recipients,
                header.constraints,
                doc,
            )
        )
        return recipient.enclave_id, doc, ReplyWriter(keys)

    def _frames(self, doc: dict[str, Any], writer: ReplyWriter) -> list[bytes]:
        body = doc["body"]
        if self.mode == "error_frame":
            return [writer.frame(json.dumps(self.error_doc).encode(), final=True)]
        if doc["op"] == "embeddings":
            docs = [embeddings_reply(body)]
        elif body.get("stream"):
            docs = [*chat_chunks(body), {"done": True}]
        else:
            docs = [chat_reply(body)]
        last = len(docs) - 1
        frames = [writer.frame(json.dumps(d).encode(), final=i == last) for i, d in enumerate(docs)]
        return self._tamper(frames, writer)

    def _tamper(self, frames: list[bytes], writer: ReplyWriter) -> list[bytes]:
        previous, self.last_frames = self.last_frames, frames
        if self.mode == "flip":
            return [*frames[:-1], flip_last_byte(frames[-1])]
        if self.mode == "reorder":
            return [frames[0], frames[2], frames[1], *frames[3:]]
        if self.mode == "truncate":
            return frames[:-1]
        if self.mode == "nonfinal":
            return [ReplyWriter.frame(writer, b"{}", final=False)]
        if self.mode == "replay":
            return previous
        return frames

    def Dispatch(self, request: Any, context: Any) -> broker_pb2.DispatchReply:
        enclave_id, doc, writer = self._open(request.envelope, context)
        frames = self._frames(doc, writer)
        if self.mode == "wrong_enclave":
            enclave_id = "e9"
        return broker_pb2.DispatchReply(enclave_id=enclave_id, frame=frames[0])

    def DispatchStream(self, request: Any, context: Any) -> Iterator[broker_pb2.DispatchReply]:
        enclave_id, doc, writer = self._open(request.envelope, context)
        for frame in self._frames(doc, writer):
            yield broker_pb2.DispatchReply(enclave_id=enclave_id, frame=frame)


@pytest.fixture
def broker(pki: Path) -> Iterator[FakeBroker]:
    fake = FakeBroker()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    broker_pb2_grpc.add_EdgeGatewayServicer_to_server(fake, server)
    files = TLSFiles.from_pki_dir(pki, Identity.broker())
    fake.port = server.add_secure_port("127.0.0.1:0", server_credentials(files))
    server.start()
    yield fake
    server.stop(None)


# -- the edge ------------------------------------------------------------------------------------


@dataclass
class Harness:
    edge: RunningEdge
    broker: FakeBroker
    key: str
    http: httpx.Client

    def chat(self, content: str = "hello", **extra: Any) -> httpx.Response:
        body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": content}], **extra}
        return self.http.post("/v1/chat/completions", json=body)

    def stream_events(self, content: str = "hello") -> tuple[int, list[str]]:
        body = {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": content}],
            "stream": True,
        }
        with self.http.stream("POST", "/v1/chat/completions", json=body) as resp:
            text = resp.read().decode()
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
        return resp.status_code, events

    def audit(self, kind: str = "request") -> list[dict[str, Any]]:
        return [e.record for e in self.edge.runtime.audit.tail(1000) if e.kind == kind]

    def sealed_to(self) -> set[str]:
        return {r.enclave_id for s in self.broker.seen for r in s.recipients}


def write_config(
    directory: Path,
    pki: Path,
    rv: Path,
    broker_port: int,
    key_sha256: str,
    *,
    regions: tuple[str, ...] = (),
    allow_simulated: bool = True,
    max_body_bytes: int = 1048576,
    extra: str = "",
) -> Path:
    edge_files = TLSFiles.from_pki_dir(pki, Identity.edge("demo"))
    _, other_hash = generate_api_key()
    path = directory / "edge.toml"
    path.write_text(
        f"""
tenant = "demo"
listen = "127.0.0.1:0"
state_dir = "{directory / "state"}"
broker = "127.0.0.1:{broker_port}"
reference_values = "{rv}"
candidates = 3
request_ttl_s = 30
max_body_bytes = {max_body_bytes}
directory_refresh_s = 30
{extra}
[tls]
cert = "{edge_files.cert}"
key = "{edge_files.key}"
ca = "{edge_files.ca}"

[constraints]
regions = {json.dumps(list(regions))}
tee_types = []
allow_simulated = {"true" if allow_simulated else "false"}

[[apps]]
name = "demo-app"
key_sha256 = "{key_sha256}"
models = ["{CHAT_MODEL}", "{EMBED_MODEL}", "{UNSERVED_MODEL}"]

[[apps]]
name = "other-app"
key_sha256 = "{other_hash}"
models = ["{OTHER_APP_MODEL}"]
"""
    )
    return path


StartEdge = Callable[..., Harness]


@pytest.fixture
def start_edge(
    tmp_path: Path, pki: Path, vendor: Vendor, broker: FakeBroker
) -> Iterator[StartEdge]:
    started: list[Harness] = []

    def start(
        offers: list[EnclaveKeyOffer] | None = None,
        *,
        directory: list[broker_pb2.EnclaveDescriptor] | None = None,
        simulation: str = "allow",
        **config_kw: Any,
    ) -> Harness:
        if offers is None:
            offers = [offer_key(vendor, e) for e in ("e1", "e2", "e3")]
        broker.serve(offers)
        broker.directory = (
            directory
            if directory is not None
            else [descriptor(o.enclave_id, o.wire) for o in offers]
        )
        key, digest = generate_api_key()
        rv = write_reference_values(tmp_path, vendor, simulation)
        path = write_config(tmp_path, pki, rv, broker.port, digest, **config_kw)
        edge = serve(EdgeConfig.from_toml(path))
        http = httpx.Client(
            base_url=edge.url, headers={"Authorization": f"Bearer {key}"}, timeout=20
        )
        harness = Harness(edge, broker, key, http)
        started.append(harness)
        return harness

    yield start
    for h in started:
        h.http.close()
        h.edge.stop()


@pytest.fixture
def edge(start_edge: StartEdge) -> Harness:
    return start_edge()


# -- the happy path ------------------------------------------------------------------------------


def test_chat_is_sealed_to_verified_enclaves_and_answered(
    edge: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sovra.edge")
    resp = edge.chat(f"hello {SECRET}", temperature=0.5)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == f"echo: hello {SECRET}"
    rid = resp.headers["x-request-id"]

    (seen,) = edge.broker.seen
    assert (seen.tenant, seen.app, seen.model, seen.op, seen.stream) == (
        "demo",
        "demo-app",
        CHAT_MODEL,
        "chat",
        False,
    )
    assert {r.enclave_id for r in seen.recipients} == {"e1", "e2", "e3"}
    assert seen.constraints == Constraints(allow_simulated=True)
    assert seen.payload["op"] == "chat"
    assert seen.payload["body"]["temperature"] == 0.5
    assert edge.broker.peers[0] == Identity.edge("demo")  # the edge's mTLS identity

    (record,) = edge.audit()
    assert record["request_id"] == rid
    assert record["outcome"] == "ok" and record["status"] == 200
    assert record["decision"] == "allow" and record["rule"] == "apps.demo-app.models"
    assert record["policy_id"].startswith("config:")
    assert record["served_by"] in {"e1", "e2", "e3"}
    assert {e["id"] for e in record["enclaves"]} == {"e1", "e2", "e3"}
    assert all(e["simulated"] is True for e in record["enclaves"])  # labelled as simulation

    def request_logged() -> bool:
        lines = [r.getMessage() for r in caplog.records if r.name == "sovra.edge"]
        return any(f"rid={rid}" in line and "status=200" in line for line in lines)

    # The access line is written after the response has gone out, so wait for that event.
    deadline = time.monotonic() + 5
    while not request_logged() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert request_logged()
    assert not any(SECRET in r.getMessage() for r in caplog.records)
    assert edge.edge.runtime.audit.verify().ok


def test_streaming_chat_sends_sse_and_done(edge: Harness) -> None:
    status, events = edge.stream_events("one two three")
    assert status == 200
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == "echo: one two three"
    assert edge.broker.seen[0].stream is True
    (record,) = edge.audit()
    assert record["outcome"] == "ok" and record["stream"] is True


def test_embeddings(edge: Harness) -> None:
    resp = edge.http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": ["ab", "abcd"]})
    assert resp.status_code == 200, resp.text
    assert [d["embedding"][0] for d in resp.json()["data"]] == [2.0, 4.0]
    assert edge.broker.seen[0].op == "embeddings"


def test_official_openai_client(edge: Harness) -> None:
    client = openai.OpenAI(base_url=edge.edge.url + "/v1", api_key=edge.key, max_retries=0)
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "hi there"}]
    )
    assert reply.choices[0].message.content == "echo: hi there"
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "a b c"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "echo: a b c"
    emb = client.embeddings.create(model=EMBED_MODEL, input="xyz")
    assert emb.data[0].embedding[0] == 3.0
    assert sorted(m.id for m in client.models.list()) == sorted([CHAT_MODEL, EMBED_MODEL])
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(
            model=OTHER_APP_MODEL, messages=[{"role": "user", "content": "x"}]
        )


def test_models_lists_allowed_models_some_verified_enclave_serves(edge: Harness) -> None:
    resp = edge.http.get("/v1/models")
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    assert sorted(m["id"] for m in body["data"]) == sorted([CHAT_MODEL, EMBED_MODEL])
    assert all(m["object"] == "model" for m in body["data"])


def test_enclaves_route_shows_the_trusted_set(
    start_edge: StartEdge, vendor: Vendor, rogue_vendor: Vendor
) -> None:
    good = offer_key(vendor, "e1", region="eu-central")
    bad = offer_key(rogue_vendor, "e2")
    h = start_edge([good, bad])
    assert h.http.get("/v1/sovra/enclaves", headers={"Authorization": ""}).status_code == 401
    rows = {r["enclave_id"]: r for r in h.http.get("/v1/sovra/enclaves").json()["data"]}
    assert rows["e1"]["status"] == "affirming"
    assert rows["e1"]["simulated"] is True and rows["e1"]["region"] == "eu-central"
    assert rows["e1"]["expires_at_ms"] > now_ms() and rows["e1"]["epoch"] == 1
    assert rows["e2"] == {
        "enclave_id": "e2",
        "epoch": 1,
        "status": "refused",
        "reason": "untrusted_evidence",
    }


def test_healthz_needs_no_key(edge: Harness) -> None:
    resp = httpx.get(edge.edge.url + "/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


# -- refusals at the door ------------------------------------------------------------------------


def test_missing_and_wrong_api_key(edge: Harness) -> None:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}]}
    resp = httpx.post(edge.edge.url + "/v1/chat/completions", json=body)
    assert resp.status_code == 401
    assert resp.json() == {
        "error": {
            "message": "missing API key: send Authorization: Bearer <key>",
            "type": "invalid_request_error",
            "param": None,
            "code": "missing_api_key",
        }
    }
    resp = httpx.post(
        edge.edge.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": "Bearer sk-sovra-wrong"},
    )
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert "sk-sovra-wrong" not in resp.text
    assert httpx.get(edge.edge.url + "/v1/models").status_code == 401
    assert edge.broker.seen == []


def test_policy_deny_names_the_rule_and_is_audited(edge: Harness) -> None:
    resp = edge.http.post(
        "/v1/chat/completions",
        json={"model": OTHER_APP_MODEL, "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status_code == 403
    err = resp.json()["error"]
    assert err["code"] == "policy_denied" and "default-deny" in err["message"]
    (record,) = edge.audit()
    assert record["decision"] == "deny" and record["rule"] == "default-deny"
    assert record["outcome"] == "policy_denied" and record["status"] == 403
    assert edge.broker.seen == []


def test_unknown_model_is_404(edge: Harness) -> None:
    resp = edge.http.post(
        "/v1/chat/completions",
        json={"model": "gpt-nope", "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"
    assert edge.broker.seen == []


def test_allowed_model_no_enclave_serves_is_503(edge: Harness) -> None:
    resp = edge.http.post(
        "/v1/chat/completions",
        json={"model": UNSERVED_MODEL, "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "no_enclave_available"


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"model": "smollm2-135m", "messages": [], "x": NaN}', "invalid_json"),
        (b'{"model": "smollm2-135m"}', "invalid_request"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', "invalid_request"),
        (
            b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], '
            b'"stream": "yes"}',
            "invalid_request",
        ),
        (b'{"model": "smollm2-135m", "messages": "hello"}', "invalid_request"),
        (
            b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": "lots"}',
            "invalid_request",
        ),
    ],
)
def test_bad_bodies_are_400_in_openai_shape(edge: Harness, content: bytes, code: str) -> None:
    resp = edge.http.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert body["error"]["type"] == "invalid_request_error"


def test_wrong_embedding_input_type_is_400(edge: Harness) -> None:
    resp = edge.http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": [1, 2]})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "input"


def test_oversized_body_is_413(start_edge: StartEdge) -> None:
    h = start_edge(max_body_bytes=2048)
    resp = h.chat("x" * 4096)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"
    assert h.broker.seen == []


def test_unknown_route_and_method_are_openai_errors(edge: Harness) -> None:
    resp = edge.http.get("/v1/nothing-here")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    resp = edge.http.get("/v1/chat/completions")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


def test_lying_content_length_and_chunked_bodies_are_capped(
    tmp_path: Path, pki: Path, vendor: Vendor, broker: FakeBroker
) -> None:
    key, digest = generate_api_key()
    rv = write_reference_values(tmp_path, vendor)
    path = write_config(tmp_path, pki, rv, broker.port, digest, max_body_bytes=1024)
    runtime = EdgeRuntime(EdgeConfig.from_toml(path))
    app = create_app(runtime)
    big = json.dumps(
        {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}
    ).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 500):
            yield big[i : i + 500]

    async def scenario() -> list[int]:
        auth = {"Authorization": f"Bearer {key}"}
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
                lie = await client.post(
                    "/v1/chat/completions",
                    content=big,
                    headers={**auth, "content-length": "10"},
                )
                stream = await client.post("/v1/chat/completions", content=chunked(), headers=auth)
                bogus = await client.post(
                    "/v1/chat/completions", content=b"{}", headers={**auth, "content-length": "x"}
                )
        return [lie.status_code, stream.status_code, bogus.status_code]

    try:
        assert asyncio.run(scenario()) == [413, 413, 400]
    finally:
        runtime.close()
    assert broker.seen == []


# -- a hostile broker's directory ----------------------------------------------------------------


def _refusals(h: Harness) -> dict[str, str]:
    return {r["enclave_id"]: r["reason"] for r in h.audit("enclave") if r["result"] == "refused"}


def test_keys_without_valid_evidence_are_never_sealed_to(
    start_edge: StartEdge, vendor: Vendor, rogue_vendor: Vendor
) -> None:
    good = offer_key(vendor, "e1")
    rogue = offer_key(rogue_vendor, "e2")
    garbage = offer_key(vendor, "e3")
    garbage.wire.evidence = b"\xa1not evidence"
    h = start_edge([good, rogue, garbage])
    for _ in range(3):
        assert h.chat().status_code == 200
    assert h.sealed_to() == {"e1"}
    assert _refusals(h) == {"e2": "untrusted_evidence", "e3": "malformed_evidence"}
    # Refusals are cached: the same bad offer is judged (and audited) once.
    assert len(h.audit("enclave")) == 3


def test_keys_swapped_between_enclaves_are_refused(start_edge: StartEdge, vendor: Vendor) -> None:
    e1, e2, e3 = (offer_key(vendor, e) for e in ("e1", "e2", "e3"))
    # e2 is offered with e1's key and evidence; e3 keeps its evidence but carries e1's key.
    e3_wire = broker_pb2.EnclaveKey()
    e3_wire.CopyFrom(e3.wire)
    e3_wire.public_key = e1.wire.public_key
    directory = [descriptor("e1", e1.wire), descriptor("e2", e1.wire), descriptor("e3", e3_wire)]
    h = start_edge([e1, e2, e3], directory=directory)
    assert h.chat().status_code == 200
    assert h.sealed_to() == {"e1"}
    assert _refusals(h) == {"e2": "key_not_bound", "e3": "key_not_bound"}


def test_forbidden_simulation_means_no_enclave(start_edge: StartEdge) -> None:
    h = start_edge(simulation="forbid")
    resp = h.chat()
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "no_enclave_available"
    assert h.broker.seen == []
    assert set(_refusals(h).values()) == {"not_accepted"}
    (record,) = h.audit()
    assert record["outcome"] == "no_enclave_available" and record["decision"] == "allow"


def test_stale_evidence_is_refused(start_edge: StartEdge, vendor: Vendor) -> None:
    fresh = offer_key(vendor, "e1")
    stale = offer_key(vendor, "e2", issued_at_ms=now_ms() - 3_600_000)
    h = start_edge([fresh, stale])
    assert h.chat().status_code == 200
    assert h.sealed_to() == {"e1"}
    assert _refusals(h) == {"e2": "stale_evidence"}


def test_constraints_use_verified_claims_not_descriptor_fields(
    start_edge: StartEdge, vendor: Vendor
) -> None:
    eu = offer_key(vendor, "e1", region="eu-west")
    us = offer_key(vendor, "e2", region="us-east")
    # The broker claims e2 is in eu-west and not simulated; the evidence says otherwise.
    directory = [descriptor("e1", eu.wire), descriptor("e2", us.wire, region="eu-west")]
    h = start_edge([eu, us], directory=directory, regions=("eu-west",))
    for _ in range(3):
        assert h.chat().status_code == 200
    assert h.sealed_to() == {"e1"}


def test_simulated_enclaves_need_allow_simulated(start_edge: StartEdge, vendor: Vendor) -> None:
    offer = offer_key(vendor, "e1")
    lie = [descriptor("e1", offer.wire, simulated=False)]
    h = start_edge([offer], directory=lie, allow_simulated=False)
    assert h.chat().status_code == 503
    assert h.broker.seen == []


def test_broker_unreachable_is_503(start_edge: StartEdge, broker: FakeBroker) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    broker.port = closed_port
    h = start_edge()
    resp = h.chat()
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "enclaves_unavailable"
    assert h.http.get("/v1/models").status_code == 503


# -- a hostile broker's replies ------------------------------------------------------------------


def _integrity_records(h: Harness) -> list[dict[str, Any]]:
    return [r for r in h.audit() if r["outcome"] == "reply_integrity_failure"]


def test_flipped_byte_in_unary_reply(edge: Harness) -> None:
    edge.broker.mode = "flip"
    resp = edge.chat(SECRET)
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "reply_integrity_failure"
    assert SECRET not in resp.text
    (record,) = _integrity_records(edge)
    assert record["status"] == 502 and "authentication" in record["reason"]


def test_unary_reply_without_end_marker(edge: Harness) -> None:
    edge.broker.mode = "nonfinal"
    resp = edge.chat()
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "reply_integrity_failure"
    assert len(_integrity_records(edge)) == 1


def test_frame_replayed_from_another_request(edge: Harness) -> None:
    assert edge.chat("first").status_code == 200
    edge.broker.mode = "replay"
    resp = edge.chat("second")
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "reply_integrity_failure"
    assert "first" not in resp.text
    assert len(_integrity_records(edge)) == 1


def test_broker_naming_another_enclave_is_refused(edge: Harness) -> None:
    edge.broker.mode = "wrong_enclave"
    resp = edge.chat()
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "reply_integrity_failure"


@pytest.mark.parametrize("mode", ["flip", "reorder", "truncate"])
def test_tampered_stream_ends_with_an_error_event(edge: Harness, mode: str) -> None:
    edge.broker.mode = mode
    status, events = edge.stream_events("one two three four")
    assert status == 200
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "reply_integrity_failure"
    forwarded = [json.loads(e) for e in events[:-2]]
    assert all("choices" in c for c in forwarded)  # only verified chunks came through
    (record,) = _integrity_records(edge)
    assert record["stream"] is True and record["status"] == 502


def test_tampered_first_stream_frame_is_a_plain_http_error(edge: Harness) -> None:
    edge.broker.mode = "replay"
    edge.broker.last_frames = []
    status, events = edge.stream_events()
    assert status == 502
    assert json.loads(events[0])["error"]["code"] == "reply_integrity_failure"


def test_enclave_error_frames_map_to_openai_errors(edge: Harness) -> None:
    edge.broker.mode = "error_frame"
    edge.broker.error_doc = {
        "error": {
            "message": "max_tokens too large",
            "type": "invalid_request_error",
            "code": "bad_max_tokens",
        }
    }
    resp = edge.chat()
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "bad_max_tokens"
    status, events = edge.stream_events()
    assert status == 400  # before the stream started: a plain HTTP error
    edge.broker.error_doc = {"error": {"message": "model crashed", "type": "upstream_error"}}
    resp = edge.chat()
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_error"


def test_broker_statuses_map_to_http(edge: Harness) -> None:
    cases = {
        grpc.StatusCode.NOT_FOUND: (503, "no_enclave_available"),
        grpc.StatusCode.UNAVAILABLE: (503, "enclaves_unavailable"),
        grpc.StatusCode.PERMISSION_DENIED: (403, "broker_permission_denied"),
        grpc.StatusCode.INVALID_ARGUMENT: (502, "broker_rejected_request"),
        grpc.StatusCode.DEADLINE_EXCEEDED: (504, "upstream_timeout"),
        grpc.StatusCode.INTERNAL: (502, "broker_error"),
    }
    for code, (status, api_code) in cases.items():
        edge.broker.mode = (code, f"broker says {code.name}")
        resp = edge.chat()
        assert resp.status_code == status, code
        err = resp.json()["error"]
        assert err["code"] == api_code and f"broker says {code.name}" in err["message"]
        status_stream, events = edge.stream_events()
        assert status_stream == status
    assert len(edge.audit()) == 2 * len(cases)


def test_audit_and_state_hold_no_content(edge: Harness) -> None:
    assert edge.chat(SECRET).status_code == 200
    edge.broker.mode = "flip"
    edge.chat(SECRET)
    state = edge.edge.runtime.config.state_dir
    for path in state.rglob("*"):  # every file, also in directories (training state)
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert edge.edge.runtime.audit.verify().ok


# -- trusted set, unit level ---------------------------------------------------------------------


def test_trusted_set_expiry_epochs_and_k(tmp_path: Path, vendor: Vendor) -> None:
    rv = ReferenceValues.load(write_reference_values(tmp_path, vendor))
    clock = {"now": now_ms()}
    audit = AuditLog(tmp_path / "audit.db")
    trusted = TrustedEnclaveSet(rv, lambda: clock["now"], audit=audit)
    e1_old = offer_key(vendor, "e1", epoch=1, key_ttl_ms=60_000)
    e1_new = offer_key(vendor, "e1", epoch=2, key_ttl_ms=120_000)
    others = [offer_key(vendor, e, key_ttl_ms=120_000) for e in ("e2", "e3", "e4")]
    listing = [descriptor("e1", e1_old.wire, e1_new.wire)]
    listing += [descriptor(o.enclave_id, o.wire) for o in others]
    admitted = trusted.sync(listing)
    assert len(admitted) == 5
    cons = Constraints(allow_simulated=True)

    picked = trusted.candidates(CHAT_MODEL, 3, cons)
    assert len(picked) == 3 and len({p.enclave_id for p in picked}) == 3
    all_four = trusted.candidates(CHAT_MODEL, 8, cons)
    assert {p.enclave_id for p in all_four} == {"e1", "e2", "e3", "e4"}
    assert next(p for p in all_four if p.enclave_id == "e1").epoch == 2
    assert trusted.candidates(CHAT_MODEL, 8, Constraints()) == []  # simulated not allowed
    assert trusted.candidates(CHAT_MODEL, 8, cons, kem=suites.KEM_X25519) == []
    assert trusted.candidates("other", 8, cons) == []

    trusted.sync(listing)  # cached: nothing is verified or audited twice
    assert len(audit.tail(100)) == 5

    clock["now"] += 200_000  # every key has expired
    assert trusted.candidates(CHAT_MODEL, 8, cons) == []
    assert {r["status"] for r in trusted.snapshot()} == {"expired"}
    trusted.sync(listing)  # re-offered after expiry: refused as stale
    assert {r["status"] for r in trusted.snapshot()} == {"refused"}
    assert trusted.candidates(CHAT_MODEL, 8, cons) == []


def test_trusted_set_refusal_types(tmp_path: Path, vendor: Vendor, rogue_vendor: Vendor) -> None:
    rv = ReferenceValues.load(write_reference_values(tmp_path, vendor, "forbid"))
    trusted = TrustedEnclaveSet(rv)
    good, rogue = offer_key(vendor, "e1"), offer_key(rogue_vendor, "e2")
    stale = offer_key(vendor, "e3", issued_at_ms=now_ms() - 3_600_000)
    garbage = offer_key(vendor, "e4")
    garbage.wire.evidence = b"junk"
    trusted.sync(
        [
            descriptor("e1", good.wire),
            descriptor("e2", rogue.wire),
            descriptor("e3", stale.wire),
            descriptor("e4", garbage.wire),
            descriptor("e5", good.wire),
        ]
    )
    reasons = {r["enclave_id"]: r["reason"] for r in trusted.snapshot()}
    assert reasons == {
        "e1": NotAccepted.code,
        "e2": UntrustedEvidence.code,
        "e3": StaleEvidence.code,
        "e4": MalformedEvidence.code,
        "e5": KeyNotBound.code,
    }


# -- config, keys, policy, identity, CLI, systemd ------------------------------------------------


def test_config_errors_name_key_and_file(tmp_path: Path, pki: Path, vendor: Vendor) -> None:
    rv = write_reference_values(tmp_path, vendor)
    path = write_config(tmp_path, pki, rv, 7443, "a" * 64, extra='surprise = "x"')
    with pytest.raises(ConfigError, match=r"edge\.toml: surprise: unknown key"):
        EdgeConfig.from_toml(path)
    text = path.read_text().replace('surprise = "x"', "").replace('tenant = "demo"', "")
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"edge\.toml: tenant: missing required key"):
        EdgeConfig.from_toml(path)
    path.write_text('tenant = "demo"\n' + text.replace("candidates = 3", 'candidates = "3"'))
    with pytest.raises(ConfigError, match="candidates: must be an integer"):
        EdgeConfig.from_toml(path)
    path.write_text('tenant = "demo"\n' + text.replace('models = ["other-model"]', "mdls = []"))
    with pytest.raises(ConfigError, match=r"apps\[1\]\.mdls: unknown key"):
        EdgeConfig.from_toml(path)
    path.write_text("not = [toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        EdgeConfig.from_toml(path)


def test_config_defaults_and_paths(tmp_path: Path, pki: Path, vendor: Vendor) -> None:
    rv = write_reference_values(tmp_path, vendor)
    config = EdgeConfig.from_toml(write_config(tmp_path, pki, rv, 7443, "b" * 64))
    assert config.listen_port == 0 and config.broker == "127.0.0.1:7443"
    assert config.suite == suites.DEFAULT_SUITE
    assert config.audit_path == tmp_path / "state" / "audit.db"
    assert config.apps[0] == AppConfig(
        "demo-app", "b" * 64, (CHAT_MODEL, EMBED_MODEL, UNSERVED_MODEL)
    )
    assert "b" * 64 not in repr(config.apps[0])


def test_api_keys() -> None:
    key, digest = generate_api_key()
    assert key.startswith("sk-sovra-") and len(key) > 40
    assert digest == hash_api_key(key) and len(digest) == 64
    keys = ApiKeys([AppConfig("a", digest, ())])
    assert keys.authenticate(f"Bearer {key}").name == "a"
    for header in (None, "", "Bearer ", f"Basic {key}"):
        with pytest.raises(ApiError) as exc:
            keys.authenticate(header)
        assert exc.value.code == "missing_api_key"
    with pytest.raises(ApiError) as exc:
        keys.authenticate(f"Bearer {key}x")
    assert exc.value.code == "invalid_api_key"


def test_policy_denies_by_default_and_names_its_config() -> None:
    apps = [AppConfig("a", "c" * 64, ("m1",))]
    policy = ConfigPolicy(apps)
    assert policy.policy_id.startswith("config:") and len(policy.policy_id) == 19
    allow = policy.decide("a", "inference", "m1")
    assert allow.allowed and allow.rule_id == "apps.a.models"
    assert not policy.decide("a", "inference", "m2").allowed
    assert not policy.decide("b", "inference", "m1").allowed
    assert not policy.decide("a", "training", "m1").allowed
    changed = ConfigPolicy([AppConfig("a", "c" * 64, ("m1", "m2"))])
    assert changed.policy_id != policy.policy_id


def test_identity_key_is_created_private_and_reused(start_edge: StartEdge) -> None:
    h = start_edge()
    key_path = h.edge.runtime.config.identity_key_path
    assert key_path.stat().st_mode & 0o777 == 0o600
    first = h.edge.runtime.edge_key_hex
    h.edge.stop()
    again = EdgeRuntime(h.edge.runtime.config)
    assert again.edge_key_hex == first
    again.close()
    key_path.chmod(0o644)
    with pytest.raises(EdgeStartError, match="chmod 600"):
        EdgeRuntime(h.edge.runtime.config)


def test_cli_audit_verify_and_tail(
    edge: Harness, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert edge.chat().status_code == 200
    parser = argparse.ArgumentParser(prog="sovra")
    edge_cli.register(parser.add_subparsers(dest="command"))
    config_path = tmp_path / "edge.toml"
    args = parser.parse_args(["edge", "audit", "verify", "--config", str(config_path)])
    assert args.func(args) == 0
    assert "chain intact" in capsys.readouterr().out
    args = parser.parse_args(["edge", "audit", "tail", "--config", str(config_path), "-n", "1"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "request"
    args = parser.parse_args(["edge", "api-key", "--app", "x"])
    assert args.func(args) == 0
    assert "key_sha256" in capsys.readouterr().out


def test_serve_notifies_systemd(start_edge: StartEdge, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = Path(tempfile.mkdtemp(prefix="sd-"))
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        h = start_edge()
        assert sock.recv(100) == b"READY=1"
        h.edge.stop()
        assert sock.recv(100) == b"STOPPING=1"
    finally:
        sock.close()
        path.unlink()
        directory.rmdir()


def test_serve_reports_a_port_in_use(tmp_path: Path, pki: Path, vendor: Vendor) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rv = write_reference_values(tmp_path, vendor)
        path = write_config(tmp_path, pki, rv, 7443, "d" * 64)
        path.write_text(path.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        with pytest.raises(EdgeStartError, match="did not start listening"):
            serve(EdgeConfig.from_toml(path))


def test_unexpected_exceptions_become_a_500_error_object() -> None:
    from edge_agent.app import RequestLogMiddleware

    async def broken_app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError(f"boom {SECRET}")

    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=RequestLogMiddleware(broken_app))
        async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
            return await client.get("/v1/models")

    resp = asyncio.run(scenario())
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "internal_error"
    assert SECRET not in resp.text


# -- attestation lifecycle: re-appraisal, the broker's EAR, the enclaves command ----------------


def _issue_broker_ear(
    offer: EnclaveKeyOffer, rv: ReferenceValues, key: ec.EllipticCurvePrivateKey, **kw: Any
) -> str:
    from attestation.verifier import OfferedKey, verify_key

    w = offer.wire
    offered = OfferedKey(
        offer.enclave_id, w.epoch, w.kem, w.public_key, w.not_after_ms, w.evidence_format,
        w.evidence, receipt_public_key=w.receipt_public_key,
    )  # fmt: skip
    return ear.issue_ear(verify_key(offered, rv), signing_key=key, policy_id="broker-rv", **kw)


def test_trusted_set_records_the_brokers_ear_next_to_its_own_verdict(
    tmp_path: Path, vendor: Vendor, rogue_vendor: Vendor
) -> None:
    rv = ReferenceValues.load(write_reference_values(tmp_path, vendor))
    broker_key = ec.generate_private_key(ec.SECP256R1())
    pem = ear.public_key_pem(broker_key)
    good, other, rogue = offer_key(vendor, "e1"), offer_key(vendor, "e2"), offer_key(vendor, "e3")
    good.wire.ear = _issue_broker_ear(good, rv, broker_key)
    other.wire.ear = good.wire.ear  # an EAR about another key
    rogue = offer_key(rogue_vendor, "e4")
    rogue.wire.ear = good.wire.ear
    audit = AuditLog(tmp_path / "audit.db")
    trusted = TrustedEnclaveSet(rv, audit=audit)
    trusted.sync(
        [descriptor(o.enclave_id, o.wire) for o in (good, other, rogue)], broker_ear_key=pem
    )
    records = {e.record["enclave_id"]: e.record for e in audit.tail(10)}
    assert records["e1"]["edge_verdict"] == "affirming" and records["e1"]["broker_ear"] == "warning"
    assert records["e2"]["broker_ear"] == "invalid"
    assert records["e2"]["broker_ear_detail"] == "the EAR is about another enclave key"
    assert records["e2"]["edge_verdict"] == "affirming"  # the edge's own verdict decides
    assert records["e4"]["edge_verdict"] == "refused" and records["e4"]["broker_ear"] == "invalid"

    plain = offer_key(vendor, "e5")
    signed_elsewhere = offer_key(vendor, "e6")
    signed_elsewhere.wire.ear = _issue_broker_ear(
        signed_elsewhere, rv, ec.generate_private_key(ec.SECP256R1())
    )
    trusted.sync(
        [descriptor("e5", plain.wire), descriptor("e6", signed_elsewhere.wire)], broker_ear_key=pem
    )
    records = {e.record["enclave_id"]: e.record for e in audit.tail(2)}
    assert records["e5"]["broker_ear"] == "absent"
    assert records["e6"]["broker_ear"] == "invalid"
    assert records["e6"]["broker_ear_detail"].startswith("EarSignatureInvalid")

    unverified = TrustedEnclaveSet(rv, audit=audit)
    unverified.sync([descriptor("e1", good.wire)])  # no EAR key in the listing
    assert audit.tail(1)[0].record["broker_ear"] == "unverified"
    assert unverified.snapshot()[0]["broker_ear"] == "unverified"


def test_trusted_set_rejudges_every_key_when_reference_values_change(
    tmp_path: Path, vendor: Vendor
) -> None:
    rv_path = write_reference_values(tmp_path, vendor)
    audit = AuditLog(tmp_path / "audit.db")
    trusted = TrustedEnclaveSet(ReferenceValuesFile(rv_path), audit=audit)
    offers = [offer_key(vendor, e) for e in ("e1", "e2")]
    listing = [descriptor(o.enclave_id, o.wire) for o in offers]
    cons = Constraints(allow_simulated=True)
    assert len(trusted.sync(listing)) == 2
    trusted.sync(listing)  # unchanged values: cached, nothing judged again
    assert len(audit.tail(100)) == 2

    rv_path.write_text(rv_path.read_text().replace("simulation: allow", "simulation: forbid"))
    assert trusted.sync(listing) == []
    assert trusted.candidates(CHAT_MODEL, 3, cons) == []
    assert {r["reason"] for r in trusted.snapshot()} == {NotAccepted.code}
    assert [e.record["result"] for e in audit.tail(2)] == ["refused", "refused"]

    rv_path.write_text(rv_path.read_text().replace("simulation: forbid", "simulation: allow"))
    assert len(trusted.sync(listing)) == 2  # judged anew, admitted again


def test_cli_enclaves_verifies_the_directory_locally(
    tmp_path: Path,
    pki: Path,
    vendor: Vendor,
    rogue_vendor: Vendor,
    broker: FakeBroker,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good, rogue = offer_key(vendor, "e1", region="eu-central"), offer_key(rogue_vendor, "e2")
    broker.directory = [descriptor("e1", good.wire), descriptor("e2", rogue.wire)]
    rv = write_reference_values(tmp_path, vendor)
    path = write_config(tmp_path, pki, rv, broker.port, "a" * 64)
    parser = argparse.ArgumentParser(prog="sovra")
    edge_cli.register(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["edge", "enclaves", "--config", str(path), "--json"])
    assert args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["enclave_id"]: r for r in doc["enclaves"]}
    assert rows["e1"]["status"] == "affirming" and rows["e1"]["region"] == "eu-central"
    assert rows["e1"]["simulated"] is True and rows["e1"]["broker_ear"] == "unverified"
    assert rows["e2"]["status"] == "refused" and rows["e2"]["reason"] == "untrusted_evidence"
    assert "vendor root" in rows["e2"]["detail"]
    assert broker.peers[-1] == Identity.edge("demo")  # fetched with the edge's mTLS identity
    assert not (tmp_path / "state" / "audit.db").exists()  # an inspection writes nothing

    args = parser.parse_args(["edge", "enclaves", "--config", str(path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "e1 epoch 1: affirming SIMULATED region=eu-central" in out
    assert "e2 epoch 1: refused (untrusted_evidence)" in out

    unreachable = write_config(tmp_path, pki, rv, 9, "a" * 64)  # nothing listens on port 9
    args = parser.parse_args(["edge", "enclaves", "--config", str(unreachable)])
    assert args.func(args) == 1
    assert "cannot list enclaves" in capsys.readouterr().err
