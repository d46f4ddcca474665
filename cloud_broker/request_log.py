"""Write-behind of the ``requests`` table: dispatch replies first, one thread writes the rows.

A ``requests`` row is accounting metadata about a request that has already been answered (or
refused); nothing the edge receives depends on it. So dispatch threads hand rows to
:class:`RequestLog` and reply at once, and one background thread commits whatever has queued up
in a single transaction (group commit: under load, one commit carries many rows). The writer
waits ``LINGER_S`` (1 ms) after it wakes, so the reply goes out first and rows of requests that
end together share a commit: a row is normally in the database a few milliseconds after its
reply.

Guarantees:

* Bounded: at most ``max_pending`` rows wait in memory. When the queue is full, dispatch threads
  wait for room (back-pressure); a row is never dropped to make room.
* ``flush(timeout)`` returns once every row submitted before the call is committed (or failed).
* ``close()`` drains the queue and stops the thread. ``RunningBroker.stop`` calls it after the
  gRPC server has stopped, so a clean shutdown loses no row. A row submitted after ``close``
  is written synchronously.
* A crash (SIGKILL, power loss) loses at most the rows still queued: normally the last few
  milliseconds of traffic, never more than ``max_pending`` rows.
* A failed commit is logged (exception type and request ids, never values) like the former
  synchronous write; the rows of that batch are lost, as they were before.

Quota state (``quotas``) is not written here: it decides admissions and stays synchronous.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Final

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from cloud_broker import db

log = logging.getLogger(__name__)

MAX_PENDING: Final = 10_000
MAX_BATCH: Final = 512
LINGER_S: Final = 0.001  # the writer waits this long after waking before it takes a batch
_LOGGED_IDS: Final = 20  # request ids named in an error line at most


class RequestLog:
    def __init__(
        self, engine: Engine, *, max_pending: int = MAX_PENDING, max_batch: int = MAX_BATCH
    ) -> None:
        if max_pending < 1 or max_batch < 1:
            raise ValueError("max_pending and max_batch must be at least 1")
        self._engine = engine
        self._max_pending = max_pending
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: deque[db.RequestRecord] = deque()
        self._submitted = 0  # rows handed over so far
        self._settled = 0  # rows committed (or failed) so far, in submission order
        self._closing = False
        self._thread: threading.Thread | None = None  # started by the first submit

    @property
    def pending(self) -> int:
        """Rows submitted but not yet settled."""
        with self._cond:
            return self._submitted - self._settled

    def submit(self, row: db.RequestRecord) -> None:
        """Queue ``row``; waits while ``max_pending`` rows are queued. After :meth:`close`,
        writes it synchronously instead."""
        with self._cond:
            while not self._closing and len(self._queue) >= self._max_pending:
                self._cond.wait()
            if not self._closing:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="broker-request-log", daemon=True
                    )
                    self._thread.start()
                self._queue.append(row)
                self._submitted += 1
                self._cond.notify_all()
                return
        self._write([row])  # closed: nobody drains the queue any more

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row submitted so far is settled; False if ``timeout`` passed."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._settled >= target, timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Write what is queued and stop the writer; False if it did not finish in time."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing, and everything is written
                linger = not self._closing
            if linger:
                # Let the reply that queued this row leave first (the writer would compete with
                # it for the GIL), and let rows of requests ending together share one commit.
                time.sleep(LINGER_S)
            with self._cond:
                count = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(count)]
                self._cond.notify_all()  # room for submitters waiting on a full queue
            self._write(batch)
            with self._cond:
                self._settled += len(batch)
                self._cond.notify_all()

    def _write(self, rows: list[db.RequestRecord]) -> None:
        try:
            db.record_requests(self._engine, rows)
        except SQLAlchemyError as exc:
            # The replies are long sent; losing metadata rows must not stop the writer.
            ids = " ".join(r.request_id for r in rows[:_LOGGED_IDS])
            more = f" (+{len(rows) - _LOGGED_IDS} more)" if len(rows) > _LOGGED_IDS else ""
            log.error(
                "could not record %d request rows rid=%s%s: %s",
                len(rows), ids, more, type(exc).__name__,
            )  # fmt: skip
        except Exception as exc:  # never let the writer thread die: later rows still count
            log.error("request log writer failed: %s", type(exc).__name__)
