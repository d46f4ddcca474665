"""The broker's metadata database: enclaves, their public keys, and one row per request.

Nothing here can hold a payload: the tables have no column for envelopes, frames or payload
bytes. Enclave keys and evidence are public (any edge may fetch and verify them), so storing them
is safe. SQLite (WAL) for one node; the same tables work on PostgreSQL for replicas.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    Column,
    Engine,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    event,
    insert,
    inspect,
)
from sqlalchemy import select as sql_select
from sqlalchemy import text as sql_text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool
from sqlmodel import Field, Session, SQLModel, col, create_engine, delete, select

STATUS_ADMITTED = "admitted"
STATUS_EVICTED = "evicted"


class EnclaveRow(SQLModel, table=True):
    __tablename__ = "enclaves"

    enclave_id: str = Field(primary_key=True)
    address: str
    region: str
    tee_type: str
    simulated: bool
    models: str = ""  # newline-separated; tiny, read whole, never queried by content
    measurement: str = ""
    status: str = Field(index=True)
    status_reason: str = ""
    attestation_status: str = ""
    attestation_expires_ms: int = 0
    admitted_at_ms: int = 0
    last_heartbeat_ms: int = 0

    @property
    def model_list(self) -> list[str]:
        return [m for m in self.models.split("\n") if m]


class EnclaveKeyRow(SQLModel, table=True):
    __tablename__ = "enclave_keys"
    __table_args__ = (UniqueConstraint("enclave_id", "epoch"),)

    id: int | None = Field(default=None, primary_key=True)
    enclave_id: str = Field(foreign_key="enclaves.enclave_id", index=True)
    epoch: int
    kem: str
    public_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    not_after_ms: int
    evidence_format: str
    evidence: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    verified_at_ms: int
    attested_until_ms: int  # earlier of key expiry and evidence age limit
    # Added later (see _migrate): the broker's EAR for this key, and the challenge it was bound to.
    ear: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))
    nonce: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    # Added later: the key epoch's Ed25519 receipt public key, which the evidence binds (public).
    receipt_public_key: bytes | None = Field(
        default=None, sa_column=Column(LargeBinary, nullable=True)
    )


class RequestRow(SQLModel, table=True):
    __tablename__ = "requests"

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(sa_column=Column(String(32), index=True, nullable=False))
    tenant: str = Field(index=True)
    app: str
    model: str
    op: str
    stream: bool
    candidates: int
    enclave_id: str | None = None  # the enclave that served it, if any
    attempts: int
    status: str  # gRPC status code name returned to the edge
    bytes_in: int
    bytes_out: int
    frames: int
    created_at_ms: int = Field(index=True)
    duration_ms: int


@dataclass(frozen=True)
class KeyRecord:
    """A verified enclave key, ready to store."""

    epoch: int
    kem: str
    public_key: bytes
    not_after_ms: int
    evidence_format: str
    evidence: bytes
    verified_at_ms: int
    attested_until_ms: int
    ear: str = ""
    nonce: bytes = b""
    receipt_public_key: bytes = b""


@dataclass(frozen=True)
class KeyReappraisal:
    """A stored key (by row id) that appraised again: its new EAR and attestation window."""

    key_id: int
    ear: str
    verified_at_ms: int
    attested_until_ms: int


@dataclass(frozen=True)
class EnclaveRecord:
    """An admitted enclave as the registry saw it at admission."""

    enclave_id: str
    address: str
    region: str
    tee_type: str
    simulated: bool
    models: tuple[str, ...]
    measurement: str
    attestation_status: str
    now_ms: int


@dataclass(frozen=True)
class EnclaveEntry:
    """An enclave with its currently usable keys (a read model, detached from the session)."""

    enclave: EnclaveRow
    keys: tuple[EnclaveKeyRow, ...]


def open_database(url: str) -> Engine:
    """Connect, create missing tables, and (SQLite) switch to WAL so readers never block."""
    kwargs: dict[str, Any] = {"hide_parameters": True}  # SQL errors must not echo bound values
    parsed = make_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    in_memory = parsed.database in (None, "", ":memory:")
    if sqlite:
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
    if sqlite and not in_memory:
        # SQLite creates the file but not its directory; keep that directory private.
        Path(str(parsed.database)).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if sqlite and in_memory:
        # One shared connection, or each thread would see its own empty database.
        kwargs["poolclass"] = StaticPool
    else:
        # Every RPC worker and the eviction sweep may hold a connection at once.
        kwargs.update(pool_size=8, max_overflow=16)
    engine = create_engine(url, **kwargs)
    if sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    SQLModel.metadata.create_all(engine)
    _migrate(engine)
    return engine


def _migrate(engine: Engine) -> None:
    """Add columns introduced after a database was created (``create_all`` adds only tables)."""
    table = EnclaveKeyRow.__table__  # type: ignore[attr-defined]
    present = {c["name"] for c in inspect(engine).get_columns(table.name)}
    with engine.begin() as conn:
        for name in ("ear", "nonce", "receipt_public_key"):
            if name in present:
                continue
            column = table.c[name]
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {name} "
            ddl += column.type.compile(dialect=engine.dialect)
            if not column.nullable:
                ddl += " NOT NULL DEFAULT ''"
            conn.execute(sql_text(ddl))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def admit_enclave(engine: Engine, record: EnclaveRecord, keys: Sequence[KeyRecord]) -> None:
    """Insert or replace an enclave and replace all its keys (a registration is a fresh start)."""
    with Session(engine) as session:
        row = session.get(EnclaveRow, record.enclave_id) or EnclaveRow(
            enclave_id=record.enclave_id,
            address="",
            region="",
            tee_type="",
            simulated=False,
            status=STATUS_ADMITTED,
        )
        row.address = record.address
        row.region = record.region
        row.tee_type = record.tee_type
        row.simulated = record.simulated
        row.models = "\n".join(record.models)
        row.measurement = record.measurement
        row.status = STATUS_ADMITTED
        row.status_reason = ""
        row.attestation_status = record.attestation_status
        row.attestation_expires_ms = max(k.attested_until_ms for k in keys)
        row.admitted_at_ms = record.now_ms
        row.last_heartbeat_ms = record.now_ms
        session.add(row)
        session.exec(delete(EnclaveKeyRow).where(col(EnclaveKeyRow.enclave_id) == row.enclave_id))
        session.add_all(_key_rows(row.enclave_id, keys))
        session.commit()


def get_enclave(engine: Engine, enclave_id: str) -> EnclaveRow | None:
    with Session(engine) as session:
        return session.get(EnclaveRow, enclave_id)


def record_heartbeat(
    engine: Engine, enclave_id: str, now_ms: int, keys: Sequence[KeyRecord] = ()
) -> None:
    """Note a heartbeat; upsert re-appraised keys by epoch and drop keys whose attestation ended."""
    with Session(engine) as session:
        row = session.get(EnclaveRow, enclave_id)
        if row is None:
            return
        epochs = [k.epoch for k in keys]
        session.exec(
            delete(EnclaveKeyRow).where(
                col(EnclaveKeyRow.enclave_id) == enclave_id,
                col(EnclaveKeyRow.epoch).in_(epochs)
                | (col(EnclaveKeyRow.attested_until_ms) <= now_ms),
            )
        )
        session.add_all(_key_rows(enclave_id, keys))
        session.flush()
        row.last_heartbeat_ms = now_ms
        row.attestation_expires_ms = _attested_until(session, enclave_id)
        session.add(row)
        session.commit()


def _key_rows(enclave_id: str, keys: Iterable[KeyRecord]) -> list[EnclaveKeyRow]:
    return [
        EnclaveKeyRow(
            enclave_id=enclave_id,
            epoch=k.epoch,
            kem=k.kem,
            public_key=k.public_key,
            not_after_ms=k.not_after_ms,
            evidence_format=k.evidence_format,
            evidence=k.evidence,
            verified_at_ms=k.verified_at_ms,
            attested_until_ms=k.attested_until_ms,
            ear=k.ear,
            nonce=k.nonce or None,
            receipt_public_key=k.receipt_public_key or None,
        )
        for k in keys
    ]


def _attested_until(session: Session, enclave_id: str) -> int:
    stmt = select(EnclaveKeyRow.attested_until_ms).where(EnclaveKeyRow.enclave_id == enclave_id)
    return max(session.exec(stmt).all(), default=0)


def evict_stale(engine: Engine, now_ms: int, heartbeat_cutoff_ms: int) -> list[tuple[str, str]]:
    """Drop keys whose attestation ended; evict enclaves that went silent or have no usable key.

    Returns ``(enclave_id, reason)`` for each enclave evicted by this call.
    """
    evicted: list[tuple[str, str]] = []
    with Session(engine) as session:
        session.exec(delete(EnclaveKeyRow).where(col(EnclaveKeyRow.attested_until_ms) <= now_ms))
        admitted = select(EnclaveRow).where(EnclaveRow.status == STATUS_ADMITTED)
        for row in session.exec(admitted).all():
            reason = _eviction_reason(session, row, now_ms, heartbeat_cutoff_ms)
            if reason:
                row.status, row.status_reason = STATUS_EVICTED, reason
                row.attestation_expires_ms = _attested_until(session, row.enclave_id)
                session.add(row)
                evicted.append((row.enclave_id, reason))
        session.commit()
    return evicted


def _eviction_reason(session: Session, row: EnclaveRow, now_ms: int, cutoff_ms: int) -> str:
    if row.last_heartbeat_ms < cutoff_ms:
        return f"no heartbeat for {(now_ms - row.last_heartbeat_ms) // 1000}s"
    if _attested_until(session, row.enclave_id) <= now_ms:
        return "attestation expired (no key with valid evidence left)"
    return ""


def admitted_enclaves(engine: Engine) -> list[EnclaveEntry]:
    """Every admitted enclave with all its stored keys (for re-appraisal), by enclave id."""
    with Session(engine) as session:
        stmt = select(EnclaveRow).where(EnclaveRow.status == STATUS_ADMITTED)
        rows = {r.enclave_id: r for r in session.exec(stmt.order_by(EnclaveRow.enclave_id)).all()}
        key_stmt = (
            select(EnclaveKeyRow)
            .where(col(EnclaveKeyRow.enclave_id).in_(list(rows)))
            .order_by(col(EnclaveKeyRow.enclave_id), col(EnclaveKeyRow.epoch))
        )
        keys: dict[str, list[EnclaveKeyRow]] = {}
        for key in session.exec(key_stmt).all():
            keys.setdefault(key.enclave_id, []).append(key)
    return [EnclaveEntry(row, tuple(keys.get(eid, ()))) for eid, row in rows.items()]


def record_reappraisal(
    engine: Engine,
    enclave_id: str,
    reappraised: Sequence[KeyReappraisal],
    dropped_key_ids: Sequence[int],
) -> None:
    """Store the new EARs and windows of keys that appraised again; drop keys that did not.

    Keys are named by row id: a key a heartbeat replaced meanwhile has a new row (and fresh
    evidence), so this pass's verdict on the old evidence never lands on it.
    """
    with Session(engine) as session:
        row = session.get(EnclaveRow, enclave_id)
        if row is None or row.status != STATUS_ADMITTED:
            return  # evicted meanwhile: nothing of this pass applies
        if dropped_key_ids:
            session.exec(
                delete(EnclaveKeyRow).where(col(EnclaveKeyRow.id).in_(list(dropped_key_ids)))
            )
        by_id = {r.key_id: r for r in reappraised}
        stmt = select(EnclaveKeyRow).where(
            EnclaveKeyRow.enclave_id == enclave_id, col(EnclaveKeyRow.id).in_(list(by_id))
        )
        for key in session.exec(stmt).all():
            assert key.id is not None
            update = by_id[key.id]
            key.ear = update.ear
            key.verified_at_ms = update.verified_at_ms
            key.attested_until_ms = update.attested_until_ms
            session.add(key)
        session.flush()
        row.attestation_expires_ms = _attested_until(session, enclave_id)
        session.add(row)
        session.commit()


def evict(
    engine: Engine, enclave_id: str, reason: str, *, admitted_at_ms: int | None = None
) -> bool:
    """Mark an admitted enclave evicted; with ``admitted_at_ms``, only that admission (not a
    registration that replaced it meanwhile). True if this call evicted it."""
    with Session(engine) as session:
        row = session.get(EnclaveRow, enclave_id)
        if row is None or row.status != STATUS_ADMITTED:
            return False
        if admitted_at_ms is not None and row.admitted_at_ms != admitted_at_ms:
            return False
        row.status, row.status_reason = STATUS_EVICTED, reason
        session.add(row)
        session.commit()
        return True


def live_enclaves(
    engine: Engine, now_ms: int, heartbeat_cutoff_ms: int, enclave_ids: Sequence[str] | None = None
) -> list[EnclaveEntry]:
    """Admitted enclaves that heartbeat recently, with keys still attested at ``now_ms``.

    Filters on liveness itself rather than trusting the last eviction sweep, so a silent enclave
    is never listed or dispatched to, even between sweeps. Enclaves left without keys are skipped.
    """
    with Session(engine) as session:
        stmt = select(EnclaveRow).where(
            EnclaveRow.status == STATUS_ADMITTED,
            col(EnclaveRow.last_heartbeat_ms) >= heartbeat_cutoff_ms,
        )
        if enclave_ids is not None:
            stmt = stmt.where(col(EnclaveRow.enclave_id).in_(enclave_ids))
        rows = {r.enclave_id: r for r in session.exec(stmt.order_by(EnclaveRow.enclave_id)).all()}
        key_stmt = (
            select(EnclaveKeyRow)
            .where(
                col(EnclaveKeyRow.enclave_id).in_(list(rows)),
                col(EnclaveKeyRow.attested_until_ms) > now_ms,
            )
            .order_by(col(EnclaveKeyRow.enclave_id), col(EnclaveKeyRow.epoch))
        )
        keys: dict[str, list[EnclaveKeyRow]] = {}
        for key in session.exec(key_stmt).all():
            keys.setdefault(key.enclave_id, []).append(key)
    return [EnclaveEntry(row, tuple(keys[eid])) for eid, row in rows.items() if eid in keys]


@dataclass(frozen=True)
class DispatchTarget:
    """What dispatch needs of a live enclave: its address, its region and the key epochs whose
    attestation is still valid. No public keys, evidence or EARs: dispatch never reads them."""

    enclave_id: str
    address: str
    region: str
    epochs: frozenset[int]


# One narrow, pre-built statement: the same liveness rules as live_enclaves (admitted, heartbeat
# within the window, key attested at `now`), selecting four small columns instead of whole rows.
_DISPATCH_TARGETS: Final = (
    sql_select(
        col(EnclaveRow.enclave_id),
        col(EnclaveRow.address),
        col(EnclaveRow.region),
        col(EnclaveKeyRow.epoch),
    )
    .join(EnclaveKeyRow, col(EnclaveKeyRow.enclave_id) == col(EnclaveRow.enclave_id))
    .where(
        col(EnclaveRow.status) == STATUS_ADMITTED,
        col(EnclaveRow.last_heartbeat_ms) >= bindparam("cutoff_ms"),
        col(EnclaveKeyRow.attested_until_ms) > bindparam("now_ms"),
        col(EnclaveRow.enclave_id).in_(bindparam("ids", expanding=True)),
    )
)


def dispatch_targets(
    engine: Engine, now_ms: int, heartbeat_cutoff_ms: int, enclave_ids: Sequence[str]
) -> dict[str, DispatchTarget]:
    """The enclaves among ``enclave_ids`` that dispatch may use now, by id.

    Exactly the rules of :func:`live_enclaves`, read fresh from the database on every call (no
    cache, so an eviction by any replica applies to the next dispatch), as one Core query.
    """
    if not enclave_ids:
        return {}
    params = {"cutoff_ms": heartbeat_cutoff_ms, "now_ms": now_ms, "ids": list(enclave_ids)}
    found: dict[str, tuple[str, str, set[int]]] = {}
    with engine.connect() as conn:
        for enclave_id, address, region, epoch in conn.execute(_DISPATCH_TARGETS, params):
            found.setdefault(enclave_id, (address, region, set()))[2].add(epoch)
    return {
        eid: DispatchTarget(eid, address, region, frozenset(epochs))
        for eid, (address, region, epochs) in found.items()
    }


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One ``requests`` row to insert: plain values, cheap to build on the dispatch path."""

    request_id: str
    tenant: str
    app: str
    model: str
    op: str
    stream: bool
    candidates: int
    enclave_id: str | None  # the enclave that served it, if any
    attempts: int
    status: str  # gRPC status code name returned to the edge
    bytes_in: int
    bytes_out: int
    frames: int
    created_at_ms: int
    duration_ms: int

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


_INSERT_REQUEST: Final = insert(RequestRow)


def record_requests(engine: Engine, records: Sequence[RequestRecord]) -> None:
    """Insert request rows in one transaction (one executemany)."""
    if not records:
        return
    with engine.begin() as conn:
        conn.execute(_INSERT_REQUEST, [record.values() for record in records])


def recent_requests(engine: Engine, limit: int = 100) -> list[RequestRow]:
    with Session(engine) as session:
        stmt = select(RequestRow).order_by(col(RequestRow.id).desc()).limit(limit)
        return list(session.exec(stmt).all())
