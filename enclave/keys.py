"""The enclave's keys: generated inside the TEE, held in memory only, rotated by epoch.

Each epoch has an HPKE key pair (requests are sealed to it) and an Ed25519 *receipt* key
(training receipts are signed with it, docs/training.md). Attestation evidence binds both public
halves (:func:`attestation.sim.report_data`), so a receipt verifies against evidence alone.
A private key is never written, exported or logged. Epochs count up from 1; a key serves new
requests until the next rotation and stays able to open requests for ``overlap_s`` more, so edges
that sealed just before a rotation are not refused. After ``not_after_ms`` the key is dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from sovra.suites import KeyPair

Clock = Callable[[], float]  # seconds since the epoch, like time.time


@dataclass(frozen=True, eq=False)
class EpochKey:
    """One epoch's HPKE key pair and receipt signing key, with the epoch and lifetime. The
    private halves never leave the enclave."""

    epoch: int
    created_ms: int
    not_after_ms: int
    pair: KeyPair = field(repr=False)
    receipt_key: ed25519.Ed25519PrivateKey = field(
        default_factory=ed25519.Ed25519PrivateKey.generate, repr=False
    )

    @property
    def kem(self) -> str:
        return self.pair.kem

    @property
    def public_bytes(self) -> bytes:
        return self.pair.public_bytes

    @property
    def receipt_public_bytes(self) -> bytes:
        """The receipt key's Ed25519 public key (32 bytes), bound into this epoch's evidence."""
        return self.receipt_key.public_key().public_bytes_raw()

    def __repr__(self) -> str:
        return f"EpochKey(epoch={self.epoch}, kem={self.kem!r}, not_after_ms={self.not_after_ms})"


class KeyRing:
    """All keys this enclave still holds, keyed by epoch. Thread-safe."""

    def __init__(self, kem: str, rotate_s: int, overlap_s: int, clock: Clock) -> None:
        self._kem = kem
        self._rotate_ms = rotate_s * 1000
        self._overlap_ms = overlap_s * 1000
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[int, EpochKey] = {}
        self._last_epoch = 0

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def rotate(self) -> EpochKey:
        """Generate the next epoch's key and drop keys past their ``not_after``."""
        now = self._now_ms()
        pair = KeyPair.generate(self._kem)
        receipt_key = ed25519.Ed25519PrivateKey.generate()
        with self._lock:
            self._last_epoch += 1
            key = EpochKey(
                self._last_epoch, now, now + self._rotate_ms + self._overlap_ms, pair, receipt_key
            )
            self._keys[key.epoch] = key
            self._prune(now)
        return key

    def get(self, epoch: int) -> EpochKey | None:
        """The key of ``epoch`` if still held and not expired, else None."""
        with self._lock:
            self._prune(self._now_ms())
            return self._keys.get(epoch)

    def active(self) -> list[EpochKey]:
        """Every key that may still open requests, oldest first."""
        with self._lock:
            self._prune(self._now_ms())
            return [self._keys[e] for e in sorted(self._keys)]

    def current(self) -> EpochKey:
        with self._lock:
            return self._keys[self._last_epoch]

    def seconds_until_rotation(self) -> float:
        with self._lock:
            created = self._keys[self._last_epoch].created_ms if self._keys else 0
        return max(0.0, (created + self._rotate_ms - self._now_ms()) / 1000)

    def _prune(self, now_ms: int) -> None:
        for epoch in [e for e, k in self._keys.items() if k.not_after_ms <= now_ms]:
            del self._keys[epoch]

    def __repr__(self) -> str:
        with self._lock:
            epochs = sorted(self._keys)
        return f"KeyRing(kem={self._kem!r}, epochs={epochs})"


class KeyRotator:
    """Background thread: a new epoch every ``rotate_s``, then ``on_rotate(new_key)``."""

    def __init__(self, ring: KeyRing, on_rotate: Callable[[EpochKey], None]) -> None:
        self._ring = ring
        self._on_rotate = on_rotate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-enclave-keys", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._ring.seconds_until_rotation()):
            self._on_rotate(self._ring.rotate())
