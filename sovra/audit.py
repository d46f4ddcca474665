"""Hash-chained audit log in SQLite: every edit, deletion, insertion or reordering is detected.

Rules (read before changing anything here):

1. An entry is ``(seq, ts_ms, kind, record, prev_hash, hash)``. ``seq`` counts from 1 without gaps;
   ``record`` is canonical JSON (sorted keys, no spaces, UTF-8); ``prev_hash`` is the previous
   entry's ``hash`` (64 zero hex digits for the first entry).
2. ``hash = SHA-256(prev_hash || seq || ts_ms || kind || record)`` over a length-prefixed encoding
   (see :func:`entry_hash`), so no two different entries share the bytes that are hashed.
3. The last ``(seq, hash)`` is also kept in a one-row ``audit_head`` table, written in the same
   transaction, so cutting entries off the end is detected too. (Someone who can rewrite the whole
   file can rewrite the whole chain: export the head hash elsewhere to anchor it.)
4. One writer at a time: a process-wide lock plus ``BEGIN IMMEDIATE`` so that two processes
   appending to the same file cannot fork the chain.
5. Records hold metadata only (ids, names, decisions, outcomes, timings). Never prompts, replies,
   API keys or key material: callers build records from fields, never from request bodies.
6. Durable before it counts: ``synchronous=FULL``, so a commit is on disk (WAL fsync) when
   ``append`` returns or the future of ``submit`` resolves. ``submit`` / ``append_async`` hand
   the entry to one writer thread, which commits whatever has queued up in one transaction
   (group commit: one fsync for many concurrent entries); callers that must not act before the
   entry is stored (the edge before it answers) wait for that future.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

GENESIS_HASH: Final = "0" * 64
MAX_BATCH: Final = 256  # entries per group commit at most

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    record TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"""


class AuditError(Exception):
    """The audit log cannot be opened or written."""


