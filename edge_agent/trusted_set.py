"""The trusted enclave set: the only door through which an enclave key becomes a key the edge
seals to. Modelled on python-tuf's ``TrustedMetadataSet``.

Rules (every change here must keep them):

1. Nothing the broker's directory says is trusted. A key enters only through :meth:`admit` (or
   :meth:`sync`, which calls it), which verifies its evidence with
   :func:`attestation.verifier.verify_key` against the EDGE's own reference values.
2. What the edge believes about an enclave (id, epoch, region, TEE type, simulated, measurement,
   expiry) comes from the verified evidence, never from descriptor fields (``region``,
   ``tee_type``, ``simulated``, ``broker_status``). Only ``models`` is taken from the directory:
   it is a routing hint; a lie sends a request to a verified enclave that refuses it, never to an
   unverified key.
3. The evidence names the enclave and binds the key, the epoch and the epoch's receipt key, so a
   key the broker moved to another enclave, an epoch it relabelled, or a receipt key it swapped
   is refused (:class:`KeyNotBound`).
4. Verification results are cached per (enclave id, epoch, SHA-256 of the public key, SHA-256 of
   the receipt public key) and reused only for the same key bytes. Refusals are cached per (that,
   SHA-256 of the evidence), so new evidence is judged anew while the same bad offer is judged,
   logged and audited once.
5. An entry is usable only before its expiry (the earlier of key expiry and evidence age limit),
   checked at every use against the injected clock. Expired entries are never candidates.
6. :meth:`candidates` returns at most k distinct enclaves, the newest usable epoch of each,
   serving the model, whose VERIFIED identity satisfies the request constraints, shuffled.
7. The latest listing is authoritative for what is offered: keys the broker no longer lists are
   not candidates (their verification stays cached).
8. Every refusal has its own exception type (a :class:`Refused`); every admission and refusal is
   audited (enclave id, epoch, result, reason) and never holds key material.
9. The edge keeps appraising with its OWN reference values: at every :meth:`sync` the reference
   values file is re-read, and when it changed every cached verdict is dropped, so each listed
   key is judged again (a revoked measurement is refused from that listing on). Verdicts also
   lapse when the evidence ages out (rule 5) and are judged again on the current offer.
10. The broker's EAR for a key is recorded next to the edge's own verdict (verified with the
    broker's EAR key from the listing, else ``unverified``), never used instead of it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

from cryptography.hazmat.primitives.asymmetric import ec

from attestation import ear
from attestation import errors as att
from attestation.reference_values import ReferenceValues, ReferenceValuesFile
from attestation.verifier import AttestationResult, OfferedKey, verify_key
from sovra import suites
from sovra.audit import AuditLog
from sovra.envelope import Constraints, Recipient
from sovra.v1 import broker_pb2

log = logging.getLogger(__name__)

MAX_CACHED_REFUSALS: Final = 1024
AUDIT_KIND: Final = "enclave"
#: Broker EAR status when the listing carried no EAR key / the key carried no EAR / it failed.
EAR_UNVERIFIED: Final = "unverified"
EAR_ABSENT: Final = "absent"
EAR_INVALID: Final = "invalid"

Clock = Callable[[], int]


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class Refused(Exception):
    """Base of every refusal to trust an offered enclave key."""

    code: ClassVar[str] = "refused"

    def __init__(self, enclave_id: str, epoch: int, reason: str) -> None:
        super().__init__(f"enclave {enclave_id!r} epoch {epoch}: {reason}")
        self.enclave_id = enclave_id
        self.epoch = epoch
        self.reason = reason


class UnusableKey(Refused):
    """The offered public key cannot be used: unknown KEM, wrong length, no enclave id."""

    code = "unusable_key"


class MalformedEvidence(Refused):
    """The evidence does not parse as the format it claims, or the format is unsupported."""

    code = "malformed_evidence"


class UntrustedEvidence(Refused):
    """The evidence signature or its chain to a vendor root does not verify."""

    code = "untrusted_evidence"


class KeyNotBound(Refused):
    """The evidence does not bind this key, epoch and expiry to this enclave (e.g. swapped)."""

    code = "key_not_bound"


class StaleEvidence(Refused):
    """The evidence is older than the reference values allow, or the key has expired."""

    code = "stale_evidence"


class NotAccepted(Refused):
    """Genuine evidence, but the edge's reference values do not accept what it reports."""

    code = "not_accepted"


