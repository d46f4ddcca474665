"""Local datasets: reading CSV, JSON Lines and Parquet files row by row, and registering them.

Registration records what the edge needs to decide and transform later: the schema (column
names and inferred types), the row count, the SHA-256 of the file, and each column's classes:
the classes declared for it (``--labels col=class``) plus what the detectors find in a sample of
its values (the policy's detectors when a policy is configured, else the built-in ones). The
file is never copied: jobs re-read it and refuse to run if its digest changed.

Readers stream: memory use does not grow with the file. JSON Lines rows are objects; the columns
are the keys seen in the first ``sample_rows`` rows (keys first seen later are not part of the
schema, and are never sent).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

FORMATS: Final = ("csv", "jsonl", "parquet")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BLOCK: Final = 1 << 20
PARQUET_BATCH: Final = 4096


class DatasetError(Exception):
    """The dataset cannot be registered or read; the message says why (never quotes values)."""


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise DatasetError(
            f"dataset name {name[:70]!r} must be 1-64 characters from [A-Za-z0-9._-]"
        )
    return name


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DatasetError(f"{path.name}: unknown format (use .csv, .jsonl or .parquet)")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


class _HashingReader(io.RawIOBase):
    """A binary reader that hashes every byte read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hash.update(data)
        return n


@dataclass
class RowSource:
    """An open dataset: ``columns`` and an iterator of rows (lists aligned with columns)."""

    columns: list[str]
    rows: Iterator[list[Any]]
    digest: Callable[[], str]  # SHA-256 of the file bytes read so far (all of them at the end)
    close: Callable[[], None]

    def __enter__(self) -> RowSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_rows(
    path: Path, fmt: str, *, schema: Sequence[str] | None = None, sample_rows: int = 1000
) -> RowSource:
    """Stream the rows of ``path``; ``schema`` fixes the columns (JSON Lines: else inferred)."""
    try:
        if fmt == "csv":
            return _csv_rows(path)
        if fmt == "jsonl":
            return _jsonl_rows(path, schema, sample_rows)
        if fmt == "parquet":
            return _parquet_rows(path)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    raise DatasetError(f"unknown dataset format {fmt!r}")


def _csv_rows(path: Path) -> RowSource:
    raw = path.open("rb")
    hashing = _HashingReader(raw)
    text = io.TextIOWrapper(io.BufferedReader(hashing, _BLOCK), encoding="utf-8-sig", newline="")
    dialect: Any = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    reader = csv.reader(text, dialect=dialect)
    try:
        header = next(reader)
    except StopIteration:
        raw.close()
        raise DatasetError(f"{path.name}: empty CSV file (no header row)") from None
    except (UnicodeDecodeError, csv.Error):
        raw.close()
        raise DatasetError(f"{path.name}: not a UTF-8 CSV file") from None
    _check_columns(path, header)

    def rows() -> Iterator[list[Any]]:
        width = len(header)
        try:
            for number, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != width:
                    raise DatasetError(
                        f"{path.name}: line {number} has {len(row)} fields, the header {width}"
                    )
                yield [None if v == "" else v for v in row]
        except (UnicodeDecodeError, csv.Error):
            raise DatasetError(f"{path.name}: not a valid UTF-8 CSV file") from None

    def digest() -> str:
        while hashing.read(_BLOCK):  # hash what the CSV reader did not need
            pass
        return hashing.hash.hexdigest()

    return RowSource(header, rows(), digest, raw.close)


def _jsonl_rows(path: Path, schema: Sequence[str] | None, sample_rows: int) -> RowSource:
    if schema is None:
        schema = _jsonl_schema(path, sample_rows)
    columns = list(schema)
    raw = path.open("rb")
    hashing = _HashingReader(raw)
    buffered = io.BufferedReader(hashing, _BLOCK)

    def rows() -> Iterator[list[Any]]:
        for number, line in enumerate(buffered, start=1):
            if not line.strip():
                continue
            obj = _json_object(path, number, line)
            yield [_scalar(obj.get(c)) for c in columns]

    def digest() -> str:
        while hashing.read(_BLOCK):
            pass
        return hashing.hash.hexdigest()

    return RowSource(columns, rows(), digest, raw.close)


def _jsonl_schema(path: Path, sample_rows: int) -> list[str]:
    columns: dict[str, None] = {}
    seen = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            columns.update(dict.fromkeys(_json_object(path, number, line)))
            seen += 1
            if seen >= sample_rows:
                break
    if not columns:
        raise DatasetError(f"{path.name}: no JSON objects found")
    names = list(columns)
    _check_columns(path, names)
    return names


