"""The broker's side of the sovereignty rules (``docs/policy.md``, "Broker policy"): per tenant,
where its requests may go (regions, jurisdictions, enclave pools) and how many it may send
(quotas). Metadata only: the broker sees headers, enclave regions and reply frame counts.

The file is YAML, in the same family as the edge's policy language::

    version: 1
    regions: {cn-north-1: CN, eu-west-1: EU}     # region -> jurisdiction (optional)
    pools: {general: ["enclave-*"]}              # pool -> enclave ids (shell patterns)
    tenants:
      demo:
        id: demo-residency                       # named in refusals (default tenants.<name>)
        regions: [cn-north-1]
        jurisdictions: [CN]
        pools: [general]
        quotas: {requests_per_min: 600, tokens_per_day: 200000}

``tokens_per_day`` is counted in reply frames: the broker cannot see tokens. A streamed reply
sends about one frame per token; a unary reply is one frame (bound unary traffic with
``requests_per_min``). Quota state lives in the broker database, so a restart keeps it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import grpc
import yaml
from sqlalchemy import Connection, Engine, bindparam, insert, update
from sqlalchemy import select as sql_select
from sqlmodel import Field, Session, SQLModel, col

from cloud_broker.errors import BrokerError

MAX_POLICY_BYTES: Final = 1024 * 1024
_TOP_KEYS: Final = frozenset({"version", "regions", "pools", "tenants"})
_TENANT_KEYS: Final = frozenset({"id", "regions", "jurisdictions", "pools", "quotas"})
_QUOTA_KEYS: Final = frozenset({"requests_per_min", "tokens_per_day"})
_MS_PER_MIN: Final = 60_000


class BrokerPolicyError(Exception):
    """The broker policy file cannot be read or is invalid; the message names file and key."""


def jurisdiction_of(region: str) -> str:
    """By convention the part of a region name before the first ``-``, upper-cased (the edge
    uses the same convention): ``cn-north-1`` -> ``CN``."""
    return region.split("-", 1)[0].upper()


@dataclass(frozen=True)
class Quotas:
    requests_per_min: int | None = None
    tokens_per_day: int | None = None  # counted as reply frames per UTC day

    @property
    def any(self) -> bool:
        return self.requests_per_min is not None or self.tokens_per_day is not None


@dataclass(frozen=True)
class TenantRules:
    tenant: str
    rule_id: str
    regions: tuple[str, ...] | None = None  # None: any
    jurisdictions: tuple[str, ...] | None = None
    pools: tuple[str, ...] | None = None
    quotas: Quotas = field(default_factory=Quotas)


@dataclass(frozen=True)
class BrokerPolicy:
    source: str
    digest: str
    tenants: Mapping[str, TenantRules]
    pools: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    region_jurisdictions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def id(self) -> str:
        return f"broker-policy:{self.digest[:12]}"

    def rules_for(self, tenant: str) -> TenantRules | None:
        """The tenant's rules; None: the file says nothing about it (broker.toml rules only)."""
        return self.tenants.get(tenant)

    def jurisdiction(self, region: str) -> str:
        return self.region_jurisdictions.get(region) or jurisdiction_of(region)

    def excludes(self, rules: TenantRules, enclave_id: str, region: str) -> str | None:
        """Why an enclave may not serve the tenant, or None if it may."""
        if rules.regions is not None and region not in rules.regions:
            return f"region {region!r} is not one of {list(rules.regions)}"
        if rules.jurisdictions is not None:
            jurisdiction = self.jurisdiction(region)
            if jurisdiction not in rules.jurisdictions:
                return (
                    f"region {region!r} is in jurisdiction {jurisdiction!r}, not one of "
                    f"{list(rules.jurisdictions)}"
                )
        if rules.pools is not None and not any(
            fnmatch.fnmatchcase(enclave_id, pattern)
            for pool in rules.pools
            for pattern in self.pools.get(pool, ())
        ):
            return f"enclave {enclave_id!r} is in none of the pools {list(rules.pools)}"
        return None

    @classmethod
    def load(cls, path: Path) -> BrokerPolicy:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BrokerPolicyError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if len(data) > MAX_POLICY_BYTES:
            raise BrokerPolicyError(f"{path}: larger than {MAX_POLICY_BYTES} bytes")
        try:
            doc = yaml.safe_load(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise BrokerPolicyError(f"{path}: not UTF-8 text") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise BrokerPolicyError(f"{path}{where}: not valid YAML ({problem})") from None
        return cls.from_document(doc, source=str(path), digest=hashlib.sha256(data).hexdigest())

    @classmethod
    def from_document(cls, doc: Any, *, source: str, digest: str = "") -> BrokerPolicy:
        r = _Reader(source)
        r.mapping(doc, "", _TOP_KEYS)
        if doc.get("version", 1) != 1:
            raise r.fail("version", "must be 1")
        regions = r.string_map(doc.get("regions", {}), "regions")
        pools = {
            name: tuple(r.strings(value, f"pools.{name}"))
            for name, value in r.mapping(doc.get("pools", {}), "pools").items()
        }
        tenants: dict[str, TenantRules] = {}
        for name, table in r.mapping(doc.get("tenants", {}), "tenants").items():
            prefix = f"tenants.{name}"
            if not isinstance(name, str) or not name:
                raise r.fail("tenants", f"tenant names must be strings, got {name!r}")
            r.mapping(table, prefix, _TENANT_KEYS)
            rule_id = table.get("id", prefix)
            if not isinstance(rule_id, str) or not rule_id:
                raise r.fail(prefix + ".id", "must be a non-empty string")
            tenant_pools = r.optional_strings(table, "pools", prefix)
            for pool in tenant_pools or ():
                if pool not in pools:
                    raise r.fail(f"{prefix}.pools", f"undefined pool {pool!r}")
            quotas = r.mapping(table.get("quotas", {}), prefix + ".quotas", _QUOTA_KEYS)
            tenants[name] = TenantRules(
                tenant=name,
                rule_id=rule_id,
                regions=r.optional_strings(table, "regions", prefix),
                jurisdictions=r.optional_strings(table, "jurisdictions", prefix),
                pools=tenant_pools,
                quotas=Quotas(
                    requests_per_min=r.positive(quotas, "requests_per_min", prefix + ".quotas"),
                    tokens_per_day=r.positive(quotas, "tokens_per_day", prefix + ".quotas"),
                ),
            )
        return cls(
            source=source,
            digest=digest or hashlib.sha256(repr(doc).encode()).hexdigest(),
            tenants=MappingProxyType(tenants),
            pools=MappingProxyType(pools),
            region_jurisdictions=MappingProxyType(regions),
        )


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> BrokerPolicyError:
        return BrokerPolicyError(f"{self.source}: {key or 'top level'}: {message}")

    def mapping(
        self, value: Any, key: str, allowed: frozenset[str] | None = None
    ) -> dict[Any, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "must be a mapping")
        if allowed is not None:
            unknown = sorted(str(k) for k in value if k not in allowed)
            if unknown:
                where = f"{key}." if key else ""
                raise self.fail(
                    where + unknown[0], f"unknown key; allowed here: {', '.join(sorted(allowed))}"
                )
        return value

    def strings(self, value: Any, key: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "must be a list of non-empty strings")
        return value

    def optional_strings(
        self, table: dict[str, Any], key: str, prefix: str
    ) -> tuple[str, ...] | None:
        if key not in table:
            return None
        values = self.strings(table[key], f"{prefix}.{key}")
        if not values:
            raise self.fail(f"{prefix}.{key}", "must not be empty (leave it out to allow any)")
        return tuple(values)

    def string_map(self, value: Any, key: str) -> dict[str, str]:
        table = self.mapping(value, key)
        for k, v in table.items():
            if not isinstance(k, str) or not isinstance(v, str) or not v:
                raise self.fail(f"{key}.{k}", "must map a region name to a jurisdiction")
        return table

    def positive(self, table: dict[str, Any], key: str, prefix: str) -> int | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self.fail(f"{prefix}.{key}", f"must be a positive integer, got {value!r}")
        return value


# --- quotas -----------------------------------------------------------------------------------


class QuotaRow(SQLModel, table=True):
    """Quota state per tenant (metadata only): the request bucket and today's reply frames."""

    __tablename__ = "quotas"

    tenant: str = Field(primary_key=True)
    bucket: float = 0.0  # requests available (token bucket, refills requests_per_min / minute)
    bucket_ms: int = 0  # when ``bucket`` was last computed
    day: str = ""  # UTC date of ``day_frames``
    day_frames: int = 0


@dataclass
class _QuotaState:
    """One ``quotas`` row as read for an update (plain values: cheaper than an ORM object on the
    dispatch path)."""

    tenant: str
    bucket: float
    bucket_ms: int
    day: str
    day_frames: int = 0
    stored: bool = False  # the row exists (UPDATE) or not yet (INSERT)


# Pre-built statements (built once, so each use skips statement construction and caching).
_QUOTA_LOCK: Final = (
    sql_select(
        col(QuotaRow.bucket), col(QuotaRow.bucket_ms), col(QuotaRow.day), col(QuotaRow.day_frames)
    )
    .where(col(QuotaRow.tenant) == bindparam("key"))
    .with_for_update()
)
_QUOTA_UPDATE: Final = (
    update(QuotaRow)
    .where(col(QuotaRow.tenant) == bindparam("key"))
    .values(
        bucket=bindparam("bucket"),
        bucket_ms=bindparam("bucket_ms"),
        day=bindparam("day"),
        day_frames=bindparam("day_frames"),
    )
)
_QUOTA_INSERT: Final = insert(QuotaRow).values(
    tenant=bindparam("key"),
    bucket=bindparam("bucket"),
    bucket_ms=bindparam("bucket_ms"),
    day=bindparam("day"),
    day_frames=bindparam("day_frames"),
)


def _load(conn: Connection, tenant: str) -> _QuotaState | None:
    """The tenant's quota row, locked for this transaction (``SELECT ... FOR UPDATE`` where the
    database has it; SQLite serialises writers anyway)."""
    found = conn.execute(_QUOTA_LOCK, {"key": tenant}).first()
    if found is None:
        return None
    bucket, bucket_ms, day, day_frames = found
    return _QuotaState(tenant, bucket, bucket_ms, day, day_frames, stored=True)


def _save(conn: Connection, state: _QuotaState) -> None:
    conn.execute(
        _QUOTA_UPDATE if state.stored else _QUOTA_INSERT,
        {
            "key": state.tenant,
            "bucket": state.bucket,
            "bucket_ms": state.bucket_ms,
            "day": state.day,
            "day_frames": state.day_frames,
        },
    )


def _day(now_s: float) -> str:
    return datetime.fromtimestamp(now_s, UTC).date().isoformat()


def _iso(when_s: float) -> str:
    return datetime.fromtimestamp(when_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class QuotaStore:
    """Quota checks and usage, in the broker database (so restarts and replicas share it).

    One writer at a time in this process (a lock); on PostgreSQL the row is also locked
    (``SELECT ... FOR UPDATE``) so replicas do not double-spend a bucket.
    """

    def __init__(self, engine: Engine, clock: Callable[[], float]) -> None:
        self._engine = engine
        self._clock = clock
        self._lock = threading.Lock()
        QuotaRow.__table__.create(engine, checkfirst=True)  # type: ignore[attr-defined]

    def admit(self, rules: TenantRules) -> None:
        """Take one request from the tenant's quotas; RESOURCE_EXHAUSTED if one is used up."""
        quotas = rules.quotas
        if not quotas.any:
            return
        now = self._clock()
        now_ms = int(now * 1000)
        today = _day(now)
        with self._lock, self._engine.begin() as conn:
            row = _load(conn, rules.tenant) or _QuotaState(
                rules.tenant, bucket=float(quotas.requests_per_min or 0), bucket_ms=now_ms,
                day=today,
            )  # fmt: skip
            if row.day != today:
                row.day, row.day_frames = today, 0
            limit = quotas.tokens_per_day
            if limit is not None and row.day_frames >= limit:
                midnight = datetime.fromisoformat(today).replace(tzinfo=UTC) + timedelta(days=1)
                raise BrokerError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"broker policy rule {rules.rule_id!r}: quota tokens_per_day ({limit}, "
                    f"counted as reply frames) of tenant {rules.tenant!r} is used up; it resets "
                    f"at {_iso(midnight.timestamp())}",
                )
            rpm = quotas.requests_per_min
            if rpm is not None:
                rate = rpm / _MS_PER_MIN  # requests per millisecond
                elapsed = max(0, now_ms - row.bucket_ms)
                tokens = min(float(rpm), row.bucket + elapsed * rate)
                if tokens < 1.0:
                    wait_s = (1.0 - tokens) / rate / 1000
                    raise BrokerError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"broker policy rule {rules.rule_id!r}: quota requests_per_min ({rpm}) "
                        f"of tenant {rules.tenant!r} is used up; the next request is allowed "
                        f"in {wait_s:.1f}s (at {_iso(now + wait_s)})",
                    )
                row.bucket, row.bucket_ms = tokens - 1.0, now_ms
            _save(conn, row)

    def record_frames(self, rules: TenantRules, frames: int) -> None:
        """Count reply frames relayed to the tenant against today's ``tokens_per_day``."""
        if rules.quotas.tokens_per_day is None or frames <= 0:
            return
        now = self._clock()
        today = _day(now)
        with self._lock, self._engine.begin() as conn:
            row = _load(conn, rules.tenant) or _QuotaState(
                rules.tenant, bucket=float(rules.quotas.requests_per_min or 0),
                bucket_ms=int(now * 1000), day=today,
            )  # fmt: skip
            if row.day != today:
                row.day, row.day_frames = today, 0
            row.day_frames += frames
            _save(conn, row)

    def usage(self, tenant: str) -> QuotaRow | None:
        with Session(self._engine) as session:
            row = session.get(QuotaRow, tenant)
            if row is not None:
                session.expunge(row)
            return row
