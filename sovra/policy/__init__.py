"""The Sovra policy engine: what may leave the premises, in what form, for which purpose, to where.

Typical use on the edge::

    from sovra.policy import Policy, Pseudonymiser

    policy = Policy.load("/etc/sovra/policy")              # or gitsource.PolicySource(...)
    classification = policy.classify(text)                  # detectors -> classes, counts
    decision = policy.decide(app, purpose, model, classification)
    if decision.may_leave:
        conversation = Pseudonymiser()                       # one per conversation
        outbound = policy.outbound_text(text, classification, decision, conversation)
        ...                                                  # seal with decision.obligations
        reply = conversation.restore(sealed_reply_text)

``docs/policy.md`` describes the language, the decision semantics and the git signing setup.
"""

from sovra.policy.engine import (
    MAX_TEXT_CHARS,
    AllOf,
    AnyClassPresent,
    AnyOf,
    ApplicationIn,
    Classification,
    Condition,
    Decision,
    DecisionForbids,
    Explanation,
    Failure,
    InputTooLarge,
    MaxClass,
    ModelIn,
    Policy,
    PurposeIn,
    RequestFacts,
    Result,
    Success,
)
from sovra.policy.gitsource import (
    CommitInfo,
    PolicyRefused,
    PolicySource,
    Refusal,
    SourceStatus,
    load_from_git,
)
from sovra.policy.language import (
    Application,
    Destination,
    DetectorSpec,
    Effect,
    Match,
    Obligations,
    PolicyError,
    PolicyInvalid,
    PolicyProblem,
    PolicySpec,
    PolicyTestCase,
    Rule,
)
from sovra.policy.pseudonymise import (
    MappingStore,
    MappingStoreError,
    Pseudonymiser,
    PseudonymiserFull,
    StreamRestorer,
)
from sovra.policy.testing import CaseResult, PolicyTestReport, run_tests

__all__ = [
    "MAX_TEXT_CHARS",
    "AllOf",
    "AnyClassPresent",
    "AnyOf",
    "Application",
    "ApplicationIn",
    "CaseResult",
    "Classification",
    "CommitInfo",
    "Condition",
    "Decision",
    "DecisionForbids",
    "Destination",
    "DetectorSpec",
    "Effect",
    "Explanation",
    "Failure",
    "InputTooLarge",
    "MappingStore",
    "MappingStoreError",
    "Match",
    "MaxClass",
    "ModelIn",
    "Obligations",
    "Policy",
    "PolicyError",
    "PolicyInvalid",
    "PolicyProblem",
    "PolicyRefused",
    "PolicySource",
    "PolicySpec",
    "PolicyTestCase",
    "PolicyTestReport",
    "Pseudonymiser",
    "PseudonymiserFull",
    "PurposeIn",
    "Refusal",
    "RequestFacts",
    "Result",
    "Rule",
    "SourceStatus",
    "StreamRestorer",
    "Success",
    "load_from_git",
    "run_tests",
]
