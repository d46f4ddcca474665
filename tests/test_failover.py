"""Failover with real processes: ``sovra.stack.start_stack`` runs broker, two enclaves and the
edge as separate OS processes (the commands ``sovra up`` runs). One enclave is killed with
SIGKILL under concurrent load, then the other; the app must see only right answers, then a
clear 503, never a hang.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai_stub import StubServer, answer_for

from sovra.stack import Stack, StackOptions, start_stack

pytestmark = pytest.mark.timeout(180)

MODEL = "stub-model"
REQUESTS = 40
FIRST_WAVE = 12  # sent at once; the rest only after the kill
KILL_AFTER = 4  # completed requests before enclave-1 is killed
WORKERS = 8
WAIT_S = 60.0  # upper bound for any wait on a real process or request


@pytest.fixture
def process_stack(tmp_path: Path, stub_server: StubServer) -> Iterator[Stack]:
    options = StackOptions(
        state_dir=tmp_path / "stack",
        workload="openai-upstream",
        upstream_url=stub_server.base_url,
        upstream_model=MODEL,
        timeout_s=WAIT_S,
    )
    stack = start_stack(options)  # stops what it started if start-up fails
    try:
        yield stack
    finally:
        stack.stop(grace_s=10)
        alive = {name: p.pid for name, p in stack.processes.items() if p.poll() is None}
        assert not alive, f"processes left running: {alive}"


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def broker_rows(stack: Stack, wait_for: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """The broker's requests rows by request id. The broker writes them just behind its replies
    (cloud_broker/request_log.py), so wait (bounded) until the ``wait_for`` ids are there."""
    db = stack.options.state_dir.resolve() / "broker" / "broker.db"
    wanted = set(wait_for)
    deadline = time.monotonic() + WAIT_S
    while True:
        with contextlib.closing(
            sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        ) as conn:
            conn.row_factory = sqlite3.Row
            rows = {r["request_id"]: dict(r) for r in conn.execute("SELECT * FROM requests")}
        if wanted <= rows.keys() or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)  # polling the broker process's database, not timing anything


def log_tail(stack: Stack, name: str, lines: int = 20) -> str:
    path = stack.options.state_dir.resolve() / "logs" / f"{name}.log"
    return (
        "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
    )


@dataclass(frozen=True)
class Outcome:
    index: int
    status: int
    request_id: str
    content: str | None
    expected: str


def test_enclave_killed_under_load_fails_over_then_503_when_none_left(
    process_stack: Stack,
) -> None:
    stack = process_stack
    client = openai.OpenAI(
        base_url=stack.edge_url + "/v1", api_key=stack.api_key, max_retries=0, timeout=WAIT_S
    )
    lock = threading.Lock()
    completed = 0
    enough_done, killed = threading.Event(), threading.Event()

    def one(index: int) -> Outcome:
        nonlocal completed
        if index >= FIRST_WAVE and not killed.wait(WAIT_S):
            raise AssertionError("enclave-1 was never killed")
        content = f"failover request {index}"
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=user(content))
        reply = raw.parse()
        with lock:
            completed += 1
            if completed >= KILL_AFTER:
                enough_done.set()
        return Outcome(
            index,
            raw.status_code,
            raw.headers["x-request-id"],
            reply.choices[0].message.content,
            answer_for(user(content)),
        )

    victim = stack.processes["enclave-1"]
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(one, i) for i in range(REQUESTS)]
        try:
            assert enough_done.wait(WAIT_S), "no request completed before the kill"
            victim.kill()  # SIGKILL: no goodbye to the broker, connections just die
            victim.wait(WAIT_S)
            killed_at_ms = int(time.time() * 1000)
        finally:
            killed.set()  # never leave the second wave waiting, even if the kill failed
        outcomes = [f.result(timeout=WAIT_S) for f in futures]

    assert victim.returncode == -9
    # Every request got the right answer, none failed.
    wrong = [o for o in outcomes if o.status != 200 or o.content != o.expected]
    assert not wrong, f"{wrong}\n{log_tail(stack, 'broker')}"
    rows = broker_rows(stack, [o.request_id for o in outcomes])
    mine = [rows[o.request_id] for o in outcomes]
    assert all(r["status"] == "OK" for r in mine)
    # Every request sent after the kill was served by the survivor...
    after = [r for r in mine if r["created_at_ms"] > killed_at_ms]
    assert len(after) >= REQUESTS - FIRST_WAVE
    assert {r["enclave_id"] for r in after} == {"enclave-2"}
    # ...and the broker really failed over: the dead enclave (still listed, not yet evicted)
    # was tried first and the request went on to enclave-2 within the same dispatch.
    failed_over = [r for r in mine if r["attempts"] > 1]
    assert failed_over, [(r["enclave_id"], r["attempts"]) for r in after]
    assert {r["enclave_id"] for r in failed_over} == {"enclave-2"}
    assert all(r["attempts"] <= r["candidates"] for r in mine)
    assert stack.dead() == ["enclave-1"]

    # Now the last enclave dies too: a clear 503 in OpenAI shape, well before the timeout.
    survivor = stack.processes["enclave-2"]
    survivor.kill()
    survivor.wait(WAIT_S)
    started = time.monotonic()
    with httpx.Client(
        base_url=stack.edge_url,
        headers={"Authorization": f"Bearer {stack.api_key}"},
        timeout=WAIT_S / 2,
    ) as http:
        resp = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": user("anyone there?")}
        )
    assert time.monotonic() - started < WAIT_S / 2
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] in ("enclaves_unavailable", "no_enclave_available"), error
    if error["code"] == "enclaves_unavailable":  # both still listed: both were tried
        assert "candidates failed" in error["message"]
        rid = resp.headers["x-request-id"]
        row = broker_rows(stack, [rid])[rid]
        assert (row["status"], row["enclave_id"]) == ("UNAVAILABLE", None)
        assert row["attempts"] == row["candidates"] == 2
    # The edge and the broker are still up and answering.
    assert sorted(stack.dead()) == ["enclave-1", "enclave-2"]
