"""The text in an OpenAI request body, for classification and pseudonymisation, and restoring
placeholders in replies (unary and streamed).

Every string the app sends (object keys included) is classified, not only the message
contents: a phone number in an earlier assistant turn (which the app sends back with the real
values restored), in ``user`` or in a tool description leaves the premises just the same.
Protocol fields (``model``, ``role``, ``type``, ...) are left alone. Content parts other than
text (images, audio) cannot be classified, so the policy path refuses them. Nothing here logs
the texts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any, Final

from edge_agent.errors import ApiError
from sovra.policy import Pseudonymiser, StreamRestorer

#: Protocol fields whose string values are not content: never classified or rewritten. Only at
#: their place in the OpenAI request (a ``type`` inside ``metadata`` is content like any other).
_TOP_LEVEL: Final = frozenset({"model", "encoding_format"})
_BELOW: Final = {
    "messages": frozenset({"role"}),
    "content": frozenset({"type"}),
    "tools": frozenset({"type"}),
    "tool_calls": frozenset({"type", "id"}),
    "response_format": frozenset({"type"}),
}
_NOTHING: Final = frozenset[str]()
MAX_CONVERSATION_HEADER: Final = 256


def _walk(obj: Any, visit: Callable[[str], str], skip: frozenset[str] = _TOP_LEVEL) -> Any:
    """``obj`` with ``visit`` applied to every string, object keys included (``metadata`` keys
    are the app's own strings), except the values of the protocol fields in ``skip``."""
    if isinstance(obj, str):
        return visit(obj)
    if isinstance(obj, list):
        return [_walk(v, visit, skip) for v in obj]
    if isinstance(obj, dict):
        return {
            visit(k): (v if k in skip else _walk(v, visit, _BELOW.get(k, _NOTHING)))
            for k, v in obj.items()
        }
    return obj


def texts_of(body: dict[str, Any]) -> list[str]:
    """Every content string in ``body``, in a fixed order (the order :func:`replace_texts`
    uses). Raises 400 for content parts that are not text."""
    _check_parts(body)
    found: list[str] = []

    def collect(text: str) -> str:
        found.append(text)
        return text

    _walk(body, collect)
    try:
        "".join(found).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a \ud800 escape in the JSON): not text
        raise ApiError(
            400,
            "invalid_request",
            "request body holds a string that is not valid Unicode (unpaired surrogate)",
        ) from None
    return found


def replace_texts(body: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """``body`` with its content strings replaced, in :func:`texts_of` order."""
    replacements: Iterator[str] = iter(texts)
    out = _walk(body, lambda _old: next(replacements))
    assert isinstance(out, dict)
    return out


def _check_parts(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ApiError(
                    400,
                    "unsupported_content",
                    f"messages[{i}].content[{j}]: content parts of type {_shown(kind)} cannot "
                    "be classified by the edge's policy; send text parts only",
                    param="messages",
                )


def _shown(kind: Any) -> str:
    if isinstance(kind, str) and kind.isascii() and len(kind) <= 32:
        return repr(kind)
    return "(missing or unknown)"


def first_user_text(body: dict[str, Any]) -> str | None:
    """The text of the first user message (a conversation's stable start), if any."""
    for message in body.get("messages") or ():
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "\n".join(
                    p["text"]
                    for p in content
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
    return None


def check_conversation_header(header: str) -> None:
    if not header or len(header) > MAX_CONVERSATION_HEADER or not header.isprintable():
        raise ApiError(
            400,
            "invalid_request",
            f"X-Sovra-Conversation must be 1-{MAX_CONVERSATION_HEADER} printable characters",
        )


def conversation_id(app: str, header: str | None, body: dict[str, Any]) -> str | None:
    """The id pseudonym mappings are kept under: the app's ``X-Sovra-Conversation`` header, or
    a hash of the app and its first user message. Always namespaced by app."""
    if header is not None:
        check_conversation_header(header)
        basis = f"header\0{app}\0{header}"
    else:
        first = first_user_text(body)
        if first is None:
            return None
        basis = f"first-user-message\0{app}\0{first}"
    return hashlib.sha256(basis.encode("utf-8", "surrogatepass")).hexdigest()


# --- replies ----------------------------------------------------------------------------------


def restore_reply(obj: dict[str, Any], pseudonymiser: Pseudonymiser) -> dict[str, Any]:
    """A unary reply with every known placeholder replaced by its value (in every string:
    only placeholders this conversation handed out are touched)."""
    out = _walk(obj, pseudonymiser.restore, _NOTHING)
    assert isinstance(out, dict)
    return out


class ChunkRestorer:
    """Restores placeholders in streamed ``chat.completion.chunk`` objects.

    ``delta.content`` goes through a :class:`StreamRestorer` per choice, so a placeholder split
    across chunks is restored; text that may still be part of one is held back and sent with a
    later chunk (at the latest with the choice's ``finish_reason`` or from :meth:`flush`).
    Other strings are restored chunk by chunk.
    """

    def __init__(self, pseudonymiser: Pseudonymiser) -> None:
        self._p = pseudonymiser
        self._streams: dict[Any, StreamRestorer] = {}
        self._last: dict[str, Any] | None = None

    def chunk(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._last = obj
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return restore_reply(obj, self._p)
        out = {k: v for k, v in obj.items() if k != "choices"}
        out = restore_reply(out, self._p)
        out["choices"] = [self._choice(c) for c in choices]
        return out

    def _choice(self, choice: Any) -> Any:
        if not isinstance(choice, dict):
            return choice
        index = choice.get("index", 0)
        delta = choice.get("delta")
        rest = restore_reply({k: v for k, v in choice.items() if k != "delta"}, self._p)
        if not isinstance(delta, dict):
            return {**rest, "delta": delta} if "delta" in choice else rest
        restorer = self._streams.setdefault(_key(index), self._p.stream())
        new_delta = restore_reply({k: v for k, v in delta.items() if k != "content"}, self._p)
        content = delta.get("content")
        if isinstance(content, str):
            text = restorer.feed(content)
            if choice.get("finish_reason") is not None:
                text += restorer.close()
                self._streams.pop(_key(index), None)
            new_delta["content"] = text
        elif choice.get("finish_reason") is not None:
            tail = restorer.close()
            self._streams.pop(_key(index), None)
            if tail:
                new_delta["content"] = tail
        return {**rest, "delta": new_delta}

    def flush(self) -> dict[str, Any] | None:
        """A last chunk holding text still held back, or None if nothing is."""
        pending = [(k, r.close()) for k, r in self._streams.items()]
        self._streams.clear()
        choices = [
            {"index": k, "delta": {"content": text}, "finish_reason": None}
            for k, text in pending
            if text
        ]
        if not choices:
            return None
        last = self._last or {}
        head: dict[str, Any] = {
            k: last[k] for k in ("id", "object", "created", "model") if k in last
        }
        return {**head, "choices": choices}


def _key(index: Any) -> Any:
    return index if isinstance(index, int | str) else 0
