"""Decisions: each effect, precedence, default deny, classification limits, and the compiled
matcher agreeing with the reference (composable) conditions."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest

from sovra.policy import (
    AllOf,
    AnyOf,
    ApplicationIn,
    DecisionForbids,
    Effect,
    Failure,
    InputTooLarge,
    Policy,
    Pseudonymiser,
    RequestFacts,
    Success,
)

HEADER = """\
classes: [public, internal, confidential, restricted]
purposes: [inference, training]
detectors:
  - builtin: CN_RESIDENT_ID
    class: confidential
  - builtin: EMAIL
    class: confidential
  - builtin: IPV4
    class: internal
  - name: PROJECT
    keywords: [Bluebird, 青鸟]
    class: restricted
applications:
  app-a: {purposes: [inference, training]}
  app-b: {purposes: [inference]}
destinations:
  cn:
    jurisdictions: [CN]
    regions: [cn-north-1]
    tee_types: [sim-ascend-cvm, virtcca]
    models: [m1, m2]
"""

RESIDENT_ID = "11010519491231002X"
EMAIL = "li.wei@example.com"


def policy_with(tmp_path: Path, rules: str) -> Policy:
    (tmp_path / "policy.yaml").write_text(
        HEADER + "rules:\n" + textwrap.indent(textwrap.dedent(rules), "  "), encoding="utf-8"
    )
    return Policy.load(tmp_path)


RULES = """\
- id: restricted-local
  match: {classes_present: [restricted]}
  effect: keep-local
- id: no-training-on-ids
  match: {purposes: [training], classes_present: [confidential, restricted]}
  effect: deny
- id: a-pseudo
  match: {applications: [app-a], purposes: [inference], classes_present: [confidential]}
  effect: pseudonymise
  destination: cn
  obligations: {pseudonymise_classes: [confidential]}
- id: a-clean
  match: {applications: [app-a], max_class: internal}
  effect: allow
  destination: cn
  obligations: {retention: P30D}
- id: b-allow-anything
  match: {applications: [app-b]}
  effect: allow
  destination: cn
- id: b-no-m2
  match: {applications: [app-b], models: [m2]}
  effect: deny
