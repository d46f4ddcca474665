"""``[training]`` in the edge config (docs/training.md, "Configuration")."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from sovra.training import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES

COLUMN_ACTIONS: Final = ("keep", "pseudonymise", "drop")
_KEYS: Final = (
    "chunk_bytes",
    "outbox_max_bytes",
    "window",
    "sample_rows",
    "apps",
    "columns",
    "poll_s",
    "max_attempts",
)


@dataclass(frozen=True)
class TrainingConfig:
    """Defaults work without a ``[training]`` table; ``apps`` and ``columns`` matter only when
    the edge has no ``[policy]`` (config-only mode)."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    outbox_max_bytes: int = 8 * 1024**3
    window: int = 8  # sealed chunks in flight before an ack is needed
    sample_rows: int = 1000  # rows the detectors look at, per column
    apps: tuple[str, ...] = ()  # config-only mode: apps allowed purpose "training"
    columns: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    poll_s: float = 1.0  # how often the worker looks for work and polls training jobs
    max_attempts: int = 3  # re-runs of a job whose enclave lost it (restart)


def parse_training(table: Any, fail: Callable[[str, str], Exception]) -> TrainingConfig:
    """Build a :class:`TrainingConfig` from the ``[training]`` TOML table; ``fail(key, message)``
    makes the config error."""
    if not isinstance(table, dict):
        raise fail("training", "must be a table")
    for key in table:
        if key not in _KEYS:
            raise fail(f"training.{key}", f"unknown key (allowed: {', '.join(_KEYS)})")

    def integer(key: str, default: int, low: int, high: int) -> int:
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise fail(f"training.{key}", f"must be an integer from {low} to {high}")
        return value

    apps = table.get("apps", [])
    if not isinstance(apps, list) or not all(isinstance(a, str) and a for a in apps):
        raise fail("training.apps", "must be a list of app names")
    columns = table.get("columns", {})
    if not isinstance(columns, dict):
        raise fail("training.columns", "must be a table of class = action")
    for cls, action in columns.items():
        if action not in COLUMN_ACTIONS:
            raise fail(f"training.columns.{cls}", f"must be one of {', '.join(COLUMN_ACTIONS)}")
    poll = table.get("poll_s", 1.0)
    if not isinstance(poll, int | float) or isinstance(poll, bool) or not 0.05 <= poll <= 60:
        raise fail("training.poll_s", "must be a number from 0.05 to 60")
    return TrainingConfig(
        chunk_bytes=integer("chunk_bytes", DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES),
        outbox_max_bytes=integer("outbox_max_bytes", 8 * 1024**3, 1024 * 1024, 2**50),
        window=integer("window", 8, 1, 64),
        sample_rows=integer("sample_rows", 1000, 10, 1_000_000),
        apps=tuple(apps),
        columns=MappingProxyType(dict(columns)),
        poll_s=float(poll),
        max_attempts=integer("max_attempts", 3, 1, 100),
    )
