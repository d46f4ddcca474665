"""Running the tests a policy ships with (the ``tests:`` section).

Each case classifies its ``text`` (plus declared ``labels``), decides for its app, purpose and
model, and compares: the effect always; the deciding rule when ``rule`` is given (``rule: null``
expects a denial no rule made); the entity counts when ``entities`` is given (exactly: a type
not listed must not be found).  Failure messages name types, counts, effects and rule ids,
never the text or the values found in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sovra.policy.engine import Policy
from sovra.policy.language import PolicyError, PolicyTestCase, Source

__all__ = ["CaseResult", "PolicyTestReport", "run_case", "run_tests"]


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    passed: bool
    failures: tuple[str, ...]
    effect: str | None
    rule_id: str | None
    source: Source | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "failures": list(self.failures),
            "effect": self.effect,
            "rule": self.rule_id,
            "source": str(self.source) if self.source else None,
        }


@dataclass(frozen=True, slots=True)
class PolicyTestReport:
    policy_id: str
    results: tuple[CaseResult, ...]

    @property
    def passed(self) -> int:
        return sum(1 for r in self.results if r.passed)

    @property
    def failed(self) -> tuple[CaseResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        total = len(self.results)
        if self.ok:
            return f"{total} policy test{'s' if total != 1 else ''} passed"
        names = ", ".join(repr(r.name) for r in self.failed[:5])
        more = "" if len(self.failed) <= 5 else f" and {len(self.failed) - 5} more"
        return f"{len(self.failed)} of {total} policy tests failed: {names}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy_id,
            "ok": self.ok,
            "passed": self.passed,
            "failed": len(self.failed),
            "results": [r.to_dict() for r in self.results],
        }


def run_case(policy: Policy, case: PolicyTestCase) -> CaseResult:
    try:
        classification = policy.classify(case.text, labels=case.labels)
        decision = policy.decide(case.app, case.purpose, case.model, classification)
    except (PolicyError, ValueError, TypeError) as exc:
        return CaseResult(
            case.name, False, (f"error: {type(exc).__name__}",), None, None, case.source
        )
    failures: list[str] = []
    expect = case.expect
    if decision.effect is not expect.effect:
        failures.append(
            f"expected effect {expect.effect.value!r}, got {decision.effect.value!r} "
            f"({decision.reason})"
        )
    if expect.check_rule and decision.rule_id != expect.rule:
        failures.append(f"expected rule {expect.rule!r}, got {decision.rule_id!r}")
    if expect.entities is not None:
        want = {t: n for t, n in expect.entities.items() if n}
        got = dict(classification.entity_counts)
        if want != got:
            failures.append(
                f"expected entities {dict(sorted(want.items()))}, got {dict(sorted(got.items()))}"
            )
    return CaseResult(
        case.name,
        not failures,
        tuple(failures),
        decision.effect.value,
        decision.rule_id,
        case.source,
    )


def run_tests(policy: Policy) -> PolicyTestReport:
    """Run every test case of ``policy``, in file order."""
    return PolicyTestReport(policy.id, tuple(run_case(policy, case) for case in policy.spec.tests))
