"""``sovra audit verify|tail|export --config EDGE.toml``: one implementation shared with
``sovra edge audit``; exit 0 ok, 1 chain broken, 2 usage."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from edge_agent import audit_cli
from edge_agent import cli as edge_cli
from sovra import cli as sovra_cli
from sovra.audit import GENESIS_HASH, AuditLog, canonical_json, entry_hash


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(
        'tenant = "demo"\nlisten = "127.0.0.1:0"\nstate_dir = "state"\n'
        'broker = "127.0.0.1:7443"\nreference_values = "rv.yaml"\n'
        '[tls]\ncert = "c.pem"\nkey = "c.key"\nca = "ca.pem"\n'
    )
    return path


@pytest.fixture
def audit_db(config: Path) -> Path:
    path = config.parent / "state" / "audit.db"
    with AuditLog(path) as log:
        log.append("edge", {"event": "start", "pid": 1})
        for i in range(4):
            log.append("request", {"request_id": f"r{i}", "decision": "allow", "status": 200})
        log.append("policy", {"event": "refused", "reason": "commit abc is not signed"})
    return path


def run(*args: str) -> int:
    return sovra_cli.main(list(args))


def test_verify_tail_and_export(
    config: Path, audit_db: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run("audit", "verify", "--config", str(config)) == 0
    assert "ok: 6 entries, chain intact" in capsys.readouterr().out

    assert run("audit", "tail", "--config", str(config), "-n", "2") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["seq"] for e in lines] == [5, 6]
    assert lines[-1]["kind"] == "policy" and lines[-1]["record"]["event"] == "refused"

    assert run("audit", "export", "--config", str(config), "--format", "jsonl") == 0
    captured = capsys.readouterr()
    exported = [json.loads(line) for line in captured.out.splitlines()]
    assert "exported 6 entries, chain intact" in captured.err
    # The export is the chain itself: anyone can re-verify it from the lines alone.
    prev = GENESIS_HASH
    for entry in exported:
        assert entry["prev_hash"] == prev
        digest = entry_hash(
            prev, entry["seq"], entry["ts_ms"], entry["kind"], canonical_json(entry["record"])
        )
        assert digest == entry["hash"]
        prev = digest

    out = tmp_path / "audit.jsonl"
    assert run("audit", "export", "--config", str(config), "-o", str(out)) == 0
    assert out.read_text().splitlines() == captured.out.splitlines()


def test_broken_chain_exits_1(
    config: Path, audit_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(audit_db) as conn:
        conn.execute("""UPDATE audit SET record = '{"decision":"deny"}' WHERE seq = 3""")
    assert run("audit", "verify", "--config", str(config)) == 1
    assert "BROKEN at entry 3" in capsys.readouterr().err
    assert run("audit", "export", "--config", str(config)) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 6  # everything is exported, and flagged
    assert "BROKEN at entry 3" in captured.err
    assert run("audit", "tail", "--config", str(config), "-n", "1") == 0  # tail only shows
    # `sovra edge audit` is the same implementation.
    assert run("edge", "audit", "verify", "--config", str(config)) == 1
    assert edge_cli._audit_verify is audit_cli.run_verify
    assert edge_cli._audit_tail is audit_cli.run_tail


def test_usage_errors_exit_2(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No audit log yet, a missing or invalid config, a bad -n: usage errors, not "broken".
    for command in ("verify", "tail", "export"):
        assert run("audit", command, "--config", str(config)) == 2
        assert "no audit log" in capsys.readouterr().err
        assert run("audit", command, "--config", str(tmp_path / "missing.toml")) == 2
        assert "cannot read" in capsys.readouterr().err
    with AuditLog(config.parent / "state" / "audit.db") as log:
        log.append("edge", {"event": "start"})
    assert run("audit", "tail", "--config", str(config), "-n", "0") == 2
    assert "-n must be at least 1" in capsys.readouterr().err
    assert run("audit", "export", "--config", str(config), "-o", str(tmp_path / "no/dir/x")) == 2
    for argv in (
        ["audit", "export", "--config", str(config), "--format", "csv"],
        ["audit", "verify"],
        ["audit"],
    ):
        with pytest.raises(SystemExit) as info:
            run(*argv)
        assert info.value.code == 2
