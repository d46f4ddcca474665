"""Pseudonymisation: typed placeholders, restoring them in replies (also streamed), and an
encrypted, expiring store for the mappings.

* :class:`Pseudonymiser` replaces detected values with typed placeholders (``<CN_RESIDENT_ID_1>``,
  ``<MRN_2>``).  One instance serves one conversation: the same value always gets the same
  placeholder, so the model can refer to "<MRN_1>" across turns.  The mapping lives only in the
  instance's memory; neither ``repr`` nor any exception message shows it.
* :class:`StreamRestorer` restores placeholders in a streamed reply whose chunks may split a
  placeholder anywhere (``"<CN_RES"`` + ``"IDENT_ID_1>"``): it holds back a possible placeholder
  prefix until the next chunk decides it, never more than the longest placeholder.
* :class:`MappingStore` keeps mappings at rest (SQLite) sealed with AES-256-GCM under a key read
  from a key file, with an expiry per conversation.  Conversation ids are stored as keyed hashes.

Placeholders that are not in the mapping (a model inventing ``<EMAIL_7>``) are left as they are.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "PLACEHOLDER_PATTERN",
    "MappingStore",
    "MappingStoreError",
    "Pseudonymiser",
    "PseudonymiserFull",
    "StreamRestorer",
]

#: ``<TYPE_n>``: an entity type (upper case, digits, underscores) and a 1-based counter.
PLACEHOLDER_PATTERN = re.compile(r"<([A-Z][A-Z0-9_]{0,63})_([1-9][0-9]{0,8})>")
_ENTITY_TYPE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# What the tail of a chunk looks like when it may still become a placeholder.
_PARTIAL = re.compile(r"<[A-Z0-9_]*\Z")


class _Span(Protocol):
    """What :meth:`Pseudonymiser.pseudonymise` needs of a finding (``sovra.detectors.Finding``)."""

    @property
    def entity_type(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def value(self) -> str: ...


class PseudonymiserFull(RuntimeError):
    """The conversation's mapping reached its size limit."""


