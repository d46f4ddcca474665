"""The one exception the broker's core raises for a refusal: a gRPC status code and a message.

Registry and dispatch code raise it; the servicers turn it into the gRPC status the caller sees.
Messages hold metadata only (ids, counts, codes), never envelope or payload bytes.
"""

from __future__ import annotations

import grpc


class BrokerError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"
