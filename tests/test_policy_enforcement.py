"""The data-sovereignty policy enforced at the edge (and what the enclave does with a misrouted
request): allow / pseudonymise / deny / keep-local through the real HTTP API, the header's
labels, policy id and constraints, placeholders restored in unary and streamed replies, the
mapping store, audit records; signed git commits, reloads (SIGHUP, poll) and the last good
policy; bad input of every kind.

The edge runs for real (uvicorn) against the FAKE broker of ``test_edge`` that plays enclave: it
opens what the edge sealed, so the tests see exactly what an enclave would see.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from openai_stub import StubServer
from stack_fixtures import _write_reference_values, workload_section
from test_edge import (
    CHAT_MODEL,
    FakeBroker,
    Vendor,
    _make_vendor,
    chat_content,
    descriptor,
    offer_key,
    write_reference_values,
)
from test_policy_gitsource import Repo, make_key

from attestation import sim_vendor
from cloud_broker.config import BrokerConfig, TenantPolicy
from cloud_broker.server import serve as serve_broker
from edge_agent.api_keys import generate_api_key
from edge_agent.config import AppConfig, ConfigError, EdgeConfig
from edge_agent.policy import (
    ConstraintConflict,
    Decision,
    EnginePolicy,
    PolicyUnavailable,
    jurisdiction_of,
    read_status,
    sealed_constraints,
)
from edge_agent.runtime import EdgeRuntime, EdgeStartError
from edge_agent.server import RunningEdge, install_reload_handler, serve
from enclave.config import EnclaveConfig, KeysSection, TEESection, TLSSection
from enclave.measurement import measure
from enclave.server import serve as serve_enclave
from sovra import cli as sovra_cli
from sovra import suites
from sovra.envelope import Constraints, Envelope, Header, Recipient, new_request_id, seal_request
from sovra.pki import Identity, init_pki
from sovra.policy import PolicySource
from sovra.tls import TLSFiles, secure_channel, server_credentials
from sovra.v1 import broker_pb2, broker_pb2_grpc, enclave_pb2, enclave_pb2_grpc

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "policy"
CN = "cn-north-1"
RESIDENT_ID = "11010519491231002X"  # synthetic, valid check digit
PHONE = "13812345678"
OTHER_ID = "110105198001010016"  # another valid synthetic ID
NOTE = f"患者身份证号{RESIDENT_ID}，电话{PHONE}，请复述。"
CLINICAL = "clinical-assistant"
BILLING = "billing-bot"
KIOSK = "intake-kiosk"  # defined in the test policy, named by no rule: default deny

needs_git = pytest.mark.skipif(
    shutil.which("git") is None or shutil.which("ssh-keygen") is None,
    reason="needs git and ssh-keygen",
)


# -- the fake broker, recording headers and splitting streams -----------------------------------


@dataclass
class PolicyBroker(FakeBroker):
    """``test_edge``'s fake broker (plays enclave), also keeping every header it opened.
    ``split``: stream the echo in chunks of that many characters; ``finish``: put
    ``finish_reason`` on the last content chunk (else only the done marker ends the stream)."""

    headers: list[Header] = field(default_factory=list)
    split: int = 0
    finish: bool = True

    def _open(self, data: bytes, context: Any) -> Any:
        opened = super()._open(data, context)
        self.headers.append(Envelope.decode(data).header)
        return opened

    def _frames(self, doc: dict[str, Any], writer: Any) -> list[bytes]:
        body = doc["body"]
        if not (self.split and body.get("stream")):
            return super()._frames(doc, writer)
        text = chat_content(body)
        pieces = [text[i : i + self.split] for i in range(0, len(text), self.split)]
        docs: list[dict[str, Any]] = [
            {
                "id": "chatcmpl-split",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}],
            }
            for p in pieces
        ]
        if self.finish:
            docs[-1]["choices"][0]["finish_reason"] = "stop"
        docs.append({"done": True})
        last = len(docs) - 1
        return [writer.frame(json.dumps(d).encode(), final=i == last) for i, d in enumerate(docs)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory, tenants=("demo",), enclaves=("e1", "e2", "e3"))
    return directory


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Vendor:
    return _make_vendor(tmp_path_factory.mktemp("vendor"), "good")


@pytest.fixture
def broker(pki: Path) -> Iterator[PolicyBroker]:
    fake = PolicyBroker()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    broker_pb2_grpc.add_EdgeGatewayServicer_to_server(fake, server)
    files = TLSFiles.from_pki_dir(pki, Identity.broker())
    fake.port = server.add_secure_port("127.0.0.1:0", server_credentials(files))
    server.start()
    yield fake
    server.stop(None)


# -- policies -----------------------------------------------------------------------------------


def copy_policy(directory: Path) -> Path:
    """The example hospital policy plus an application no rule names (for the default deny)."""
    shutil.copytree(EXAMPLE, directory)
    apps = directory / "applications.yaml"
    apps.write_text(
        apps.read_text()
        + f"  {KIOSK}:\n    description: Intake kiosk.\n    purposes: [inference]\n"
    )
    return directory


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    return copy_policy(tmp_path / "policy")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("keys")
    alice = make_key(base / "alice", "alice")
    mallory = make_key(base / "mallory", "mallory")
    signers = base / "allowed_signers"
    kind, blob = alice.with_suffix(".pub").read_text().split()[:2]
    signers.write_text(f'alice@hospital.example namespaces="git" {kind} {blob}\n')
    return {"alice": alice, "mallory": mallory, "signers": signers}


# -- the edge -----------------------------------------------------------------------------------


@dataclass
class Edge:
    edge: RunningEdge
    broker: PolicyBroker
    keys: dict[str, str]  # app -> API key
    config_path: Path
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def runtime(self) -> EdgeRuntime:
        return self.edge.runtime

    def http(self, app: str = CLINICAL, **headers: str) -> httpx.Client:
        client = httpx.Client(
            base_url=self.edge.url,
            headers={"Authorization": f"Bearer {self.keys[app]}", **headers},
            timeout=20,
        )
        self.clients.append(client)
        return client

    def chat(
        self,
        content: str | list[dict[str, Any]] = "hello",
        *,
        app: str = CLINICAL,
        model: str = CHAT_MODEL,
        messages: list[dict[str, Any]] | None = None,
        **headers: str,
    ) -> httpx.Response:
        body = {"model": model, "messages": messages or [{"role": "user", "content": content}]}
        return self.http(app, **headers).post("/v1/chat/completions", json=body)

    def stream(self, content: str, **headers: str) -> tuple[int, list[str]]:
        body = {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": content}],
            "stream": True,
        }
        with self.http(**headers).stream("POST", "/v1/chat/completions", json=body) as resp:
            text = resp.read().decode()
        return resp.status_code, [e.removeprefix("data: ") for e in text.split("\n\n") if e]

    def audit(self, kind: str = "request") -> list[dict[str, Any]]:
        return [e.record for e in self.runtime.audit.tail(1000) if e.kind == kind]

    def payload(self) -> dict[str, Any]:
        """The request body the enclave saw last."""
        body: dict[str, Any] = self.broker.seen[-1].payload["body"]
        return body

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.edge.stop()


def write_edge_config(
    directory: Path,
    pki: Path,
    rv: Path,
    broker_port: int,
    apps: dict[str, str],
    policy: str,
    *,
    regions: tuple[str, ...] = (),
    max_body_bytes: int = 1048576,
) -> Path:
    edge_files = TLSFiles.from_pki_dir(pki, Identity.edge("demo"))
    app_tables = "".join(
        f'\n[[apps]]\nname = "{name}"\nkey_sha256 = "{digest}"\n' for name, digest in apps.items()
    )
    path = directory / "edge.toml"
    path.write_text(
        f"""
