"""Training jobs held by one enclave: chunk acceptance, the encrypted spool, the training run and
its sealed result.

A job lives in memory for its lifetime (until the edge closes it, or the enclave stops). Chunks
must arrive in order, each exactly once: a chunk index below the next expected one is a
duplicate (refused, ``ALREADY_EXISTS``), above it a reordering or gap (refused,
``OUT_OF_RANGE``); a chunk that does not authenticate under the job's chunk key (tampered,
another job's, another position's) is refused with ``INVALID_ARGUMENT``. Refusing a chunk never
ends the job: the edge asks for the position again and resumes.

Accepted chunks are spooled to a private temporary directory exactly as they arrived (sealed
under the job's chunk key, which exists only in this enclave and the edge), and deleted when the
job closes; training reads them back through the same authenticated decryption. The running
SHA-256 over the plaintext, in order, is the dataset digest the receipt names; it must equal the
digest the edge sealed into the job spec.
"""

from __future__ import annotations

import hashlib
import io
import queue
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave.processor import Refused
from sovra.training import (
    ChunkRejected,
    JobKeys,
    JobSpec,
    MalformedMessage,
    parse_chunk,
)

RECEIVING: Final = "receiving"
TRAINING: Final = "training"
COMPLETED: Final = "completed"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"

#: A sealed chunk as received: bytes, or a view into the upload request that carried it (the
#: enclave reads chunks in place, without copying them out of their message).
Sealed = bytes | memoryview


@dataclass(frozen=True)
class JobContext:
    """Who asked and under which attested identity the job was opened (for the receipt)."""

    tenant: str
    app: str
    policy_id: str
    model: str
    enclave_id: str
    epoch: int
    measurement: str
    tee_type: str
    simulated: bool
    region: str
    key_sha256: str
    # The key epoch's receipt signing key (enclave/keys.py; its public half is bound into the
    # epoch's evidence). Held with the job so a receipt can be signed after the epoch rotated away.
    receipt_key: ed25519.Ed25519PrivateKey | None = field(default=None, repr=False, compare=False)


class Spool:
    """Accepted chunks, still sealed under the job's chunk key (held in memory only): the first
    ``MEMORY_BYTES`` in memory, the rest on disk.

    Disk writes go through a small bounded queue to a writer thread, so an ack does not wait for
    the disk: the spool bounds memory, it adds no durability (the job lives in enclave memory,
    and so does the key that opens the spool). :meth:`flush` waits for every write and reports a
    failed one.
    """

    QUEUE_CHUNKS = 4
    MEMORY_BYTES = 128 * 1024 * 1024

    def __init__(self, root: Path, job_hex: str, keys: JobKeys) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix=f"job-{job_hex[:8]}-", dir=root))
        self._keys = keys
        self._queue: queue.Queue[tuple[int, Sealed] | None] = queue.Queue(self.QUEUE_CHUNKS)
        self._memory: dict[int, Sealed] = {}
        self._memory_bytes = 0
        self._error: str | None = None
        self._writer = threading.Thread(target=self._write_all, name="sim-spool", daemon=True)
        self._writer.start()

    def _write_all(self) -> None:
        while (item := self._queue.get()) is not None:
            index, data = item
            try:
                if self._error is None:
                    (self._dir / f"{index:010d}").write_bytes(data)
            except OSError as exc:
                self._error = f"spool write failed ({exc.strerror or type(exc).__name__})"
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def write(self, index: int, sealed_chunk: Sealed) -> None:
        if self._memory_bytes + len(sealed_chunk) <= self.MEMORY_BYTES:
            self._memory[index] = sealed_chunk
            self._memory_bytes += len(sealed_chunk)
            return
        self._queue.put((index, sealed_chunk))

    def flush(self) -> None:
        self._queue.join()
        if self._error is not None:
            raise OSError(self._error)

    def read(self, index: int) -> bytes:
        sealed = self._memory.get(index)
        if sealed is None:
            sealed = (self._dir / f"{index:010d}").read_bytes()
        found, _final, plaintext = self._keys.open_chunk(sealed)
        if found != index:
            raise ChunkRejected(f"spooled chunk {index} holds chunk {found}")
        return plaintext

    def stream(self, count: int) -> io.BufferedReader:
        """The spooled plaintext of chunks 0..count-1 as one readable byte stream."""
        self.flush()
        return io.BufferedReader(_SpoolReader(self, count), buffer_size=1 << 20)

    def remove(self) -> None:
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout=30)
        self._memory.clear()
        self._memory_bytes = 0
        shutil.rmtree(self._dir, ignore_errors=True)


