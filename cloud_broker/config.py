"""Broker configuration: one TOML file, read once at start into a frozen :class:`BrokerConfig`.

Relative paths (reference values, TLS files, a relative SQLite database) are resolved against the
directory of the config file, so a config and its files can move together.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from cloud_broker.policy import BrokerPolicy, BrokerPolicyError
from sovra.pki import Identity
from sovra.tls import TLSFiles

Strategy = Literal["least-inflight", "ordered"]
STRATEGIES: Final[tuple[Strategy, ...]] = ("least-inflight", "ordered")

_REQUIRED: Final = frozenset({"listen", "database", "reference_values", "tls"})
_DEFAULTS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "heartbeat_interval_s": 5,
        "evict_after_missed": 3,
        "challenge_ttl_s": 60,
        "strategy": "least-inflight",
        "enclave_call_timeout_s": 120,
        "reappraise_interval_s": 60,
        "ear_signing_key": "",
        "tenants": {},
        "policy": "",
    }
)
EAR_KEY_FILE: Final = "ear-signing-key.pem"
_TLS_KEYS: Final = frozenset({"cert", "key", "ca"})
_TENANT_KEYS: Final = frozenset({"allowed_edge_keys", "regions"})


class ConfigError(Exception):
    """The broker config file is missing, unreadable or invalid; the message names key and file."""


@dataclass(frozen=True)
class TenantPolicy:
    """Broker-side rules for one tenant (the tenant is the name in its edge certificate)."""

    name: str
    allowed_edge_keys: frozenset[bytes] = frozenset()  # empty: any key the tenant's edge signs with
    regions: tuple[str, ...] = ()  # empty: any region

    def allows_edge_key(self, key: bytes) -> bool:
        return not self.allowed_edge_keys or key in self.allowed_edge_keys

    def allows_region(self, region: str) -> bool:
        return not self.regions or region in self.regions


@dataclass(frozen=True)
class BrokerConfig:
    listen: str
    database: str
    reference_values: Path
    tls: TLSFiles
    heartbeat_interval_s: int = 5
    evict_after_missed: int = 3
    challenge_ttl_s: int = 60
    strategy: Strategy = "least-inflight"
    enclave_call_timeout_s: float = 120.0
    tenants: Mapping[str, TenantPolicy] = field(default_factory=lambda: MappingProxyType({}))
    policy: BrokerPolicy | None = None  # broker-side sovereignty rules and quotas (optional)
    source: str = "<memory>"
    reappraise_interval_s: int = 60
    ear_signing_key: Path | None = None  # None: EAR_KEY_FILE in the state dir (see state_dir)

    @property
    def state_dir(self) -> Path:
        """Where the broker keeps files it creates: the SQLite database's directory, or (for
        other databases) the config file's directory."""
        url = make_url(self.database)
        db = url.database
        if url.get_backend_name() == "sqlite" and db and db != ":memory:":
            return Path(db).parent
        return Path(self.source).parent if self.source != "<memory>" else Path.cwd()

    @property
    def ear_signing_key_path(self) -> Path:
        return self.ear_signing_key or self.state_dir / EAR_KEY_FILE

    @property
    def eviction_window_s(self) -> int:
        """An enclave silent for longer than this is evicted."""
        return self.heartbeat_interval_s * self.evict_after_missed

    @classmethod
    def from_toml(cls, path: Path) -> BrokerConfig:
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        return cls.from_document(doc, base=path.parent, source=str(path))

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], *, base: Path, source: str) -> BrokerConfig:
        _check_keys(doc, _REQUIRED, _REQUIRED | set(_DEFAULTS), "", source)
        values = {**_DEFAULTS, **doc}
        return cls(
            listen=_listen(values["listen"], source),
            database=_database(values["database"], base, source),
            reference_values=_path(values["reference_values"], base, "reference_values", source),
            tls=_tls(values["tls"], base, source),
            heartbeat_interval_s=_positive_int(values, "heartbeat_interval_s", source),
            evict_after_missed=_positive_int(values, "evict_after_missed", source),
            challenge_ttl_s=_positive_int(values, "challenge_ttl_s", source),
            strategy=_strategy(values["strategy"], source),
            enclave_call_timeout_s=_positive_number(values, "enclave_call_timeout_s", source),
            tenants=_tenants(values["tenants"], source),
            policy=_broker_policy(values["policy"], base, source),
            source=source,
            reappraise_interval_s=_positive_int(values, "reappraise_interval_s", source),
            ear_signing_key=(
                _path(values["ear_signing_key"], base, "ear_signing_key", source)
                if values["ear_signing_key"] != ""
                else None
            ),
        )


