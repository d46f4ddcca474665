"""The policy transform of a dataset, row by row, into the canonical CSV that is uploaded.

Output: UTF-8 CSV (RFC 4180 quoting, ``\\n`` line ends), a header row, then one line per input
row, with the columns in dataset order minus the dropped ones. ``keep`` writes the value as read
(numbers as Python prints them, missing values empty); ``pseudonymise`` writes
``tok_`` + the first 32 hex digits of HMAC-SHA256(dataset key, ``"sovra/v1 pseudonym" 0x00 ‖
column ‖ 0x00 ‖ value``): the same value in the same column gets the same token in every job and
scoring request of the dataset, and the key never leaves the edge. The transform is deterministic,
so the digest of its output can be recomputed at any time to check a receipt.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

_PSEUDONYM_CTX: Final = b"sovra/v1 pseudonym\x00"
PSEUDONYM_PREFIX: Final = "tok_"


def pseudonym(key: bytes, column: str, value: Any) -> str:
    data = _PSEUDONYM_CTX + column.encode() + b"\x00" + str(value).encode()
    return PSEUDONYM_PREFIX + hmac.new(key, data, hashlib.sha256).hexdigest()[:32]


class Transformer:
    """Applies column actions to rows (uploads) and records (scoring)."""

    def __init__(self, columns: Sequence[str], actions: Mapping[str, str], key: bytes) -> None:
        unknown = set(actions) - set(columns)
        if unknown:
            raise ValueError(f"actions name unknown columns {sorted(unknown)}")
        self.columns = list(columns)
        self._actions = {c: actions.get(c, "keep") for c in columns}
        self._key = key
        self.out_columns = [c for c in columns if self._actions[c] != "drop"]
        self._plan: list[tuple[int, str, bool]] = [
            (i, c, self._actions[c] == "pseudonymise")
            for i, c in enumerate(columns)
            if self._actions[c] != "drop"
        ]

    def values(self, row: Sequence[Any]) -> list[Any]:
        out: list[Any] = []
        for index, column, pseudonymise in self._plan:
            value = row[index]
            if value is None or value == "":
                out.append("")
            elif pseudonymise:
                out.append(pseudonym(self._key, column, value))
            else:
                out.append(value)
        return out

    def record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A scoring record as it may leave: dropped columns removed, pseudonymised ones
        tokenised, columns the dataset does not have removed."""
        out: dict[str, Any] = {}
        for _index, column, pseudonymise in self._plan:
            if column not in record:
                continue
            value = record[column]
            if value is None or value == "":
                out[column] = None
            elif pseudonymise:
                out[column] = pseudonym(self._key, column, value)
            else:
                out[column] = value
        return out

    def stream(self, rows: Iterator[Sequence[Any]]) -> Iterator[bytes]:
        """The transformed CSV as byte blocks (each at most a few rows' worth)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.out_columns)
        pending = 0
        for row in rows:
            writer.writerow(self.values(row))
            pending += 1
            if pending >= 256:
                yield buffer.getvalue().encode("utf-8")
                buffer.seek(0)
                buffer.truncate()
                pending = 0
        tail = buffer.getvalue()
        if tail:
            yield tail.encode("utf-8")


class Chunker:
    """Cuts a byte stream into chunks of exactly ``size`` bytes, the last one shorter (but never
    empty unless the whole stream is). The last chunk is only known at the end, so each chunk is
    handed to ``emit(index, final, data)`` one step late."""

    def __init__(self, size: int, emit: Callable[[int, bool, bytes], None]) -> None:
        self._size = size
        self._emit = emit
        self._buffer = bytearray()
        self._held: bytes | None = None
        self.index = 0
        self.total = 0
        self.digest = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self.digest.update(data)
        self.total += len(data)
        self._buffer += data
        while len(self._buffer) >= self._size:
            piece = bytes(self._buffer[: self._size])
            del self._buffer[: self._size]
            self._push(piece)

    def _push(self, piece: bytes) -> None:
        if self._held is not None:
            self._emit(self.index, False, self._held)
            self.index += 1
        self._held = piece

    def close(self) -> int:
        """Emit what is left as the final chunk; returns the number of chunks."""
        if self._buffer:
            self._push(bytes(self._buffer))
            self._buffer.clear()
        if self._held is None:
            self._held = b""
        self._emit(self.index, True, self._held)
        self._held = None
        self.index += 1
        return self.index