def _json_object(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        raise DatasetError(f"{path.name}: line {number} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path.name}: line {number} is not a JSON object")
    return obj


def _scalar(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return value


def _parquet_rows(path: Path) -> RowSource:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError("Parquet needs pyarrow: pip install 'sovra[train]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception:
        raise DatasetError(f"{path.name}: not a readable Parquet file") from None
    columns = list(parquet.schema_arrow.names)
    _check_columns(path, columns)

    def rows() -> Iterator[list[Any]]:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH):
            data = batch.to_pydict()
            lists = [data[c] for c in columns]
            for i in range(batch.num_rows):
                yield [_scalar(col[i]) for col in lists]

    return RowSource(columns, rows(), lambda: file_sha256(path), parquet.close)


def _check_columns(path: Path, columns: Sequence[str]) -> None:
    if not columns or any(not isinstance(c, str) or not c.strip() for c in columns):
        raise DatasetError(f"{path.name}: every column needs a non-empty name")
    if len(set(columns)) != len(columns):
        raise DatasetError(f"{path.name}: duplicate column names")


# -- inspection ------------------------------------------------------------------------------


def infer_type(values: Sequence[Any]) -> str:
    """``integer``, ``number``, ``boolean``, ``string`` or ``empty`` for a column sample."""
    kinds = set()
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool):
            kinds.add("boolean")
        elif isinstance(value, int):
            kinds.add("integer")
        elif isinstance(value, float):
            kinds.add("number")
        else:
            text = str(value).strip()
            if re.fullmatch(r"[+-]?\d+", text):
                kinds.add("integer")
            elif _is_float(text):
                kinds.add("number")
            elif text.lower() in ("true", "false"):
                kinds.add("boolean")
            else:
                kinds.add("string")
    if not kinds:
        return "empty"
    if kinds <= {"integer"}:
        return "integer"
    if kinds <= {"integer", "number"}:
        return "number"
    if kinds == {"boolean"}:
        return "boolean"
    return "string"


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.lower() not in ("nan", "inf", "-inf", "infinity", "+inf")


Classifier = Callable[[str], tuple[dict[str, int], list[str]]]
"""Detect over one column's sample text: ({entity type: count}, classes found)."""


@dataclass(frozen=True)
class Inspection:
    format: str
    size: int
    sha256: str
    rows: int
    columns: list[dict[str, Any]]


def inspect(
    path: Path,
    fmt: str,
    *,
    labels: Mapping[str, Sequence[str]],
    classify: Classifier,
    sample_rows: int,
) -> Inspection:
    """One streaming pass: row count, digest, per-column type and detections over a sample."""
    samples: list[list[Any]] = []
    count = 0
    with open_rows(path, fmt, sample_rows=sample_rows) as source:
        columns = source.columns
        unknown = sorted(set(labels) - set(columns))
        if unknown:
            raise DatasetError(f"--labels names columns the dataset does not have: {unknown}")
        samples = [[] for _ in columns]
        for row in source.rows:
            if count < sample_rows:
                for i, value in enumerate(row):
                    samples[i].append(value)
            count += 1
        digest = source.digest()
    described = []
    for i, name in enumerate(columns):
        text = "\n".join(str(v) for v in samples[i] if v is not None)
        detected, detected_classes = classify(text) if text else ({}, [])
        described.append(
            {
                "name": name,
                "type": infer_type(samples[i]),
                "declared": list(labels.get(name, ())),
                "detected": detected,
                "detected_classes": detected_classes,
            }
        )
    return Inspection(fmt, os.path.getsize(path), digest, count, described)


def sample_columns(path: Path, fmt: str, columns: Sequence[str], sample_rows: int) -> list[str]:
    """Each column's sample values joined by newlines (what detectors look at)."""
    samples: list[list[str]] = [[] for _ in columns]
    with open_rows(path, fmt, schema=columns, sample_rows=sample_rows) as source:
        if list(source.columns) != list(columns):
            raise DatasetError("the dataset's columns changed since it was registered")
        for n, row in enumerate(source.rows):
            if n >= sample_rows:
                break
            for i, value in enumerate(row):
                if value is not None:
                    samples[i].append(str(value))
    return ["\n".join(s) for s in samples]


def parse_labels(text: str | None, classes: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``col=class,col2=class`` → {col: [class, ...]}; ValueError on a bad item."""
    out: dict[str, list[str]] = {}
    if not text:
        return out
    for item in text.split(","):
        column, sep, cls = item.strip().partition("=")
        column, cls = column.strip(), cls.strip()
        if not sep or not column or not cls:
            raise DatasetError(f"--labels item {item.strip()[:60]!r} is not column=class")
        if classes is not None and cls not in classes:
            defined = ", ".join(classes)
            raise DatasetError(
                f"--labels class {cls!r} is not defined by the policy (classes: {defined})"
            )
        out.setdefault(column, [])
        if cls not in out[column]:
            out[column].append(cls)
    return out