_FROM_ATTESTATION: Final[dict[type[att.AttestationError], type[Refused]]] = {
    att.EvidenceMalformed: MalformedEvidence,
    att.EvidenceSignatureInvalid: UntrustedEvidence,
    att.UntrustedChain: UntrustedEvidence,
    att.KeyBindingMismatch: KeyNotBound,
    att.EvidenceStale: StaleEvidence,
    att.AppraisalFailed: NotAccepted,
}


@dataclass(frozen=True)
class TrustedKey:
    """A verified enclave key. Identity fields come from the attestation result only."""

    result: AttestationResult
    kem: str
    public_key: bytes = field(repr=False)
    key_sha256: str
    models: frozenset[str]
    broker_ear: str = EAR_UNVERIFIED  # the broker's EAR status for this key (rule 10)
    # The offer exactly as verified (evidence included): training records it so a receipt can be
    # exported with the evidence that binds its signing key (docs/training.md).
    offer: OfferedKey | None = field(default=None, repr=False, compare=False)
    # ``public_key`` parsed once at admission (sealing reuses it instead of parsing per request)
    hpke_key: suites.HPKEPublicKey | None = field(default=None, repr=False, compare=False)

    @property
    def sealing_key(self) -> bytes | suites.HPKEPublicKey:
        """What ``seal_request`` takes for this key: the parsed key, else the wire bytes."""
        return self.hpke_key if self.hpke_key is not None else self.public_key

    @property
    def enclave_id(self) -> str:
        return self.result.enclave_id

    @property
    def epoch(self) -> int:
        return self.result.epoch

    @property
    def expires_at_ms(self) -> int:
        return self.result.expires_at_ms

    @property
    def receipt_public_key(self) -> str:
        """Hex Ed25519 receipt public key the verified evidence binds (from the result)."""
        return self.result.receipt_public_key

    @property
    def recipient(self) -> Recipient:
        return Recipient(self.result.enclave_id, self.result.epoch)

    def satisfies(self, constraints: Constraints) -> bool:
        r = self.result
        if constraints.regions and r.region not in constraints.regions:
            return False
        if constraints.tee_types and r.tee_type not in constraints.tee_types:
            return False
        if constraints.measurements and r.measurement.lower() not in constraints.measurements:
            return False
        return constraints.allow_simulated or not r.simulated


_CacheKey = tuple[str, int, str, str]  # enclave id, epoch, sha256(public key), sha256(receipt)
_RefusalKey = tuple[str, int, str, str, str]  # ... plus sha256(evidence)


