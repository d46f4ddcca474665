"""Decisions: classifying text, and deciding what may leave, in what form, to where.

Semantics (``docs/policy.md``): deny by default; an undefined application or purpose, or a
purpose the application may not use, is denied; otherwise every rule whose conditions all hold
matches, and the strongest effect among the matching rules wins (deny > keep-local >
pseudonymise > allow).  The deciding rule is the first matching rule with that effect, in file
order; its destination and obligations travel with the decision.

Two representations of the same rule conditions live here:

* small composable conditions in the style of sigstore-python's ``verify/policy.py``:
  each has ``verify(facts) -> Success | Failure(reason)``, :class:`AllOf` needs every child
  (and fails when it has none), :class:`AnyOf` needs one.  They say *why* a rule did not match
  (``Policy.explain``) and are the reference the compiled matcher is tested against;
* the compiled matcher used by :meth:`Policy.decide`: each condition becomes a bit mask over
  the rules, so a decision is a handful of integer ANDs whatever the number of rules.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from sovra.detectors import (
    BUILTIN_TYPES,
    Detector,
    Finding,
    KeywordDetector,
    RegexDetector,
    builtin_detector,
    detect,
)
from sovra.policy.language import (
    EFFECT_PRECEDENCE,
    NO_OBLIGATIONS,
    Destination,
    Effect,
    Obligations,
    PolicyError,
    PolicySpec,
    Rule,
    load_spec,
    parse_policy,
)
from sovra.policy.pseudonymise import Pseudonymiser

__all__ = [
    "MAX_TEXT_CHARS",
    "AllOf",
    "AnyClassPresent",
    "AnyOf",
    "ApplicationIn",
    "Classification",
    "Condition",
    "Decision",
    "DecisionForbids",
    "Explanation",
    "Failure",
    "InputTooLarge",
    "MaxClass",
    "ModelIn",
    "Policy",
    "PurposeIn",
    "RequestFacts",
    "Result",
    "Success",
]

log = logging.getLogger(__name__)

#: Texts longer than this (in characters) are refused by :meth:`Policy.classify`.
MAX_TEXT_CHARS = 8 * 1024 * 1024


class InputTooLarge(PolicyError, ValueError):
    """The text exceeds the classification limit."""


class DecisionForbids(PolicyError):
    """The decision does not let the text leave (deny or keep-local)."""


def _shown(name: str) -> str:
    """A request-supplied name, quoted and cut short, for reasons and logs."""
    return repr(name if len(name) <= 64 else name[:61] + "...")


# --- results and composable conditions --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Success:
    def __bool__(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Failure:
    reason: str

    def __bool__(self) -> bool:
        return False


Result = Success | Failure
_OK = Success()


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What rule conditions look at: the request and the classes present in its data."""

    app: str
    purpose: str
    model: str
    classes: frozenset[str]
    max_rank: int  # rank of the most sensitive class present; -1 when none is


class Condition(Protocol):
    def verify(self, facts: RequestFacts) -> Result: ...


@dataclass(frozen=True, slots=True)
class ApplicationIn:
    names: frozenset[str]

    def verify(self, facts: RequestFacts) -> Result:
        if facts.app in self.names:
            return _OK
        return Failure(f"application {_shown(facts.app)} is not one of {sorted(self.names)}")


@dataclass(frozen=True, slots=True)
class PurposeIn:
    names: frozenset[str]

    def verify(self, facts: RequestFacts) -> Result:
        if facts.purpose in self.names:
            return _OK
        return Failure(f"purpose {_shown(facts.purpose)} is not one of {sorted(self.names)}")


@dataclass(frozen=True, slots=True)
class ModelIn:
    names: frozenset[str]
    what: str = "the rule's models"

    def verify(self, facts: RequestFacts) -> Result:
        if facts.model in self.names:
            return _OK
        return Failure(f"model {_shown(facts.model)} is not among {self.what} {sorted(self.names)}")


@dataclass(frozen=True, slots=True)
class AnyClassPresent:
    classes: frozenset[str]

    def verify(self, facts: RequestFacts) -> Result:
        if facts.classes & self.classes:
            return _OK
        return Failure(f"none of the classes {sorted(self.classes)} is present")


@dataclass(frozen=True, slots=True)
class MaxClass:
    name: str
    rank: int

    def verify(self, facts: RequestFacts) -> Result:
        if facts.max_rank <= self.rank:
            return _OK
        return Failure(f"data more sensitive than {self.name!r} is present")


@dataclass(frozen=True, slots=True)
class AllOf:
    """Every child must succeed; an empty AllOf fails (it would otherwise accept anything)."""

    children: tuple[Condition, ...]

    def verify(self, facts: RequestFacts) -> Result:
        if not self.children:
            return Failure("no conditions to verify")
        for child in self.children:
            result = child.verify(facts)
            if not result:
                return result
        return _OK


