"""Sealing requests to verified enclave keys and opening their sealed replies (envelope v1).

Payload contract (the enclave opens it): canonical JSON ``{"op": "chat"|"embeddings", "body":
<the OpenAI request body, with "model">}``. Reply contract: every frame is a JSON object.
Unary: exactly one frame, carrying the end marker, holding the OpenAI response or
``{"error": {...}}``. Stream: each frame holds one OpenAI chunk, ``{"done": true, ...}`` (not
forwarded) or ``{"error": {...}}``; the frame with the end marker ends the stream.

Only plaintext that opened under this request's reply keys, in order, leaves this module: any
envelope error becomes :class:`ReplyIntegrityError` and the bytes are discarded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.config import ConstraintsConfig
from edge_agent.errors import INVALID_REQUEST, ApiError, ReplyIntegrityError
from edge_agent.trusted_set import TrustedKey
from sovra.envelope import (
    Constraints,
    EnvelopeError,
    Header,
    ReplyReader,
    RequestSecrets,
    seal_request,
)

_MAX_ERROR_TEXT: Final = 1000


@dataclass(frozen=True, eq=False)
class SealedRequest:
    header: Header
    envelope: bytes = field(repr=False)
    secrets: RequestSecrets = field(repr=False)


@dataclass(frozen=True)
class RequestMeta:
    """Everything the header needs besides recipients and the edge key."""

    suite: str
    request_id: bytes
    tenant: str
    app: str
    model: str
    operation: str
    stream: bool
    policy_id: str
    constraints: Constraints
    issued_at_ms: int
    ttl_s: int
    labels: tuple[str, ...] = ()  # data classes the policy found (sealed into the header)


def header_constraints(cfg: ConstraintsConfig) -> Constraints:
    # measurements stay empty: the enclave accepts any measurement the edge verified.
    return Constraints(
        regions=cfg.regions,
        tee_types=cfg.tee_types,
        measurements=(),
        allow_simulated=cfg.allow_simulated,
    )


def build_header(meta: RequestMeta, candidates: Sequence[TrustedKey], edge_key: bytes) -> Header:
    return Header(
        suite=meta.suite,
        request_id=meta.request_id,
        tenant=meta.tenant,
        app=meta.app,
        model=meta.model,
        operation=meta.operation,
        stream=meta.stream,
        labels=meta.labels,
        constraints=meta.constraints,
        policy_id=meta.policy_id,
        issued_at_ms=meta.issued_at_ms,
        expires_at_ms=meta.issued_at_ms + meta.ttl_s * 1000,
        recipients=tuple(c.recipient for c in candidates),
        edge_key=edge_key,
    )


def seal(
    meta: RequestMeta,
    body: dict[str, Any],
    candidates: Sequence[TrustedKey],
    signing_key: ed25519.Ed25519PrivateKey,
) -> SealedRequest:
    """Seal ``body`` to the verified ``candidates`` (from the trusted set, never elsewhere)."""
    header = build_header(meta, candidates, signing_key.public_key().public_bytes_raw())
    try:
        payload = json.dumps(
            {"op": meta.operation, "body": body}, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: not text
        raise ApiError(
            400,
            "invalid_request",
            "request body holds a string that is not valid Unicode (unpaired surrogate)",
        ) from None
    envelope, secrets = seal_request(
        header, payload, [(c.recipient, c.sealing_key) for c in candidates], signing_key
    )
    return SealedRequest(header, envelope, secrets)


class ReplyOpener:
    """Opens the reply frames of one request, in order; yields only verified JSON objects."""

    def __init__(self, secrets: RequestSecrets) -> None:
        self._reader = ReplyReader(secrets.reply_keys)

    @property
    def done(self) -> bool:
        return self._reader.done

    def open(self, frame: bytes) -> dict[str, Any]:
        """The frame's JSON object; ApiError for an ``error`` frame, integrity error otherwise."""
        try:
            plaintext = self._reader.open(frame)
        except EnvelopeError as exc:
            raise ReplyIntegrityError(str(exc)) from None
        obj = _json_object(plaintext)
        if "error" in obj:
            raise enclave_error(obj["error"])
        return obj

    def finish(self) -> None:
        try:
            self._reader.finish()
        except EnvelopeError as exc:
            raise ReplyIntegrityError(str(exc)) from None


def open_unary(secrets: RequestSecrets, frame: bytes) -> dict[str, Any]:
    opener = ReplyOpener(secrets)
    obj = opener.open(frame)
    if not opener.done:
        raise ReplyIntegrityError("a unary reply must be a single frame with the end marker")
    return obj


def is_done_marker(obj: dict[str, Any]) -> bool:
    return obj.get("done") is True


def enclave_error(error: Any) -> ApiError:
    """Map an enclave ``error`` object to an API error: 400 for bad requests, else 502."""
    if not isinstance(error, dict):
        return ApiError(502, "upstream_error", "the enclave reported an error")
    kind = error.get("type")
    code = error.get("code")
    message = error.get("message")
    status = 400 if kind == INVALID_REQUEST else 502
    return ApiError(
        status,
        code if isinstance(code, str) and code else "upstream_error",
        message[:_MAX_ERROR_TEXT] if isinstance(message, str) else "the enclave reported an error",
        type_=INVALID_REQUEST if status == 400 else "upstream_error",
    )


def _json_object(plaintext: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(plaintext)
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        raise ApiError(502, "bad_enclave_reply", "the enclave reply is not a JSON object")
    return obj
