"""Throughput and accuracy of ``sovra.detectors.detect`` with all built-in detectors.

Builds ~5 MB (UTF-8) of mixed Chinese/English hospital / bank text with the labelled corpus
generator in ``tests/detector_corpus.py``, groups it into documents of ~4 KB (a typical prompt;
``--doc-bytes 0`` passes the whole text in one call), times ``detect()`` over all documents
(median of ``--runs`` runs, single process) and prints one JSON object: MB/s (10^6 UTF-8 bytes
per second, plus characters per second), and precision / recall per entity type (exact span and
type match against the generator's gold labels).

Two text profiles are measured: ``realistic`` (80 % of sentences are prose without sensitive
values; about one finding per 400 bytes) and ``dense`` (every sentence carries entities or
near-misses; about one finding per 70 bytes, roughly half of all characters are digits).

    PYTHONPATH=. python bench/detectors.py [--mb 5] [--runs 5] [--doc-bytes 4096]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from detector_corpus import build_corpus  # noqa: E402

from sovra.detectors import BUILTIN_TYPES, Finding, builtin_detectors, detect  # noqa: E402

Span = tuple[str, int, int]


def make_documents(
    min_bytes: int, doc_bytes: int, prose: float, seed: int
) -> list[tuple[str, list[Span]]]:
    """Corpus samples joined by newlines into documents of about ``doc_bytes`` each."""
    docs: list[tuple[str, list[Span]]] = []
    parts: list[str] = []
    gold: list[Span] = []
    offset = size = total = batch = 0

    def flush() -> None:
        nonlocal parts, gold, offset, size
        if parts:
            docs.append(("\n".join(parts), gold))
        parts, gold, offset, size = [], [], 0, 0

    while total < min_bytes:
        for text, spans in build_corpus(1000, seed + batch, prose):
            if parts:
                offset += 1  # the joining newline
            gold.extend((etype, offset + start, offset + end) for etype, start, end in spans)
            parts.append(text)
            offset += len(text)
            nbytes = len(text.encode()) + 1
            size += nbytes
            total += nbytes
            if doc_bytes and size >= doc_bytes:
                flush()
            if total >= min_bytes:
                break
        batch += 1
    flush()
    return docs


def score(docs: list[tuple[str, list[Span]]], found: list[list[Finding]]) -> dict[str, object]:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for (_, gold), findings in zip(docs, found, strict=True):
        predicted = {(f.entity_type, f.start, f.end) for f in findings}
        expected = set(gold)
        for etype, _, _ in predicted & expected:
            tp[etype] += 1
        for etype, _, _ in predicted - expected:
            fp[etype] += 1
        for etype, _, _ in expected - predicted:
            fn[etype] += 1
    result: dict[str, object] = {}
    for etype in BUILTIN_TYPES:
        predicted_n, expected_n = tp[etype] + fp[etype], tp[etype] + fn[etype]
        result[etype] = {
            "gold": expected_n,
            "precision": round(tp[etype] / predicted_n, 4) if predicted_n else None,
            "recall": round(tp[etype] / expected_n, 4) if expected_n else None,
        }
    return result


def measure(prose: float, args: argparse.Namespace) -> dict[str, object]:
    docs = make_documents(int(args.mb * 1e6), args.doc_bytes, prose, args.seed)
    texts = [text for text, _ in docs]
    nbytes = sum(len(t.encode()) for t in texts) + len(texts) - 1
    nchars = sum(len(t) for t in texts) + len(texts) - 1
    detectors = builtin_detectors()
    timings: list[float] = []
    cpu_timings: list[float] = []
    found: list[list[Finding]] = []
    for _ in range(args.runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        found = [detect(text, detectors) for text in texts]
        cpu_timings.append(time.process_time() - cpu_start)
        timings.append(time.perf_counter() - start)
    median = statistics.median(timings)
    cpu_median = statistics.median(cpu_timings)
    n_findings = sum(len(f) for f in found)
    return {
        "prose_share": prose,
        "documents": len(texts),
        "bytes": nbytes,
        "chars": nchars,
        "findings": n_findings,
        "bytes_per_finding": round(nbytes / max(n_findings, 1)),
        "seconds_median": round(median, 4),
        "seconds_all": [round(t, 4) for t in timings],
        "mb_per_s": round(nbytes / median / 1e6, 2),
        "mchars_per_s": round(nchars / median / 1e6, 2),
        "mb_per_cpu_s": round(nbytes / cpu_median / 1e6, 2),
        "per_type": score(docs, found),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=5.0, help="UTF-8 megabytes of text")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--doc-bytes", type=int, default=4096, help="0: one call, whole text")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    report = {
        "python": platform.python_version(),
        "doc_bytes": args.doc_bytes,
        "runs": args.runs,
        "realistic": measure(0.8, args),
        "dense": measure(0.0, args),
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