@dataclass(frozen=True, slots=True)
class AnyOf:
    """At least one child must succeed; an empty AnyOf fails."""

    children: tuple[Condition, ...]

    def verify(self, facts: RequestFacts) -> Result:
        reasons: list[str] = []
        for child in self.children:
            result = child.verify(facts)
            if result:
                return _OK
            assert isinstance(result, Failure)
            reasons.append(result.reason)
        if not reasons:
            return Failure("no conditions to verify")
        return Failure("none succeeded: " + "; ".join(reasons))


def rule_condition(rule: Rule, spec: PolicySpec) -> AllOf:
    """The reference form of a rule's conditions (including "its destination serves the model")."""
    rank = {name: i for i, name in enumerate(spec.classes)}
    match = rule.match
    children: list[Condition] = []
    if match.applications is not None:
        children.append(ApplicationIn(frozenset(match.applications)))
    if match.purposes is not None:
        children.append(PurposeIn(frozenset(match.purposes)))
    if match.models is not None:
        children.append(ModelIn(frozenset(match.models)))
    if rule.destination is not None:
        destination = spec.destinations[rule.destination]
        if destination.models:
            what = f"the models destination {destination.name!r} serves"
            children.append(ModelIn(frozenset(destination.models), what))
    if match.classes_present is not None:
        children.append(AnyClassPresent(frozenset(match.classes_present)))
    if match.max_class is not None:
        children.append(MaxClass(match.max_class, rank[match.max_class]))
    return AllOf(tuple(children))


