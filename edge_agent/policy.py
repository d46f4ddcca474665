"""Edge policy decisions behind one :class:`PolicyDecider` protocol.

* :class:`ConfigPolicy`: the minimal allow-list from the edge config (``[[apps]] models``), used
  when the config has no ``[policy]`` section. Deny by default; ``policy_id`` is ``config:`` +
  the first 12 hex digits of the SHA-256 of the canonical ``[[apps]]`` section.
* :class:`EnginePolicy`: the data-sovereignty policy engine (``sovra.policy``), loaded from a
  git repository (only commits signed by an allowed signer, validated and tested, through
  :class:`sovra.policy.PolicySource`) or from a directory. A refused revision never replaces the
  active policy; every (re)load attempt is logged, written to a status file and, when it
  activates or refuses a policy, appended to the audit chain.

Both turn a request into an :class:`Assessment`: the :class:`Decision` (effect, rule, policy id,
classes, entity counts, destination constraints) and, for ``pseudonymise``, how to rewrite the
request's texts. Nothing here logs or returns request texts or detected values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol

from edge_agent.config import AppConfig, PolicyConfig
from sovra.audit import AuditLog
from sovra.envelope import Constraints
from sovra.policy import (
    Classification,
    InputTooLarge,
    Policy,
    PolicyError,
    PolicyInvalid,
    PolicySource,
    Pseudonymiser,
    run_tests,
)
from sovra.policy import Decision as EngineDecision
from sovra.policy import Effect as EngineEffect

log = logging.getLogger("sovra.edge")

PURPOSES: Final = ("inference",)
RULE_DEFAULT_DENY: Final = "default-deny"
AUDIT_KIND: Final = "policy"
STATUS_FILE: Final = "policy-status.json"

EffectName = Literal["allow", "pseudonymise", "deny", "keep-local"]
ReloadResult = Literal["activated", "unchanged", "refused"]

__all__ = [
    "PURPOSES",
    "RULE_DEFAULT_DENY",
    "Assessment",
    "ConfigPolicy",
    "ConstraintConflict",
    "Decision",
    "EnginePolicy",
    "InputTooLarge",
    "PolicyDecider",
    "PolicyUnavailable",
    "jurisdiction_of",
    "policy_id_for",
    "read_status",
    "sealed_constraints",
]


class PolicyUnavailable(Exception):
    """No policy could be activated (at start-up); the message says why."""


class ConstraintConflict(Exception):
    """The policy's destination and the edge's own constraints leave nowhere to send a request."""


@dataclass(frozen=True)
class Decision:
    """The edge's decision for one request. ``regions``/``tee_types`` None: the policy adds no
    such constraint (the edge config's apply); ``jurisdictions`` limit regions by jurisdiction
    when the destination names no regions."""

    effect: EffectName
    rule_id: str
    policy_id: str
    reason: str
    classes: tuple[str, ...] = ()
    entity_counts: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    destination: str | None = None
    regions: tuple[str, ...] | None = None
    tee_types: tuple[str, ...] | None = None
    jurisdictions: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        """The request may leave the premises (as is, or pseudonymised)."""
        return self.effect in ("allow", "pseudonymise")

    @property
    def may_leave(self) -> bool:
        return self.allowed


class Assessment:
    """A decision, plus (for pseudonymise) how to rewrite the texts it was made on."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    @property
    def rewrites(self) -> bool:
        """True when :meth:`outbound` may change the texts."""
        return False

    def outbound(self, texts: Sequence[str], pseudonymiser: Pseudonymiser) -> list[str]:
        """The texts as they may leave (placeholders instead of values for pseudonymise)."""
        return list(texts)


class PolicyDecider(Protocol):
    """What the dispatcher needs of a policy; :class:`ConfigPolicy` and :class:`EnginePolicy`."""

    @property
    def mode(self) -> str: ...

    @property
    def policy_id(self) -> str: ...

    @property
    def classifies(self) -> bool:
        """Whether :meth:`assess` looks at the request texts (skip extracting them if not)."""
        ...

    def assess(self, app: str, purpose: str, model: str, texts: Sequence[str]) -> Assessment: ...

    def known_models(self) -> frozenset[str]: ...

    def app_models(self, app: AppConfig, served: Collection[str]) -> list[str]: ...

    def reload(self, trigger: str = "manual") -> ReloadResult: ...

    def status(self) -> dict[str, Any]: ...


# --- constraints ------------------------------------------------------------------------------


def jurisdiction_of(region: str) -> str:
    """The jurisdiction a region name belongs to, by convention: the part before the first
    ``-``, upper-cased (``cn-north-1`` -> ``CN``, ``eu-west`` -> ``EU``)."""
    return region.split("-", 1)[0].upper()


def _narrow(edge: tuple[str, ...], policy: tuple[str, ...]) -> tuple[str, ...]:
    if not edge:
        return policy
    allowed = set(policy)
    return tuple(v for v in edge if v in allowed)


def sealed_constraints(edge: Constraints, decision: Decision) -> Constraints:
    """The edge's configured constraints narrowed by the decision's (never widened).

    Raises :class:`ConstraintConflict` when nothing is left: an empty list would mean "any".
    """
    regions = edge.regions
    if decision.regions is not None:
        regions = _narrow(edge.regions, decision.regions)
        if not regions:
            raise ConstraintConflict(
                f"destination {decision.destination!r} allows regions "
                f"{list(decision.regions)}; the edge allows {list(edge.regions)}: no overlap"
            )
    elif decision.jurisdictions:
        wanted = set(decision.jurisdictions)
        regions = tuple(r for r in edge.regions if jurisdiction_of(r) in wanted)
        if not regions:
            raise ConstraintConflict(
                f"destination {decision.destination!r} names no regions and the edge config "
                f"names none in jurisdictions {sorted(wanted)}: cannot seal a residency "
                "constraint"
            )
    tee_types = edge.tee_types
    if decision.tee_types is not None:
        tee_types = _narrow(edge.tee_types, decision.tee_types)
        if not tee_types:
            raise ConstraintConflict(
                f"the policy accepts TEE types {list(decision.tee_types)}; the edge allows "
                f"{list(edge.tee_types)}: no overlap"
            )
    return Constraints(
        regions=regions,
        tee_types=tee_types,
        measurements=edge.measurements,
        allow_simulated=edge.allow_simulated,
    )


# --- the config allow-list --------------------------------------------------------------------


def policy_id_for(apps: Sequence[AppConfig]) -> str:
    canonical = json.dumps(
        [
            {"key_sha256": a.key_sha256, "models": list(a.models), "name": a.name}
            for a in sorted(apps, key=lambda a: a.name)
        ],
        sort_keys=True,
        separators=(",", ":"),
    )
    return "config:" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


class ConfigPolicy:
    """Deny by default; allow an app the models on its ``[[apps]] models`` allow-list."""

    mode = "config"
    classifies = False

    def __init__(self, apps: Sequence[AppConfig]) -> None:
        self._apps = {a.name: a for a in apps}
        self.policy_id = policy_id_for(apps)
        self._models = frozenset(m for a in apps for m in a.models)

    def decide(self, app: str, purpose: str, model: str) -> Decision:
        cfg = self._apps.get(app)
        if purpose not in PURPOSES:
            return self._deny(f"purpose {purpose!r} is not allowed by the edge config")
        if cfg is None:
            return self._deny(f"app {app!r} is not configured")
        if model not in cfg.models:
            return self._deny(f"model {model!r} is not on app {app!r}'s allow-list")
        return Decision(
            "allow", f"apps.{app}.models", self.policy_id, f"model {model!r} is allow-listed"
        )

    def _deny(self, reason: str) -> Decision:
        return Decision("deny", RULE_DEFAULT_DENY, self.policy_id, reason)

    def assess(self, app: str, purpose: str, model: str, texts: Sequence[str]) -> Assessment:
        return Assessment(self.decide(app, purpose, model))

    def known_models(self) -> frozenset[str]:
        return self._models

    def app_models(self, app: AppConfig, served: Collection[str]) -> list[str]:
        return [m for m in app.models if m in served]

    def reload(self, trigger: str = "manual") -> ReloadResult:
        return "unchanged"  # the allow-list changes only with the config (restart)

    def status(self) -> dict[str, Any]:
        return {
            "source": "config",
            "active": {"policy_id": self.policy_id, "commit": None, "signer": None},
            "last_refusal": None,
        }


# --- the policy engine ------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def read_status(path: Path) -> dict[str, Any] | None:
    """The status file an edge writes on each (re)load attempt; None if absent or unreadable."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class _EngineAssessment(Assessment):
    def __init__(
        self,
        decision: Decision,
        policy: Policy,
        engine: EngineDecision,
        classifications: Sequence[Classification],
    ) -> None:
        super().__init__(decision)
        self._policy = policy
        self._engine = engine
        self._classifications = tuple(classifications)

    @property
    def rewrites(self) -> bool:
        return self._engine.effect is EngineEffect.PSEUDONYMISE and any(
            self._policy.findings_to_replace(c, self._engine) for c in self._classifications
        )

    def outbound(self, texts: Sequence[str], pseudonymiser: Pseudonymiser) -> list[str]:
        return [
            self._policy.outbound_text(text, c, self._engine, pseudonymiser)
            for text, c in zip(texts, self._classifications, strict=True)
        ]


@dataclass(frozen=True)
class _Active:
    policy: Policy
    commit: str | None
    signer: str | None
    key_fingerprint: str | None
    loaded_at: datetime
    models: frozenset[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy_id": self.policy.id,
            "commit": self.commit,
            "signer": self.signer,
            "key_fingerprint": self.key_fingerprint,
            "loaded_at": self.loaded_at.isoformat(),
        }


class EnginePolicy:
    """The policy engine on the edge: the last good policy and how it got there.

    ``start()`` activates the first policy (raising :class:`PolicyUnavailable` if none can be);
    ``reload(trigger)`` tries the source again and never raises. Thread-safe: reloads are
    serialised, and a request uses the policy that was active when it was assessed.
    """

    def __init__(
        self,
        config: PolicyConfig,
        apps: Sequence[AppConfig],
        *,
        status_path: Path,
        audit: AuditLog | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.config = config
        self._apps = {a.name: a for a in apps}
        self._status_path = status_path
        self._audit = audit
        self._clock = clock
        self._lock = threading.Lock()
        self._active: _Active | None = None
        self._refusal: dict[str, Any] | None = None
        self._last_attempt: dict[str, Any] | None = None
        self._source: PolicySource | None = None
        if config.source == "git":
            assert config.allowed_signers is not None
            self._source = PolicySource(
                config.path,
                config.allowed_signers,
                rev=config.rev,
                allow_rollback=config.allow_rollback,
                clock=clock,
            )

    @property
    def mode(self) -> str:
        return self.config.source

    classifies = True

    @property
    def policy(self) -> Policy:
        active = self._active
        if active is None:
            raise PolicyUnavailable("no policy is active")
        return active.policy

    @property
    def policy_id(self) -> str:
        active = self._active
        return active.policy.id if active is not None else "none"

    # -- loading -------------------------------------------------------------------------------

    def start(self) -> None:
        """Activate the first policy; raise :class:`PolicyUnavailable` with the reason if none.

        From git, the commit that was active when the edge last ran (from the status file) is
        tried first, so rollback protection and the last good policy survive a restart.
        """
        previous = read_status(self._status_path) or {}
        last = (previous.get("active") or {}).get("commit")
        if self._source is not None and isinstance(last, str) and last:
            with self._lock:
                self._source.rev = last
                try:
                    self._attempt("restart")
                finally:
                    self._source.rev = self.config.rev
            if self._active is None:
                log.warning("policy: the last active commit %s could not be restored", last[:12])
                self._refusal = None
        self.reload("start")
        if self._active is None:
            reason = (self._refusal or {}).get("reason", "no policy could be loaded")
            raise PolicyUnavailable(f"no policy could be activated: {reason}")

    def reload(self, trigger: str = "manual") -> ReloadResult:
        """Try the source now; activate what passes, keep the last good policy otherwise."""
        with self._lock:
            result = self._attempt(trigger)
            self._write_status()
            return result

    def _attempt(self, trigger: str) -> ReloadResult:
        try:
            if self._source is not None:
                return self._attempt_git(trigger)
            return self._attempt_dir(trigger)
        except Exception as exc:  # a reload must never take the edge down
            log.error("policy reload failed unexpectedly (%s)", type(exc).__name__)
            return self._refuse(trigger, None, f"unexpected error ({type(exc).__name__})")

    def _attempt_git(self, trigger: str) -> ReloadResult:
        source = self._source
        assert source is not None
        before = source.status().last_refusal
        activated = source.reload()
        status = source.status()
        if activated:
            policy, info = source.policy, status.commit
            assert policy is not None and info is not None
            problem = self._check_apps(policy)
            if problem:
                return self._refuse(trigger, info.commit, problem)
            return self._activate(
                trigger, policy, info.commit, info.signer, info.key_fingerprint or None
            )
        refusal = status.last_refusal
        if refusal is not None and refusal is not before:
            return self._refuse(trigger, refusal.commit, refusal.reason)
        return self._unchanged(trigger)

    def _attempt_dir(self, trigger: str) -> ReloadResult:
        try:
            policy = Policy.load(self.config.path)
        except PolicyInvalid as exc:
            shown = "; ".join(str(p) for p in exc.problems[:3])
            more = "" if len(exc.problems) <= 3 else f"; and {len(exc.problems) - 3} more"
            return self._refuse(
                trigger, None, f"policy is invalid ({len(exc.problems)} problems): {shown}{more}"
            )
        except (PolicyError, OSError, ValueError) as exc:
            return self._refuse(trigger, None, f"policy cannot be read: {exc}")
        active = self._active
        if active is not None and active.policy.id == policy.id:
            return self._unchanged(trigger)
        report = run_tests(policy)
        if not report.ok:
            return self._refuse(trigger, policy.id, f"policy {policy.id}: {report.summary()}")
        problem = self._check_apps(policy)
        if problem:
            return self._refuse(trigger, policy.id, problem)
        return self._activate(trigger, policy, None, None, None)

    def _check_apps(self, policy: Policy) -> str:
        missing = sorted(name for name in self._apps if name not in policy.spec.applications)
        if not missing:
            return ""
        defined = ", ".join(sorted(policy.spec.applications)) or "none"
        names = ", ".join(repr(m) for m in missing)
        return (
            f"application(s) {names} from the edge config [[apps]] are not defined in the "
            f"policy (defined: {defined})"
        )

    def _activate(
        self,
        trigger: str,
        policy: Policy,
        commit: str | None,
        signer: str | None,
        fingerprint: str | None,
    ) -> ReloadResult:
        self._active = _Active(
            policy, commit, signer, fingerprint, self._clock(), _models_named(policy)
        )
        self._last_attempt = self._attempt_record(trigger, "activated", policy.id)
        log.info(
            "policy %s active (source %s%s; trigger %s)",
            policy.id,
            self.config.source,
            f", signed by {signer}" if signer else "",
            trigger,
        )
        self._append_audit(
            {
                "event": "activated",
                "source": self.config.source,
                "policy_id": policy.id,
                "commit": commit,
                "signer": signer,
                "key_fingerprint": fingerprint,
                "trigger": trigger,
            }
        )
        return "activated"

    def _refuse(self, trigger: str, commit: str | None, reason: str) -> ReloadResult:
        self._last_attempt = self._attempt_record(trigger, "refused", commit)
        last = self._refusal
        if last is not None and (last["commit"], last["reason"]) == (commit, reason):
            # The same revision refused again (a directory polled unchanged): logged and
            # audited once, not at every poll.
            log.info("policy still refused (commit %s)", commit or "-")
            return "refused"
        self._refusal = {"at": self._clock().isoformat(), "commit": commit, "reason": reason}
        keeping = self._active.policy.id if self._active is not None else "none"
        log.warning(
            "policy refused (source %s, commit %s): %s; keeping policy %s",
            self.config.source,
            commit or "-",
            reason,
            keeping,
        )
        self._append_audit(
            {
                "event": "refused",
                "source": self.config.source,
                "commit": commit,
                "reason": reason,
                "kept_policy_id": None if self._active is None else self._active.policy.id,
                "trigger": trigger,
            }
        )
        return "refused"

    def _unchanged(self, trigger: str) -> ReloadResult:
        self._last_attempt = self._attempt_record(trigger, "unchanged", self.policy_id)
        return "unchanged"

    def _attempt_record(self, trigger: str, result: str, what: str | None) -> dict[str, Any]:
        return {"at": self._clock().isoformat(), "trigger": trigger, "result": result, "id": what}

    def _append_audit(self, record: dict[str, Any]) -> None:
        if self._audit is None:
            return
        try:
            self._audit.append(AUDIT_KIND, record)
        except Exception as exc:  # the audit log failing is logged, not fatal to a reload
            log.error("could not audit a policy event (%s)", type(exc).__name__)

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        active = self._active
        return {
            "source": self.config.source,
            "location": str(self.config.path),
            "rev": self.config.rev if self.config.source == "git" else None,
            "active": active.to_dict() if active is not None else None,
            "last_attempt": self._last_attempt,
            "last_refusal": self._refusal,
        }

    def _write_status(self) -> None:
        doc = {**self.status(), "pid": os.getpid()}
        tmp = self._status_path.with_name(self._status_path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(doc, handle, indent=2, sort_keys=True)
                handle.write("\n")
            os.replace(tmp, self._status_path)
        except OSError as exc:
            log.warning("could not write the policy status file: %s", exc.strerror or exc)

    # -- decisions -----------------------------------------------------------------------------

    def assess(self, app: str, purpose: str, model: str, texts: Sequence[str]) -> Assessment:
        """Classify ``texts`` and decide; raises :class:`InputTooLarge` past the text limit."""
        active = self._active
        if active is None:
            raise PolicyUnavailable("no policy is active")
        policy = active.policy
        total = sum(len(t) for t in texts)
        if total > policy.max_text_chars:
            raise InputTooLarge(
                f"the request holds {total} characters of text; the classification limit is "
                f"{policy.max_text_chars}"
            )
        seen: dict[str, Classification] = {}
        classifications: list[Classification] = []
        for text in texts:
            found = seen.get(text)
            if found is None:
                found = seen[text] = policy.classify(text)
            classifications.append(found)
        merged = _merge(policy, classifications)
        engine = policy.decide(app, purpose, model, merged)
        app_cfg = self._apps.get(app)
        narrowed = app_cfg is not None and bool(app_cfg.models)
        if engine.may_leave and narrowed and app_cfg and model not in app_cfg.models:
            # The edge config may narrow what the policy allows, never widen it.
            decision = Decision(
                "deny",
                f"apps.{app}.models",
                policy.id,
                f"model {model!r} is not on app {app!r}'s allow-list in the edge config",
                classes=merged.classes,
                entity_counts=merged.entity_counts,
            )
            return Assessment(decision)
        return _EngineAssessment(_edge_decision(engine), policy, engine, classifications)

    def known_models(self) -> frozenset[str]:
        active = self._active
        return active.models if active is not None else frozenset()

    def app_models(self, app: AppConfig, served: Collection[str]) -> list[str]:
        active = self._active
        if active is None:
            return []
        return [
            m
            for m in sorted(served)
            if (not app.models or m in app.models) and _may_serve(active.policy, app.name, m)
        ]


def _models_named(policy: Policy) -> frozenset[str]:
    models: set[str] = set()
    for rule in policy.rules:
        models.update(rule.match.models or ())
    for destination in policy.spec.destinations.values():
        models.update(destination.models)
    return frozenset(models)


def _may_serve(policy: Policy, app: str, model: str) -> bool:
    """Some rule could let ``app`` send a request to ``model`` for inference."""
    application = policy.spec.applications.get(app)
    if application is None or "inference" not in application.purposes:
        return False
    for rule in policy.rules:
        if rule.effect not in (EngineEffect.ALLOW, EngineEffect.PSEUDONYMISE):
            continue
        match = rule.match
        if match.applications is not None and app not in match.applications:
            continue
        if match.purposes is not None and "inference" not in match.purposes:
            continue
        if match.models is not None and model not in match.models:
            continue
        if rule.destination is not None:
            served = policy.spec.destinations[rule.destination].models
            if served and model not in served:
                continue
        return True
    return False


def _merge(policy: Policy, parts: Sequence[Classification]) -> Classification:
    """One classification for the whole request (findings are per text; not merged)."""
    rank = {name: i for i, name in enumerate(policy.classes)}
    classes = sorted({c for p in parts for c in p.classes}, key=rank.__getitem__)
    counts: dict[str, int] = {}
    entity_classes: dict[str, str] = {}
    for part in parts:
        for entity, n in part.entity_counts.items():
            counts[entity] = counts.get(entity, 0) + n
        entity_classes.update(part.entity_classes)
    return Classification(
        findings=(),
        classes=tuple(classes),
        entity_counts=MappingProxyType(counts),
        entity_classes=MappingProxyType(entity_classes),
    )


def _edge_decision(engine: EngineDecision) -> Decision:
    destination = engine.destination
    regions: tuple[str, ...] | None = None
    tee_types: tuple[str, ...] | None = None
    jurisdictions: tuple[str, ...] = ()
    if engine.may_leave and destination is not None:
        obligations = engine.obligations
        allowed = tuple(obligations.allowed_jurisdictions or destination.jurisdictions)
        narrowed = not set(destination.jurisdictions) <= set(allowed)
        if destination.regions:
            regions = tuple(
                r for r in destination.regions if not narrowed or jurisdiction_of(r) in set(allowed)
            )
        else:
            jurisdictions = allowed
        accepted = obligations.accepted_tee_types or destination.tee_types
        tee_types = tuple(accepted) if accepted else None
    return Decision(
        effect=engine.effect.value,  # the same four names
        rule_id=engine.rule_id or RULE_DEFAULT_DENY,
        policy_id=engine.policy_id,
        reason=engine.reason,
        classes=engine.classes,
        entity_counts=MappingProxyType(dict(engine.entity_counts)),
        destination=destination.name if destination is not None else None,
        regions=regions,
        tee_types=tee_types,
        jurisdictions=jurisdictions,
    )