class TrustedEnclaveSet:
    def __init__(
        self,
        reference_values: ReferenceValues | ReferenceValuesFile,
        clock: Clock = wall_clock_ms,
        *,
        audit: AuditLog | None = None,
    ) -> None:
        self._rv = reference_values
        self._clock = clock
        self._audit = audit
        self._verified: dict[_CacheKey, TrustedKey] = {}
        self._refused: OrderedDict[_RefusalKey, Refused] = OrderedDict()
        self._listed: set[_CacheKey] = set()
        self._listed_refusals: list[Refused] = []
        self._ear_key: ec.EllipticCurvePublicKey | None = None
        self._ear_key_pem = ""

    @property
    def reference_values(self) -> ReferenceValues:
        """The edge's reference values in effect (the last good version of the file)."""
        rv = self._rv
        return rv.values if isinstance(rv, ReferenceValuesFile) else rv

    def recheck_reference_values(self) -> bool:
        """Re-read the reference values file; if it changed, drop every cached verdict so the
        next listing is judged anew under the new values. True if it changed."""
        if not isinstance(self._rv, ReferenceValuesFile) or not self._rv.refresh():
            return False
        log.warning(
            "reference values changed (generation %d): re-verifying %d cached enclave keys",
            self._rv.generation,
            len(self._verified),
        )
        self._verified.clear()
        self._refused.clear()
        return True

    # -- the door -----------------------------------------------------------------------------

    def admit(self, descriptor: broker_pb2.EnclaveDescriptor) -> list[TrustedKey]:
        """Verify every key the descriptor offers; return those trusted, record the refusals."""
        admitted: list[TrustedKey] = []
        models = frozenset(descriptor.models)
        for offered in descriptor.keys:
            outcome = self._judge(descriptor.enclave_id, offered, models)
            if isinstance(outcome, Refused):
                if outcome not in self._listed_refusals:
                    self._listed_refusals.append(outcome)
                continue
            receipt_key = outcome.offer.receipt_public_key if outcome.offer else b""
            self._listed.add(
                _cache_key(outcome.enclave_id, outcome.epoch, outcome.public_key, receipt_key)
            )
            admitted.append(outcome)
        return admitted

    def sync(
        self,
        descriptors: Iterable[broker_pb2.EnclaveDescriptor],
        *,
        broker_ear_key: str = "",
    ) -> list[TrustedKey]:
        """Make the latest directory listing the offer: admit all, retire what is not listed.

        Re-reads the reference values first (rule 9). ``broker_ear_key``: the broker's EAR
        verification key (PEM) from the listing, used only to record the broker's view.
        """
        self.recheck_reference_values()
        self._set_ear_key(broker_ear_key)
        self._listed = set()
        self._listed_refusals = []
        admitted = [key for d in descriptors for key in self.admit(d)]
        now = self._clock()
        self._verified = {k: v for k, v in self._verified.items() if v.expires_at_ms > now}
        return admitted

    def _judge(
        self, enclave_id: str, offered: broker_pb2.EnclaveKey, models: frozenset[str]
    ) -> TrustedKey | Refused:
        key = _cache_key(enclave_id, offered.epoch, offered.public_key, offered.receipt_public_key)
        now = self._clock()
        cached = self._verified.get(key)
        if cached is not None and cached.expires_at_ms > now:
            if cached.models != models:
                cached = self._verified[key] = replace(cached, models=models)
            return cached
        refusal_key = (*key, hashlib.sha256(offered.evidence).hexdigest())
        refused = self._refused.get(refusal_key)
        if refused is not None:
            return refused
        broker_ear, ear_detail = self._broker_ear(enclave_id, offered, now)
        try:
            trusted = self._verify(enclave_id, offered, models, now)
        except Refused as exc:
            self._remember_refusal(refusal_key, exc, broker_ear, ear_detail)
            return exc
        trusted = replace(trusted, broker_ear=broker_ear)
        self._verified[key] = trusted
        self._record_admission(trusted, ear_detail)
        return trusted

    # -- the broker's view (recorded, never relied on) ------------------------------------------

    def _set_ear_key(self, pem: str) -> None:
        if pem == self._ear_key_pem:
            return
        self._ear_key_pem = pem
        self._ear_key = None
        if pem:
            try:
                self._ear_key = ear.load_public_key_pem(pem)
            except ValueError as exc:
                log.warning("broker EAR key not usable, broker EARs stay unverified: %s", exc)

    def _broker_ear(
        self, enclave_id: str, offered: broker_pb2.EnclaveKey, now_ms: int
    ) -> tuple[str, str]:
        """The broker's EAR status for this key and, if invalid, why."""
        if self._ear_key is None:
            return EAR_UNVERIFIED, ""
        if not offered.ear:
            return EAR_ABSENT, ""
        when = datetime.fromtimestamp(now_ms / 1000, UTC)
        try:
            claims = ear.verify_ear(offered.ear, self._ear_key, now=when)
        except att.AttestationError as exc:
            return EAR_INVALID, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # hostile bytes must never take the edge down
            return EAR_INVALID, f"the EAR could not be verified ({type(exc).__name__})"
        if (claims.sovra.enclave_id, claims.sovra.epoch) != (enclave_id, offered.epoch):
            return EAR_INVALID, "the EAR is about another enclave key"
        return claims.status, ""

    def _verify(
        self, enclave_id: str, offered: broker_pb2.EnclaveKey, models: frozenset[str], now: int
    ) -> TrustedKey:
        epoch = offered.epoch
        if not enclave_id:
            raise UnusableKey(enclave_id, epoch, "directory entry has no enclave id")
        try:
            hpke_key = suites.decode_public_key(offered.kem, offered.public_key)
        except ValueError as exc:  # UnknownSuite is a ValueError too
            raise UnusableKey(enclave_id, epoch, str(exc)) from None
        candidate = OfferedKey(
            enclave_id=enclave_id,
            epoch=epoch,
            kem=offered.kem,
            public_key=offered.public_key,
            not_after_ms=offered.not_after_ms,
            evidence_format=offered.evidence_format,
            evidence=offered.evidence,
            nonce=offered.nonce,
            receipt_public_key=offered.receipt_public_key,
        )
        try:
            result = verify_key(candidate, self.reference_values, now_ms=now)
        except att.AttestationError as exc:
            refusal = _refusal_type(exc)
            raise refusal(enclave_id, epoch, str(exc)) from None
        except Exception as exc:
            # Hostile bytes must never take the edge down; they are simply not trusted.
            raise MalformedEvidence(
                enclave_id, epoch, f"evidence could not be verified ({type(exc).__name__})"
            ) from None
        if (result.enclave_id, result.epoch) != (enclave_id, epoch):
            raise KeyNotBound(enclave_id, epoch, "verified identity differs from the offer")
        if result.receipt_public_key != offered.receipt_public_key.hex():
            raise KeyNotBound(enclave_id, epoch, "verified receipt key differs from the offer")
        return TrustedKey(
            result=result,
            kem=offered.kem,
            public_key=offered.public_key,
            key_sha256=hashlib.sha256(offered.public_key).hexdigest(),
            models=models,
            hpke_key=hpke_key,
            offer=candidate,
        )

    # -- queries ------------------------------------------------------------------------------

    def candidates(
        self, model: str, k: int, constraints: Constraints, *, kem: str | None = None
    ) -> list[TrustedKey]:
        """Up to ``k`` distinct verified enclaves for ``model`` (newest usable epoch each)."""
        newest: dict[str, TrustedKey] = {}
        for key in self._usable():
            if model not in key.models or (kem is not None and key.kem != kem):
                continue
            if not key.satisfies(constraints):
                continue
            current = newest.get(key.enclave_id)
            if current is None or key.epoch > current.epoch:
                newest[key.enclave_id] = key
        chosen = list(newest.values())
        secrets.SystemRandom().shuffle(chosen)
        return chosen[:k]

    def models(self, constraints: Constraints, *, kem: str | None = None) -> set[str]:
        """Models served by at least one usable verified enclave within ``constraints``."""
        return {
            model
            for key in self._usable()
            if key.satisfies(constraints) and (kem is None or key.kem == kem)
            for model in key.models
        }

    def listed_models(self) -> set[str]:
        """Models the latest listing names for trusted keys (used to tell 404 from 503)."""
        return {m for k in self._listed_entries() for m in k.models}

    def snapshot(self, *, details: bool = False) -> list[dict[str, Any]]:
        """The set as shown to operators: admitted and refused keys of the latest listing.

        ``details`` adds each refusal's reason text (``detail``), for operator tools."""
        now = self._clock()
        rows: list[dict[str, Any]] = []
        for key in sorted(self._listed_entries(), key=lambda k: (k.enclave_id, k.epoch)):
            r = key.result
            rows.append(
                {
                    "enclave_id": r.enclave_id,
                    "epoch": r.epoch,
                    "status": r.status if r.expires_at_ms > now else "expired",
                    "simulated": r.simulated,
                    "region": r.region,
                    "tee_type": r.tee_type,
                    "measurement": r.measurement,
                    "expires_at_ms": r.expires_at_ms,
                    "models": sorted(key.models),
                    "broker_ear": key.broker_ear,
                }
            )
        for refusal in self._listed_refusals:
            row: dict[str, Any] = {
                "enclave_id": refusal.enclave_id,
                "epoch": refusal.epoch,
                "status": "refused",
                "reason": refusal.code,
            }
            if details:
                row["detail"] = refusal.reason
            rows.append(row)
        return rows

    def _listed_entries(self) -> list[TrustedKey]:
        return [self._verified[k] for k in self._listed if k in self._verified]

    def _usable(self) -> list[TrustedKey]:
        now = self._clock()
        return [k for k in self._listed_entries() if k.expires_at_ms > now]

    # -- records ------------------------------------------------------------------------------

    def _remember_refusal(
        self, key: _RefusalKey, refusal: Refused, broker_ear: str, ear_detail: str
    ) -> None:
        self._refused[key] = refusal
        while len(self._refused) > MAX_CACHED_REFUSALS:
            self._refused.popitem(last=False)
        log.warning(
            "refused enclave key: enclave=%s epoch=%d reason=%s: %s",
            refusal.enclave_id,
            refusal.epoch,
            refusal.code,
            refusal.reason,
        )
        self._append(
            {
                "enclave_id": refusal.enclave_id,
                "epoch": refusal.epoch,
                "result": "refused",
                "reason": refusal.code,
                "detail": refusal.reason,
                "edge_verdict": "refused",
                **_ear_fields(broker_ear, ear_detail),
            }
        )

    def _record_admission(self, key: TrustedKey, ear_detail: str = "") -> None:
        r = key.result
        log.info(
            "admitted enclave key: enclave=%s epoch=%d simulated=%s region=%s",
            r.enclave_id,
            r.epoch,
            r.simulated,
            r.region,
        )
        self._append(
            {
                "enclave_id": r.enclave_id,
                "epoch": r.epoch,
                "result": "admitted",
                "reason": r.status,
                "simulated": r.simulated,
                "region": r.region,
                "tee_type": r.tee_type,
                "measurement": r.measurement,
                "expires_at_ms": r.expires_at_ms,
                "key_sha256": key.key_sha256,
                "receipt_public_key": r.receipt_public_key,
                "edge_verdict": r.status,
                "npus": [n.to_json_dict() for n in r.npus],
                **_ear_fields(key.broker_ear, ear_detail),
            }
        )

    def _append(self, record: dict[str, Any]) -> None:
        if self._audit is not None:
            self._audit.append(AUDIT_KIND, record)


def _refusal_type(exc: att.AttestationError) -> type[Refused]:
    """The refusal for an attestation error, by its nearest mapped class (subclasses such as
    ``CompositeBindingMismatch`` refuse like their parent)."""
    for cls in type(exc).__mro__:
        if cls in _FROM_ATTESTATION:
            return _FROM_ATTESTATION[cls]
    return NotAccepted


def _ear_fields(status: str, detail: str) -> dict[str, str]:
    fields = {"broker_ear": status}
    if detail:
        fields["broker_ear_detail"] = detail
    return fields


def _cache_key(enclave_id: str, epoch: int, public_key: bytes, receipt_key: bytes) -> _CacheKey:
    return (
        enclave_id,
        epoch,
        hashlib.sha256(public_key).hexdigest(),
        hashlib.sha256(receipt_key).hexdigest(),
    )
