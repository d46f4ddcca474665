"""The one exception the broker's core raises for a refusal: a gRPC status code and a message,
and the servicer wrappers that turn it into the gRPC status the caller sees.

Registry and dispatch code raise it. Messages hold metadata only (ids, counts, codes), never
envelope or payload bytes. An unexpected error leaves as INTERNAL and is logged by type and stack
only, because exception messages may quote values the broker must not log.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Servicer = TypeVar("Servicer")


class BrokerError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def unary_handler(
    method: Callable[[Servicer, Req, grpc.ServicerContext], Resp],
) -> Callable[[Servicer, Req, grpc.ServicerContext], Resp]:
    """Turn refusals into gRPC statuses for a unary handler."""

    @functools.wraps(method)
    def handler(self: Servicer, request: Req, context: grpc.ServicerContext) -> Resp:
        try:
            return method(self, request, context)
        except BrokerError as exc:
            failure = exc
        except Exception as exc:
            failure = _internal(method.__qualname__, exc)
        context.abort(failure.code, failure.message)
        raise AssertionError("context.abort returned")  # abort always raises

    return handler


def streaming_handler(
    method: Callable[[Servicer, Req, grpc.ServicerContext], Iterator[Resp]],
) -> Callable[[Servicer, Req, grpc.ServicerContext], Iterator[Resp]]:
    """Turn refusals into gRPC statuses for a server-streaming handler."""

    @functools.wraps(method)
    def handler(self: Servicer, request: Req, context: grpc.ServicerContext) -> Iterator[Resp]:
        try:
            yield from method(self, request, context)
            return
        except BrokerError as exc:
            failure = exc
        except Exception as exc:
            failure = _internal(method.__qualname__, exc)
        context.abort(failure.code, failure.message)

    return handler


def _internal(method: str, exc: Exception) -> BrokerError:
    stack = "".join(traceback.format_tb(exc.__traceback__))
    log.error("internal error in %s: %s\n%s", method, type(exc).__name__, stack)
    return BrokerError(grpc.StatusCode.INTERNAL, f"internal broker error ({type(exc).__name__})")
