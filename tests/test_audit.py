"""sovra.audit: the hash chain detects edits, deletions, insertions and reordering made with raw
SQL on the SQLite file, and holds what was appended."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from sovra.audit import GENESIS_HASH, AuditEntry, AuditError, AuditLog, entry_hash


def _filled(path: Path, n: int = 5) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.append("request", {"request_id": f"r{i}", "status": 200, "app": "demo-app"})
    return log


def _sql(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    with db:
        for statement in statements:
            db.execute(statement)
    db.close()


def test_append_links_entries_and_verifies(tmp_path: Path) -> None:
    log = _filled(tmp_path / "audit.db")
    entries = list(log.entries())
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS_HASH
    for prev, cur in itertools.pairwise(entries):
        assert cur.prev_hash == prev.hash
    first = entries[0]
    record = json.dumps(first.record, sort_keys=True, separators=(",", ":"))
    assert first.hash == entry_hash(GENESIS_HASH, 1, first.ts_ms, "request", record)
    report = log.verify()
    assert report.ok and report.entries == 5 and report.first_bad_seq is None


def test_empty_log_verifies(tmp_path: Path) -> None:
    assert AuditLog(tmp_path / "a.db").verify().ok


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _filled(path, 2).close()
    with AuditLog(path) as log:
        entry = log.append("edge", {"event": "start"})
        assert entry.seq == 3
        assert log.verify().ok


def test_edit_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _filled(path).close()
    _sql(
        path,
        """UPDATE audit SET record = '{"app":"demo-app","request_id":"r2","status":403}'
                  WHERE seq = 3""",
    )
    report = AuditLog(path).verify()
    assert not report.ok and report.first_bad_seq == 3 and "edited" in report.reason


def test_timestamp_edit_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _filled(path).close()
    _sql(path, "UPDATE audit SET ts_ms = ts_ms + 1 WHERE seq = 2")
    report = AuditLog(path).verify()
    assert not report.ok and report.first_bad_seq == 2


def test_deletion_in_the_middle_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _filled(path).close()
    _sql(path, "DELETE FROM audit WHERE seq = 2")
    report = AuditLog(path).verify()
    assert not report.ok and report.first_bad_seq == 3


def test_deletion_at_the_end_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _filled(path).close()
    _sql(path, "DELETE FROM audit WHERE seq >= 4")
    report = AuditLog(path).verify()
    assert not report.ok and report.first_bad_seq == 4 and "head" in report.reason


def test_renumbered_deletion_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _filled(path).close()
    _sql(path, "DELETE FROM audit WHERE seq = 2", "UPDATE audit SET seq = seq - 1 WHERE seq > 2")
    report = AuditLog(path).verify()
    assert not report.ok and report.first_bad_seq == 2


def test_insertion_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = _filled(path)
    third = list(log.entries())[2]
    log.close()
    # A forged entry slotted in after entry 3, with a correct hash of its own.
    record = '{"request_id":"forged"}'
    forged = entry_hash(third.hash, 4, third.ts_ms, "request", record)
    _sql(
        path,
        "UPDATE audit SET seq = seq + 100 WHERE seq > 3",
        "UPDATE audit SET seq = seq - 99 WHERE seq > 100",
        f"INSERT INTO audit VALUES (4, {third.ts_ms}, 'request', '{record}', '{third.hash}', "
        f"'{forged}')",
    )
    report = AuditLog(path).verify()
    assert not report.ok and report.first_bad_seq == 5


def test_appended_forgery_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _filled(path).close()
    _sql(path, f"INSERT INTO audit VALUES (6, 1, 'request', '{{}}', '{'0' * 64}', '{'1' * 64}')")
    report = AuditLog(path).verify()
    assert not report.ok and report.first_bad_seq == 6


def test_reordering_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _filled(path).close()
    _sql(
        path,
        "UPDATE audit SET seq = -1 WHERE seq = 2",
        "UPDATE audit SET seq = 2 WHERE seq = 3",
        "UPDATE audit SET seq = 3 WHERE seq = -1",
    )
    report = AuditLog(path).verify()
    assert not report.ok and report.first_bad_seq == 2


def test_swapped_records_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _filled(path).close()
    _sql(
        path,
        "UPDATE audit SET record = (SELECT record FROM audit WHERE seq = 5) WHERE seq = 4",
    )
    report = AuditLog(path).verify()
    assert not report.ok and report.first_bad_seq == 4


def test_tail_and_export(tmp_path: Path) -> None:
    log = _filled(tmp_path / "audit.db")
    tail = log.tail(2)
    assert [e.seq for e in tail] == [4, 5]
    assert tail[-1].record == {"request_id": "r4", "status": 200, "app": "demo-app"}
    out = io.StringIO()
    assert log.export_jsonl(out) == 5
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["seq"] for line in lines] == [1, 2, 3, 4, 5]
    assert lines[4]["hash"] == tail[-1].hash
    assert lines[4]["record"]["request_id"] == "r4"


def test_tail_survives_a_garbled_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _filled(path).close()
    _sql(path, "UPDATE audit SET record = 'not json' WHERE seq = 5")
    log = AuditLog(path)
    assert log.tail(1)[0].record == {"unreadable_record": True}
    assert log.verify().first_bad_seq == 5


def test_non_json_record_is_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db")
    with pytest.raises(ValueError, match="plain JSON"):
        log.append("request", {"x": object()})
    assert log.verify().ok and log.verify().entries == 0


def test_concurrent_appends_keep_one_chain(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db")

    def worker(n: int) -> None:
        for i in range(25):
            log.append("request", {"worker": n, "i": i})

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = log.verify()
    assert report.ok and report.entries == 100


def test_two_handles_on_one_file_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    a, b = AuditLog(path), AuditLog(path)
    for i in range(5):
        a.append("x", {"i": i})
        b.append("y", {"i": i})
    assert a.verify().ok and a.verify().entries == 10


def test_async_appends_share_commits_and_keep_one_chain(tmp_path: Path) -> None:
    """append_async (the edge's path): concurrent requests are committed together by one writer
    thread, interleaved with plain appends, and each caller gets its own entry back."""
    log = AuditLog(tmp_path / "audit.db")

    async def main() -> list[AuditEntry]:
        async def one(n: int) -> AuditEntry:
            return await log.append_async("request", {"n": n})

        entries = await asyncio.gather(*(one(n) for n in range(200)))
        log.append("edge", {"event": "stop"})
        return entries

    entries = asyncio.run(main())
    assert [e.record for e in entries] == [{"n": n} for n in range(200)]
    assert sorted(e.seq for e in entries) == list(range(1, 201))
    report = log.verify()
    assert report.ok and report.entries == 201
    assert log._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL: fsync per commit


def test_an_async_entry_is_written_even_if_its_waiter_gives_up(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(path)

    async def main() -> None:
        task = asyncio.ensure_future(log.append_async("request", {"request_id": "gone"}))
        await asyncio.sleep(0)  # submitted
        task.cancel()  # the client went away while the record was being written
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    log.close()  # drains the writer
    reopened = AuditLog(path)
    assert [e.record for e in reopened.entries()] == [{"request_id": "gone"}]
    assert reopened.verify().ok


def test_close_drains_submitted_entries_and_refuses_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(path)
    futures = [log.submit("request", {"i": i}) for i in range(50)]
    log.close()
    assert [f.result(timeout=10).seq for f in futures] == list(range(1, 51))
    with pytest.raises(AuditError, match="closed"):
        log.submit("request", {"i": 50})
    with pytest.raises(ValueError, match="plain JSON"):  # checked before anything is queued
        AuditLog(tmp_path / "other.db").submit("request", {"x": object()})
    assert AuditLog(path).verify().entries == 50
