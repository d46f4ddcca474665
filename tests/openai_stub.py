"""A small, real OpenAI-compatible HTTP server for tests and benchmarks (FastAPI + uvicorn).

Answers are deterministic: a chat answer is the last user message reversed plus " [stub]";
an embedding is 8 floats derived from SHA-256 of the input. Model ``stub-error`` makes every
endpoint answer HTTP 500, to exercise error paths. ``running_stub()`` serves on 127.0.0.1 with
an ephemeral port in a background thread and yields the base URL (ending in ``/v1``).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODELS = ("stub-model", "smollm2-135m")
ERROR_MODEL = "stub-error"
SUFFIX = " [stub]"


def answer_for(messages: list[dict[str, Any]]) -> str:
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return (str(users[-1]) if users else "")[::-1] + SUFFIX


def embedding_for(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255, 6) for b in digest[:8]]


def _error(status: int, message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return JSONResponse(body, status_code=status)


def _usage(prompt: str, completion: str) -> dict[str, int]:
    p, c = len(prompt.split()), len(completion.split())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None) -> str:
    doc = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(doc)}\n\n"


def _stream(cid: str, model: str, text: str) -> Iterator[str]:
    yield _chunk(cid, model, {"role": "assistant"}, None)
    words = text.split(" ")
    for i, word in enumerate(words):
        yield _chunk(cid, model, {"content": word if i == 0 else " " + word}, None)
    yield _chunk(cid, model, {}, "stop")
    yield "data: [DONE]\n\n"


def create_app() -> FastAPI:
    app = FastAPI(title="openai-stub")
    app.state.requests = []  # bodies received, for tests that check what was forwarded

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        data = [{"id": m, "object": "model", "owned_by": "stub"} for m in MODELS]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        app.state.requests.append(body)
        model = str(body.get("model", ""))
        if model == ERROR_MODEL:
            return _error(500, "stub failure", "stub_failure")
        messages = body.get("messages")
        if not isinstance(messages, list):
            return _error(400, "messages is required", "missing_messages")
        text = answer_for(messages)
        cid = "chatcmpl-stub-" + hashlib.sha256(text.encode()).hexdigest()[:12]
        if body.get("stream"):
            return StreamingResponse(_stream(cid, model, text), media_type="text/event-stream")
        prompt = " ".join(str(m.get("content", "")) for m in messages)
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": _usage(prompt, text),
            }
        )

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(request: Request) -> JSONResponse:
        body = await request.json()
        app.state.requests.append(body)
        model = str(body.get("model", ""))
        if model == ERROR_MODEL:
            return _error(500, "stub failure", "stub_failure")
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list):
            return _error(400, "input is required", "missing_input")
        data = [
            {"object": "embedding", "index": i, "embedding": embedding_for(str(text))}
            for i, text in enumerate(inputs)
        ]
        tokens = sum(len(str(t).split()) for t in inputs)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    return app


class StubServer:
    """The stub running in a thread; ``base_url`` ends in ``/v1``."""

    def __init__(self) -> None:
        self.app = create_app()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="openai-stub", daemon=True)
        self.base_url = ""

    @property
    def requests(self) -> list[dict[str, Any]]:
        return list(self.app.state.requests)

    def start(self, timeout: float = 10.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("openai stub did not start")
            time.sleep(0.01)  # polling for readiness, not timing anything
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self.base_url

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@contextmanager
def running_stub() -> Iterator[str]:
    """Serve the stub for the duration of the block; yields its base URL."""
    with running_stub_server() as stub:
        yield stub.base_url


@contextmanager
def running_stub_server() -> Iterator[StubServer]:
    """Like :func:`running_stub` but yields the :class:`StubServer` (to read ``requests``)."""
    stub = StubServer()
    stub.start()
    try:
        yield stub
    finally:
        stub.stop()


if __name__ == "__main__":
    with running_stub() as url:
        print(url, flush=True)
        threading.Event().wait()
