"""Policy language: loading, merging, and validation errors that name file, line and path."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from sovra.policy import Effect, Policy, PolicyInvalid, PolicyProblem
from sovra.policy.language import parse_policy, read_policy_dir

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "policy"

BASE = {
    "base.yaml": """\
        classes: [public, internal, confidential, restricted]
        purposes: [inference, training]
        detectors:
          - builtin: CN_RESIDENT_ID
            class: confidential
          - builtin: EMAIL
            class: confidential
        applications:
          app-a:
            purposes: [inference, training]
        destinations:
          cn:
            jurisdictions: [CN]
            tee_types: [sim-ascend-cvm, virtcca]
            models: [m1]
        """,
}


def write(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return tmp_path


def problems_for(tmp_path: Path, rules_yaml: str, name: str = "rules.yaml") -> list[PolicyProblem]:
    write(tmp_path, {**BASE, name: rules_yaml})
    with pytest.raises(PolicyInvalid) as info:
        Policy.load(tmp_path)
    return list(info.value.problems)


def only(problems: list[PolicyProblem], needle: str) -> PolicyProblem:
    found = [p for p in problems if needle in p.message]
    assert len(found) == 1, problems
    return found[0]


# --- loading ----------------------------------------------------------------------------------


def test_example_policy_loads_in_file_order() -> None:
    policy = Policy.load(EXAMPLE)
    assert policy.classes == ("public", "internal", "confidential", "restricted")
    assert [r.id for r in policy.rules][:3] == [
        "restricted-stays-local",
        "no-raw-identifiers-for-training",
        "no-offshore-models",
    ]
    assert policy.rules[-1].id == "research-training-deidentified"
    assert len(policy.spec.tests) >= 10
    assert policy.id.startswith("dir:") and len(policy.id) == 4 + 64
    assert set(policy.spec.applications) == {
        "clinical-assistant",
        "billing-bot",
        "research-pipeline",
    }


def test_policy_id_is_deterministic_and_content_addressed(tmp_path: Path) -> None:
    files = read_policy_dir(EXAMPLE)
    first = Policy.from_files(files).id
    assert Policy.from_files(dict(reversed(list(files.items())))).id == first
    changed = dict(files)
    changed["classes.yaml"] += b"\n# a comment changes the id\n"
    assert Policy.from_files(changed).id != first
    assert Policy.from_files(files, policy_id="0" * 40).id == "0" * 40


def test_hidden_files_and_other_suffixes_are_ignored(tmp_path: Path) -> None:
    write(
        tmp_path,
        {**BASE, ".hidden.yaml": "nonsense: [", "notes.txt": "x", "sub/r.yml": "rules: []"},
    )
    assert read_policy_dir(tmp_path).keys() == {"base.yaml", "sub/r.yml"}


def test_defaults_filled_from_destination(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            **BASE,
            "rules.yaml": """\
                rules:
                  - id: p
                    match: {applications: [app-a]}
                    effect: pseudonymise
                    destination: cn
                """,
        },
    )
    rule = Policy.load(tmp_path).rules[0]
    assert rule.effect is Effect.PSEUDONYMISE
    assert rule.obligations.allowed_jurisdictions == ("CN",)
    assert rule.obligations.accepted_tee_types == ("sim-ascend-cvm", "virtcca")
    assert rule.obligations.min_attestation == "affirming"
    assert rule.obligations.retention == "none"
    assert rule.obligations.pseudonymise_classes == ("confidential", "restricted")


# --- problems name file, line and path --------------------------------------------------------


def test_unknown_key_names_file_line_path_and_suggests(tmp_path: Path) -> None:
    problems = problems_for(
        tmp_path,
        """\
        rules:
          - id: r1
            match:
              applications: [app-a]
              classes_presnt: [confidential]
            effect: deny
        """,
    )
    problem = only(problems, "unknown key")
    assert (problem.file, problem.line, problem.path) == (
        "rules.yaml",
        5,
        "rules[0].match.classes_presnt",
    )
    assert "did you mean 'classes_present'" in problem.message
    assert str(problem).startswith("rules.yaml:5: rules[0].match.classes_presnt: unknown key")


def test_wrong_type(tmp_path: Path) -> None:
    problems = problems_for(
        tmp_path,
        """\
        rules:
          - id: r1
            match: {applications: [app-a]}
            effect: 3
        """,
    )
    problem = only(problems, "expected a string")
    assert (problem.line, problem.path) == (4, "rules[0].effect")


def test_yaml_boolean_trap_is_explained(tmp_path: Path) -> None:
    write(tmp_path, {**BASE, "dest.yaml": "destinations:\n  no:\n    jurisdictions: [NO]\n"})
    with pytest.raises(PolicyInvalid) as info:
        Policy.load(tmp_path)
    messages = " ".join(p.message for p in info.value.problems)
    assert "quote it" in messages


@pytest.mark.parametrize(
    ("rules_yaml", "needle", "path", "line"),
    [
        (
            "rules:\n  - id: r\n    match: {applications: [app-z]}\n    effect: deny\n",
            "undefined application 'app-z'",
            "rules[0].match.applications[0]",
            3,
        ),
        (
            "rules:\n  - id: r\n    match:\n      purposes: [inference, fun]\n    effect: deny\n",
            "undefined purpose 'fun'",
            "rules[0].match.purposes[1]",
            4,
        ),
        (
            "rules:\n  - id: r\n    match: {max_class: secret}\n    effect: deny\n",
            "undefined class 'secret'",
            "rules[0].match.max_class",
            3,
        ),
        (
            "rules:\n  - id: r\n    match: {purposes: [inference]}\n    effect: allow\n"
            "    destination: eu\n",
            "undefined destination 'eu'",
            "rules[0].destination",
            5,
        ),
        (
            "rules:\n  - id: r\n    match: {purposes: [inference]}\n    effect: maybe\n",
            "unknown effect 'maybe'",
            "rules[0].effect",
            4,
        ),
        (
            "rules:\n  - id: r\n    match: {}\n    effect: deny\n",
            "empty match",
            "rules[0].match",
            3,
        ),
        (
            "rules:\n  - id: r\n    match: {purposes: [inference]}\n    effect: allow\n",
            "needs a 'destination'",
            "rules[0]",
            2,
        ),
        (
            "rules:\n  - id: r\n    match: {purposes: [inference]}\n    effect: deny\n"
            "    destination: cn\n",
            "meaningless for effect 'deny'",
            "rules[0].destination",
            5,
        ),
        (
            "rules:\n  - id: r\n    match: {purposes: [inference]}\n    effect: allow\n"
            "    destination: cn\n    obligations:\n      allowed_jurisdictions: [CN, US]\n",
            "not offered by destination 'cn'",
            "rules[0].obligations.allowed_jurisdictions[1]",
            7,
        ),
        (
            "rules:\n  - id: r\n    match: {purposes: [inference]}\n    effect: allow\n"
            "    destination: cn\n    obligations: {retention: forever}\n",
            "invalid retention 'forever'",
            "rules[0].obligations.retention",
            6,
        ),
        (
            "rules:\n  - id: r\n    match: {purposes: [inference]}\n    effect: allow\n"
            "    destination: cn\n    obligations: {min_attestation: hopeful}\n",
            "unknown attestation level",
            "rules[0].obligations.min_attestation",
            6,
        ),
        (
            "rules:\n  - id: r\n    match: {purposes: [inference]}\n    effect: allow\n"
            "    destination: cn\n    obligations: {pseudonymise_classes: [confidential]}\n",
            "only valid when effect is 'pseudonymise'",
            "rules[0].obligations.pseudonymise_classes",
            6,
        ),
        (
            "rules:\n  - id: r\n    match:\n      classes_present: [restricted]\n"
            "      max_class: internal\n    effect: deny\n",
            "can never match",
            "rules[0].match.classes_present",
            4,
        ),
    ],
)
def test_reference_and_value_problems(
    tmp_path: Path, rules_yaml: str, needle: str, path: str, line: int
) -> None:
    problem = only(problems_for(tmp_path, rules_yaml), needle)
    assert (problem.file, problem.path, problem.line) == ("rules.yaml", path, line)


def test_duplicate_rule_ids_across_files_name_the_first(tmp_path: Path) -> None:
    rule = "rules:\n  - id: same\n    match: {purposes: [inference]}\n    effect: deny\n"
    write(tmp_path, {**BASE, "a.yaml": rule, "b/c.yaml": "\n" + rule})
    with pytest.raises(PolicyInvalid) as info:
        Policy.load(tmp_path)
    problem = only(list(info.value.problems), "duplicate rule id 'same'")
    assert (problem.file, problem.line, problem.path) == ("b/c.yaml", 3, "rules[0].id")
    assert "a.yaml:2" in problem.message


DETECTOR_CASES = [
    ("- name: MRN\n  regex: 'MRN-(\\d{6}'", "invalid regular expression", "detectors[0].regex"),
    (
        "- name: MRN\n  regex: 'MRN-\\d{6}'\n  validator: luhn2",
        "undefined validator 'luhn2'",
        "detectors[0].validator",
    ),
    ("- builtin: CN_PASSPORT", "undefined built-in detector 'CN_PASSPORT'", "detectors[0].builtin"),
    ("- builtin: US_SSN\n  class: secret", "undefined class 'secret'", "detectors[0].class"),
    ("- name: mrn\n  regex: 'x'", "invalid entity type 'mrn'", "detectors[0].name"),
    ("- name: X\n  regex: 'a*'", "matches the empty string", "detectors[0].regex"),
    (
        "- name: X\n  regex: 'a'\n  keywords: [b]",
        "exactly one of 'regex' or 'keywords'",
        "detectors[0]",
    ),
    ("- builtin: IBAN\n- builtin: IBAN", "already enabled", "detectors[1]"),
]


@pytest.mark.parametrize(("detector", "needle", "path"), DETECTOR_CASES)
def test_detector_problems(tmp_path: Path, detector: str, needle: str, path: str) -> None:
    # every item gets a class unless the case sets one
    items = detector.replace("\n- ", "\n  class: confidential\n- ")
    if "class:" not in items.rsplit("\n- ", 1)[-1]:
        items += "\n  class: confidential"
    write(tmp_path, {**BASE, "det.yaml": "detectors:\n" + textwrap.indent(items, "  ") + "\n"})
    with pytest.raises(PolicyInvalid) as info:
        Policy.load(tmp_path)
    problem = only(list(info.value.problems), needle)
    assert problem.file == "det.yaml" and problem.path == path and problem.line is not None


def test_yaml_syntax_error_and_duplicate_keys(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            **BASE,
            "bad.yaml": "rules:\n  - id: x\n    effect: [deny\n",
            "dup.yaml": "purposes: [a]\npurposes: [b]\n",
        },
    )
    with pytest.raises(PolicyInvalid) as info:
        Policy.load(tmp_path)
    problems = list(info.value.problems)
    syntax = only(problems, "YAML syntax error")
    assert syntax.file == "bad.yaml" and syntax.line is not None
    duplicate = only(problems, "duplicate key 'purposes'")
    assert (duplicate.file, duplicate.line) == ("dup.yaml", 2)


def test_classes_required_once(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": "purposes: [inference]\n"})
    with pytest.raises(PolicyInvalid, match="no file defines 'classes'"):
        Policy.load(tmp_path)
    write(tmp_path, {**BASE, "z.yaml": "classes: [x]\n"})
    with pytest.raises(PolicyInvalid, match=r"'classes' already defined at base\.yaml:1"):
        Policy.load(tmp_path)


def test_binary_and_non_utf8_files_are_clear_problems(tmp_path: Path) -> None:
    write(tmp_path, BASE)
    (tmp_path / "blob.yaml").write_bytes(b"\x00\x01\x02binary\xff")
    (tmp_path / "latin.yaml").write_bytes("rules: []  # caf\xe9".encode("latin-1"))
    with pytest.raises(PolicyInvalid) as info:
        Policy.load(tmp_path)
    messages = {p.file: p.message for p in info.value.problems}
    assert "NUL bytes" in messages["blob.yaml"]
    assert "not valid UTF-8" in messages["latin.yaml"]


def test_alias_bomb_is_bounded(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    write(tmp_path, {**BASE, "bomb.yaml": "\n".join(lines) + "\n"})
    with pytest.raises(PolicyInvalid) as info:
        Policy.load(tmp_path)
    assert any("more than" in p.message and p.file == "bomb.yaml" for p in info.value.problems)


def test_missing_and_empty_directories(tmp_path: Path) -> None:
    with pytest.raises(PolicyInvalid, match="not a directory"):
        Policy.load(tmp_path / "nope")
    with pytest.raises(PolicyInvalid, match=r"no \*.yaml policy files"):
        Policy.load(tmp_path)


def test_test_case_problems_never_quote_the_text(tmp_path: Path) -> None:
    secret = "11010519491231002X"
    problems = problems_for(
        tmp_path,
        f"""\
        tests:
          - name: t
            app: app-a
            purpose: inference
            model: m1
            text: "身份证 {secret}"
            expect: {{effect: allow, rule: nope, entities: {{PHONE: 1}}}}
        """,
        name="tests.yaml",
    )
    assert only(problems, "undefined rule 'nope'").path == "tests[0].expect.rule"
    rendered = str(PolicyInvalid(problems))
    assert secret not in rendered


def test_schema_accepts_example_and_rejects_mistakes() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema_path = Path(__file__).resolve().parents[1] / "sovra" / "policy" / "schema.json"
    validator = jsonschema.Draft202012Validator(json.loads(schema_path.read_text()))
    for path in sorted(EXAMPLE.rglob("*.yaml")):
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8"))))
        assert not errors, (path, [e.message for e in errors])
    bad = {"rules": [{"id": "r", "match": {"modles": ["m"]}, "effect": "allow"}]}
    assert list(validator.iter_errors(bad))


def test_parse_policy_requires_files() -> None:
    with pytest.raises(PolicyInvalid):
        parse_policy({})
