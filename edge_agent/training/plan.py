"""Deciding a training job: column classes → column actions → policy decision → sealed
constraints (docs/training.md, "Policy").

With a policy (``[policy]`` in the edge config) the policy's ``training_columns`` say what
happens to the columns of each class (keep, pseudonymise, drop; classes it does not name are
kept). The decision for purpose ``training`` is then made on the classes of the columns that
leave *as they are*; a ``pseudonymise`` decision also pseudonymises the kept columns whose class
its obligations name. Without a policy (config-only mode) an app may train only if ``[training]
apps`` names it, and every classified column is dropped unless ``[training.columns]`` maps its
class to ``pseudonymise`` or ``keep``; findings of the built-in detectors count as class
``confidential``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from edge_agent.policy import (
    ConstraintConflict,
    Decision,
    jurisdiction_of,
    read_status,
    sealed_constraints,
)
from edge_agent.training.config import TrainingConfig
from sovra.detectors import builtin_detectors, detect
from sovra.envelope import Constraints
from sovra.policy import Classification, Policy
from sovra.policy import Decision as EngineDecision

PURPOSE: Final = "training"
CONFIG_CLASS: Final = "confidential"
_STRENGTH: Final = {"keep": 0, "pseudonymise": 1, "drop": 2}


class TrainingRefused(Exception):
    """Policy (or the config) does not allow this job; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TrainingPlan:
    mode: str  # "policy" | "config"
    policy_id: str
    rule_id: str
    effect: str
    reason: str
    actions: dict[str, str]  # every column: keep | pseudonymise | drop
    column_classes: dict[str, list[str]]  # classified columns only
    classes_decided: list[str]  # classes of the columns that leave as they are
    regions: list[str] = field(default_factory=list)
    tee_types: list[str] = field(default_factory=list)
    allow_simulated: bool = False

    @property
    def constraints(self) -> Constraints:
        return Constraints(
            regions=tuple(self.regions),
            tee_types=tuple(self.tee_types),
            measurements=(),
            allow_simulated=self.allow_simulated,
        )

    @property
    def labels(self) -> tuple[str, ...]:
        """Classes of the data that leaves (header ``labels``): kept classes, and what was
        pseudonymised (as tokens)."""
        out = set(self.classes_decided)
        for column, action in self.actions.items():
            if action == "pseudonymise":
                out.update(self.column_classes.get(column, ()))
        return tuple(sorted(out))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainingPlan:
        return cls(**json.loads(text))

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "policy_id": self.policy_id,
            "rule": self.rule_id,
            "effect": self.effect,
            "columns": {
                c: {"action": a, "classes": self.column_classes.get(c, [])}
                for c, a in self.actions.items()
            },
        }


# -- classification -------------------------------------------------------------------------


def classify_with_policy(policy: Policy, text: str) -> tuple[dict[str, int], list[str]]:
    found = policy.classify(text[: policy.max_text_chars])
    return dict(found.entity_counts), list(found.classes)


def classify_builtin(text: str) -> tuple[dict[str, int], list[str]]:
    counts: dict[str, int] = {}
    for finding in detect(text, builtin_detectors()):
        counts[finding.entity_type] = counts.get(finding.entity_type, 0) + 1
    return counts, [CONFIG_CLASS] if counts else []


def column_classes(
    columns: Sequence[str],
    declared: Mapping[str, Sequence[str]],
    samples: Sequence[str],
    policy: Policy | None,
) -> dict[str, list[str]]:
    """Each column's classes: declared plus what the detectors find in its sample."""
    out: dict[str, list[str]] = {}
    for name, text in zip(columns, samples, strict=True):
        classes = list(declared.get(name, ()))
        if text:
            _counts, found = (
                classify_with_policy(policy, text) if policy is not None else classify_builtin(text)
            )
            classes += [c for c in found if c not in classes]
        if classes:
            out[name] = classes
    return out


# -- plans ----------------------------------------------------------------------------------


def _strongest(actions: Sequence[str]) -> str:
    return max(actions, key=_STRENGTH.__getitem__, default="keep")


