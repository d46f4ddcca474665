"""The edge's OpenAI-compatible HTTP API (FastAPI).

Order of checks for every model route: API key (401) -> body size (413) -> JSON object (400)
-> field types (400) -> model known (404) -> policy (403) -> verified enclaves (503) -> sealed
dispatch. Every failure is an OpenAI-style error object; no route ever shows a traceback.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_agent.config import AppConfig
from edge_agent.dispatcher import RequestRecord
from edge_agent.errors import ApiError, internal_error
from edge_agent.runtime import EdgeRuntime
from edge_agent.training import routes as training_routes

log = logging.getLogger("sovra.edge")

_RECORD = "sovra_record"
_APP = "sovra_app"
CONVERSATION_HEADER = "x-sovra-conversation"


# -- request bodies ------------------------------------------------------------------------------


class _OpenAIBody(BaseModel):
    # Unknown OpenAI parameters pass through to the enclave; known ones must have their types.
    model_config = ConfigDict(extra="allow", strict=True)


class ChatMessage(_OpenAIBody):
    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_OpenAIBody):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None


class EmbeddingsRequest(_OpenAIBody):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)


def _validation_error(errors: list[Any]) -> ApiError:
    # Name the field and the rule; never echo the offending value (it may be content).
    first = errors[0] if errors else {}
    path = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    loc = ".".join(path)
    message = f"invalid request body: {loc or 'body'}: {first.get('msg', 'invalid value')}"
    return ApiError(400, "invalid_request", message, param=path[0] if path else None)


def _is_type_tag(part: Any) -> bool:
    # pydantic names the union member that failed ("str", "list[str]") inside the location.
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read with a cap (Content-Length may lie or be absent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "invalid_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    if not size:
        raise ApiError(400, "invalid_json", "request body is empty: send a JSON object")
    try:
        obj = json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"request body is larger than {limit} bytes")


_Body = TypeVar("_Body", bound=BaseModel)


def _parse(model: type[_Body], obj: dict[str, Any]) -> _Body:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise _validation_error(exc.errors(include_input=False)) from None


def authenticated(request: Request) -> AppConfig:
    runtime: EdgeRuntime = request.app.state.runtime
    found = runtime.api_keys.authenticate(request.headers.get("authorization"))
    setattr(request.state, _APP, found.name)
    return found


async def _authenticated(request: Request) -> AppConfig:
    # The same check as a coroutine: FastAPI runs sync dependencies in a worker thread, and the
    # hop costs more than the check itself (a few hashes) on every request.
    return authenticated(request)


AuthenticatedApp = Annotated[AppConfig, Depends(_authenticated)]


# -- the app -------------------------------------------------------------------------------------


def create_app(runtime: EdgeRuntime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="Sovra edge agent",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(RequestLogMiddleware)
    _install_error_handlers(app)
    app.state.runtime = runtime
    limit = runtime.config.max_body_bytes
    dispatcher = runtime.dispatcher

    def record(request: Request, app_cfg: AppConfig, model: str, op: str, stream: bool) -> Any:
        rec = dispatcher.new_record(app_cfg.name, model, op, stream)
        setattr(request.state, _RECORD, rec)
        return rec

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(app_cfg: AuthenticatedApp) -> dict[str, Any]:
        models = await dispatcher.models_for(app_cfg)
        trained = training_routes.model_objects(runtime.training, app_cfg.name)
        return {"object": "list", "data": [_model_object(m) for m in models] + trained}

    @app.get("/v1/models/{model}")
    async def get_model(model: str, app_cfg: AuthenticatedApp) -> Any:
        for trained in training_routes.model_objects(runtime.training, app_cfg.name):
            if trained["id"] == model:
                return trained
        if model not in await dispatcher.models_for(app_cfg):
            raise ApiError(404, "model_not_found", f"the model {model!r} is not available")
        return _model_object(model)

    @app.get("/v1/sovra/enclaves")
    async def enclaves(app_cfg: AuthenticatedApp) -> dict[str, Any]:
        await dispatcher.refresh_tolerant()
        return {"object": "list", "data": runtime.trusted.snapshot()}

    @app.get("/v1/sovra/policy")
    async def policy_status(app_cfg: AuthenticatedApp) -> dict[str, Any]:
        status = runtime.policy.status()
        status.pop("location", None)  # a path on this server: not the app's business
        return {"object": "sovra.policy_status", "policy_id": runtime.policy.policy_id, **status}

    @app.post("/v1/chat/completions")
    async def chat(request: Request, app_cfg: AuthenticatedApp) -> Any:
        body = await read_json_object(request, limit)
        parsed = _parse(ChatCompletionRequest, body)
        rec = record(request, app_cfg, parsed.model, "chat", parsed.stream)
        conversation = request.headers.get(CONVERSATION_HEADER)
        if parsed.stream:
            events = await dispatcher.stream(rec, body, conversation=conversation)
            return StreamingResponse(
                events, media_type="text/event-stream", headers=_stream_headers(rec)
            )
        result = await dispatcher.complete(rec, body, conversation=conversation)
        return JSONResponse(result, headers=_headers(rec))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request, app_cfg: AuthenticatedApp) -> Any:
        body = await read_json_object(request, limit)
        parsed = _parse(EmbeddingsRequest, body)
        rec = record(request, app_cfg, parsed.model, "embeddings", False)
        result = await dispatcher.complete(rec, body)
        return JSONResponse(result, headers=_headers(rec))

    training_routes.install(app, runtime.training, authenticated, read_json_object, limit)
    return app


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "sovra"}


def _headers(rec: RequestRecord | None) -> dict[str, str]:
    if rec is None:
        return {}
    headers = {"x-request-id": rec.request_id_hex}
    d = rec.decision
    if d is not None:  # what the policy decided (names only; never values)
        headers["x-sovra-policy"] = _header_value(d.policy_id)
        headers["x-sovra-decision"] = d.effect
        headers["x-sovra-rule"] = _header_value(d.rule_id)
        headers["x-sovra-labels"] = ",".join(_header_value(c) for c in d.classes)
    return headers


def _header_value(text: str) -> str:
    # Policy names are the customer's; percent-encode anything that is not plain ASCII.
    return quote(text, safe="-_.:@/+ ")[:256]


def _stream_headers(rec: RequestRecord) -> dict[str, str]:
    return {**_headers(rec), "cache-control": "no-cache", "x-accel-buffering": "no"}


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        headers = _headers(getattr(request.state, _RECORD, None))
        if exc.status == 401:
            headers["www-authenticate"] = "Bearer"
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return await api_error(request, _validation_error(list(exc.errors())))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        err = ApiError(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))
        return await api_error(request, err)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


class RequestLogMiddleware:
    """One INFO line per request (id, app, model, op, status, latency; never content), and a
    last line of defence: an unexpected exception becomes a 500 error object, not a trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = {"code": 0}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            log.error("unhandled error in %s: %s", scope.get("path"), type(exc).__name__)
            if not status["code"]:
                await _send_json(send_wrapper, internal_error())
        finally:
            _log_request(scope, status["code"], started)


async def _send_json(send: Callable[[Message], Awaitable[None]], err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _log_request(scope: Scope, http_status: int, started: float) -> None:
    state = scope.get("state") or {}
    rec: RequestRecord | None = state.get(_RECORD)
    latency = int((time.monotonic() - started) * 1000)
    if rec is None:
        log.info(
            "request rid=- app=%s model=- op=%s %s status=%d latency_ms=%d",
            state.get(_APP, "-"),
            scope.get("method", "-"),
            scope.get("path", "-"),
            http_status,
            latency,
        )
        return
    # For streams the HTTP status is 200 even when an error event ended them.
    status = rec.status or http_status
    log.info(
        "request rid=%s app=%s model=%s op=%s status=%d latency_ms=%d",
        rec.request_id_hex,
        rec.app,
        rec.model,
        rec.op,
        status,
        latency,
    )
