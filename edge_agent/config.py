"""Edge agent configuration: one TOML file read into frozen dataclasses (docs/edge.md).

Every key is checked: an unknown key (usually a typo) or a missing required key raises
:class:`ConfigError` naming the key and the file. Relative paths are relative to the file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sovra import suites
from sovra.envelope import MAX_RECIPIENTS
from sovra.pki import Identity
from sovra.tls import TLSFiles

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_TOP_REQUIRED: Final = ("tenant", "listen", "state_dir", "broker", "reference_values", "tls")
_TOP_OPTIONAL: Final = (
    "suite",
    "candidates",
    "request_ttl_s",
    "max_body_bytes",
    "directory_refresh_s",
    "constraints",
    "apps",
)


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid."""


@dataclass(frozen=True)
class AppConfig:
    name: str
    key_sha256: str = field(repr=False)
    models: tuple[str, ...]


@dataclass(frozen=True)
class ConstraintsConfig:
    regions: tuple[str, ...] = ()
    tee_types: tuple[str, ...] = ()
    allow_simulated: bool = False


@dataclass(frozen=True)
class EdgeConfig:
    tenant: str
    listen_host: str
    listen_port: int
    state_dir: Path
    broker: str
    reference_values: Path
    tls: TLSFiles
    suite: str = suites.DEFAULT_SUITE
    candidates: int = 3
    request_ttl_s: int = 120
    max_body_bytes: int = 1024 * 1024
    directory_refresh_s: int = 30
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    apps: tuple[AppConfig, ...] = ()
    source: str = "<memory>"

    @property
    def identity_key_path(self) -> Path:
        return self.state_dir / "identity.key"

    @property
    def audit_path(self) -> Path:
        return self.state_dir / "audit.db"

    @classmethod
    def from_toml(cls, path: Path) -> EdgeConfig:
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        return cls.from_dict(doc, base=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, base: Path, source: str) -> EdgeConfig:
        r = _Reader(source, base)
        r.keys(doc, "", _TOP_REQUIRED, _TOP_OPTIONAL)
        tenant = r.string(doc, "tenant")
        try:
            Identity.edge(tenant)
        except ValueError as exc:
            raise ConfigError(f"{source}: tenant: {exc}") from None
        host, port = r.host_port(doc, "listen", allow_zero=True)
        broker_host, broker_port = r.host_port(doc, "broker", allow_zero=False)
        suite = r.string(doc, "suite", suites.DEFAULT_SUITE)
        if suite not in suites.SUITES:
            raise ConfigError(f"{source}: suite: {suite!r} is not one of {sorted(suites.SUITES)}")
        return cls(
            tenant=tenant,
            listen_host=host,
            listen_port=port,
            state_dir=r.path(doc, "state_dir"),
            broker=f"{broker_host}:{broker_port}",
            reference_values=r.path(doc, "reference_values"),
            tls=r.tls(doc.get("tls")),
            suite=suite,
            candidates=r.integer(doc, "candidates", 3, 1, MAX_RECIPIENTS),
            request_ttl_s=r.integer(doc, "request_ttl_s", 120, 1, 3600),
            max_body_bytes=r.integer(doc, "max_body_bytes", 1024 * 1024, 1, 64 * 1024 * 1024),
            directory_refresh_s=r.integer(doc, "directory_refresh_s", 30, 1, 86400),
            constraints=r.constraints(doc.get("constraints", {})),
            apps=r.apps(doc.get("apps", [])),
            source=source,
        )


class _Reader:
    """Typed access to a parsed TOML document; every error names file and key."""

    def __init__(self, source: str, base: Path) -> None:
        self.source = source
        self.base = base

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")

    def keys(
        self, table: Any, prefix: str, required: tuple[str, ...], optional: tuple[str, ...]
    ) -> None:
        where = prefix.rstrip(".") or "top level"
        if not isinstance(table, dict):
            raise ConfigError(f"{self.source}: {where} must be a table")
        for key in table:
            if key not in required and key not in optional:
                allowed = ", ".join(sorted(required + optional))
                raise self.fail(prefix + key, f"unknown key (allowed in {where}: {allowed})")
        for key in required:
            if key not in table:
                raise self.fail(prefix + key, "missing required key")

    def string(self, table: dict[str, Any], key: str, default: str | None = None) -> str:
        value = table.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(key, "must be a non-empty string")
        return value

    def integer(self, table: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.fail(key, f"must be an integer from {low} to {high}")
        return value

    def strings(self, table: dict[str, Any], key: str, prefix: str = "") -> tuple[str, ...]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(prefix + key, "must be a list of non-empty strings")
        return tuple(value)

    def path(self, table: dict[str, Any], key: str, prefix: str = "") -> Path:
        value = table.get(key)
        if not isinstance(value, str) or not value:
            raise self.fail(prefix + key, "must be a non-empty path string")
        return self.base / Path(value).expanduser()

    def host_port(self, table: dict[str, Any], key: str, *, allow_zero: bool) -> tuple[str, int]:
        value = self.string(table, key)
        host, sep, port_text = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit():
            raise self.fail(key, f"must be HOST:PORT, got {value!r}")
        port = int(port_text)
        if not (0 if allow_zero else 1) <= port <= 65535:
            raise self.fail(key, f"port {port} is out of range")
        return host, port

    def tls(self, table: Any) -> TLSFiles:
        self.keys(table, "tls.", ("cert", "key", "ca"), ())
        return TLSFiles(
            cert=self.path(table, "cert", "tls."),
            key=self.path(table, "key", "tls."),
            ca=self.path(table, "ca", "tls."),
        )

    def constraints(self, table: Any) -> ConstraintsConfig:
        self.keys(table, "constraints.", (), ("regions", "tee_types", "allow_simulated"))
        allow = table.get("allow_simulated", False)
        if not isinstance(allow, bool):
            raise self.fail("constraints.allow_simulated", "must be true or false")
        return ConstraintsConfig(
            regions=self.strings(table, "regions", "constraints."),
            tee_types=self.strings(table, "tee_types", "constraints."),
            allow_simulated=allow,
        )

    def apps(self, items: Any) -> tuple[AppConfig, ...]:
        if not isinstance(items, list):
            raise self.fail("apps", "must be an array of tables ([[apps]])")
        apps: list[AppConfig] = []
        for i, item in enumerate(items):
            prefix = f"apps[{i}]."
            self.keys(item, prefix, ("name", "key_sha256", "models"), ())
            name = item["name"]
            if not isinstance(name, str) or not _APP_NAME.fullmatch(name):
                raise self.fail(prefix + "name", "must be 1-64 characters from [A-Za-z0-9._-]")
            digest = item["key_sha256"]
            if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
                raise self.fail(prefix + "key_sha256", "must be 64 lowercase hex digits")
            apps.append(AppConfig(name, digest, self.strings(item, "models", prefix)))
        self._unique(apps)
        return tuple(apps)

    def _unique(self, apps: list[AppConfig]) -> None:
        names = [a.name for a in apps]
        digests = [a.key_sha256 for a in apps]
        for i, app in enumerate(apps):
            if app.name in names[:i]:
                raise self.fail(f"apps[{i}].name", f"duplicate app name {app.name!r}")
            if app.key_sha256 in digests[:i]:
                raise self.fail(f"apps[{i}].key_sha256", "two apps share the same API key")