"""


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return policy_with(tmp_path, RULES)


def decide(policy: Policy, app: str, purpose: str, model: str, text: str, **kw: object):  # type: ignore[no-untyped-def]
    return policy.decide(app, purpose, model, policy.classify(text, **kw))  # type: ignore[arg-type]


def test_allow(policy: Policy) -> None:
    decision = decide(policy, "app-a", "inference", "m1", "server 10.1.2.3 is slow")
    assert decision.effect is Effect.ALLOW and decision.rule_id == "a-clean"
    assert decision.may_leave
    assert decision.classes == ("internal",)
    assert dict(decision.entity_counts) == {"IPV4": 1}
    assert decision.destination is not None and decision.destination.name == "cn"
    assert decision.obligations.retention == "P30D"
    assert decision.obligations.allowed_jurisdictions == ("CN",)
    assert decision.policy_id == policy.id


def test_pseudonymise(policy: Policy) -> None:
    decision = decide(policy, "app-a", "inference", "m1", f"ID {RESIDENT_ID}, server 10.1.2.3")
    assert decision.effect is Effect.PSEUDONYMISE and decision.rule_id == "a-pseudo"
    assert decision.obligations.pseudonymise_classes == ("confidential",)
    assert decision.classes == ("internal", "confidential")


def test_keep_local(policy: Policy) -> None:
    decision = decide(policy, "app-a", "inference", "m1", f"青鸟项目 {EMAIL}")
    assert decision.effect is Effect.KEEP_LOCAL and decision.rule_id == "restricted-local"
    assert not decision.may_leave and decision.destination is None
    # keep-local beats the pseudonymise rule that matched too
    assert set(decision.matched_rules) == {"restricted-local", "a-pseudo"}


def test_deny_beats_allow(policy: Policy) -> None:
    decision = decide(policy, "app-b", "inference", "m2", "hello")
    assert decision.effect is Effect.DENY and decision.rule_id == "b-no-m2"
    assert decision.matched_rules == ("b-allow-anything", "b-no-m2")
    assert decide(policy, "app-b", "inference", "m1", "hello").effect is Effect.ALLOW


def test_deny_beats_keep_local(policy: Policy) -> None:
    decision = decide(policy, "app-a", "training", "m1", "Bluebird roadmap")
    assert decision.effect is Effect.DENY and decision.rule_id == "no-training-on-ids"


def test_pseudonymise_beats_allow_and_first_rule_of_winning_effect_decides(
    tmp_path: Path,
) -> None:
    policy = policy_with(
        tmp_path,
        """\
        - id: allow-all
          match: {applications: [app-a]}
          effect: allow
          destination: cn
        - id: pseudo-1
          match: {applications: [app-a], classes_present: [confidential]}
          effect: pseudonymise
          destination: cn
        - id: pseudo-2
          match: {purposes: [inference], classes_present: [confidential]}
          effect: pseudonymise
          destination: cn
          obligations: {retention: P1D}
        """,
    )
    decision = decide(policy, "app-a", "inference", "m1", f"mail {EMAIL}")
    assert decision.effect is Effect.PSEUDONYMISE and decision.rule_id == "pseudo-1"
    assert decision.matched_rules == ("allow-all", "pseudo-1", "pseudo-2")
    assert decision.obligations.retention == "none"  # the deciding rule's obligations


def test_default_deny(policy: Policy) -> None:
    # app-b may not use the training purpose at all
    decision = decide(policy, "app-b", "training", "m1", "hello")
    assert decision.effect is Effect.DENY and decision.rule_id is None
    assert "not allowed for application 'app-b'" in decision.reason
    # no rule at all for app-a + inference + confidential on an unknown model
    decision = decide(policy, "app-a", "inference", "unknown-model", f"id {RESIDENT_ID}")
    assert decision.effect is Effect.DENY and decision.rule_id is None
    assert decision.reason == "no rule matched; deny by default"
    assert decision.matched_rules == ()


def test_policy_without_rules_denies_everything(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(HEADER, encoding="utf-8")
    policy = Policy.load(tmp_path)
    assert decide(policy, "app-a", "inference", "m1", "hi").effect is Effect.DENY


def test_unknown_application_and_purpose(policy: Policy) -> None:
    unknown_app = decide(policy, "intruder", "inference", "m1", "hi")
    assert unknown_app.effect is Effect.DENY and "not defined" in unknown_app.reason
    unknown_purpose = decide(policy, "app-a", "marketing", "m1", "hi")
    assert unknown_purpose.effect is Effect.DENY and "purpose 'marketing'" in unknown_purpose.reason


def test_destination_must_serve_the_model(policy: Policy) -> None:
    # b-allow-anything has no model condition, but its destination serves only m1 and m2
    decision = decide(policy, "app-b", "inference", "m3", "hi")
    assert decision.effect is Effect.DENY and decision.rule_id is None


def test_declared_labels(policy: Policy) -> None:
    decision = decide(policy, "app-a", "inference", "m1", "plain", labels=["restricted"])
    assert decision.effect is Effect.KEEP_LOCAL
    with pytest.raises(ValueError, match="undefined class label"):
        policy.classify("x", labels=["secret"])


def test_classification_from_another_policy_is_denied(policy: Policy) -> None:
    foreign = policy.classify("hi")
    foreign = type(foreign)(foreign.findings, ("top-secret",), foreign.entity_counts)
    decision = policy.decide("app-a", "inference", "m1", foreign)
    assert decision.effect is Effect.DENY and "undefined class" in decision.reason


def test_decide_is_pure(policy: Policy) -> None:
    classification = policy.classify(f"{EMAIL} 10.0.0.1")
    first = policy.decide("app-a", "inference", "m1", classification)
    assert all(policy.decide("app-a", "inference", "m1", classification) == first for _ in range(3))


def test_outbound_text(policy: Policy) -> None:
    text = f"患者身份证{RESIDENT_ID}, mail {EMAIL}, host 10.1.2.3"
    classification = policy.classify(text)
    decision = policy.decide("app-a", "inference", "m1", classification)
    conversation = Pseudonymiser()
    out = policy.outbound_text(text, classification, decision, conversation)
    assert out == "患者身份证<CN_RESIDENT_ID_1>, mail <EMAIL_1>, host 10.1.2.3"
    assert conversation.restore(out) == text
    clean = policy.classify("host 10.1.2.3")
    allow = policy.decide("app-a", "inference", "m1", clean)
    assert policy.outbound_text("host 10.1.2.3", clean, allow, conversation) == "host 10.1.2.3"
    local = policy.classify("Bluebird")
    keep = policy.decide("app-a", "inference", "m1", local)
    with pytest.raises(DecisionForbids):
        policy.outbound_text("Bluebird", local, keep, conversation)


def test_decisions_and_classifications_never_carry_values(policy: Policy) -> None:
    text = f"{RESIDENT_ID} {EMAIL}"
    classification = policy.classify(text)
    decision = policy.decide("app-a", "inference", "m1", classification)
    explanation = policy.explain("app-a", "inference", "m1", classification)
    rendered = " ".join(
        [
            repr(classification),
            repr(decision),
            json.dumps(decision.to_dict(), ensure_ascii=False),
            json.dumps(classification.to_dict()),
            json.dumps(explanation.to_dict(), ensure_ascii=False),
        ]
    )
    assert RESIDENT_ID not in rendered and EMAIL not in rendered


# --- input limits -----------------------------------------------------------------------------


def test_huge_input_is_refused_clearly(policy: Policy) -> None:
    with pytest.raises(InputTooLarge, match="classification limit"):
        policy.classify("x" * (policy.max_text_chars + 1))
    small = Policy(policy.spec, max_text_chars=10)
    with pytest.raises(InputTooLarge):
        small.classify("12345678901")
    assert small.classify("1234567890").entity_counts == {}


def test_bytes_and_binary_input(policy: Policy) -> None:
    with pytest.raises(TypeError, match="decode bytes first"):
        policy.classify(b"\x00\x01")  # type: ignore[arg-type]
    noise = bytes(random.Random(7).randrange(256) for _ in range(200_000)).decode("latin-1")
    classification = policy.classify(noise + f"\x00{EMAIL}\x00")
    assert classification.entity_counts.get("EMAIL", 0) >= 1


# --- composable conditions and the compiled matcher -------------------------------------------


def test_all_of_and_any_of() -> None:
    facts = RequestFacts("a", "inference", "m", frozenset(), -1)
    assert not AllOf(()).verify(facts)
    assert isinstance(AllOf(()).verify(facts), Failure)
    assert isinstance(AnyOf(()).verify(facts), Failure)
    yes, no = ApplicationIn(frozenset({"a"})), ApplicationIn(frozenset({"b"}))
    assert AllOf((yes,)).verify(facts) == Success()
    assert isinstance(AllOf((yes, no)).verify(facts), Failure)
    assert AnyOf((no, yes)).verify(facts) == Success()
    result = AnyOf((no, no)).verify(facts)
    assert isinstance(result, Failure) and "not one of" in result.reason


def test_compiled_matcher_agrees_with_reference_conditions(tmp_path: Path) -> None:
    rng = random.Random(20240601)
    apps, purposes, models = ["app-a", "app-b"], ["inference", "training"], ["m1", "m2", "m9"]
    classes = ["public", "internal", "confidential", "restricted"]
    effects = ["allow", "pseudonymise", "deny", "keep-local"]
    rules = []
    for i in range(60):
        match: dict[str, object] = {}
        while not match:
            if rng.random() < 0.5:
                match["applications"] = rng.sample(apps, rng.randint(1, 2))
            if rng.random() < 0.4:
                match["purposes"] = rng.sample(purposes, 1)
            if rng.random() < 0.4:
                match["models"] = rng.sample(models, rng.randint(1, 2))
            top = rng.randrange(4)
            if rng.random() < 0.4:
                match["max_class"] = classes[top]
            if rng.random() < 0.4:
                match["classes_present"] = rng.sample(classes[: top + 1], rng.randint(1, top + 1))
        rule: dict[str, object] = {"id": f"r{i}", "match": match, "effect": rng.choice(effects)}
        if rule["effect"] in ("allow", "pseudonymise"):
            rule["destination"] = "cn"
        rules.append(rule)
    policy = policy_with(tmp_path, json.dumps(rules))
    by_id = {r.id: r for r in policy.rules}
    precedence = ["deny", "keep-local", "pseudonymise", "allow"]
    for _ in range(400):
        present = tuple(c for c in classes if rng.random() < 0.3)
        app = rng.choice([*apps, "ghost"])
        purpose, model = rng.choice(purposes), rng.choice(models)
        classification = policy.classify("")
        classification = type(classification)((), present, {})
        explanation = policy.explain(app, purpose, model, classification)
        matched = tuple(rule_id for rule_id, result in explanation.rules if result)
        decision = explanation.decision
        assert decision.matched_rules == matched
        if not matched:
            assert decision.effect is Effect.DENY and decision.rule_id is None
            continue
        winner = next(
            rule_id
            for effect in precedence
            for rule_id in matched
            if by_id[rule_id].effect.value == effect
        )
        assert decision.rule_id == winner
        assert decision.effect is by_id[winner].effect
