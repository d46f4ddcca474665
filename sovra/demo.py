"""``sovra demo``: an application's view and the broker's view of the same requests."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sovra.stack import Stack

PROMPTS = (
    "In one sentence, why should hospital data stay on premises?",
    "Name three colours of the rainbow.",
)
CANARY_NOTE = "patient MRN-CANARY-7731 (this string must never reach the broker)"


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

    rows = broker_view(stack.options.state_dir)
    print("\n-- what the broker recorded (its whole view: metadata only):")
    for row in rows:
        print("   " + json.dumps(_public(row), default=str))
    leaked = _canary_in_broker(stack)
    print(f"\n-- canary {CANARY_NOTE.split()[1]!r} found in broker files: {leaked}")
    return 1 if leaked else 0


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("id",)}


def _canary_in_broker(stack: Stack) -> bool:
    needle = CANARY_NOTE.split()[1].encode()
    broker_dir = stack.options.state_dir.resolve() / "broker"
    logs = stack.options.state_dir.resolve() / "logs" / "broker.log"
    paths = [*broker_dir.glob("*"), logs]
    return any(p.is_file() and needle in p.read_bytes() for p in paths)