class _SpoolReader(io.RawIOBase):
    def __init__(self, spool: Spool, count: int) -> None:
        self._spool = spool
        self._count = count
        self._next = 0
        self._buffer = memoryview(b"")  # the rest of the current chunk (a view: no re-copying)

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer and self._next < self._count:
            self._buffer = memoryview(self._spool.read(self._next))
            self._next += 1
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


@dataclass(eq=False)
class Job:
    spec: JobSpec
    keys: JobKeys = field(repr=False)
    context: JobContext
    spool: Spool = field(repr=False)
    state: str = RECEIVING
    next_chunk: int = 0
    received_bytes: int = 0
    opened_ms: int = 0
    started_ms: int = 0
    ended_ms: int = 0
    accepted: Counter[int] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    result_frames: list[bytes] | None = field(default=None, repr=False)
    failure: tuple[str, str] | None = None  # (code, message) when the job failed
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _digest: Any = field(default_factory=hashlib.sha256, repr=False)

    @property
    def job_id(self) -> bytes:
        return self.spec.job_id

    @property
    def complete(self) -> bool:
        return self.state != RECEIVING

    def accept(self, chunk: Sealed, on_complete: Callable[[Job], None]) -> None:
        """Store one chunk; Refused (job unchanged) if it is not the next authentic chunk."""
        with self.lock:
            try:
                self._accept_locked(chunk, on_complete)
            except Refused as exc:
                self.refused[exc.code.name] += 1
                raise

    def _accept_locked(self, chunk: Sealed, on_complete: Callable[[Job], None]) -> None:
        if self.state != RECEIVING:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job is {self.state}; it takes no more chunks",
            )
        try:
            routing = parse_chunk(chunk)
        except MalformedMessage as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed chunk: {exc}") from None
        if routing.job_id != self.job_id:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "chunk belongs to another job")
        try:
            index, final, plaintext = self.keys.open_chunk(routing)
        except ChunkRejected as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if index < self.next_chunk:
            raise Refused(
                grpc.StatusCode.ALREADY_EXISTS,
                f"duplicate chunk {index}: chunks below {self.next_chunk} are already stored",
            )
        if index > self.next_chunk:
            raise Refused(
                grpc.StatusCode.OUT_OF_RANGE,
                f"chunk {index} arrived where chunk {self.next_chunk} was due (reordered or gap)",
            )
        last = index == self.spec.chunks - 1
        if final != last:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk {index} end marker is {final} but the job has {self.spec.chunks} chunks",
            )
        if self.received_bytes + len(plaintext) > self.spec.total_bytes:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "more data than the job spec declares")
        self.spool.write(index, chunk)
        self._digest.update(plaintext)
        self.received_bytes += len(plaintext)
        self.accepted[index] += 1
        self.next_chunk = index + 1
        if final:
            if self.received_bytes != self.spec.total_bytes or (
                self._digest.digest() != self.spec.dataset_sha256
            ):
                # Every chunk authenticated, so only the edge can have caused this.
                self.state = FAILED
                self.failure = ("dataset_mismatch", "the received dataset does not match its spec")
                raise Refused(
                    grpc.StatusCode.DATA_LOSS,
                    "the received dataset does not match the digest in the job spec",
                )
            self.state = TRAINING
            self.started_ms = int(time.time() * 1000)
            on_complete(self)

    @property
    def dataset_sha256(self) -> bytes:
        return self._digest.digest()

    def data(self) -> io.BufferedReader:
        return self.spool.stream(self.next_chunk)


class JobTable:
    """The jobs of one enclave, by job id. Thread-safe; bounded."""

    def __init__(self, max_jobs: int) -> None:
        self._max = max_jobs
        self._lock = threading.Lock()
        self._jobs: dict[bytes, Job] = {}

    def add(self, job: Job) -> Job:
        with self._lock:
            existing = self._jobs.get(job.job_id)
            if existing is not None:
                return existing
            if len(self._jobs) >= self._max:
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"enclave busy: it holds {self._max} training jobs; retry later",
                )
            self._jobs[job.job_id] = job
            return job

    def get(self, job_id: bytes) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"job {job_id.hex()} is not known to this enclave (never opened, closed, or "
                "the enclave restarted)",
            )
        return job

    def remove(self, job_id: bytes) -> Job | None:
        with self._lock:
            return self._jobs.pop(job_id, None)

    def __iter__(self) -> Iterator[Job]:
        with self._lock:
            return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)
