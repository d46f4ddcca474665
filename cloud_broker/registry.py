"""Enclave admission by attestation: challenges, registration, heartbeats, eviction, directory.

The broker admits an enclave only if every key it offers is bound by genuine evidence to a
challenge nonce this broker issued, and the broker's reference values accept what the evidence
reports. Edges re-verify everything themselves; admission keeps unattested machines out of the
directory and out of dispatch, it is not something an edge has to trust.

Every admitted key gets an EAR (signed ES256 with the broker's verifier key) at admission and at
every re-appraisal. :meth:`Registry.reappraise` re-verifies the stored evidence of every admitted
enclave against the CURRENT reference values (the file is re-read when it changed), so a
revocation evicts within one ``reappraise_interval_s``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine

from attestation import ear
from attestation.errors import AttestationError, EvidenceStale
from attestation.reference_values import ReferenceValues, ReferenceValuesFile
from attestation.verifier import AttestationResult, OfferedKey, verify_key
from cloud_broker import db
from cloud_broker.config import TenantPolicy
from cloud_broker.errors import BrokerError
from sovra import suites

log = logging.getLogger(__name__)

Clock = Callable[[], float]  # seconds since the epoch, like time.time

NONCE_BYTES: Final = 32
MAX_OUTSTANDING_CHALLENGES: Final = 10_000
MAX_KEYS: Final = 8
MAX_MODELS: Final = 128
MAX_TEXT: Final = 255
MAX_EVIDENCE_BYTES: Final = 64 * 1024


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    expires_at_ms: int


@dataclass(frozen=True)
class Announcement:
    """What an enclave says about itself when it registers; nothing here is trusted yet."""

    enclave_id: str
    address: str
    region: str
    tee_type: str
    simulated: bool
    models: tuple[str, ...]
    keys: tuple[OfferedKey, ...]


class ChallengeBook:
    """Outstanding challenge nonces, in memory: single use, expiring, bound to the enclave asked."""

    def __init__(self, ttl_s: int, clock: Clock) -> None:
        self._ttl_ms = ttl_s * 1000
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[bytes, tuple[str, int]] = {}

    def issue(self, enclave_id: str) -> Challenge:
        now = _ms(self._clock())
        with self._lock:
            self._purge(now)
            if len(self._open) >= MAX_OUTSTANDING_CHALLENGES:
                raise BrokerError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "too many outstanding challenges; retry"
                )
            challenge = Challenge(os.urandom(NONCE_BYTES), now + self._ttl_ms)
            self._open[challenge.nonce] = (enclave_id, challenge.expires_at_ms)
        return challenge

    def redeem(self, enclave_id: str, nonce: bytes) -> None:
        """Consume ``nonce``; FAILED_PRECONDITION unless it is outstanding for ``enclave_id``."""
        now = _ms(self._clock())
        with self._lock:
            entry = self._open.get(nonce)
            # Another enclave's nonce stays outstanding for its owner; only the owner uses it up.
            if entry is not None and entry[0] == enclave_id:
                del self._open[nonce]
        if entry is None or entry[0] != enclave_id or entry[1] <= now:
            raise BrokerError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "unknown or expired challenge; call Challenge again",
            )

    def _purge(self, now_ms: int) -> None:
        for nonce in [n for n, (_, exp) in self._open.items() if exp <= now_ms]:
            del self._open[nonce]


class Registry:
    """Admission decisions and the enclave directory, backed by the metadata database."""

    def __init__(
        self,
        engine: Engine,
        reference_values: ReferenceValues | ReferenceValuesFile,
        *,
        heartbeat_interval_s: int,
        evict_after_missed: int,
        challenge_ttl_s: int,
        clock: Clock = time.time,
        ear_signing_key: ec.EllipticCurvePrivateKey | None = None,
        reappraise_interval_s: int = 60,
    ) -> None:
        self.engine = engine
        self.heartbeat_interval_s = heartbeat_interval_s
        self.reappraise_interval_s = reappraise_interval_s
        self._rv = reference_values
        self._window_ms = heartbeat_interval_s * evict_after_missed * 1000
        self._clock = clock
        self._challenges = ChallengeBook(challenge_ttl_s, clock)
        self._ear_key = ear_signing_key or ec.generate_private_key(ec.SECP256R1())
        self._write_lock = threading.Lock()  # one writer at a time: SQLite would serialise anyway
        self._reappraise_lock = threading.Lock()  # one re-appraisal pass at a time

    def now_ms(self) -> int:
        return _ms(self._clock())

    @property
    def reference_values(self) -> ReferenceValues:
        """The reference values in effect (the last good version of the file)."""
        rv = self._rv
        return rv.values if isinstance(rv, ReferenceValuesFile) else rv

    @property
    def ear_verifier_key_pem(self) -> str:
        """The public half of the EAR signing key, as published to edges."""
        return ear.public_key_pem(self._ear_key)

    def challenge(self, enclave_id: str) -> Challenge:
        return self._challenges.issue(enclave_id)

    def register(self, caller: str, announcement: Announcement, nonce: bytes) -> None:
        try:
            self._admit(caller, announcement, nonce)
        except BrokerError as exc:
            log.info("refused enclave=%s status=%s reason=%s", caller, exc.code.name, exc.message)
            raise

    def _admit(self, caller: str, announcement: Announcement, nonce: bytes) -> None:
        if announcement.enclave_id != caller:
            raise BrokerError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"descriptor names enclave {announcement.enclave_id!r} but the client "
                f"certificate is enclave {caller!r}",
            )
        _check_announcement(announcement)
        self._challenges.redeem(caller, nonce)
        a = announcement
        results = self._appraise_all(a.keys, nonce, a.region, a.tee_type, a.simulated)
        if len({r.measurement for r in results}) != 1:
            raise BrokerError(
                grpc.StatusCode.PERMISSION_DENIED, "keys carry evidence of different measurements"
            )
        record = db.EnclaveRecord(
            enclave_id=caller, address=a.address, region=a.region, tee_type=a.tee_type,
            simulated=a.simulated, models=a.models, measurement=results[0].measurement,
            attestation_status=results[0].status, now_ms=results[0].verified_at_ms,
        )  # fmt: skip
        with self._write_lock:
            db.admit_enclave(self.engine, record, self._key_records(a.keys, results, nonce))
        log.info(
            "admitted enclave=%s region=%s tee=%s simulated=%s epochs=%s models=%s address=%s",
            caller, a.region, a.tee_type, a.simulated, [k.epoch for k in a.keys], list(a.models),
            a.address,
        )  # fmt: skip

    def heartbeat(
        self, caller: str, enclave_id: str, keys: Sequence[OfferedKey], nonce: bytes
    ) -> None:
        if enclave_id and enclave_id != caller:
            raise BrokerError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"heartbeat names enclave {enclave_id!r} but the client certificate is "
                f"enclave {caller!r}",
            )
        row = self._admitted_row(caller)
        records: list[db.KeyRecord] = []
        if keys:
            _check_keys(keys, caller)
            self._challenges.redeem(caller, nonce)
            results = self._appraise_all(keys, nonce, row.region, row.tee_type, row.simulated)
            records = self._key_records(keys, results, nonce)
        with self._write_lock:
            db.record_heartbeat(self.engine, caller, self.now_ms(), records)
        if records:
            log.info("re-appraised enclave=%s epochs=%s", caller, [k.epoch for k in records])

    def evict_stale(self, now: float | None = None) -> list[str]:
        """Evict enclaves silent for longer than the window or without attested keys.

        ``now`` (seconds) defaults to the registry clock; tests pass it to be deterministic.
        """
        now_ms = _ms(self._clock() if now is None else now)
        with self._write_lock:
            evicted = db.evict_stale(self.engine, now_ms, now_ms - self._window_ms)
        for enclave_id, reason in evicted:
            log.info("evicted enclave=%s reason=%s", enclave_id, reason)
        return [enclave_id for enclave_id, _ in evicted]

    def reappraise(self, now: float | None = None) -> list[str]:
        """Re-verify every admitted enclave's stored evidence against the current reference
        values (re-reading the file if it changed) and refresh the keys' EARs.

        A key whose evidence aged out is dropped (the enclave re-attests at its next rotation,
        and :meth:`evict_stale` evicts it once no key is left). An enclave with a key that no
        longer appraises for any other reason (revoked measurement or device certificate,
        measurement no longer accepted, simulation now forbidden, ...) is evicted: its identity
        is no longer acceptable. Returns the ids evicted by this pass. ``now`` (seconds)
        defaults to the registry clock.
        """
        with self._reappraise_lock:
            if isinstance(self._rv, ReferenceValuesFile):
                self._rv.refresh()
            rv = self.reference_values
            now_ms = _ms(self._clock() if now is None else now)
            evicted: list[str] = []
            for entry in db.admitted_enclaves(self.engine):
                try:
                    if self._reappraise_enclave(entry, rv, now_ms):
                        evicted.append(entry.enclave.enclave_id)
                except Exception as exc:  # one enclave's trouble must not stall the others
                    log.error(
                        "re-appraisal of enclave=%s failed: %s",
                        entry.enclave.enclave_id,
                        type(exc).__name__,
                    )
            return evicted

    def _reappraise_enclave(self, entry: db.EnclaveEntry, rv: ReferenceValues, now_ms: int) -> bool:
        row = entry.enclave
        reappraised: list[db.KeyReappraisal] = []
        dropped: list[int] = []
        for key in entry.keys:
            assert key.id is not None
            try:
                result = verify_key(_stored_offer(row.enclave_id, key), rv, now_ms=now_ms)
                _check_matches(result, row.region, row.tee_type, row.simulated)
            except EvidenceStale:
                dropped.append(key.id)
                continue
            except (AttestationError, BrokerError) as exc:
                reason = f"re-appraisal: key epoch {key.epoch}: {_reason(exc)}"
                with self._write_lock:
                    done = db.evict(
                        self.engine, row.enclave_id, reason, admitted_at_ms=row.admitted_at_ms
                    )
                if done:
                    log.info("evicted enclave=%s reason=%s", row.enclave_id, reason)
                return done
            reappraised.append(
                db.KeyReappraisal(
                    key_id=key.id,
                    ear=self._issue_ear(result, rv),
                    verified_at_ms=result.verified_at_ms,
                    attested_until_ms=result.expires_at_ms,
                )
            )
        with self._write_lock:
            db.record_reappraisal(self.engine, row.enclave_id, reappraised, dropped)
        return False

    def _issue_ear(self, result: AttestationResult, rv: ReferenceValues) -> str:
        """The broker's EAR for ``result``; valid for two re-appraisal intervals at most, so an
        EAR of an enclave evicted since stops vouching for it soon."""
        try:
            return ear.issue_ear(
                result,
                signing_key=self._ear_key,
                policy_id=f"policy:{Path(rv.source).name}",
                now=datetime.fromtimestamp(result.verified_at_ms / 1000, UTC),
                ttl_s=2 * self.reappraise_interval_s,
            )
        except ear.EarExpired:
            return ""  # the result expires within the second: no EAR rather than a dead one

    def _key_records(
        self, keys: Sequence[OfferedKey], results: Sequence[AttestationResult], nonce: bytes
    ) -> list[db.KeyRecord]:
        """Verified keys to store, each with its EAR and the challenge its evidence binds (the
        nonce this broker issued, so re-appraisal and edges can recompute the binding)."""
        rv = self.reference_values
        return [
            db.KeyRecord(
                epoch=k.epoch,
                kem=k.kem,
                public_key=k.public_key,
                not_after_ms=k.not_after_ms,
                evidence_format=k.evidence_format,
                evidence=k.evidence,
                verified_at_ms=r.verified_at_ms,
                attested_until_ms=r.expires_at_ms,
                ear=self._issue_ear(r, rv),
                nonce=nonce,
                receipt_public_key=k.receipt_public_key,
            )
            for k, r in zip(keys, results, strict=True)
        ]

    def directory(self, tenant: TenantPolicy, model: str = "") -> list[db.EnclaveEntry]:
        """Live enclaves the tenant may use, optionally only those serving ``model``."""
        return [
            e
            for e in self.live()
            if tenant.allows_region(e.enclave.region)
            and (not model or model in e.enclave.model_list)
        ]

    def live(self, enclave_ids: Sequence[str] | None = None) -> list[db.EnclaveEntry]:
        now = self.now_ms()
        return db.live_enclaves(self.engine, now, now - self._window_ms, enclave_ids)

    def dispatch_targets(self, enclave_ids: Sequence[str]) -> dict[str, db.DispatchTarget]:
        """The live enclaves among ``enclave_ids`` with their attested epochs (the rules of
        :meth:`live`, read fresh for every dispatch; only the columns dispatch needs)."""
        now = self.now_ms()
        return db.dispatch_targets(self.engine, now, now - self._window_ms, enclave_ids)

    def _admitted_row(self, enclave_id: str) -> db.EnclaveRow:
        row = db.get_enclave(self.engine, enclave_id)
        if row is not None and row.status == db.STATUS_ADMITTED:
            silent_ms = self.now_ms() - row.last_heartbeat_ms
            if silent_ms <= self._window_ms:
                return row
            # Too late: it may have missed a key rotation; make it attest again from scratch.
            with self._write_lock:
                db.evict(self.engine, enclave_id, f"no heartbeat for {silent_ms // 1000}s")
            log.info("evicted enclave=%s reason=late heartbeat", enclave_id)
        raise BrokerError(grpc.StatusCode.FAILED_PRECONDITION, "not admitted; register again")

    def _appraise_all(
        self, keys: Sequence[OfferedKey], nonce: bytes, region: str, tee_type: str,
        simulated: bool,
    ) -> list[AttestationResult]:  # fmt: skip
        """Verify every key against the challenge; each must attest what the enclave claims."""
        if isinstance(self._rv, ReferenceValuesFile):
            self._rv.refresh()  # a revocation applies to new admissions at once
        now = self.now_ms()
        results = [self._appraise(key, nonce, now) for key in keys]
        for result in results:
            _check_matches(result, region, tee_type, simulated)
        return results

    def _appraise(self, key: OfferedKey, nonce: bytes, now_ms: int) -> AttestationResult:
        try:
            return verify_key(key, self.reference_values, expected_nonce=nonce, now_ms=now_ms)
        except AttestationError as exc:
            raise BrokerError(
                grpc.StatusCode.PERMISSION_DENIED, f"key epoch {key.epoch}: {exc}"
            ) from None


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _reason(exc: Exception) -> str:
    return exc.message if isinstance(exc, BrokerError) else str(exc)


def _stored_offer(enclave_id: str, key: db.EnclaveKeyRow) -> OfferedKey:
    return OfferedKey(
        enclave_id=enclave_id,
        epoch=key.epoch,
        kem=key.kem,
        public_key=key.public_key,
        not_after_ms=key.not_after_ms,
        evidence_format=key.evidence_format,
        evidence=key.evidence,
        nonce=key.nonce or b"",
        receipt_public_key=key.receipt_public_key or b"",
    )


def _invalid(message: str) -> BrokerError:
    return BrokerError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _check_announcement(a: Announcement) -> None:
    host, sep, port = a.address.rpartition(":")
    if not sep or not host or not port.isdigit() or len(a.address) > MAX_TEXT:
        raise _invalid(f"address {a.address[:MAX_TEXT]!r} is not host:port")
    for name, value in (("region", a.region), ("tee_type", a.tee_type)):
        if not value or len(value) > MAX_TEXT:
            raise _invalid(f"{name} must be 1 to {MAX_TEXT} characters")
    if not a.models or len(a.models) > MAX_MODELS:
        raise _invalid(f"an enclave must serve 1 to {MAX_MODELS} models")
    if any(not m or len(m) > MAX_TEXT or "\n" in m for m in a.models):
        raise _invalid(f"model names must be 1 to {MAX_TEXT} characters on one line")
    if not a.keys:
        raise _invalid("register needs at least one key with its evidence")
    _check_keys(a.keys, a.enclave_id)


def _check_keys(keys: Sequence[OfferedKey], enclave_id: str) -> None:
    if len(keys) > MAX_KEYS:
        raise _invalid(f"at most {MAX_KEYS} keys per call")
    if len({k.epoch for k in keys}) != len(keys):
        raise _invalid("the same key epoch is offered twice")
    for key in keys:
        if len(key.evidence) > MAX_EVIDENCE_BYTES:
            raise _invalid(
                f"key epoch {key.epoch}: evidence larger than {MAX_EVIDENCE_BYTES} bytes"
            )
        try:
            suites.decode_public_key(key.kem, key.public_key)
        except ValueError as exc:
            raise _invalid(f"key epoch {key.epoch}: {exc}") from None


def _check_matches(result: AttestationResult, region: str, tee_type: str, simulated: bool) -> None:
    """The descriptor must say what the evidence says: the directory repeats only attested facts.

    Evidence that attests no region (a CCA token; ``result.region == ""``) leaves the region to
    the registration; edges never take a region from the directory anyway.
    """
    for name, said, attested in (
        ("region", region, result.region or region),
        ("tee_type", tee_type, result.tee_type),
        ("simulated", simulated, result.simulated),
    ):
        if said != attested:
            raise BrokerError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"descriptor says {name} {said!r} but the evidence of key epoch {result.epoch} "
                f"says {attested!r}",
            )


class PeriodicTask:
    """Runs ``task()`` every ``interval_s`` in a daemon thread until stopped."""

    def __init__(self, task: Callable[[], object], *, interval_s: float, name: str) -> None:
        self._task = task
        self._name = name
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._task()
            except Exception as exc:  # keep going; the next round may succeed
                log.error("%s failed: %s", self._name, type(exc).__name__)


class EvictionLoop(PeriodicTask):
    """Runs :meth:`Registry.evict_stale` every ``interval_s``.

    Reads already ignore silent enclaves; the loop makes the eviction durable and logged.
    """

    def __init__(self, registry: Registry, *, interval_s: float) -> None:
        super().__init__(registry.evict_stale, interval_s=interval_s, name="broker-eviction")


class ReappraisalLoop(PeriodicTask):
    """Runs :meth:`Registry.reappraise` every ``registry.reappraise_interval_s``."""

    def __init__(self, registry: Registry) -> None:
        super().__init__(
            registry.reappraise,
            interval_s=registry.reappraise_interval_s,
            name="broker-reappraisal",
        )