def plan_with_policy(
    policy: Policy,
    *,
    app: str,
    base_model: str,
    columns: Sequence[str],
    classes: Mapping[str, Sequence[str]],
    target: str,
    edge_constraints: Constraints,
) -> TrainingPlan:
    rank = {name: i for i, name in enumerate(policy.classes)}
    undefined = sorted({c for cs in classes.values() for c in cs if c not in rank})
    if undefined:
        raise TrainingRefused(
            "undefined_class", f"classes {undefined} are not defined by policy {policy.id}"
        )
    table = policy.spec.training_columns
    actions = {c: _strongest([table.get(k, "keep") for k in classes.get(c, ())]) for c in columns}
    left = sorted(
        {k for c in columns if actions[c] == "keep" for k in classes.get(c, ())},
        key=rank.__getitem__,
    )
    classification = Classification(
        findings=(),
        classes=tuple(left),
        entity_counts=MappingProxyType({}),
        entity_classes=MappingProxyType({}),
    )
    decision = policy.decide(app, PURPOSE, base_model, classification)
    if not decision.may_leave:
        raise TrainingRefused(
            "policy_denied",
            f"training denied by policy rule {decision.rule_id or 'default-deny'!r} "
            f"({decision.policy_id}): {decision.reason}",
        )
    extra = (
        set(decision.obligations.pseudonymise_classes)
        if decision.effect.value == "pseudonymise"
        else set()
    )
    for column in columns:
        if actions[column] == "keep" and extra & set(classes.get(column, ())):
            actions[column] = "pseudonymise"
    _check_target(target, actions, classes)
    constraints = _narrow(edge_constraints, decision)
    return TrainingPlan(
        mode="policy",
        policy_id=decision.policy_id,
        rule_id=decision.rule_id or "",
        effect=decision.effect.value,
        reason=decision.reason,
        actions=actions,
        column_classes={c: list(v) for c, v in classes.items()},
        classes_decided=list(left),
        regions=list(constraints.regions),
        tee_types=list(constraints.tee_types),
        allow_simulated=constraints.allow_simulated,
    )


def plan_with_config(
    config: TrainingConfig,
    *,
    policy_id: str,
    app: str,
    columns: Sequence[str],
    classes: Mapping[str, Sequence[str]],
    target: str,
    edge_constraints: Constraints,
) -> TrainingPlan:
    if app not in config.apps:
        raise TrainingRefused(
            "policy_denied",
            f"app {app!r} may not train: the edge has no [policy] and [training] apps does not "
            "name it",
        )
    actions = {
        c: _strongest([config.columns.get(k, "drop") for k in classes.get(c, ())]) for c in columns
    }
    _check_target(target, actions, classes)
    table = json.dumps({"apps": list(config.apps), "columns": dict(config.columns)}, sort_keys=True)
    training_id = hashlib.sha256(table.encode()).hexdigest()[:12]
    return TrainingPlan(
        mode="config",
        policy_id=f"{policy_id}+training:{training_id}",
        rule_id="training.apps",
        effect="allow",
        reason=f"app {app!r} is allowed training by the edge config",
        actions=actions,
        column_classes={c: list(v) for c, v in classes.items()},
        classes_decided=sorted(
            {k for c in columns if actions[c] == "keep" for k in classes.get(c, ())}
        ),
        regions=list(edge_constraints.regions),
        tee_types=list(edge_constraints.tee_types),
        allow_simulated=edge_constraints.allow_simulated,
    )


def _check_target(
    target: str, actions: Mapping[str, str], classes: Mapping[str, Sequence[str]]
) -> None:
    if target not in actions:
        raise TrainingRefused("invalid_target", f"target column {target!r} is not in the dataset")
    if actions[target] == "drop":
        raise TrainingRefused(
            "target_dropped",
            f"the target column {target!r} is dropped by policy (class "
            f"{', '.join(classes.get(target, ()))}); it cannot be trained on",
        )


def _narrow(edge: Constraints, engine: EngineDecision) -> Constraints:
    """The edge's constraints narrowed by the decision's destination (never widened)."""
    destination = engine.destination
    regions: tuple[str, ...] | None = None
    tee_types: tuple[str, ...] | None = None
    jurisdictions: tuple[str, ...] = ()
    if destination is not None:
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
    decision = Decision(
        effect=engine.effect.value,
        rule_id=engine.rule_id or "",
        policy_id=engine.policy_id,
        reason=engine.reason,
        destination=destination.name if destination is not None else None,
        regions=regions,
        tee_types=tee_types,
        jurisdictions=jurisdictions,
    )
    try:
        return sealed_constraints(edge, decision)
    except ConstraintConflict as exc:
        raise TrainingRefused("constraint_conflict", str(exc)) from None


# -- where the policy comes from --------------------------------------------------------------


def load_policy_for_cli(config: Any) -> Policy | None:
    """The policy the edge runs (for CLI commands that work on the state directory): the
    directory policy, or from git the commit the agent last activated (signature verified)."""
    cfg = config.policy
    if cfg is None:
        return None
    if cfg.source == "dir":
        return Policy.load(cfg.path)
    from edge_agent.policy import STATUS_FILE
    from sovra.policy import load_from_git

    status = read_status(Path(config.state_dir) / STATUS_FILE) or {}
    commit = (status.get("active") or {}).get("commit") or cfg.rev
    policy, _info = load_from_git(cfg.path, commit, cfg.allowed_signers)
    return policy
