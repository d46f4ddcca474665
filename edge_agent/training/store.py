"""The edge's training state: datasets, jobs, model artifacts (SQLite, ``training.db``).

Secrets (pseudonymisation keys, job keys, artifact keys) are stored sealed with AES-256-GCM
under a key read from ``training.key`` (32 random bytes, mode 0600, created on first use), with
the table, row id and field in the associated data, so a sealed value cannot be moved to another
row or field. Model artifacts are files under ``models/``, kept exactly as the enclave sealed
them (AES-256-GCM under the artifact key). Nothing here ever holds a dataset.

The database is shared by the agent, its worker thread and CLI processes (WAL mode). Job
ownership is a lease: the process that claims a job writes its pid and a lease expiry; a job
whose owner died (``kill -9``) can be claimed at once by anyone on the same host.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

DB_FILE: Final = "training.db"
KEY_FILE: Final = "training.key"
MODELS_DIR: Final = "models"
OUTBOX_DIR: Final = "outbox"
_AT_REST_AAD: Final = b"sovra edge at rest\x00"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS datasets (
  name TEXT PRIMARY KEY,
  path TEXT NOT NULL,
  format TEXT NOT NULL,
  size INTEGER NOT NULL,
  sha256 TEXT NOT NULL,
  rows INTEGER NOT NULL,
  columns TEXT NOT NULL,
  pseudonym_key BLOB NOT NULL,
  created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  app TEXT NOT NULL,
  dataset TEXT NOT NULL,
  task TEXT NOT NULL,
  target TEXT NOT NULL,
  algorithm TEXT NOT NULL,
  params TEXT NOT NULL,
  base_model TEXT NOT NULL,
  text_column TEXT NOT NULL DEFAULT '',
  policy_id TEXT NOT NULL,
  rule_id TEXT NOT NULL,
  plan TEXT NOT NULL,
  constraints TEXT NOT NULL,
  state TEXT NOT NULL,
  error_code TEXT NOT NULL DEFAULT '',
  error TEXT NOT NULL DEFAULT '',
  job_key BLOB,
  chunk_bytes INTEGER NOT NULL,
  chunks INTEGER NOT NULL DEFAULT 0,
  total_bytes INTEGER NOT NULL DEFAULT 0,
  rows INTEGER NOT NULL DEFAULT 0,
  source_sha256 TEXT NOT NULL DEFAULT '',
  transformed_sha256 TEXT NOT NULL DEFAULT '',
  spooled INTEGER NOT NULL DEFAULT 0,
  acked INTEGER NOT NULL DEFAULT 0,
  opened INTEGER NOT NULL DEFAULT 0,
  enclave_id TEXT NOT NULL DEFAULT '',
  epoch INTEGER NOT NULL DEFAULT 0,
  attestation TEXT NOT NULL DEFAULT '',
  attestation_sha256 TEXT NOT NULL DEFAULT '',
  attempts INTEGER NOT NULL DEFAULT 0,
  worker_pid INTEGER NOT NULL DEFAULT 0,
  lease_until_ms INTEGER NOT NULL DEFAULT 0,
  cancel_requested INTEGER NOT NULL DEFAULT 0,
  receipt BLOB,
  receipt_sig BLOB,
  receipt_signer BLOB,
  metrics TEXT NOT NULL DEFAULT '',
  artifact_key BLOB,
  artifact_nonce BLOB,
  artifact_sha256 BLOB,
  created_at_ms INTEGER NOT NULL,
  updated_at_ms INTEGER NOT NULL,
  finished_at_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
"""

#: Columns a job row update may set.
JOB_FIELDS: Final = frozenset(
    {
        "state", "error_code", "error", "job_key", "chunks", "total_bytes", "rows",
        "source_sha256", "transformed_sha256", "spooled", "acked", "opened", "enclave_id",
        "epoch", "attestation", "attestation_sha256", "attempts", "worker_pid",
        "lease_until_ms", "cancel_requested", "receipt", "receipt_sig", "receipt_signer",
        "metrics", "artifact_key", "artifact_nonce", "artifact_sha256", "finished_at_ms",
    }
)  # fmt: skip