def _broker_policy(value: Any, base: Path, source: str) -> BrokerPolicy | None:
    if value == "":
        return None
    try:
        return BrokerPolicy.load(_path(value, base, "policy", source))
    except BrokerPolicyError as exc:
        raise _error(source, "policy", str(exc)) from None


def _error(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {message}")


def _check_keys(
    table: Any,
    required: frozenset[str],
    allowed: frozenset[str] | set[str],
    prefix: str,
    source: str,
) -> None:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(table, Mapping):
        raise _error(source, where, "must be a table")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise _error(
            source, prefix + unknown[0], f"unknown key; allowed here: {', '.join(sorted(allowed))}"
        )
    missing = sorted(required - set(table))
    if missing:
        raise _error(source, prefix + missing[0], "missing required key")


def _string(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise _error(source, key, "must be a non-empty string")
    return value


def _listen(value: Any, source: str) -> str:
    text = _string(value, "listen", source)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise _error(source, "listen", f"{text!r} is not host:port (port 0 picks a free port)")
    return text


def _path(value: Any, base: Path, key: str, source: str) -> Path:
    path = Path(_string(value, key, source))
    return path if path.is_absolute() else base / path


def _database(value: Any, base: Path, source: str) -> str:
    text = _string(value, "database", source)
    try:
        url = make_url(text)
    except ArgumentError:
        raise _error(source, "database", f"{text!r} is not a SQLAlchemy database URL") from None
    db = url.database
    if (
        url.get_backend_name() == "sqlite"
        and db
        and db != ":memory:"
        and not Path(db).is_absolute()
    ):
        # Like every other relative path in this file: relative to the config, not the cwd.
        return url.set(database=str(base / db)).render_as_string(hide_password=False)
    return text


def _tls(value: Any, base: Path, source: str) -> TLSFiles:
    _check_keys(value, _TLS_KEYS, _TLS_KEYS, "tls.", source)
    return TLSFiles(
        cert=_path(value["cert"], base, "tls.cert", source),
        key=_path(value["key"], base, "tls.key", source),
        ca=_path(value["ca"], base, "tls.ca", source),
    )


def _positive_int(values: Mapping[str, Any], key: str, source: str) -> int:
    value = values[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _error(source, key, f"must be a positive integer, got {value!r}")
    return value


def _positive_number(values: Mapping[str, Any], key: str, source: str) -> float:
    value = values[key]
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise _error(source, key, f"must be a positive number, got {value!r}")
    return float(value)


def _strategy(value: Any, source: str) -> Strategy:
    for strategy in STRATEGIES:
        if value == strategy:
            return strategy
    raise _error(source, "strategy", f"{value!r} is not one of {', '.join(STRATEGIES)}")


def _tenants(value: Any, source: str) -> Mapping[str, TenantPolicy]:
    if not isinstance(value, Mapping):
        raise _error(source, "tenants", "must be a table of [tenants.<name>] tables")
    return MappingProxyType({name: _tenant(name, table, source) for name, table in value.items()})


def _tenant(name: str, table: Any, source: str) -> TenantPolicy:
    prefix = f"tenants.{name}."
    try:
        Identity.edge(name)
    except ValueError as exc:
        raise _error(source, prefix.rstrip("."), str(exc)) from None
    _check_keys(table, frozenset(), _TENANT_KEYS, prefix, source)
    keys = _string_list(table.get("allowed_edge_keys", []), prefix + "allowed_edge_keys", source)
    regions = _string_list(table.get("regions", []), prefix + "regions", source)
    return TenantPolicy(
        name=name,
        allowed_edge_keys=frozenset(
            _edge_key(k, prefix + "allowed_edge_keys", source) for k in keys
        ),
        regions=tuple(regions),
    )


def _string_list(value: Any, key: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _error(source, key, "must be a list of non-empty strings")
    return value


def _edge_key(text: str, key: str, source: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise _error(source, key, f"{text[:16]!r}... is not a 64-hex-digit Ed25519 public key")
    return raw
