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
from urllib.parse import urlsplit

from edge_agent.training.config import TrainingConfig, parse_training
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
    "policy",
    "training",
)
_POLICY_KEYS: Final = (
    "source",
    "path",
    "rev",
    "allowed_signers",
    "poll_s",
    "allow_rollback",
    "mapping_key",
    "mapping_db",
    "mapping_ttl_s",
    "local_upstream",
    "local_model",
)
_LOOPBACK_HOSTS: Final = ("localhost", "127.0.0.1", "::1")


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
class PolicyConfig:
    """``[policy]``: where the data-sovereignty policy comes from (docs/edge.md, docs/policy.md).

    Without this section the edge runs on the config allow-list (``[[apps]] models``).
    """

    source: str  # "git" | "dir"
    path: Path
    mapping_key: Path
    mapping_db: Path
    rev: str = "HEAD"
    allowed_signers: Path | None = None
    poll_s: int = 60  # 0: reload only on SIGHUP
    allow_rollback: bool = False
    mapping_ttl_s: int = 3600
    local_upstream: str = ""  # OpenAI-compatible base URL on loopback, for keep-local
    local_model: str = ""  # model name to ask the local upstream for (default: the same)


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
    policy: PolicyConfig | None = None
    training: TrainingConfig = field(default_factory=TrainingConfig)
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
        state_dir = r.path(doc, "state_dir")
        return cls(
            tenant=tenant,
            listen_host=host,
            listen_port=port,
            state_dir=state_dir,
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
            policy=r.policy(doc["policy"], state_dir) if "policy" in doc else None,
            training=parse_training(doc.get("training", {}), r.fail),
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
            self.keys(item, prefix, ("name", "key_sha256"), ("models",))
            name = item["name"]
            if not isinstance(name, str) or not _APP_NAME.fullmatch(name):
                raise self.fail(prefix + "name", "must be 1-64 characters from [A-Za-z0-9._-]")
            digest = item["key_sha256"]
            if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
                raise self.fail(prefix + "key_sha256", "must be 64 lowercase hex digits")
            apps.append(AppConfig(name, digest, self.strings(item, "models", prefix)))
        self._unique(apps)
        return tuple(apps)

    def policy(self, table: Any, state_dir: Path) -> PolicyConfig:
        self.keys(table, "policy.", ("source", "path"), _POLICY_KEYS)
        source = table["source"]
        if source not in ("git", "dir"):
            raise self.fail("policy.source", f'must be "git" or "dir", got {source!r}')
        signers: Path | None = None
        if source == "git":
            if "allowed_signers" not in table:
                raise self.fail("policy.allowed_signers", 'required when source = "git"')
            signers = self.path(table, "allowed_signers", "policy.")
        else:
            for key in ("allowed_signers", "rev", "allow_rollback"):
                if key in table:
                    raise self.fail("policy." + key, 'only valid with source = "git"')
        rev = table.get("rev", "HEAD")
        if not isinstance(rev, str) or not rev or rev.startswith("-"):
            raise self.fail("policy.rev", "must be a branch, tag or commit (not starting with '-')")
        rollback = table.get("allow_rollback", False)
        if not isinstance(rollback, bool):
            raise self.fail("policy.allow_rollback", "must be true or false")
        upstream = table.get("local_upstream", "")
        if upstream != "":
            upstream = self._loopback_url(upstream)
        local_model = table.get("local_model", "")
        if not isinstance(local_model, str):
            raise self.fail("policy.local_model", "must be a string")
        return PolicyConfig(
            source=source,
            path=self.path(table, "path", "policy."),
            rev=rev,
            allowed_signers=signers,
            poll_s=self.integer(table, "poll_s", 60, 0, 86400),
            allow_rollback=rollback,
            mapping_key=(
                self.path(table, "mapping_key", "policy.")
                if "mapping_key" in table
                else state_dir / "pseudonym-mapping.key"
            ),
            mapping_db=(
                self.path(table, "mapping_db", "policy.")
                if "mapping_db" in table
                else state_dir / "pseudonyms.db"
            ),
            mapping_ttl_s=self.integer(table, "mapping_ttl_s", 3600, 1, 30 * 86400),
            local_upstream=upstream,
            local_model=local_model,
        )

    def _loopback_url(self, value: Any) -> str:
        key = "policy.local_upstream"
        if not isinstance(value, str):
            raise self.fail(key, "must be a URL string")
        try:
            parsed = urlsplit(value)
            host = parsed.hostname or ""
            parsed.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise self.fail(key, f"{value!r} is not a valid URL") from None
        if parsed.scheme not in ("http", "https") or not host:
            raise self.fail(key, f"{value!r} must be an http(s) URL")
        if host not in _LOOPBACK_HOSTS and not host.startswith("127."):
            raise self.fail(
                key,
                f"host {host!r} is not loopback: keep-local requests must stay on this machine",
            )
        return value.rstrip("/")

    def _unique(self, apps: list[AppConfig]) -> None:
        names = [a.name for a in apps]
        digests = [a.key_sha256 for a in apps]
        for i, app in enumerate(apps):
            if app.name in names[:i]:
                raise self.fail(f"apps[{i}].name", f"duplicate app name {app.name!r}")
            if app.key_sha256 in digests[:i]:
                raise self.fail(f"apps[{i}].key_sha256", "two apps share the same API key")
