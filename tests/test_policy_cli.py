"""``sovra policy`` validate / test / explain: exit codes (0 ok, 1 invalid, 2 usage) and JSON."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from sovra.policy import cli as policy_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "policy"
RESIDENT_ID = "11010519491231002X"
MOBILE = "13812345678"


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sovra")
    policy_cli.register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def explain_argv(*extra: str) -> list[str]:
    return [
        "policy", "explain", str(EXAMPLE),
        "--app", "clinical-assistant", "--purpose", "inference", "--model", "smollm2-135m",
        *extra,
    ]  # fmt: skip


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["policy", "validate", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.startswith("ok: dir:")
    assert run(["policy", "validate", str(EXAMPLE), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["problems"] == [] and doc["rules"] == 10


def test_validate_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(EXAMPLE, tmp_path / "p")
    (tmp_path / "p" / "rules" / "30-bad.yaml").write_text(
        "rules:\n  - id: bad\n    match: {applications: [pharmacy]}\n    effect: deny\n"
    )
    assert run(["policy", "validate", str(tmp_path / "p")]) == 1
    out = capsys.readouterr().out
    assert "rules/30-bad.yaml:3: rules[0].match.applications[0]: undefined application" in out
    assert run(["policy", "validate", str(tmp_path / "p"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert doc["problems"][0] == {
        "file": "rules/30-bad.yaml",
        "line": 3,
        "path": "rules[0].match.applications[0]",
        "message": doc["problems"][0]["message"],
    }


def test_validate_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["policy", "validate", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run(["policy", "validate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        run(["policy"])
    assert info.value.code == 2


def test_test_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["policy", "test", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS ") >= 10 and "policy tests passed" in out
    shutil.copytree(EXAMPLE, tmp_path / "p")
    (tmp_path / "p" / "tests" / "wrong.yaml").write_text(
        "tests:\n  - name: wrong expectation\n    app: billing-bot\n    purpose: inference\n"
        f"    model: smollm2-135m\n    text: 'call {MOBILE}'\n"
        "    expect: {effect: allow, entities: {EMAIL: 1}}\n"
    )
    assert run(["policy", "test", str(tmp_path / "p")]) == 1
    out = capsys.readouterr().out
    assert "FAIL wrong expectation (tests/wrong.yaml:2)" in out
    assert "expected effect 'allow', got 'pseudonymise'" in out
    assert "expected entities {'EMAIL': 1}, got {'CN_MOBILE': 1}" in out
    assert MOBILE not in out
    assert run(["policy", "test", str(tmp_path / "p"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["failed"] == 1 and doc["passed"] >= 10


def test_explain_text(capsys: pytest.CaptureFixture[str]) -> None:
    text = f"身份证{RESIDENT_ID}，电话{MOBILE}，MRN-204518 复诊"
    assert run(explain_argv("--text", text)) == 0
    out = capsys.readouterr().out
    assert "effect:      pseudonymise" in out
    assert "rule:        clinical-pseudonymised" in out
    assert "entities:    CN_MOBILE=1, CN_RESIDENT_ID=1, MRN=1" in out
    assert "身份证<CN_RESIDENT_ID_1>，电话<CN_MOBILE_1>，<MRN_1> 复诊" in out
    assert RESIDENT_ID not in out and MOBILE not in out


def test_explain_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "note.txt"
    source.write_text(f"Patient {RESIDENT_ID} asks about HIV test results.", encoding="utf-8")
    assert run(explain_argv("--file", str(source), "--json")) == 0
    raw = capsys.readouterr().out
    doc = json.loads(raw)
    decision = doc["decision"]
    assert decision["effect"] == "keep-local" and decision["rule"] == "restricted-stays-local"
    assert decision["entity_counts"] == {"CN_RESIDENT_ID": 1, "SPECIAL_CATEGORY": 1}
    assert decision["obligations"] is None and decision["destination"] is None
    assert doc["pseudonymised_text"] is None
    # the pseudonymise rule matched too; keep-local is stronger
    matched = [r["id"] for r in doc["rules"] if r["matched"]]
    assert matched == ["restricted-stays-local", "clinical-pseudonymised"]
    assert decision["matched_rules"] == matched
    assert RESIDENT_ID not in raw


def test_explain_default_deny_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = explain_argv("--text", "hello", "--json")
    argv[argv.index("smollm2-135m")] = "unknown-model"
    assert run(argv) == 0
    decision = json.loads(capsys.readouterr().out)["decision"]
    assert decision["effect"] == "deny" and decision["rule"] is None


def test_explain_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00")
    assert run(explain_argv("--file", str(binary))) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert run(explain_argv("--file", str(tmp_path / "missing.txt"), "--json")) == 2
    assert json.loads(capsys.readouterr().out)["ok"] is False
    assert run(explain_argv("--text", "x", "--label", "top-secret")) == 2
    assert "undefined class label" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run(explain_argv("--text", "x", "--file", str(binary)))
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        run(["policy", "explain", str(EXAMPLE), "--text", "x"])
    assert info.value.code == 2


def test_explain_invalid_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.yaml").write_text("classes: [a]\nrules: 3\n")
    argv = explain_argv("--text", "x")
    argv[2] = str(tmp_path)
    assert run(argv) == 1
    assert "p.yaml:2: rules: expected a list, got integer" in capsys.readouterr().out


def test_main_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    assert policy_cli.main(["policy", "validate", str(EXAMPLE), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
