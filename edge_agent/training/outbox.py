"""The training outbox: sealed chunks waiting for upload, on disk, bounded in bytes.

Store and forward: a job's chunks are sealed (under its job key) and written here before the
upload starts, so an agent that dies (``kill -9``), a broker restart or a network cut loses
nothing: the upload resumes from the enclave's last acknowledged chunk, reading the rest from
here. A chunk file is deleted only after the enclave acknowledged it (authenticated ack).

Each chunk is stored as the serialized ``UploadRequest`` that carries it (job id, then the
sealed chunk, protobuf wire format), so the uploader sends a file as read, in one piece, without
building a message around it.

The outbox holds at most ``max_bytes`` of sealed chunks. Writing a chunk that would pass the
limit raises :class:`OutboxFull` and leaves every stored chunk in place (nothing queued is ever
evicted); the job that hit the limit removes its own partial chunks and fails with a clear
error, and may be retried once space is free.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Final

from edge_agent.training.client import upload_request_prefix
from sovra.v1 import training_pb2

_SUFFIX: Final = ".chunk"
_MESSAGE_START: Final = 0x0A  # an UploadRequest starts with field 1; a bare sealed chunk with 0x86


class OutboxFull(Exception):
    """The outbox byte limit would be exceeded."""

    code = "outbox_full"


class Outbox:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def _dir(self, job_id: str) -> Path:
        return self.root / job_id

    def path(self, job_id: str, index: int) -> Path:
        return self._dir(job_id) / f"{index:010d}{_SUFFIX}"

    def used(self) -> int:
        total = 0
        for entry in self.root.glob(f"*/*{_SUFFIX}"):
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def put(self, job_id: str, index: int, *parts: bytes) -> None:
        """Store one sealed chunk (the concatenation of ``parts``, written without joining
        them) durably, as its upload request; OutboxFull if it does not fit."""
        size = sum(len(part) for part in parts)
        prefix = upload_request_prefix(bytes.fromhex(job_id), size)
        with self._lock:
            used = self.used()
            if used + len(prefix) + size > self.max_bytes:
                raise OutboxFull(
                    f"outbox full: {used} of {self.max_bytes} bytes used, a {size} byte "
                    "chunk does not fit; nothing queued was dropped (free space by finishing or "
                    "cancelling jobs, or raise [training] outbox_max_bytes)"
                )
            directory = self._dir(job_id)
            directory.mkdir(mode=0o700, exist_ok=True)
            final = self.path(job_id, index)
            tmp = final.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                for part in (prefix, *parts):
                    handle.write(part)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)

    def message(self, job_id: str, index: int) -> bytes:
        """The chunk's serialized ``UploadRequest``, as the uploader sends it."""
        data = _read(self.path(job_id, index))
        if data[:1] != bytes([_MESSAGE_START]):  # a bare chunk (spooled by an older version)
            return upload_request_prefix(bytes.fromhex(job_id), len(data)) + data
        return data

    def get(self, job_id: str, index: int) -> bytes:
        """The sealed chunk."""
        data = self.path(job_id, index).read_bytes()
        if data[:1] != bytes([_MESSAGE_START]):
            return data
        return training_pb2.UploadRequest.FromString(data).chunk

    def has(self, job_id: str, index: int) -> bool:
        return self.path(job_id, index).exists()

    def delete_below(self, job_id: str, next_chunk: int) -> None:
        """Drop the chunks the enclave acknowledged (indexes below ``next_chunk``)."""
        directory = self._dir(job_id)
        if not directory.exists():
            return
        for entry in directory.glob(f"*{_SUFFIX}"):
            if int(entry.name[: -len(_SUFFIX)]) < next_chunk:
                entry.unlink(missing_ok=True)

    def delete(self, job_id: str, index: int) -> None:
        self.path(job_id, index).unlink(missing_ok=True)

    def job_bytes(self, job_id: str) -> int:
        return sum(p.stat().st_size for p in self._dir(job_id).glob(f"*{_SUFFIX}"))

    def chunks(self, job_id: str) -> list[int]:
        return sorted(int(p.name[: -len(_SUFFIX)]) for p in self._dir(job_id).glob(f"*{_SUFFIX}"))

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self._dir(job_id), ignore_errors=True)


def _read(path: Path) -> bytes:
    """The whole file in one buffer of exactly its size (no growing or shrinking)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size)
        if len(data) < size:  # a short read: rare on a regular file
            parts = [data]
            while chunk := os.read(fd, size - sum(map(len, parts))):
                parts.append(chunk)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)