tenant = "demo"
listen = "127.0.0.1:0"
state_dir = "{directory / "state"}"
broker = "127.0.0.1:{broker_port}"
reference_values = "{rv}"
request_ttl_s = 30
max_body_bytes = {max_body_bytes}

[tls]
cert = "{edge_files.cert}"
key = "{edge_files.key}"
ca = "{edge_files.ca}"

[constraints]
regions = {json.dumps(list(regions))}
allow_simulated = true

[policy]
{policy}
{app_tables}"""
    )
    return path


StartEdge = Callable[..., Edge]


@pytest.fixture
def start_edge(
    tmp_path: Path, pki: Path, vendor: Vendor, broker: PolicyBroker
) -> Iterator[StartEdge]:
    started: list[Edge] = []
    offers = [offer_key(vendor, e, region=CN) for e in ("e1", "e2", "e3")]
    broker.serve(offers)
    broker.directory = [descriptor(o.enclave_id, o.wire, region=CN) for o in offers]
    rv = write_reference_values(tmp_path, vendor)

    def start(
        policy: str, *, apps: tuple[str, ...] = (CLINICAL, BILLING, KIOSK), **kw: Any
    ) -> Edge:
        keys, digests = {}, {}
        for app in apps:
            keys[app], digests[app] = generate_api_key()
        path = write_edge_config(tmp_path, pki, rv, broker.port, digests, policy, **kw)
        edge = Edge(serve(EdgeConfig.from_toml(path)), broker, keys, path)
        started.append(edge)
        return edge

    yield start
    for edge in started:
        edge.close()


def dir_policy(path: Path, extra: str = "") -> str:
    return f'source = "dir"\npath = "{path}"\npoll_s = 0\n{extra}'


# -- config -------------------------------------------------------------------------------------


def test_policy_section_is_checked_key_by_key(tmp_path: Path, pki: Path, vendor: Vendor) -> None:
    rv = write_reference_values(tmp_path, vendor)

    def config(policy: str) -> EdgeConfig:
        return EdgeConfig.from_toml(write_edge_config(tmp_path, pki, rv, 7443, {}, policy))

    parsed = config('source = "dir"\npath = "policy"')
    assert parsed.policy is not None and parsed.policy.source == "dir"
    assert parsed.policy.path == tmp_path / "policy"  # relative to the config file
    assert parsed.policy.mapping_key == tmp_path / "state" / "pseudonym-mapping.key"
    assert parsed.policy.mapping_db == tmp_path / "state" / "pseudonyms.db"
    assert (parsed.policy.poll_s, parsed.policy.mapping_ttl_s) == (60, 3600)
    git = config('source = "git"\npath = "repo"\nallowed_signers = "signers"\nrev = "main"')
    assert git.policy is not None and git.policy.rev == "main"
    assert git.policy.allowed_signers == tmp_path / "signers"
    cases = {
        'source = "svn"\npath = "p"': 'policy.source: must be "git" or "dir"',
        'source = "git"\npath = "p"': "policy.allowed_signers: required",
        'source = "dir"\npath = "p"\nallowed_signers = "s"': "policy.allowed_signers: only valid",
        'source = "dir"\npath = "p"\npol_s = 3': "policy.pol_s: unknown key",
        'path = "p"': "policy.source: missing required key",
        'source = "dir"\npath = "p"\npoll_s = -1': "poll_s: must be an integer",
        'source = "git"\npath = "p"\nallowed_signers = "s"\nrev = "--exec=x"': "policy.rev",
        'source = "dir"\npath = "p"\nlocal_upstream = "http://10.0.0.8:8000/v1"': "not loopback",
        'source = "dir"\npath = "p"\nlocal_upstream = "ftp://127.0.0.1/v1"': "http(s) URL",
    }
    for policy, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            config(policy)
    local = config('source = "dir"\npath = "p"\nlocal_upstream = "http://127.0.0.1:8000/v1/"')
    assert local.policy is not None and local.policy.local_upstream == "http://127.0.0.1:8000/v1"


def test_constraints_are_narrowed_never_widened() -> None:
    edge = Constraints(regions=(), tee_types=(), allow_simulated=True)
    decision = Decision("allow", "r", "p", "ok", destination="d", regions=(CN,), tee_types=("x",))
    sealed = sealed_constraints(edge, decision)
    assert (sealed.regions, sealed.tee_types, sealed.allow_simulated) == ((CN,), ("x",), True)
    edge = Constraints(regions=(CN, "cn-south-1"), tee_types=("x", "y"))
    assert sealed_constraints(edge, decision).regions == (CN,)
    assert sealed_constraints(edge, decision).tee_types == ("x",)
    no_policy = Decision("allow", "r", "p", "ok")  # config mode: the edge's constraints as is
    assert sealed_constraints(edge, no_policy) == edge
    with pytest.raises(ConstraintConflict, match="no overlap"):
        sealed_constraints(Constraints(regions=("eu-west",)), decision)
    with pytest.raises(ConstraintConflict, match="no overlap"):
        sealed_constraints(Constraints(tee_types=("z",)), decision)
    # A destination without regions: the edge's regions within its jurisdictions, or nothing.
    by_law = Decision("allow", "r", "p", "ok", destination="d", jurisdictions=("CN",))
    assert sealed_constraints(Constraints(regions=(CN, "eu-west")), by_law).regions == (CN,)
    with pytest.raises(ConstraintConflict, match="cannot seal a residency constraint"):
        sealed_constraints(Constraints(), by_law)
    assert jurisdiction_of("cn-north-1") == "CN" and jurisdiction_of("eu-west") == "EU"


# -- decisions through the API ------------------------------------------------------------------


def test_clean_request_is_allowed_with_the_policy_constraints(
    start_edge: StartEdge, policy_dir: Path
) -> None:
    edge = start_edge(dir_policy(policy_dir))
    policy_id = edge.runtime.policy.policy_id
    assert policy_id.startswith("dir:")
    resp = edge.chat("What is the recommended dosing of amoxicillin for a child?")
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-sovra-decision"] == "allow"
    assert resp.headers["x-sovra-rule"] == "clinical-clean"
    assert resp.headers["x-sovra-policy"] == policy_id
    (header,) = edge.broker.headers
    assert header.policy_id == policy_id and header.labels == ()
    assert header.constraints.regions == (CN,)  # the destination's region, sealed
    assert header.constraints.tee_types == ("sim-ascend-cvm", "virtcca")
    assert header.constraints.allow_simulated is True
    (record,) = edge.audit()
    assert record["decision"] == "allow" and record["rule"] == "clinical-clean"
    assert record["policy_id"] == policy_id and record["purpose"] == "inference"
    assert record["destination"] == "cn-sovereign" and record["classes"] == []
    (event,) = edge.audit("policy")
    assert event["event"] == "activated" and event["policy_id"] == policy_id
    models = edge.http().get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [CHAT_MODEL]  # what the policy lets the app use


def test_pseudonymised_request_leaves_with_placeholders_and_is_restored(
    start_edge: StartEdge, policy_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    edge = start_edge(dir_policy(policy_dir))
    resp = edge.chat(NOTE)
    assert resp.status_code == 200, resp.text
    # The app gets its values back...
    assert resp.json()["choices"][0]["message"]["content"] == f"echo: {NOTE}"
    assert resp.headers["x-sovra-decision"] == "pseudonymise"
    assert resp.headers["x-sovra-labels"] == "confidential"
    # ...while the enclave saw placeholders only.
    sent = edge.payload()["messages"][0]["content"]
    assert sent == "患者身份证号<CN_RESIDENT_ID_1>，电话<CN_MOBILE_1>，请复述。"
    (header,) = edge.broker.headers
    assert header.labels == ("confidential",)
    record = edge.audit()[-1]
    assert record["decision"] == "pseudonymise" and record["rule"] == "clinical-pseudonymised"
    assert record["classes"] == ["confidential"]
    assert record["entity_counts"] == {"CN_MOBILE": 1, "CN_RESIDENT_ID": 1}
    # Nothing sensitive at rest or in the logs: audit, mapping store (encrypted), status.
    state = edge.runtime.config.state_dir
    for path in state.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert RESIDENT_ID.encode() not in data and PHONE.encode() not in data, path
    assert len(edge.runtime.mappings or []) == 1
    assert RESIDENT_ID not in caplog.text and PHONE not in caplog.text


def test_conversation_keeps_its_placeholders_across_turns(
    start_edge: StartEdge, policy_dir: Path
) -> None:
    edge = start_edge(dir_policy(policy_dir))
    assert edge.chat(NOTE).status_code == 200
    # Turn two: the app sends the earlier answer back (real values) and a new question.
    messages = [
        {"role": "user", "content": NOTE},
        {"role": "assistant", "content": f"echo: {NOTE}"},
        {"role": "user", "content": f"Call {PHONE} or check ID {OTHER_ID}."},
    ]
    resp = edge.chat(messages=messages)
    assert resp.status_code == 200, resp.text
    assert (
        resp.json()["choices"][0]["message"]["content"]
        == f"echo: Call {PHONE} or check ID {OTHER_ID}."
    )
    sent = [m["content"] for m in edge.payload()["messages"]]
    assert "<CN_RESIDENT_ID_1>" in sent[1] and RESIDENT_ID not in sent[1]
    assert sent[2] == "Call <CN_MOBILE_1> or check ID <CN_RESIDENT_ID_2>."
    # X-Sovra-Conversation names the conversation explicitly (namespaced by app).
    assert edge.chat(f"ID {OTHER_ID}", **{"X-Sovra-Conversation": "ward-7"}).status_code == 200
    assert edge.payload()["messages"][0]["content"] == "ID <CN_RESIDENT_ID_1>"
    second = f"IDs {RESIDENT_ID} and {OTHER_ID}"
    assert edge.chat(second, **{"X-Sovra-Conversation": "ward-7"}).status_code == 200
    assert (
        edge.payload()["messages"][0]["content"] == "IDs <CN_RESIDENT_ID_2> and <CN_RESIDENT_ID_1>"
    )
    resp = edge.chat("x", **{"X-Sovra-Conversation": "c" * 300})
    assert resp.status_code == 400 and "X-Sovra-Conversation" in resp.json()["error"]["message"]


@pytest.mark.parametrize("split", [1, 3, 7])
@pytest.mark.parametrize("finish", [True, False])
def test_streamed_reply_restores_placeholders_split_across_chunks(
    start_edge: StartEdge, policy_dir: Path, split: int, finish: bool
) -> None:
    edge = start_edge(dir_policy(policy_dir))
    edge.broker.split, edge.broker.finish = split, finish
    status, events = edge.stream(NOTE)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == f"echo: {NOTE}"
    assert "<CN_" not in text
    assert edge.payload()["messages"][0]["content"].count("<CN_") == 2
    assert edge.audit()[-1]["outcome"] == "ok"


def test_embeddings_inputs_are_classified_and_pseudonymised(
    start_edge: StartEdge, policy_dir: Path
) -> None:
    edge = start_edge(dir_policy(policy_dir))
    body = {"model": CHAT_MODEL, "input": [f"电话{PHONE}", "no identifiers here"]}
    resp = edge.http().post("/v1/embeddings", json=body)
    assert resp.status_code == 200, resp.text
    assert edge.payload()["input"] == ["电话<CN_MOBILE_1>", "no identifiers here"]
    assert edge.audit()[-1]["entity_counts"] == {"CN_MOBILE": 1}


def test_denials_name_the_rule_and_reach_no_enclave(
    start_edge: StartEdge, policy_dir: Path
) -> None:
    edge = start_edge(dir_policy(policy_dir))
    policy_id = edge.runtime.policy.policy_id
    resp = edge.chat("Summarise the ward round checklist.", model="gpt-4o")
    assert resp.status_code == 403
    err = resp.json()["error"]
    assert err["code"] == "policy_denied" and "'no-offshore-models'" in err["message"]
    assert policy_id in err["message"]
    resp = edge.chat("Where is the cardiology wing?", app=KIOSK)
    assert resp.status_code == 403 and "'default-deny'" in resp.json()["error"]["message"]
    assert "no rule matched" in resp.json()["error"]["message"]
    assert edge.chat("hello", model="no-such-model").status_code == 404
    assert edge.broker.seen == []
    records = edge.audit()
    assert [(r["decision"], r["rule"], r["outcome"]) for r in records] == [
        ("deny", "no-offshore-models", "policy_denied"),
        ("deny", "default-deny", "policy_denied"),
        (None, None, "model_not_found"),
    ]


def test_destination_outside_the_edge_constraints_is_denied(
    start_edge: StartEdge, policy_dir: Path
) -> None:
    edge = start_edge(dir_policy(policy_dir), regions=("eu-west",))
    resp = edge.chat("What is the recommended dosing of amoxicillin?")
    assert resp.status_code == 403
    assert "no overlap" in resp.json()["error"]["message"]
    assert edge.broker.seen == []


def test_keep_local_without_and_with_a_local_model(
    start_edge: StartEdge, policy_dir: Path, stub_server: StubServer
) -> None:
    hiv = "患者 MRN-204518 HIV 阳性，请给出用药建议。"
    edge = start_edge(dir_policy(policy_dir))
    resp = edge.chat(hiv)
    assert resp.status_code == 403
    err = resp.json()["error"]
    assert err["code"] == "keep_local" and "'restricted-stays-local'" in err["message"]
    edge.close()

    local = f'local_upstream = "{stub_server.base_url}"'
    edge = start_edge(dir_policy(policy_dir, local))
    before = len(stub_server.requests)
    resp = edge.chat(hiv)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == hiv[::-1] + " [stub]"
    assert resp.headers["x-sovra-decision"] == "keep-local"
    assert stub_server.requests[before]["messages"][0]["content"] == hiv  # as is: it stays here
    status, events = edge.stream(hiv)
    assert status == 200 and events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == hiv[::-1] + " [stub]"
    assert edge.broker.seen == []  # nothing was sealed, nothing left
    records = edge.audit()[-2:]
    assert all(r["destination"] == "local" and r["decision"] == "keep-local" for r in records)
    assert all(r["outcome"] == "ok" for r in records)


def test_policy_status_route_needs_an_app_key(start_edge: StartEdge, policy_dir: Path) -> None:
    edge = start_edge(dir_policy(policy_dir))
    resp = edge.http().get("/v1/sovra/policy")
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["source"] == "dir" and doc["active"]["policy_id"] == edge.runtime.policy.policy_id
    assert "location" not in doc and doc["last_refusal"] is None
    anonymous = httpx.get(edge.edge.url + "/v1/sovra/policy", timeout=10)
    assert anonymous.status_code == 401


# -- bad input ----------------------------------------------------------------------------------


def test_bad_bodies_get_clear_errors_and_nothing_crashes(
    start_edge: StartEdge, policy_dir: Path
) -> None:
    edge = start_edge(dir_policy(policy_dir), max_body_bytes=64 * 1024)
    http = edge.http()
    url = "/v1/chat/completions"
    json_headers = {"content-type": "application/json"}

    resp = http.post(url, content=b"x" * (64 * 1024 + 1), headers=json_headers)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    resp = http.post(url, content=bytes(range(256)) * 4, headers=json_headers)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    latin1 = json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "é"}]})
    resp = http.post(
        url, content=latin1.encode().replace(b"\\u00e9", b"\xe9"), headers=json_headers
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    # A lone surrogate is not text: 400, not a 500 from the encoder.
    lone = b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % (
        CHAT_MODEL.encode()
    )
    resp = http.post(url, content=lone, headers=json_headers)
    assert resp.status_code == 400 and "surrogate" in resp.json()["error"]["message"]
    # Content the policy cannot classify is refused, not sent.
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    resp = edge.chat(image)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported_content"
    assert edge.broker.seen == []

    # UTF-16 JSON (allowed by RFC 8259 readers) with mixed scripts and full-width digits.
    wide = RESIDENT_ID.translate({ord(c): ord(c) + 0xFEE0 for c in "0123456789X"})
    mixed = f"مرحبا Привет 👋🏽 患者 {wide}，電話 +86 138 1234 5678"
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": mixed}]}
    utf16 = json.dumps(body, ensure_ascii=False).encode("utf-16")
    resp = http.post(url, content=utf16, headers=json_headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == f"echo: {mixed}"
    sent = edge.payload()["messages"][0]["content"]
    assert sent == "مرحبا Привет 👋🏽 患者 <CN_RESIDENT_ID_1>，電話 <CN_MOBILE_1>"

    # Past the classification limit: 413, the request is not sent.
    edge.runtime.policy.policy.max_text_chars = 20  # type: ignore[attr-defined]
    seen = len(edge.broker.seen)
    resp = edge.chat("a" * 40)
    assert resp.status_code == 413 and "classification limit" in resp.json()["error"]["message"]
    assert len(edge.broker.seen) == seen
    assert edge.http().get("/healthz").status_code == 200  # still serving


def test_unknown_application_is_a_start_error(
    tmp_path: Path, pki: Path, vendor: Vendor, policy_dir: Path
) -> None:
    rv = write_reference_values(tmp_path, vendor)
    _, digest = generate_api_key()
    path = write_edge_config(
        tmp_path, pki, rv, 7443, {CLINICAL: generate_api_key()[1], "marketing-bot": digest},
        dir_policy(policy_dir),
    )  # fmt: skip
    with pytest.raises(EdgeStartError, match=r"'marketing-bot'.*not defined in the policy"):
        EdgeRuntime(EdgeConfig.from_toml(path))


def test_dir_reload_keeps_the_last_good_policy(start_edge: StartEdge, policy_dir: Path) -> None:
    edge = start_edge(dir_policy(policy_dir))
    good = edge.runtime.policy.policy_id
    bad_cases = {
        "rules/30-bad.yaml": (b"rules:\n  - id: x\n    match: {classes_presnt: [a]}\n", "invalid"),
        "binary.yaml": (b"\x00\x01\x02\xff", "invalid"),
        "utf16.yaml": ("classes: [a]".encode("utf-16"), "invalid"),
        "huge.yaml": (b"#" * (1024 * 1024 + 1), "invalid"),
        "tests/broken.yaml": (
            b"tests:\n  - name: wrong expectation\n    app: clinical-assistant\n"
            b"    purpose: inference\n    model: smollm2-135m\n    text: hello\n"
            b"    expect: {effect: deny}\n",
            "policy tests failed",
        ),
    }
    for name, (data, reason) in bad_cases.items():
        path = policy_dir / name
        path.write_bytes(data)
        assert edge.runtime.reload_policy("test") == "refused", name
        status = edge.runtime.policy.status()
        assert reason in status["last_refusal"]["reason"], (name, status)
        assert status["active"]["policy_id"] == good
        assert edge.chat(NOTE).status_code == 200  # still deciding under the good policy
        assert edge.broker.headers[-1].policy_id == good
        path.unlink()
    # Polling an unchanged bad directory refuses it again, but logs and audits it once.
    (policy_dir / "bad.yaml").write_bytes(b"rules: [")
    assert edge.runtime.reload_policy("poll") == "refused"
    assert edge.runtime.reload_policy("poll") == "refused"
    assert edge.runtime.policy.status()["last_attempt"]["result"] == "refused"
    (policy_dir / "bad.yaml").unlink()
    # A policy that drops an application the edge serves is refused too.
    apps = policy_dir / "applications.yaml"
    original = apps.read_text()
    apps.write_text(original.replace(f"  {KIOSK}:", "  renamed-kiosk:"))
    assert edge.runtime.reload_policy("test") == "refused"
    assert f"'{KIOSK}'" in edge.runtime.policy.status()["last_refusal"]["reason"]
    apps.write_text(original + "# a comment changes the id\n")
    assert edge.runtime.reload_policy("test") == "activated"
    assert edge.runtime.policy.policy_id != good
    events = [(e["event"], e.get("reason", "")) for e in edge.audit("policy")]
    assert [e for e, _ in events] == ["activated", *["refused"] * 7, "activated"]
    assert all(RESIDENT_ID not in r for _, r in events)


# -- signed git commits -------------------------------------------------------------------------


def git_policy(repo: Path, signers: Path) -> str:
    return f'source = "git"\npath = "{repo}"\nallowed_signers = "{signers}"\npoll_s = 0'


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(copy_policy(tmp_path / "policy-repo"))


@needs_git
def test_git_policy_reloads_only_good_signed_commits(
    start_edge: StartEdge, repo: Repo, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    first = repo.commit("hospital policy v1", keys["alice"])
    edge = start_edge(git_policy(repo.root, keys["signers"]))
    assert edge.runtime.policy.policy_id == first
    assert edge.chat(NOTE).status_code == 200
    assert edge.broker.headers[-1].policy_id == first
    assert edge.audit()[-1]["policy_id"] == first
    status = edge.http().get("/v1/sovra/policy").json()
    assert status["active"]["commit"] == first
    assert status["active"]["signer"] == "alice@hospital.example"

    rules = repo.root / "rules" / "15-extra.yaml"
    bad = {
        "unsigned": (None, "rules:\n  - {id: a1, match: {purposes: [inference]}, effect: deny}\n",
                     "is not signed"),
        "wrong signer": (keys["mallory"], "# mallory\n", "not an allowed signer"),
        "invalid": (keys["alice"], "rules:\n  - {id: a2, effect: allow}\n", "is invalid"),
        "failing test": (
            keys["alice"],
            "rules:\n  - {id: a3, match: {models: [smollm2-135m]}, effect: deny}\n",
            "policy tests failed",
        ),
        "binary": (keys["alice"], "\x00\x00binary", "is invalid"),
    }  # fmt: skip
    for name, (key, text, reason) in bad.items():
        rules.write_text(text)
        commit = repo.commit(name, key)
        assert edge.runtime.reload_policy("test") == "refused", name
        status = edge.runtime.policy.status()
        assert status["last_refusal"]["commit"] == commit, name
        assert reason in status["last_refusal"]["reason"], (name, status["last_refusal"])
        assert status["active"]["commit"] == first
        resp = edge.chat("What is the recommended dosing of amoxicillin?")
        assert resp.status_code == 200 and resp.headers["x-sovra-policy"] == first
    refusals = [e for e in edge.audit("policy") if e["event"] == "refused"]
    assert len(refusals) == len(bad)

    # The edge's state tells `sovra policy status` the same (exit 0: a policy is active).
    assert sovra_cli.main(["policy", "status", "--config", str(edge.config_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["active"]["commit"] == first and "is invalid" in doc["last_refusal"]["reason"]
    assert sovra_cli.main(["policy", "status", "--config", str(edge.config_path)]) == 0
    out = capsys.readouterr().out
    assert f"active:       {first}" in out and "alice@hospital.example" in out

    rules.unlink()
    fixed = repo.commit("drop the extra rules", keys["alice"])
    assert edge.runtime.reload_policy("test") == "activated"
    assert edge.chat("hello").headers["x-sovra-policy"] == fixed
    assert edge.runtime.reload_policy("test") == "unchanged"


@needs_git
def test_sighup_reloads_and_tells_systemd(
    start_edge: StartEdge, repo: Repo, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = repo.commit("v1", keys["alice"])
    edge = start_edge(git_policy(repo.root, keys["signers"]))
    (repo.root / "README.md").write_text("v2\n")
    second = repo.commit("v2", keys["alice"])
    directory = Path(tempfile.mkdtemp(prefix="sd-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(directory / "notify"))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(directory / "notify"))
    previous = signal.getsignal(signal.SIGHUP)
    handler = install_reload_handler(edge.runtime)
    assert handler is not None and edge.runtime.policy.policy_id == first
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert handler.done.wait(30)
        reloading = sock.recv(200).decode()
        assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert sock.recv(200) == b"READY=1"
    finally:
        signal.signal(signal.SIGHUP, previous)
        sock.close()
        shutil.rmtree(directory)
    assert edge.runtime.policy.policy_id == second
    (event,) = [e for e in edge.audit("policy") if e.get("trigger") == "sighup"]
    assert event["event"] == "activated" and event["commit"] == second


@needs_git
def test_poll_interval_picks_up_a_new_signed_commit(
    start_edge: StartEdge, repo: Repo, keys: dict[str, Path]
) -> None:
    repo.commit("v1", keys["alice"])
    policy = git_policy(repo.root, keys["signers"]).replace("poll_s = 0", "poll_s = 1")
    edge = start_edge(policy)
    (repo.root / "README.md").write_text("v2\n")
    second = repo.commit("v2", keys["alice"])
    polled = threading.Event()
    reload = edge.runtime.reload_policy

    def observed(trigger: str = "manual") -> Any:
        result = reload(trigger)
        if trigger == "poll" and result == "activated":
            polled.set()
        return result

    edge.runtime.reload_policy = observed  # type: ignore[method-assign]
    assert polled.wait(30)  # the poll task ran (an event, not a sleep)
    assert edge.runtime.policy.policy_id == second
    assert edge.chat("hello").headers["x-sovra-policy"] == second


@needs_git
def test_restart_keeps_the_last_good_commit_and_refuses_a_bad_head(
    start_edge: StartEdge,
    repo: Repo,
    keys: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    (repo.root / "README.md").write_text("unsigned\n")
    repo.commit("unsigned first", None)
    with pytest.raises(EdgeStartError, match="is not signed"):
        start_edge(git_policy(repo.root, keys["signers"]))
    # Nothing active: `sovra policy status` exits 1 (the refused start wrote the status).
    config = next(repo.root.parent.glob("edge.toml"))
    assert sovra_cli.main(["policy", "status", "--config", str(config)]) == 1
    assert "is not signed" in capsys.readouterr().out

    good = repo.commit("signed", keys["alice"])
    edge = start_edge(git_policy(repo.root, keys["signers"]))
    assert edge.runtime.policy.policy_id == good
    edge.close()
    (repo.root / "README.md").write_text("tampered\n")
    repo.commit("unsigned on top", None)
    edge = start_edge(git_policy(repo.root, keys["signers"]))
    status = edge.runtime.policy.status()
    assert status["active"]["commit"] == good  # restored from the status file
    assert "is not signed" in status["last_refusal"]["reason"]
    assert edge.chat("hello").headers["x-sovra-policy"] == good


@needs_git
def test_policy_source_refuses_bad_commits_and_keeps_the_last_good(
    repo: Repo, keys: dict[str, Path], tmp_path: Path
) -> None:
    good = repo.commit("v1", keys["alice"])
    source = PolicySource(repo.root, keys["signers"])
    assert source.reload() and source.current().id == good
    extra = repo.root / "rules" / "99-extra.yaml"
    cases = [
        (None, "# unsigned\n", "is not signed"),
        (keys["mallory"], "# mallory\n", "not an allowed signer"),
        (keys["alice"], "rules: [", "is invalid"),
        (keys["alice"], "\x00\x01", "is invalid"),
        (keys["alice"], "#" * (1024 * 1024 + 1), "exceeds"),
        (keys["alice"], "rules:\n  - {id: z, match: {models: [smollm2-135m]}, effect: deny}\n",
         "policy tests failed"),
    ]  # fmt: skip
    for key, text, reason in cases:
        extra.write_text(text)
        commit = repo.commit(reason, key)
        assert source.reload() is False
        refusal = source.status().last_refusal
        assert refusal is not None and refusal.commit == commit and reason in refusal.reason
        assert source.current().id == good
    # The edge's own check on top: every [[apps]] name must be an application of the policy.
    extra.unlink()
    clean = repo.commit("clean", keys["alice"])
    doc = {
        "tenant": "demo", "listen": "127.0.0.1:0", "state_dir": "s", "broker": "b:1",
        "reference_values": "rv", "tls": {"cert": "c", "key": "k", "ca": "a"},
        "policy": {"source": "git", "path": str(repo.root),
                   "allowed_signers": str(keys["signers"])},
    }  # fmt: skip
    config = EdgeConfig.from_dict(doc, base=tmp_path, source="mem").policy
    assert config is not None
    status = tmp_path / "status.json"
    engine = EnginePolicy(config, [AppConfig("marketing-bot", "0" * 64, ())], status_path=status)
    with pytest.raises(PolicyUnavailable, match="'marketing-bot'"):
        engine.start()
    written = read_status(status)
    assert written is not None and written["active"] is None
    assert "'marketing-bot'" in written["last_refusal"]["reason"]
    engine = EnginePolicy(config, [AppConfig(CLINICAL, "0" * 64, ())], status_path=status)
    engine.start()
    assert engine.policy_id == clean


# -- the broker and the enclave -----------------------------------------------------------------


def test_broker_refusals_are_audited_at_the_edge(start_edge: StartEdge, policy_dir: Path) -> None:
    edge = start_edge(dir_policy(policy_dir))
    message = "enclave e2: sealed constraint 'regions' excludes this enclave's region 'eu-west'"
    edge.broker.mode = (grpc.StatusCode.PERMISSION_DENIED, message)
    resp = edge.chat("What is the recommended dosing of amoxicillin?")
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "broker_permission_denied"
    record = edge.audit()[-1]
    assert record["outcome"] == "broker_permission_denied" and record["status"] == 403
    assert record["reason"] == f"PERMISSION_DENIED: {message}"
    edge.broker.mode = (grpc.StatusCode.RESOURCE_EXHAUSTED, "quota requests_per_min used up")
    resp = edge.chat("What is the recommended dosing of amoxicillin?")
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "quota_exceeded"
    assert edge.audit()[-1]["reason"].startswith("RESOURCE_EXHAUSTED: quota")


class Misroute(grpc.ServerInterceptor):
    """A broker that sends every Dispatch to ``target`` (an enclave the edge did not choose)."""

    def __init__(self) -> None:
        self.target: enclave_pb2_grpc.EnclaveServiceStub | None = None
        self.calls = 0

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        target = self.target
        if handler is None or target is None or not details.method.endswith("/Dispatch"):
            return handler

        def dispatch(request: Any, context: grpc.ServicerContext) -> Any:
            self.calls += 1
            try:
                reply = target.Process(
                    enclave_pb2.SealedRequest(envelope=request.envelope), timeout=10
                )
            except grpc.RpcError as err:
                context.abort(err.code(), f"enclave enclave-eu: {err.details()}")
            return broker_pb2.DispatchReply(enclave_id="enclave-eu", frame=reply.frame)

        return grpc.unary_unary_rpc_method_handler(
            dispatch, handler.request_deserializer, handler.response_serializer
        )


def test_misrouted_request_is_refused_by_the_enclave_and_audited_at_the_edge(
    tmp_path: Path, stub_server: StubServer
) -> None:
    """Sealed for cn-north-1, routed to an enclave in eu-west-1: the enclave refuses to open it
    (PERMISSION_DENIED) whatever the broker does, and the edge audits the refusal it gets."""
    ids = ("enclave-cn", "enclave-eu")
    pki = init_pki(tmp_path / "pki", tenants=("demo",), enclaves=ids)
    root_cert = sim_vendor.create_root(tmp_path / "vendor")
    section = workload_section("openai-upstream", "stub-model", stub_server.base_url)
    rv = tmp_path / "reference-values.yaml"
    _write_reference_values(rv, [measure(section)], root_cert)
    misroute = Misroute()
    broker = serve_broker(
        BrokerConfig(
            listen="127.0.0.1:0",
            database=f"sqlite:///{tmp_path / 'broker' / 'broker.db'}",
            reference_values=rv,
            tls=TLSFiles.from_issued(pki[Identity.broker().file_stem]),
            strategy="ordered",
            tenants=MappingProxyType({"demo": TenantPolicy("demo")}),
        ),
        interceptors=[misroute],
    )
    enclaves = {}
    with contextlib.ExitStack() as stack:
        stack.callback(broker.stop, 0)
        for enclave_id, region in zip(ids, (CN, "eu-west-1")):
            key, cert = sim_vendor.issue_device(tmp_path / "vendor", enclave_id, tmp_path / "dev")
            issued = pki[Identity.enclave(enclave_id).file_stem]
            enclaves[enclave_id] = serve_enclave(
                EnclaveConfig(
                    enclave_id=enclave_id, region=region, broker=broker.address,
                    state_dir=tmp_path / enclave_id,
                    tls=TLSSection(issued.cert_path, issued.key_path, issued.ca_path),
                    tee=TEESection(key, cert), workload=section,
                    keys=KeysSection(rotate_s=600, overlap_s=120),
                )
            )  # fmt: skip
            stack.callback(enclaves[enclave_id].stop, 0)
        for running in enclaves.values():
            assert running.registered.wait(60)

        # 1. An envelope naming both enclaves, sealed for cn-north-1, routed to eu-west-1 first.
        signing_key = ed25519.Ed25519PrivateKey.generate()
        current = {e: enclaves[e].keys.current() for e in ids}
        recipients = [
            (Recipient(e, current[e].epoch), current[e].public_bytes)
            for e in ("enclave-eu", "enclave-cn")
        ]
        now = int(time.time() * 1000)
        header = Header(
            suite=suites.DEFAULT_SUITE, request_id=new_request_id(),
            tenant="demo", app=CLINICAL, model="stub-model", operation="chat", stream=False,
            labels=("confidential",),
            constraints=Constraints(regions=(CN,), allow_simulated=True), policy_id="p",
            issued_at_ms=now, expires_at_ms=now + 60_000,
            recipients=tuple(r for r, _ in recipients),
            edge_key=signing_key.public_key().public_bytes_raw(),
        )  # fmt: skip
        envelope, _ = seal_request(header, b'{"op":"chat","body":{}}', recipients, signing_key)
        with secure_channel(
            broker.address,
            TLSFiles.from_issued(pki[Identity.edge("demo").file_stem]),
            server_identity=Identity.broker(),
        ) as channel:
            stub = broker_pb2_grpc.EdgeGatewayStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Dispatch(enclave_pb2.SealedRequest(envelope=envelope), timeout=20)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "enclave enclave-eu" in info.value.details()
        assert "sealed constraint 'regions' excludes this enclave's region 'eu-west-1'" in (
            info.value.details()
        )
        assert broker.dispatcher.flush_records(timeout=10)  # rows are written behind replies
        with contextlib.closing(sqlite3.connect(tmp_path / "broker" / "broker.db")) as conn:
            (status,) = conn.execute(
                "SELECT status FROM requests WHERE request_id = ?", (header.request_id_hex,)
            ).fetchone()
        assert status == "PERMISSION_DENIED"  # no failover: it is the enclave's verdict

        # 2. A real edge (cn-north-1 only) seals to enclave-cn; a misrouting broker sends it to
        # enclave-eu, which refuses; the edge answers 403 and audits the refusal it received.
        api_key, digest = generate_api_key()
        files = TLSFiles.from_issued(pki[Identity.edge("demo").file_stem])
        edge_config = EdgeConfig.from_dict(
            {
                "tenant": "demo", "listen": "127.0.0.1:0", "state_dir": str(tmp_path / "edge"),
                "broker": broker.address, "reference_values": str(rv),
                "tls": {"cert": str(files.cert), "key": str(files.key), "ca": str(files.ca)},
                "constraints": {"regions": [CN], "allow_simulated": True},
                "apps": [{"name": "e2e", "key_sha256": digest, "models": ["stub-model"]}],
            },
            base=tmp_path, source="mem",
        )  # fmt: skip
        edge = serve(edge_config)
        stack.callback(edge.stop)
        body = {"model": "stub-model", "messages": [{"role": "user", "content": "hello"}]}
        auth = {"Authorization": f"Bearer {api_key}"}
        resp = httpx.post(edge.url + "/v1/chat/completions", json=body, headers=auth, timeout=30)
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
        ok = [e.record for e in edge.runtime.audit.tail(50) if e.kind == "request"][-1]
        assert ok["served_by"] == "enclave-cn"
        misroute.target = enclave_pb2_grpc.EnclaveServiceStub(
            stack.enter_context(
                secure_channel(
                    enclaves["enclave-eu"].address,
                    TLSFiles.from_issued(pki[Identity.broker().file_stem]),
                    server_identity=Identity.enclave("enclave-eu"),
                )
            )
        )
        resp = httpx.post(edge.url + "/v1/chat/completions", json=body, headers=auth, timeout=30)
        assert misroute.calls == 1
        assert resp.status_code == 403
        assert resp.json()["error"]["code"] == "broker_permission_denied"
        record = [e.record for e in edge.runtime.audit.tail(50) if e.kind == "request"][-1]
        assert record["outcome"] == "broker_permission_denied"
        assert record["reason"].startswith("PERMISSION_DENIED: enclave enclave-eu:")
        assert "names no key of enclave 'enclave-eu'" in record["reason"]
        assert edge.runtime.audit.verify().ok


# -- CLI ----------------------------------------------------------------------------------------


def test_policy_status_cli_without_a_status_file(
    tmp_path: Path, pki: Path, vendor: Vendor, policy_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rv = write_reference_values(tmp_path, vendor)
    path = write_edge_config(tmp_path, pki, rv, 7443, {}, dir_policy(policy_dir))
    assert sovra_cli.main(["policy", "status", "--config", str(path)]) == 1
    assert "active:       NONE" in capsys.readouterr().out
    assert sovra_cli.main(["policy", "status", "--config", str(tmp_path / "nope.toml")]) == 2
    # Without [policy] the config allow-list is the active policy.
    plain = tmp_path / "plain.toml"
    plain.write_text(path.read_text().split("[policy]")[0])
    assert sovra_cli.main(["policy", "status", "--config", str(plain), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active"]["policy_id"].startswith("config:")


# -- the local stack's policy -------------------------------------------------------------------


@needs_git
def test_stack_policy_is_a_signed_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud_broker.policy import BrokerPolicy
    from sovra import stack_policy
    from sovra.policy import Policy, load_from_git, run_tests

    made = stack_policy.prepare(tmp_path / "a", "smollm2-135m")
    assert made.source == "git" and made.allowed_signers is not None and not made.warning
    policy, info = load_from_git(made.path, "HEAD", made.allowed_signers)
    assert info.commit == made.commit and info.signer == stack_policy.SIGNER
    assert "clinical-assistant" in policy.spec.applications
    assert stack_policy.prepare(tmp_path / "a", "smollm2-135m").commit == made.commit  # reused
    table = made.edge_table()
    assert table is not None and table["source"] == "git" and table["rev"] == "HEAD"

    other = stack_policy.prepare(tmp_path / "b", "stub-model")  # an upstream model: renamed
    renamed = Policy.load(other.path)
    assert renamed.spec.destinations["cn-sovereign"].models == ("stub-model",)
    assert run_tests(renamed).ok

    monkeypatch.setattr(stack_policy.shutil, "which", lambda _name: None)
    fallback = stack_policy.prepare(tmp_path / "c", "smollm2-135m")
    assert fallback.source == "dir" and "git is not installed" in fallback.warning
    assert fallback.edge_table() == {"source": "dir", "path": str(fallback.path), "poll_s": 60}

    stack_policy.write_broker_policy(tmp_path / "broker-policy.yaml", "demo", CN)
    rules = BrokerPolicy.load(tmp_path / "broker-policy.yaml").rules_for("demo")
    assert rules is not None and rules.regions == (CN,) and rules.jurisdictions == ("CN",)
