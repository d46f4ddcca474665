"""``sovra demo``: an application's view and the broker's view of the same requests."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from sovra import demo_training

if TYPE_CHECKING:
    from sovra.stack import Stack

PROMPTS = (
    "In one sentence, why should hospital data stay on premises?",
    "Name three colours of the rainbow.",
)
CANARY_NOTE = "patient MRN-CANARY-7731 (this string must never reach the broker)"
# Synthetic identifiers (valid check digits, no real person): the policy pseudonymises them.
RESIDENT_ID = "11010519491231002X"
PHONE = "13812345678"
PSEUDONYMISED_PROMPT = (
    f"患者身份证号{RESIDENT_ID}，电话{PHONE}。Draft a short reminder to call the patient."
)
OFFSHORE_MODEL = "gpt-4o"  # examples/policy: rule no-offshore-models
KEEP_LOCAL_PROMPT = "患者 HIV 阳性，请给出用药建议。"  # special category: stays on the premises


def run(stack: Stack) -> int:
    from openai import OpenAI

    from sovra.stack import broker_view

    info = stack.describe()
    client = OpenAI(base_url=info["edge_url"] + "/v1", api_key=info["api_key"], max_retries=0)
    model = info["model"]
    print(f"== Sovra demo (TEE: SIMULATED) — edge {info['edge_url']}/v1, model {model}\n")
    print("-- models visible to the app:", [m.id for m in client.models.list().data])

    for prompt in PROMPTS:
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"{prompt} ({CANARY_NOTE})"}],
            max_tokens=48,
            temperature=0,
        )
        took = (time.perf_counter() - started) * 1000
        print(f"\n-- app asked: {prompt!r}\n   app got ({took:.0f} ms): "
              f"{reply.choices[0].message.content!r}")  # fmt: skip

    print("\n-- streaming:", end=" ", flush=True)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count from one to five in words."}],
        max_tokens=32,
        temperature=0,
        stream=True,
    )
    chunks = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            print(chunk.choices[0].delta.content, end="", flush=True)
    print(f"\n   ({chunks} sealed chunks, each opened and checked in order)")

    emb = client.embeddings.create(model=model, input=["sovereign data", "confidential AI"])
    print(f"\n-- embeddings: {len(emb.data)} vectors of dimension {len(emb.data[0].embedding)}")

    policy_ok = True
    if stack.policy is not None and stack.policy.source:
        policy_ok = _policy_demo(stack, client, model)

    rows = broker_view(stack.options.state_dir)
    print("\n-- what the broker recorded (its whole view: metadata only):")
    for row in rows:
        print("   " + json.dumps(_public(row), default=str))
    leaked = _canary_in_broker(stack)
    print(f"\n-- canary {CANARY_NOTE.split()[1]!r} or the resident ID found in broker files: "
          f"{leaked}")  # fmt: skip
    training_ok = demo_training.run(stack) == 0  # sovra/demo_training.py
    return 1 if leaked or not policy_ok or not training_ok else 0


def _policy_demo(stack: Stack, client: Any, model: str) -> bool:
    """One pseudonymised request, one denied, one kept local; True if each did as expected."""
    import openai

    from sovra.policy import Policy, Pseudonymiser

    policy = stack.policy
    assert policy is not None
    status = _edge_policy_status(stack)
    active = status.get("active") or {}
    signed = f", signed by {active['signer']}" if active.get("signer") else " (unsigned)"
    print(f"\n== policy ({policy.source}): {active.get('policy_id')}{signed}")

    print("\n-- pseudonymised request")
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": PSEUDONYMISED_PROMPT}],
        max_tokens=48,
        temperature=0,
    )
    reply = raw.parse()
    headers = raw.headers
    print(f"   app sent:     {PSEUDONYMISED_PROMPT!r}")
    print(f"   decision:     {headers.get('x-sovra-decision')} by rule "
          f"{headers.get('x-sovra-rule')} (policy {headers.get('x-sovra-policy')})")  # fmt: skip
    print(f"   header labels (sealed, seen by broker and enclave): {headers.get('x-sovra-labels')}")
    # The sealed payload opens only inside the enclave; recompute what it holds with the
    # same policy files, to show it.
    local = Policy.load(policy.path)
    classification = local.classify(PSEUDONYMISED_PROMPT)
    decision = local.decide("clinical-assistant", "inference", model, classification)
    outbound = local.outbound_text(PSEUDONYMISED_PROMPT, classification, decision, Pseudonymiser())
    print(f"   enclave saw:  {outbound!r}")
    print(f"   app got:      {reply.choices[0].message.content!r}  (placeholders restored)")
    record = _audit_record(stack, headers.get("x-request-id", ""))
    if record is not None:
        shown = {k: record.get(k) for k in ("decision", "rule", "classes", "entity_counts")}
        print(f"   edge audit:   {json.dumps(shown, ensure_ascii=False)}  (counts, never values)")
    pseudonymised = headers.get("x-sovra-decision") == "pseudonymise"

    print(f"\n-- denied request (model {OFFSHORE_MODEL})")
    denied = False
    try:
        client.chat.completions.create(
            model=OFFSHORE_MODEL, messages=[{"role": "user", "content": "Summarise the round."}]
        )
    except openai.PermissionDeniedError as exc:
        error = (exc.body or {}) if isinstance(exc.body, dict) else {}
        print(f"   HTTP {exc.status_code} {error.get('code')}: {error.get('message')}")
        denied = "no-offshore-models" in str(error.get("message"))

    print("\n-- special-category data (keep-local; this stack has no local model)")
    kept = False
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": KEEP_LOCAL_PROMPT}]
        )
    except openai.PermissionDeniedError as exc:
        error = (exc.body or {}) if isinstance(exc.body, dict) else {}
        print(f"   HTTP {exc.status_code} {error.get('code')}: {error.get('message')}")
        kept = error.get("code") == "keep_local"
    return pseudonymised and denied and kept


def _edge_policy_status(stack: Stack) -> dict[str, Any]:
    path = stack.options.state_dir.resolve() / "edge" / "policy-status.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _audit_record(stack: Stack, request_id: str) -> dict[str, Any] | None:
    import contextlib
    import sqlite3

    db = stack.options.state_dir.resolve() / "edge" / "audit.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT record FROM audit WHERE kind = 'request' ORDER BY seq DESC LIMIT 20"
        ).fetchall()
    for (text,) in rows:
        record = json.loads(text)
        if record.get("request_id") == request_id:
            return dict(record)
    return None


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("id",)}


def _canary_in_broker(stack: Stack) -> bool:
    needles = (CANARY_NOTE.split()[1].encode(), RESIDENT_ID.encode())
    broker_dir = stack.options.state_dir.resolve() / "broker"
    logs = stack.options.state_dir.resolve() / "logs" / "broker.log"
    paths = [p for p in (*broker_dir.glob("*"), logs) if p.is_file()]
    return any(needle in p.read_bytes() for p in paths for needle in needles)