class Pseudonymiser:
    """Replaces values with typed placeholders and restores them; one instance per conversation.

    Not thread-safe: a conversation is handled by one request at a time.
    """

    def __init__(self, *, max_entries: int = 1_000_000) -> None:
        self._max_entries = max_entries
        self._by_value: dict[tuple[str, str], str] = {}
        self._by_placeholder: dict[str, str] = {}
        self._counters: dict[str, int] = {}
        self._max_len = 0

    def __repr__(self) -> str:
        return f"Pseudonymiser(entries={len(self._by_placeholder)})"

    def __len__(self) -> int:
        return len(self._by_placeholder)

    @property
    def max_placeholder_length(self) -> int:
        return self._max_len

    def placeholder_for(self, entity_type: str, value: str) -> str:
        """The placeholder for ``value`` (allocating the next one for its type if new)."""
        key = (entity_type, value)
        found = self._by_value.get(key)
        if found is not None:
            return found
        if not _ENTITY_TYPE.fullmatch(entity_type):
            raise ValueError("entity type must match [A-Z][A-Z0-9_]{0,63}")
        if len(self._by_placeholder) >= self._max_entries:
            raise PseudonymiserFull(f"mapping holds {self._max_entries} entries (the limit)")
        number = self._counters.get(entity_type, 0) + 1
        self._counters[entity_type] = number
        placeholder = f"<{entity_type}_{number}>"
        self._by_value[key] = placeholder
        self._by_placeholder[placeholder] = value
        self._max_len = max(self._max_len, len(placeholder))
        return placeholder

    def pseudonymise(self, text: str, findings: Iterable[_Span]) -> str:
        """``text`` with every finding's span replaced by its placeholder.

        Findings must lie inside ``text``, not overlap, and ``text[start:end]`` must equal their
        value (as :func:`sovra.detectors.detect` returns them); otherwise ``ValueError``.
        """
        ordered = sorted(findings, key=lambda f: (f.start, f.end))
        if not ordered:
            return text
        pieces: list[str] = []
        position = 0
        for index, finding in enumerate(ordered):
            start, end = finding.start, finding.end
            if not 0 <= start < end <= len(text) or start < position:
                raise ValueError(f"finding #{index} lies outside the text or overlaps another")
            if text[start:end] != finding.value:
                raise ValueError(f"finding #{index} does not match the text at its offsets")
            pieces.append(text[position:start])
            pieces.append(self.placeholder_for(finding.entity_type, finding.value))
            position = end
        pieces.append(text[position:])
        return "".join(pieces)

    def restore(self, text: str) -> str:
        """``text`` with every known placeholder replaced by its original value."""
        if not self._by_placeholder or "<" not in text:
            return text
        lookup = self._by_placeholder

        def swap(match: re.Match[str]) -> str:
            return lookup.get(match.group(0), match.group(0))

        return PLACEHOLDER_PATTERN.sub(swap, text)

    def stream(self) -> StreamRestorer:
        """A restorer for one streamed reply."""
        return StreamRestorer(self)

    def restore_stream(self, chunks: Iterable[str]) -> Iterator[str]:
        """Restore a stream of chunks; yields restored text (empty chunks are skipped)."""
        restorer = self.stream()
        for chunk in chunks:
            out = restorer.feed(chunk)
            if out:
                yield out
        tail = restorer.close()
        if tail:
            yield tail

    # -- serialisation (sensitive: MappingStore encrypts it) ----------------------------------

    def export_mapping(self) -> bytes:
        """The mapping as JSON bytes.  Sensitive: only ever store it encrypted."""
        entries = [[t, v, p] for (t, v), p in self._by_value.items()]
        return json.dumps(
            {"v": 1, "counters": self._counters, "entries": entries},
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8")

    @classmethod
    def import_mapping(cls, data: bytes, *, max_entries: int = 1_000_000) -> Pseudonymiser:
        """Rebuild a pseudonymiser from :meth:`export_mapping` output."""
        try:
            doc = json.loads(data.decode("utf-8"))
            if doc.get("v") != 1:
                raise ValueError
            out = cls(max_entries=max_entries)
            for entity_type, value, placeholder in doc["entries"]:
                if not all(isinstance(x, str) for x in (entity_type, value, placeholder)):
                    raise ValueError
                match = PLACEHOLDER_PATTERN.fullmatch(placeholder)
                if match is None or match.group(1) != entity_type:
                    raise ValueError
                out._by_value[(entity_type, value)] = placeholder
                out._by_placeholder[placeholder] = value
                out._max_len = max(out._max_len, len(placeholder))
            for entity_type, count in doc["counters"].items():
                if not isinstance(count, int) or not _ENTITY_TYPE.fullmatch(entity_type):
                    raise ValueError
                out._counters[entity_type] = count
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise ValueError("not a pseudonym mapping export") from None
        return out


class StreamRestorer:
    """Restores placeholders in a reply that arrives in chunks.

    ``feed(chunk)`` returns the text that is certain; a trailing ``"<"`` + upper-case/digit/
    underscore run that could still become a known placeholder is held back (at most the
    longest placeholder's length).  ``close()`` returns whatever is left.
    """

    def __init__(self, pseudonymiser: Pseudonymiser) -> None:
        self._p = pseudonymiser
        self._pending = ""
        self._closed = False

    def feed(self, chunk: str) -> str:
        if self._closed:
            raise ValueError("stream already closed")
        buffer = self._pending + chunk if self._pending else chunk
        cut = self._hold_from(buffer)
        self._pending = buffer[cut:]
        return self._p.restore(buffer[:cut])

    def close(self) -> str:
        self._closed = True
        rest, self._pending = self._pending, ""
        return self._p.restore(rest)

    def _hold_from(self, buffer: str) -> int:
        limit = self._p.max_placeholder_length
        start = buffer.rfind("<", max(0, len(buffer) - limit))
        if start < 0 or _PARTIAL.match(buffer, start) is None:
            return len(buffer)
        return start


# --- mappings at rest -------------------------------------------------------------------------


class MappingStoreError(Exception):
    """The mapping store cannot be used (bad key file, tampered row, ...)."""


_KEY_BYTES = 32
_AAD_PREFIX = b"sovra/policy/mapping/v1\0"


def _read_key(key_file: Path) -> bytes:
    try:
        info = key_file.stat()
        if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise MappingStoreError(
                f"key file {key_file} is accessible by group or others (chmod 600 it)"
            )
        data = key_file.read_bytes()
    except OSError as exc:
        raise MappingStoreError(f"cannot read key file {key_file}: {exc.strerror}") from None
    if len(data) != _KEY_BYTES:
        raise MappingStoreError(f"key file {key_file} must hold exactly {_KEY_BYTES} bytes")
    return data


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(key)


class MappingStore:
    """Pseudonym mappings at rest: SQLite rows sealed with AES-256-GCM, each with an expiry.

    The row id is an HMAC of the conversation id, the associated data binds the ciphertext to
    that row id and its expiry (so rows cannot be swapped or have their expiry extended), and
    expired rows are never returned (and are deleted when seen or by :meth:`purge_expired`).
    ``clock`` returns seconds since the epoch (injectable for tests).
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        key = _read_key(Path(key_file))
        self._aead = AESGCM(_derive(key, b"sovra policy mapping encryption v1"))
        self._id_key = _derive(key, b"sovra policy mapping row id v1")
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(os.fspath(db_path), check_same_thread=False)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS mappings ("
                " row_id TEXT PRIMARY KEY, expires_ms INTEGER NOT NULL,"
                " nonce BLOB NOT NULL, sealed BLOB NOT NULL)"
            )
            self._db.commit()
        except sqlite3.Error as exc:
            raise MappingStoreError(f"cannot open mapping database: {exc}") from None

    @staticmethod
    def generate_key(key_file: str | os.PathLike[str]) -> None:
        """Create a new random key file (mode 0600); refuses to overwrite an existing one."""
        path = Path(key_file)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise MappingStoreError(f"key file {path} already exists") from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(_KEY_BYTES))

    def __enter__(self) -> MappingStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row_id(self, conversation_id: str) -> str:
        return hmac.new(self._id_key, conversation_id.encode("utf-8"), hashlib.sha256).hexdigest()

    @staticmethod
    def _aad(row_id: str, expires_ms: int) -> bytes:
        return _AAD_PREFIX + row_id.encode() + b"\0" + str(expires_ms).encode()

    def put(self, conversation_id: str, pseudonymiser: Pseudonymiser, ttl_s: float) -> float:
        """Store (replace) the conversation's mapping for ``ttl_s`` seconds; returns the expiry."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        now = self._clock()
        expires_ms = int((now + ttl_s) * 1000)
        row_id = self._row_id(conversation_id)
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(
            nonce, pseudonymiser.export_mapping(), self._aad(row_id, expires_ms)
        )
        with self._lock:
            self._db.execute("DELETE FROM mappings WHERE expires_ms <= ?", (int(now * 1000),))
            self._db.execute(
                "INSERT OR REPLACE INTO mappings (row_id, expires_ms, nonce, sealed)"
                " VALUES (?, ?, ?, ?)",
                (row_id, expires_ms, nonce, sealed),
            )
            self._db.commit()
        return expires_ms / 1000

    def get(self, conversation_id: str) -> Pseudonymiser | None:
        """The stored mapping, or ``None`` when absent or expired."""
        row_id = self._row_id(conversation_id)
        with self._lock:
            row = self._db.execute(
                "SELECT expires_ms, nonce, sealed FROM mappings WHERE row_id = ?", (row_id,)
            ).fetchone()
            if row is None:
                return None
            expires_ms, nonce, sealed = row
            if expires_ms <= int(self._clock() * 1000):
                self._db.execute("DELETE FROM mappings WHERE row_id = ?", (row_id,))
                self._db.commit()
                return None
        try:
            plain = self._aead.decrypt(nonce, sealed, self._aad(row_id, expires_ms))
        except InvalidTag:
            raise MappingStoreError(
                "stored mapping failed authentication (wrong key or tampered row)"
            ) from None
        return Pseudonymiser.import_mapping(plain)

    def delete(self, conversation_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM mappings WHERE row_id = ?", (self._row_id(conversation_id),)
            )
            self._db.commit()
            return cursor.rowcount > 0

    def purge_expired(self) -> int:
        """Delete expired rows; returns how many."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM mappings WHERE expires_ms <= ?", (int(self._clock() * 1000),)
            )
            self._db.commit()
            return cursor.rowcount

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM mappings").fetchone()
            return int(count)
