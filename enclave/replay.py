"""Replay cache: request ids seen by this enclave, each kept until its request expires.

Freshness checks already refuse expired requests, so an id only needs remembering until its
``exp``. The cache is bounded; when it is full of ids that have not expired yet, new requests are
refused rather than evicting live ids, because evicting one would re-open a replay window.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable


class Replayed(Exception):
    """This request id was already accepted."""


class ReplayCacheFull(Exception):
    """Too many live request ids to remember another one safely."""


class ReplayCache:
    def __init__(self, max_entries: int, clock: Callable[[], float]) -> None:
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []  # (exp_ms, id) to drop the oldest cheaply

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)

    def admit(self, request_id: bytes, expires_at_ms: int) -> None:
        """Remember ``request_id`` until ``expires_at_ms``; raise if seen or if full."""
        with self._lock:
            self._forget_expired(int(self._clock() * 1000))
            if request_id in self._expiry:
                raise Replayed("replayed request id")
            if len(self._expiry) >= self._max:
                raise ReplayCacheFull("replay cache is full of live request ids")
            self._expiry[request_id] = expires_at_ms
            heapq.heappush(self._heap, (expires_at_ms, request_id))

    def _forget_expired(self, now_ms: int) -> None:
        while self._heap and self._heap[0][0] <= now_ms:
            _, request_id = heapq.heappop(self._heap)
            self._expiry.pop(request_id, None)
