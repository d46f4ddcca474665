"""Workloads run on opened requests: the ``Workload`` protocol, its errors and body checks.

A workload receives OpenAI-shaped request bodies and returns OpenAI-shaped objects. Its errors
(:class:`WorkloadError`) are sealed back to the edge; their messages never repeat the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from enclave.config import WorkloadSection

LLM_EXTRA_HINT: Final = "pip install 'sovra[llm]' (compiles llama.cpp, about 8 minutes on 2 cores)"
MAX_TOKENS_LIMIT: Final = 1024
DEFAULT_MAX_TOKENS: Final = 128
MAX_STOP_SEQUENCES: Final = 4

INVALID_REQUEST: Final = "invalid_request_error"
UPSTREAM_ERROR: Final = "upstream_error"


class WorkloadUnavailable(Exception):
    """The workload cannot start here (missing optional dependency or model file)."""


class WorkloadError(Exception):
    """A request the workload could not serve; sealed to the edge as an OpenAI error object."""

    def __init__(self, message: str, *, type: str = INVALID_REQUEST, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.type = type
        self.code = code

    def to_json_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


class Workload(Protocol):
    @property
    def models(self) -> tuple[str, ...]: ...

    def chat(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def chat_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]: ...

    def embeddings(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ChatParams:
    """The chat body parameters a workload honours; everything else in the body is ignored."""

    messages: list[dict[str, str]]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ChatParams:
        return cls(
            messages=_messages(body.get("messages")),
            max_tokens=_max_tokens(body.get("max_tokens", body.get("max_completion_tokens"))),
            temperature=_number(body.get("temperature"), "temperature", 0.0, 2.0),
            top_p=_number(body.get("top_p"), "top_p", 0.0, 1.0),
            stop=_stop(body.get("stop")),
            seed=_seed(body.get("seed")),
        )

    def to_body(self) -> dict[str, Any]:
        """Only the parameters that were set, in OpenAI request form."""
        body: dict[str, Any] = {"messages": self.messages, "max_tokens": self.max_tokens}
        for name in ("temperature", "top_p", "stop", "seed"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        return body


def embedding_inputs(body: dict[str, Any]) -> list[str]:
    """``input`` as a non-empty list of strings (token arrays are not supported)."""
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise WorkloadError(
        "'input' must be a string or a non-empty array of strings", code="invalid_input"
    )


def build_workload(section: WorkloadSection) -> Workload:
    """The configured workload; WorkloadUnavailable if it cannot run here."""
    if section.kind == "llama":
        from enclave.workloads.llama import LlamaWorkload

        return LlamaWorkload.from_section(section)
    from enclave.workloads.upstream import UpstreamWorkload

    return UpstreamWorkload.from_section(section)


def _messages(value: Any) -> list[dict[str, str]]:
    if value is None:
        raise WorkloadError("'messages' is required", code="missing_messages")
    if not isinstance(value, list) or not value:
        raise WorkloadError("'messages' must be a non-empty array", code="invalid_messages")
    out = []
    for i, msg in enumerate(value):
        role = msg.get("role") if isinstance(msg, dict) else None
        content = msg.get("content") if isinstance(msg, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise WorkloadError(
                f"messages[{i}] must have role system|user|assistant and string content",
                code="invalid_messages",
            )
        out.append({"role": role, "content": content})
    return out


def _max_tokens(value: Any) -> int:
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not _is_int(value) or not 1 <= value <= MAX_TOKENS_LIMIT:
        raise WorkloadError(
            f"'max_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}", code="invalid_value"
        )
    return int(value)


def _number(value: Any, name: str, low: float, high: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise WorkloadError(f"'{name}' must be a number from {low} to {high}", code="invalid_value")
    return float(value)


def _stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise WorkloadError(
            f"'stop' must be a string or up to {MAX_STOP_SEQUENCES} non-empty strings",
            code="invalid_value",
        )
    return list(stops)


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value):
        raise WorkloadError("'seed' must be an integer", code="invalid_value")
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
