"""Serving ``keep-local`` requests on the premises: an OpenAI-compatible server on loopback.

The request body goes to ``[policy] local_upstream`` unchanged (nothing is sealed, nothing
leaves the machine); only the model name may be replaced by ``local_model``. Failures become
API errors that never quote the request or the upstream's reply.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Final

import httpx

from edge_agent.errors import ApiError

_ERROR_TEXT: Final = 300


class LocalModel:
    def __init__(self, base_url: str, model: str = "", timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._model = model
        self._client = httpx.AsyncClient(timeout=timeout_s)

    async def close(self) -> None:
        await self._client.aclose()

    def _body(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "model": self._model} if self._model else body

    def _url(self, op: str) -> str:
        return f"{self.base_url}/{'embeddings' if op == 'embeddings' else 'chat/completions'}"

    async def complete(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self._client.post(self._url(op), json=self._body(body))
        except httpx.HTTPError as exc:
            raise _unavailable(exc) from None
        if resp.status_code != 200:
            raise _upstream_status(resp.status_code, resp.content)
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise ApiError(502, "bad_local_reply", "the local model's reply is not a JSON object")
        return doc

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The chunks of a streamed chat reply (``data: [DONE]`` ends it)."""
        request = self._client.build_request(
            "POST", self._url("chat"), json={**self._body(body), "stream": True}
        )
        try:
            resp = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _unavailable(exc) from None
        try:
            if resp.status_code != 200:
                raise _upstream_status(resp.status_code, await resp.aread())
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    chunk = None
                if not isinstance(chunk, dict):
                    raise ApiError(
                        502, "bad_local_reply", "the local model sent a chunk that is not JSON"
                    )
                yield chunk
        except httpx.HTTPError as exc:
            raise _unavailable(exc) from None
        finally:
            await resp.aclose()


def _unavailable(exc: httpx.HTTPError) -> ApiError:
    return ApiError(
        503,
        "local_model_unavailable",
        f"the policy keeps this request on the premises, and the local model cannot be reached "
        f"({type(exc).__name__})",
    )


def _upstream_status(status: int, content: bytes) -> ApiError:
    message = "the local model refused the request"
    try:
        error = json.loads(content).get("error", {})
        if isinstance(error.get("code"), str) and error["code"].isascii():
            message += f" ({error['code'][:_ERROR_TEXT]})"
    except (ValueError, AttributeError):
        pass
    return ApiError(502 if status >= 500 else 400, "local_model_error", f"{message}: HTTP {status}")
