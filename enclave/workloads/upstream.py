"""Forward opened requests to an OpenAI-compatible server on loopback inside the same TEE.

Only loopback URLs are accepted (enforced by the config): plaintext must not leave the TEE. The
upstream's own error text is never relayed, since servers often quote the offending input;
the edge gets the HTTP status and, if it is a plain identifier, the upstream's error code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Final

import httpx

from enclave.config import WorkloadSection, check_loopback_url
from enclave.workloads import (
    INVALID_REQUEST,
    UPSTREAM_ERROR,
    ChatParams,
    WorkloadError,
    embedding_inputs,
)

_SAFE_CODE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CONNECT_TIMEOUT_S: Final = 5.0


class UpstreamWorkload:
    def __init__(
        self, models: tuple[str, ...], url: str, upstream_model: str, timeout_s: float
    ) -> None:
        check_loopback_url(url)
        self._models = models
        self._upstream_model = upstream_model
        self._client = httpx.Client(
            base_url=url.rstrip("/") + "/",
            timeout=httpx.Timeout(timeout_s, connect=_CONNECT_TIMEOUT_S),
            trust_env=False,  # never route through a proxy from the environment
        )

    @classmethod
    def from_section(cls, section: WorkloadSection) -> UpstreamWorkload:
        return cls(
            section.models,
            section.upstream_url,
            section.upstream_model,
            float(section.upstream_timeout_s),
        )

    @property
    def models(self) -> tuple[str, ...]:
        return self._models

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        request = self._chat_request(body, stream=False)
        return self._post_json("chat/completions", request)

    def chat_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        request = self._chat_request(body, stream=True)
        try:
            with self._client.stream("POST", "chat/completions", json=request) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _status_error(response)
                yield from _sse_events(response.iter_lines())
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from None

    def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        request = {"model": self._model_for(body), "input": embedding_inputs(body)}
        return self._post_json("embeddings", request)

    def close(self) -> None:
        self._client.close()

    def _model_for(self, body: dict[str, Any]) -> str:
        return self._upstream_model or str(body.get("model") or self._models[0])

    def _chat_request(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        request = ChatParams.from_body(body).to_body()
        request["model"] = self._model_for(body)
        request["stream"] = stream
        return request

    def _post_json(self, path: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._client.post(path, json=request)
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from None
        if response.status_code >= 400:
            raise _status_error(response)
        try:
            result = response.json()
        except ValueError:
            raise WorkloadError(
                "upstream answered with invalid JSON",
                type=UPSTREAM_ERROR,
                code="upstream_bad_reply",
            ) from None
        if not isinstance(result, dict):
            raise WorkloadError(
                "upstream answer is not a JSON object",
                type=UPSTREAM_ERROR,
                code="upstream_bad_reply",
            )
        return result


def _sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """JSON objects from ``data:`` events until ``[DONE]`` (multi-line data joined with \\n)."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
            continue
        if line or not data:
            continue  # comments, event/id fields, or blank keep-alives
        payload, data = "\n".join(data), []
        if payload.strip() == "[DONE]":
            return
        yield _event_json(payload)
    if data and "\n".join(data).strip() != "[DONE]":
        yield _event_json("\n".join(data))


def _event_json(payload: str) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise WorkloadError(
            "upstream stream carried an invalid event",
            type=UPSTREAM_ERROR,
            code="upstream_bad_reply",
        )
    if "error" in event:
        raise WorkloadError(
            "upstream failed during the stream", type=UPSTREAM_ERROR, code=_upstream_code(event)
        )
    return event


def _transport_error(exc: httpx.HTTPError) -> WorkloadError:
    if isinstance(exc, httpx.TimeoutException):
        return WorkloadError("upstream timed out", type=UPSTREAM_ERROR, code="upstream_timeout")
    return WorkloadError(
        "upstream is unreachable", type=UPSTREAM_ERROR, code="upstream_unreachable"
    )


def _status_error(response: httpx.Response) -> WorkloadError:
    try:
        code = _upstream_code(response.json())
    except ValueError:
        code = None
    status = response.status_code
    if 400 <= status < 500:
        return WorkloadError(
            f"upstream refused the request (HTTP {status})", type=INVALID_REQUEST, code=code
        )
    return WorkloadError(
        f"upstream failed (HTTP {status})", type=UPSTREAM_ERROR, code=code or f"upstream_{status}"
    )


def _upstream_code(doc: Any) -> str | None:
    """The upstream's error code or type, only if it is a plain identifier (no free text)."""
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return None
    for key in ("code", "type"):
        value = error.get(key)
        if isinstance(value, str) and _SAFE_CODE.fullmatch(value):
            return value
    return None
