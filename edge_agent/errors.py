"""OpenAI-style API errors: the only shape in which the edge reports a failure to an app.

Messages say what is wrong and what to do; they never hold prompts, replies, API keys or keys.
"""

from __future__ import annotations

from typing import Any, Final

INVALID_REQUEST: Final = "invalid_request_error"
PERMISSION: Final = "permission_error"
UPSTREAM: Final = "upstream_error"
SERVER: Final = "server_error"


class ApiError(Exception):
    """An error reply: HTTP status plus the OpenAI error object."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type_ or _default_type(status)
        self.param = param

    def error_object(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def body(self) -> dict[str, Any]:
        return {"error": self.error_object()}


def _default_type(status: int) -> str:
    if status == 403:
        return PERMISSION
    if status == 500:
        return SERVER
    if status >= 500:
        return UPSTREAM
    return INVALID_REQUEST


def missing_api_key() -> ApiError:
    return ApiError(
        401,
        "missing_api_key",
        "missing API key: send Authorization: Bearer <key>",
        type_=INVALID_REQUEST,
    )


def invalid_api_key() -> ApiError:
    return ApiError(401, "invalid_api_key", "invalid API key", type_=INVALID_REQUEST)


def internal_error() -> ApiError:
    return ApiError(500, "internal_error", "internal error in the edge agent (see its log)")


class ReplyIntegrityError(ApiError):
    """A reply frame failed to open: tampered, reordered, truncated or from another request."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            502,
            "reply_integrity_failure",
            f"the enclave reply failed its integrity check and was discarded: {reason}",
        )
        self.reason = reason
