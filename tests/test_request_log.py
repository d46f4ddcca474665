"""The broker's write-behind of requests rows (cloud_broker/request_log.py): bounded, flushed on
demand and on close, never dropping a row to make room, surviving a failed commit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from cloud_broker import db, request_log
from cloud_broker.request_log import RequestLog


def row(n: int) -> db.RequestRecord:
    return db.RequestRecord(
        request_id=f"{n:032x}", tenant="demo", app="app", model="m", op="chat", stream=False,
        candidates=1, enclave_id="e1", attempts=1, status="OK", bytes_in=10, bytes_out=20,
        frames=1, created_at_ms=n, duration_ms=1,
    )  # fmt: skip


def stored(engine: Engine) -> list[str]:
    return [r.request_id for r in reversed(db.recent_requests(engine, limit=10_000))]


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return db.open_database(f"sqlite:///{tmp_path / 'broker.db'}")


def test_flush_and_close_write_every_row_in_order(engine: Engine) -> None:
    log = RequestLog(engine)
    for n in range(10):
        log.submit(row(n))
    assert log.flush(timeout=10)
    assert stored(engine) == [f"{n:032x}" for n in range(10)]
    for n in range(10, 300):
        log.submit(row(n))
    assert log.close(timeout=10)  # no flush: close drains the queue
    assert stored(engine) == [f"{n:032x}" for n in range(300)]
    assert log.pending == 0
    log.submit(row(300))  # after close: written at once, not queued and lost
    assert stored(engine)[-1] == f"{300:032x}"


def test_a_full_queue_makes_submitters_wait_and_loses_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    batches: list[int] = []
    write = db.record_requests

    def slow_write(eng: Engine, rows: Sequence[db.RequestRecord]) -> None:
        gate.wait(10)  # the database is slow: the queue fills up
        batches.append(len(rows))
        write(eng, rows)

    monkeypatch.setattr(request_log.db, "record_requests", slow_write)
    log = RequestLog(engine, max_pending=4, max_batch=3)
    submitted = threading.Event()

    def submit_all() -> None:
        for n in range(20):
            log.submit(row(n))
        submitted.set()

    producer = threading.Thread(target=submit_all)
    producer.start()
    time.sleep(0.3)  # give the producer time to run into the bound (a wait, not a timing claim)
    assert not submitted.is_set()  # blocked: 4 queued + one batch of 3 held by the writer
    assert log.pending <= 4 + 3
    gate.set()
    producer.join(10)
    assert submitted.is_set()
    assert log.close(timeout=10)
    assert stored(engine) == [f"{n:032x}" for n in range(20)]
    assert max(batches) <= 3


def test_a_failed_commit_is_logged_and_the_writer_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write = db.record_requests
    failures = [1]

    def flaky(eng: Engine, rows: Sequence[db.RequestRecord]) -> None:
        if failures:
            failures.pop()
            raise OperationalError("INSERT ...", {}, Exception("database is locked"))
        write(eng, rows)

    monkeypatch.setattr(request_log.db, "record_requests", flaky)
    caplog.set_level(logging.ERROR, logger="cloud_broker.request_log")
    log = RequestLog(engine)
    log.submit(row(1))
    assert log.flush(timeout=10)
    log.submit(row(2))
    assert log.close(timeout=10)
    assert stored(engine) == [f"{2:032x}"]
    assert f"could not record 1 request rows rid={1:032x}: OperationalError" in caplog.text
    assert "database is locked" not in caplog.text  # the type only, never the message


def test_rejects_unbounded_settings(engine: Engine) -> None:
    with pytest.raises(ValueError):
        RequestLog(engine, max_pending=0)


def test_request_record_names_every_column_but_the_row_id() -> None:
    columns = set(db.RequestRow.model_fields) - {"id"}
    assert set(db.RequestRecord.__slots__) == columns