class StoreError(Exception):
    """The training state cannot be read or written; the message says why."""


def now_ms() -> int:
    return int(time.time() * 1000)


class AtRestKey:
    """Seals small secrets stored in the database (AES-256-GCM, bound to table/row/field)."""

    def __init__(self, path: Path) -> None:
        self._key = _load_or_create_key(path)

    def seal(self, where: str, value: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + AESGCM(self._key).encrypt(nonce, value, _AT_REST_AAD + where.encode())

    def open(self, where: str, blob: bytes) -> bytes:
        try:
            return AESGCM(self._key).decrypt(blob[:12], blob[12:], _AT_REST_AAD + where.encode())
        except (InvalidTag, ValueError):
            raise StoreError(f"sealed value {where} does not open (tampered or moved)") from None


def _load_or_create_key(path: Path) -> bytes:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(os.urandom(32))
                handle.flush()
                os.fsync(handle.fileno())
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise StoreError(f"{path} is accessible by group or others (mode {mode:o}); chmod 600 it")
    key = path.read_bytes()
    if len(key) != 32:
        raise StoreError(f"{path} must hold exactly 32 bytes")
    return key


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    path: str
    format: str
    size: int
    sha256: str
    rows: int
    columns: list[dict[str, Any]]
    created_at_ms: int
    pseudonym_key: bytes = field(repr=False, default=b"")

    def public(self) -> dict[str, Any]:
        return {
            "object": "sovra.dataset",
            "name": self.name,
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "sha256": self.sha256,
            "rows": self.rows,
            "columns": self.columns,
            "created_at_ms": self.created_at_ms,
        }


class TrainingStore:
    """All training state of one edge state directory. Thread-safe."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.state_dir / MODELS_DIR).mkdir(mode=0o700, exist_ok=True)
        self.at_rest = AtRestKey(self.state_dir / KEY_FILE)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(
                self.state_dir / DB_FILE, check_same_thread=False, isolation_level=None, timeout=30
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.state_dir / DB_FILE}: {exc}") from None

    @property
    def outbox_dir(self) -> Path:
        return self.state_dir / OUTBOX_DIR

    def artifact_path(self, job_id: str) -> Path:
        return self.state_dir / MODELS_DIR / f"job-{job_id}.artifact"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            try:
                return self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise StoreError(f"training state: {exc}") from None

    # -- datasets -------------------------------------------------------------------------

    def add_dataset(self, record: DatasetRecord) -> None:
        key = self.at_rest.seal(f"datasets/{record.name}/pseudonym_key", record.pseudonym_key)
        try:
            self._execute(
                "INSERT INTO datasets (name, path, format, size, sha256, rows, columns, "
                "pseudonym_key, created_at_ms) VALUES (?,?,?,?,?,?,?,?,?)",
                (record.name, record.path, record.format, record.size, record.sha256,
                 record.rows, json.dumps(record.columns), key, record.created_at_ms),
            )  # fmt: skip
        except StoreError as exc:
            if "UNIQUE" in str(exc):
                raise StoreError(
                    f"a dataset named {record.name!r} is already registered; remove it first"
                ) from None
            raise

    def dataset(self, name: str) -> DatasetRecord | None:
        row = self._execute("SELECT * FROM datasets WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        return DatasetRecord(
            name=row["name"],
            path=row["path"],
            format=row["format"],
            size=row["size"],
            sha256=row["sha256"],
            rows=row["rows"],
            columns=json.loads(row["columns"]),
            created_at_ms=row["created_at_ms"],
            pseudonym_key=self.at_rest.open(f"datasets/{name}/pseudonym_key", row["pseudonym_key"]),
        )

    def datasets(self) -> list[DatasetRecord]:
        names = [r["name"] for r in self._execute("SELECT name FROM datasets ORDER BY name")]
        return [d for d in (self.dataset(n) for n in names) if d is not None]

    def remove_dataset(self, name: str) -> bool:
        active = self._execute(
            "SELECT id FROM jobs WHERE dataset = ? AND state IN ('queued','uploading','training')",
            (name,),
        ).fetchone()
        if active is not None:
            raise StoreError(f"dataset {name!r} has an unfinished job ({active['id']}); cancel it")
        return self._execute("DELETE FROM datasets WHERE name = ?", (name,)).rowcount > 0

    # -- jobs -----------------------------------------------------------------------------

    def add_job(self, job: dict[str, Any]) -> None:
        now = now_ms()
        row = {**job, "created_at_ms": now, "updated_at_ms": now}
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self._execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(row.values()))  # noqa: S608

    def job(self, job_id: str) -> dict[str, Any] | None:
        row = self._execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(row) if row is not None else None

    def jobs(self, *, app: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if app is None:
            rows = self._execute("SELECT * FROM jobs ORDER BY created_at_ms DESC LIMIT ?", (limit,))
        else:
            rows = self._execute(
                "SELECT * FROM jobs WHERE app = ? ORDER BY created_at_ms DESC LIMIT ?", (app, limit)
            )
        return [dict(r) for r in rows]

    def update_job(self, job_id: str, **changes: Any) -> None:
        unknown = set(changes) - JOB_FIELDS
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        changes["updated_at_ms"] = now_ms()
        assignments = ", ".join(f"{k} = ?" for k in changes)
        self._execute(
            f"UPDATE jobs SET {assignments} WHERE id = ?",  # noqa: S608 - names from JOB_FIELDS
            (*changes.values(), job_id),
        )

    def runnable(self) -> list[str]:
        """Jobs a worker may pick up: unfinished, not leased by a live process."""
        rows = self._execute(
            "SELECT id, worker_pid, lease_until_ms FROM jobs "
            "WHERE state IN ('queued','uploading','training') ORDER BY created_at_ms"
        ).fetchall()
        now = now_ms()
        return [r["id"] for r in rows if not _leased(r["worker_pid"], r["lease_until_ms"], now)]

    def claim(self, job_id: str, lease_ms: int) -> bool:
        """Take the job's lease for this process; False if a live process holds it."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute(
                    "SELECT worker_pid, lease_until_ms FROM jobs WHERE id = ?", (job_id,)
                ).fetchone()
                now = now_ms()
                mine = row is not None and row["worker_pid"] == os.getpid()
                if row is None or (
                    not mine and _leased(row["worker_pid"], row["lease_until_ms"], now)
                ):
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute(
                    "UPDATE jobs SET worker_pid = ?, lease_until_ms = ? WHERE id = ?",
                    (os.getpid(), now + lease_ms, job_id),
                )
                self._db.execute("COMMIT")
                return True
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK") if self._db.in_transaction else None
                raise StoreError(f"training state: {exc}") from None

    def release(self, job_id: str) -> None:
        self._execute(
            "UPDATE jobs SET worker_pid = 0, lease_until_ms = 0 WHERE id = ? AND worker_pid = ?",
            (job_id, os.getpid()),
        )

    def seal_secret(self, job_id: str, name: str, value: bytes) -> bytes:
        return self.at_rest.seal(f"jobs/{job_id}/{name}", value)

    def open_secret(self, job_id: str, name: str, blob: bytes) -> bytes:
        return self.at_rest.open(f"jobs/{job_id}/{name}", blob)

    def models(self, app: str | None = None) -> Iterator[dict[str, Any]]:
        sql = "SELECT * FROM jobs WHERE state = 'completed'"
        args: tuple[Any, ...] = ()
        if app is not None:
            sql += " AND app = ?"
            args = (app,)
        for row in self._execute(sql + " ORDER BY created_at_ms", args).fetchall():
            yield dict(row)


def _leased(pid: int, lease_until_ms: int, now: int) -> bool:
    if not pid or lease_until_ms <= now:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # the owner died (kill -9): the lease is void
    except PermissionError:
        return True
    return True