# --- classification and decisions -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Classification:
    """What a text holds: findings (values are sensitive), classes present, counts per type."""

    findings: tuple[Finding, ...]
    classes: tuple[str, ...]  # least to most sensitive
    entity_counts: Mapping[str, int]
    entity_classes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def to_dict(self) -> dict[str, Any]:
        """Types, counts and classes only: never the values."""
        return {"classes": list(self.classes), "entity_counts": dict(self.entity_counts)}


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one request; ``rule_id`` is None for denials no rule made."""

    effect: Effect
    rule_id: str | None
    policy_id: str
    reason: str
    classes: tuple[str, ...]
    entity_counts: Mapping[str, int]
    obligations: Obligations
    destination: Destination | None
    matched_rules: tuple[str, ...] = ()

    @property
    def may_leave(self) -> bool:
        return self.effect is Effect.ALLOW or self.effect is Effect.PSEUDONYMISE

    def to_dict(self) -> dict[str, Any]:
        return {
            "effect": self.effect.value,
            "rule": self.rule_id,
            "policy": self.policy_id,
            "reason": self.reason,
            "classes": list(self.classes),
            "entity_counts": dict(self.entity_counts),
            "obligations": self.obligations.to_dict() if self.may_leave else None,
            "destination": self.destination.to_dict() if self.destination else None,
            "matched_rules": list(self.matched_rules),
        }


@dataclass(frozen=True, slots=True)
class Explanation:
    """A decision plus, for every rule in order, whether it matched and if not, why."""

    decision: Decision
    rules: tuple[tuple[str, Result], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision.to_dict(),
            "rules": [
                {"id": rule_id, "matched": bool(result)}
                | ({} if result else {"reason": getattr(result, "reason", "")})
                for rule_id, result in self.rules
            ],
        }


def _bits(indices: Iterable[int]) -> int:
    mask = 0
    for index in indices:
        mask |= 1 << index
    return mask


class _Matcher:
    """Rule conditions compiled into bit masks over the rules (bit i = rule i)."""

    def __init__(self, spec: PolicySpec) -> None:
        rules = spec.rules
        indexed = list(enumerate(rules))
        self.rank = {name: i for i, name in enumerate(spec.classes)}

        def having(test: Any) -> int:
            return _bits(i for i, rule in indexed if test(rule))

        app_any = having(lambda r: r.match.applications is None)
        purpose_any = having(lambda r: r.match.purposes is None)
        self.pairs: dict[tuple[str, str], int] = {}
        for app in spec.applications.values():
            app_mask = app_any | having(
                lambda r, a=app.name: r.match.applications and a in r.match.applications
            )
            for purpose in app.purposes:
                purpose_mask = purpose_any | having(
                    lambda r, p=purpose: r.match.purposes and p in r.match.purposes
                )
                self.pairs[(app.name, purpose)] = app_mask & purpose_mask

        def serves(rule: Rule, model: str | None) -> bool:
            if rule.match.models is not None and model not in rule.match.models:
                return False
            if rule.destination is not None:
                served = spec.destinations[rule.destination].models
                if served and model not in served:
                    return False
            return True

        models: set[str] = set()
        for rule in rules:
            models.update(rule.match.models or ())
        for destination in spec.destinations.values():
            models.update(destination.models)
        self.models = {m: having(lambda r, m=m: serves(r, m)) for m in sorted(models)}
        self.other_models = having(lambda r: serves(r, None))

        self.classes_none = having(lambda r: r.match.classes_present is None)
        self.classes_any = {
            c: having(lambda r, c=c: r.match.classes_present and c in r.match.classes_present)
            for c in spec.classes
        }
        # index rank + 1: rules whose max_class allows data of that rank (index 0: nothing found)
        self.max_ok = [
            having(lambda r, k=k: r.match.max_class is None or self.rank[r.match.max_class] >= k)
            for k in range(-1, len(spec.classes))
        ]
        self.effects = [(e, having(lambda r, e=e: r.effect is e)) for e in EFFECT_PRECEDENCE]
        self._class_masks: dict[tuple[str, ...], int | None] = {}

    def class_mask(self, classes: tuple[str, ...]) -> int | None:
        """Rules whose class conditions hold for ``classes``; None if a class is undefined."""
        cached = self._class_masks.get(classes, -1)
        if cached != -1:
            return cached
        mask: int | None
        try:
            ranks = [self.rank[c] for c in classes]
        except KeyError:
            mask = None
        else:
            present = self.classes_none
            for c in classes:
                present |= self.classes_any[c]
            mask = present & self.max_ok[max(ranks, default=-1) + 1]
        if len(self._class_masks) >= 4096:
            self._class_masks.clear()
        self._class_masks[classes] = mask
        return mask


class Policy:
    """A loaded, validated policy: classify texts and decide requests.

    ``policy_id`` is the git commit id when loaded from git (:mod:`sovra.policy.gitsource`),
    or ``dir:<sha256 of the files>`` otherwise.
    """

    def __init__(
        self,
        spec: PolicySpec,
        policy_id: str | None = None,
        *,
        max_text_chars: int = MAX_TEXT_CHARS,
    ) -> None:
        self.spec = spec
        self.id = policy_id or spec.digest
        self.max_text_chars = max_text_chars
        self._class_of = {d.entity_type: d.data_class for d in spec.detectors}
        self._rank = {name: i for i, name in enumerate(spec.classes)}
        self._detectors = _build_detectors(spec)
        self._matcher = _Matcher(spec)
        self._rules = spec.rules
        self._conditions = tuple(rule_condition(r, spec) for r in spec.rules)
        self._destinations = tuple(
            spec.destinations[r.destination] if r.destination else None for r in spec.rules
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str], **kwargs: Any) -> Policy:
        """Load and validate a policy directory; raises :class:`PolicyInvalid`."""
        return cls(load_spec(directory), **kwargs)

    @classmethod
    def from_files(
        cls, files: Mapping[str, bytes], policy_id: str | None = None, **kwargs: Any
    ) -> Policy:
        """Load from ``{relative path: bytes}`` (e.g. blobs of a git commit)."""
        return cls(parse_policy(files), policy_id, **kwargs)

    def __repr__(self) -> str:
        return f"Policy({self.id!r}, rules={len(self._rules)}, tests={len(self.spec.tests)})"

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    @property
    def detectors(self) -> tuple[Detector, ...]:
        return self._detectors

    def class_of(self, entity_type: str) -> str:
        return self._class_of[entity_type]

    # -- classification ------------------------------------------------------------------------

    def classify(self, text: str, *, labels: Sequence[str] = ()) -> Classification:
        """Run the policy's detectors over ``text``; ``labels`` are classes the caller declares.

        Raises ``TypeError`` for non-``str`` input (decode bytes first), :class:`InputTooLarge`
        beyond :attr:`max_text_chars`, ``ValueError`` for an undefined label.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__} (decode bytes first)")
        if len(text) > self.max_text_chars:
            raise InputTooLarge(
                f"text has {len(text)} characters; the classification limit is "
                f"{self.max_text_chars}"
            )
        if isinstance(labels, str):
            raise TypeError("labels must be a sequence of class names, not a string")
        for label in labels:
            if label not in self._rank:
                raise ValueError(f"undefined class label {_shown(label)}")
        findings = tuple(detect(text, self._detectors))
        counts = Counter(f.entity_type for f in findings)
        entity_classes = {t: self._class_of[t] for t in counts}
        present = set(entity_classes.values()).union(labels)
        return Classification(
            findings=findings,
            classes=tuple(sorted(present, key=self._rank.__getitem__)),
            entity_counts=MappingProxyType(dict(counts)),
            entity_classes=MappingProxyType(entity_classes),
        )

    # -- decisions -----------------------------------------------------------------------------

    def decide(
        self, app: str, purpose: str, model: str, classification: Classification
    ) -> Decision:
        """The decision for ``app`` asking ``model`` for ``purpose`` on classified data.  Pure."""
        matcher = self._matcher
        pair = matcher.pairs.get((app, purpose))
        if pair is None:
            return self._deny(self._precondition_failure(app, purpose), classification)
        class_mask = matcher.class_mask(classification.classes)
        if class_mask is None:
            return self._deny("the data carries an undefined class", classification)
        matched = pair & matcher.models.get(model, matcher.other_models) & class_mask
        if not matched:
            return self._deny("no rule matched; deny by default", classification)
        effect, winners = Effect.DENY, 0
        for candidate, effect_mask in matcher.effects:
            winners = matched & effect_mask
            if winners:
                effect = candidate
                break
        index = (winners & -winners).bit_length() - 1
        rule = self._rules[index]
        ids = []
        rest = matched
        while rest:
            low = rest & -rest
            ids.append(self._rules[low.bit_length() - 1].id)
            rest ^= low
        return Decision(
            effect=effect,
            rule_id=rule.id,
            policy_id=self.id,
            reason=f"rule {rule.id!r} decided {effect.value}; {len(ids)} rule(s) matched",
            classes=classification.classes,
            entity_counts=classification.entity_counts,
            obligations=rule.obligations,
            destination=self._destinations[index],
            matched_rules=tuple(ids),
        )

    def _precondition_failure(self, app: str, purpose: str) -> str:
        application = self.spec.applications.get(app)
        if application is None:
            return f"application {_shown(app)} is not defined in the policy"
        if purpose not in self.spec.purposes:
            return f"purpose {_shown(purpose)} is not defined in the policy"
        return f"purpose {_shown(purpose)} is not allowed for application {_shown(app)}"

    def _deny(self, reason: str, classification: Classification) -> Decision:
        return Decision(
            effect=Effect.DENY,
            rule_id=None,
            policy_id=self.id,
            reason=reason,
            classes=classification.classes,
            entity_counts=classification.entity_counts,
            obligations=NO_OBLIGATIONS,
            destination=None,
        )

    def explain(
        self, app: str, purpose: str, model: str, classification: Classification
    ) -> Explanation:
        """The decision plus each rule's match result, evaluated with the reference conditions."""
        facts = RequestFacts(
            app=app,
            purpose=purpose,
            model=model,
            classes=frozenset(classification.classes),
            max_rank=max(
                (self._rank.get(c, len(self._rank)) for c in classification.classes), default=-1
            ),
        )
        pre: Result = _OK
        if (app, purpose) not in self._matcher.pairs:
            pre = Failure(self._precondition_failure(app, purpose))
        results: list[tuple[str, Result]] = []
        for rule, condition in zip(self._rules, self._conditions, strict=True):
            results.append((rule.id, condition.verify(facts) if pre else pre))
        return Explanation(self.decide(app, purpose, model, classification), tuple(results))

    # -- what leaves ---------------------------------------------------------------------------

    def findings_to_replace(
        self, classification: Classification, decision: Decision
    ) -> list[Finding]:
        """The findings a pseudonymise decision replaces (their class is to be pseudonymised)."""
        wanted = set(decision.obligations.pseudonymise_classes)
        classes = classification.entity_classes
        return [f for f in classification.findings if classes.get(f.entity_type) in wanted]

    def outbound_text(
        self,
        text: str,
        classification: Classification,
        decision: Decision,
        pseudonymiser: Pseudonymiser,
    ) -> str:
        """The text as it may leave: unchanged for allow, with placeholders for pseudonymise.

        Raises :class:`DecisionForbids` for deny and keep-local.
        """
        if decision.effect is Effect.ALLOW:
            return text
        if decision.effect is Effect.PSEUDONYMISE:
            return pseudonymiser.pseudonymise(
                text, self.findings_to_replace(classification, decision)
            )
        raise DecisionForbids(f"decision {decision.effect.value!r} does not let the text leave")


def _build_detectors(spec: PolicySpec) -> tuple[Detector, ...]:
    """Built-in detectors in their canonical order (IDs before cards), then custom ones."""
    enabled = {d.entity_type for d in spec.detectors if d.kind == "builtin"}
    out: list[Detector] = [builtin_detector(t) for t in BUILTIN_TYPES if t in enabled]
    for d in spec.detectors:
        if d.kind == "regex":
            assert d.pattern is not None
            out.append(RegexDetector(d.entity_type, d.pattern, d.validator))
        elif d.kind == "keywords":
            out.append(KeywordDetector(d.entity_type, d.keywords, d.case_sensitive))
    return tuple(out)