def canonical_json(record: dict[str, Any]) -> str:
    """The one text form of a record that is hashed and stored."""
    try:
        return json.dumps(
            record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit record is not plain JSON data: {exc}") from None


def entry_hash(prev_hash: str, seq: int, ts_ms: int, kind: str, record: str) -> str:
    """SHA-256 over length-prefixed fields; ``prev_hash`` as its 32 raw bytes."""
    h = hashlib.sha256()
    h.update(bytes.fromhex(prev_hash))
    h.update(struct.pack(">qq", seq, ts_ms))
    for text in (kind, record):
        data = text.encode("utf-8")
        h.update(struct.pack(">I", len(data)))
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    ts_ms: int
    kind: str
    record: dict[str, Any]
    prev_hash: str
    hash: str

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts_ms": self.ts_ms,
            "kind": self.kind,
            "record": self.record,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    entries: int
    first_bad_seq: int | None = None
    reason: str = ""


class AuditLog:
    """One SQLite file holding one chain. Safe to share between threads and async tasks."""

    def __init__(self, path: Path, *, clock: Callable[[], int] | None = None) -> None:
        self.path = Path(path)
        self._clock = clock or (lambda: int(time.time() * 1000))
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are opened explicitly with BEGIN IMMEDIATE.
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=10
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # rule 6: fsync at every commit
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise AuditError(f"cannot open audit log {self.path}: {exc}") from None
        self._queue: list[tuple[str, str, Future[AuditEntry]]] = []
        self._queue_cond = threading.Condition()
        self._writer: threading.Thread | None = None  # started by the first submit
        self._closing = False

    def close(self) -> None:
        """Commit what was submitted, stop the writer thread and close the file."""
        with self._queue_cond:
            self._closing = True
            self._queue_cond.notify_all()
            writer = self._writer
        if writer is not None:
            writer.join()
        with self._lock:
            self._db.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, kind: str, record: dict[str, Any]) -> AuditEntry:
        text = canonical_json(record)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    entry = self._append_locked(kind, text)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise AuditError(f"cannot append to audit log {self.path}: {exc}") from None
        return entry

    def submit(self, kind: str, record: dict[str, Any]) -> Future[AuditEntry]:
        """Queue an entry for the writer thread; the future resolves once it is committed and
        on disk (rule 6), or fails with :class:`AuditError`. ValueError at once if ``record``
        is not plain JSON data."""
        text = canonical_json(record)
        future: Future[AuditEntry] = Future()
        # Running from the start: a waiter that gives up (a cancelled request) cannot cancel it,
        # so the entry is written whatever happens to the caller.
        future.set_running_or_notify_cancel()
        with self._queue_cond:
            if self._closing:
                raise AuditError(f"audit log {self.path} is closed")
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="sovra-audit-writer", daemon=True
                )
                self._writer.start()
            self._queue.append((kind, text, future))
            self._queue_cond.notify()
        return future

    async def append_async(self, kind: str, record: dict[str, Any]) -> AuditEntry:
        """:meth:`append` without blocking the event loop: returns once the entry is on disk.
        Concurrent callers share commits (group commit)."""
        return await asyncio.wrap_future(self.submit(kind, record))

    def _write_loop(self) -> None:
        while True:
            with self._queue_cond:
                while not self._queue and not self._closing:
                    self._queue_cond.wait()
                if not self._queue:
                    return  # closing, and everything submitted is written
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            self._write_batch(batch)

    def _write_batch(self, batch: list[tuple[str, str, Future[AuditEntry]]]) -> None:
        """Append ``batch`` in order in ONE transaction; every future gets the outcome."""
        entries: list[AuditEntry] = []
        error: BaseException | None = None
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    entries = [self._append_locked(kind, text) for kind, text, _ in batch]
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                error = AuditError(f"cannot append to audit log {self.path}: {exc}")
            except Exception as exc:  # the writer thread must survive; callers see the failure
                error = AuditError(f"cannot append to audit log {self.path}: {type(exc).__name__}")
        for index, (_, _, future) in enumerate(batch):
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(entries[index])

    def _append_locked(self, kind: str, text: str) -> AuditEntry:
        row = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS_HASH)
        ts = self._clock()
        digest = entry_hash(prev, seq, ts, kind, text)
        self._db.execute(
            "INSERT INTO audit (seq, ts_ms, kind, record, prev_hash, hash) VALUES (?,?,?,?,?,?)",
            (seq, ts, kind, text, prev, digest),
        )
        self._db.execute(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            (seq, digest),
        )
        return AuditEntry(seq, ts, kind, json.loads(text), prev, digest)

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise AuditError(f"cannot read audit log {self.path}: {exc}") from None

    def tail(self, n: int = 20) -> list[AuditEntry]:
        """The last ``n`` entries, oldest first."""
        rows = self._rows(
            "SELECT seq, ts_ms, kind, record, prev_hash, hash FROM audit ORDER BY seq DESC LIMIT ?",
            (max(n, 0),),
        )
        return [_entry(r) for r in reversed(rows)]

    def entries(self) -> Iterator[AuditEntry]:
        rows = self._rows(
            "SELECT seq, ts_ms, kind, record, prev_hash, hash FROM audit ORDER BY seq"
        )
        return (_entry(r) for r in rows)

    def export_jsonl(self, fp: IO[str]) -> int:
        """Write every entry as one JSON line (stored fields, verbatim); return the count."""
        count = 0
        for seq, ts, kind, record, prev, digest in self._raw_rows():
            line = f'{{"seq":{seq},"ts_ms":{ts},"kind":{json.dumps(kind)},"record":{record},'
            fp.write(line + f'"prev_hash":"{prev}","hash":"{digest}"}}\n')
            count += 1
        return count

    def _raw_rows(self) -> list[tuple[Any, ...]]:
        return self._rows(
            "SELECT seq, ts_ms, kind, record, prev_hash, hash FROM audit ORDER BY seq"
        )

    def verify(self) -> VerifyReport:
        """Walk the chain from the first entry; report the first entry that breaks it."""
        rows = self._raw_rows()
        prev, expected_seq = GENESIS_HASH, 1
        for seq, ts, kind, record, prev_hash, digest in rows:
            problem = _check_row(expected_seq, prev, seq, ts, kind, record, prev_hash, digest)
            if problem:
                return VerifyReport(False, len(rows), seq, problem)
            prev, expected_seq = digest, seq + 1
        head = self._rows("SELECT seq, hash FROM audit_head WHERE id = 1")
        last_seq = expected_seq - 1
        head_seq, head_hash = head[0] if head else (0, GENESIS_HASH)
        if (head_seq, head_hash) != (last_seq, prev):
            return VerifyReport(
                False,
                len(rows),
                min(head_seq, last_seq) + 1,
                f"chain ends at entry {last_seq} but the recorded head is entry {head_seq}"
                " (entries were cut off the end, or the head was edited)",
            )
        return VerifyReport(True, len(rows))


def _check_row(
    expected_seq: int,
    prev: str,
    seq: Any,
    ts: Any,
    kind: Any,
    record: Any,
    prev_hash: Any,
    digest: Any,
) -> str:
    if not (isinstance(seq, int) and isinstance(ts, int)):
        return "entry has a non-integer seq or timestamp"
    if not all(isinstance(v, str) for v in (kind, record, prev_hash, digest)):
        return "entry has a non-text field"
    if seq != expected_seq:
        return f"expected entry {expected_seq} next, found {seq} (deleted or inserted entries)"
    if prev_hash != prev:
        return "prev_hash does not match the previous entry's hash (reordered or replaced)"
    try:
        recomputed = entry_hash(prev_hash, seq, ts, kind, record)
    except ValueError:
        return "prev_hash is not hex"
    if recomputed != digest:
        return "hash does not match the entry's contents (edited)"
    return ""


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    seq, ts, kind, record, prev, digest = row
    try:
        parsed = json.loads(record)
    except (TypeError, ValueError):
        parsed = None
    if not isinstance(parsed, dict):
        # A tampered row must not break reading the rest; verify() reports it.
        parsed = {"unreadable_record": True}
    return AuditEntry(seq, ts, kind, parsed, prev, digest)
