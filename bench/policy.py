"""Policy engine benchmark: decision latency on a generated 200-rule policy (detection excluded)
and classification throughput on mixed Chinese/English text.

    python bench/policy.py [--rules 200] [--decisions 50000] [--megabytes 4]

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sovra.policy import Classification, Policy

CLASSES = ["public", "internal", "confidential", "restricted"]
EFFECTS = ["allow", "pseudonymise", "deny", "keep-local"]


def generate_policy(rules: int, seed: int = 1) -> Policy:
    rng = random.Random(seed)
    apps = [f"app-{i}" for i in range(20)]
    models = [f"model-{i}" for i in range(12)]
    destinations = {
        f"dest-{i}": {
            "jurisdictions": ["CN"],
            "regions": [f"cn-north-{i % 3 + 1}"],
            "tee_types": ["sim-ascend-cvm", "virtcca"],
            "models": rng.sample(models, 6),
        }
        for i in range(5)
    }
    rule_docs = []
    for i in range(rules):
        match: dict[str, object] = {"applications": rng.sample(apps, rng.randint(1, 3))}
        if rng.random() < 0.5:
            match["purposes"] = [rng.choice(["inference", "training"])]
        if rng.random() < 0.4:
            match["models"] = rng.sample(models, rng.randint(1, 4))
        top = rng.randrange(len(CLASSES))
        if rng.random() < 0.4:
            match["max_class"] = CLASSES[top]
        if rng.random() < 0.4:
            match["classes_present"] = rng.sample(CLASSES[: top + 1], 1)
        effect = rng.choices(EFFECTS, weights=[40, 30, 15, 15])[0]
        rule: dict[str, object] = {"id": f"rule-{i:03d}", "match": match, "effect": effect}
        if effect in ("allow", "pseudonymise"):
            rule["destination"] = rng.choice(sorted(destinations))
        rule_docs.append(rule)
    doc = {
        "classes": CLASSES,
        "purposes": ["inference", "training"],
        "detectors": [
            {"builtin": "CN_RESIDENT_ID", "class": "confidential"},
            {"builtin": "BANK_CARD", "class": "confidential"},
            {"builtin": "CN_MOBILE", "class": "confidential"},
            {"builtin": "EMAIL", "class": "confidential"},
            {"builtin": "IPV4", "class": "internal"},
            {"builtin": "IPV6", "class": "internal"},
            {"builtin": "IBAN", "class": "confidential"},
            {"builtin": "US_SSN", "class": "confidential"},
            {
                "name": "MRN",
                "regex": r"(?<![A-Za-z0-9])MRN-[0-9]{6}(?![0-9])",
                "class": "confidential",
            },
            {"name": "DIAGNOSIS", "keywords": ["HIV", "艾滋病", "梅毒"], "class": "restricted"},
        ],
        "applications": {a: {"purposes": ["inference", "training"]} for a in apps},
        "destinations": destinations,
        "rules": rule_docs,
    }
    # JSON is YAML: load it through the real loader and validator
    return Policy.from_files({"bench.yaml": json.dumps(doc).encode()})


def bench_decisions(policy: Policy, count: int, seed: int = 2) -> dict[str, float]:
    rng = random.Random(seed)
    apps = [f"app-{i}" for i in range(20)]
    models = [f"model-{i}" for i in range(12)]
    classifications = [
        Classification((), tuple(c for c in CLASSES if rng.random() < 0.3), {}) for _ in range(64)
    ]
    requests = [
        (rng.choice(apps), rng.choice(["inference", "training"]), rng.choice(models),
         rng.choice(classifications))
        for _ in range(1024)
    ]  # fmt: skip
    decide = policy.decide
    for app, purpose, model, classification in requests:  # warm up
        decide(app, purpose, model, classification)
    samples: list[int] = []
    clock = time.perf_counter_ns
    for i in range(count):
        app, purpose, model, classification = requests[i & 1023]
        start = clock()
        decide(app, purpose, model, classification)
        samples.append(clock() - start)
    samples.sort()
    effects: dict[str, int] = {}
    for app, purpose, model, classification in requests:
        decision = decide(app, purpose, model, classification)
        effect = decision.effect.value if decision.rule_id else "deny (default)"
        effects[effect] = effects.get(effect, 0) + 1
    return {
        "decisions": count,
        "p50_us": round(samples[len(samples) // 2] / 1000, 2),
        "p99_us": round(samples[int(len(samples) * 0.99)] / 1000, 2),
        "mean_us": round(statistics.fmean(samples) / 1000, 2),
        "effect_mix_of_1024": effects,
    }


def mixed_text(megabytes: float, seed: int = 3) -> str:
    rng = random.Random(seed)
    pieces = [
        "患者主诉胸痛三天，既往高血压病史，",
        "The patient reports chest pain for three days; history of hypertension. ",
        "身份证号11010519491231002X，",
        "phone 13812345678, e-mail li.wei@example.com, ",
        "病历号MRN-204518，复诊时间下周二。",
        "server 10.20.30.40 and fe80::1 were slow. ",
        "refund to card 6212262201023557228 please. ",
        "Lab results: HbA1c 7.9%, LDL 3.1 mmol/L, eGFR 78. ",
        "随访计划：两周后复查血常规与肝肾功能。",
    ]
    target = int(megabytes * 1_000_000)
    out: list[str] = []
    size = 0
    while size < target:
        piece = rng.choice(pieces)
        out.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(out)


def bench_classify(policy: Policy, megabytes: float) -> dict[str, float]:
    text = mixed_text(megabytes)
    size = len(text.encode("utf-8"))
    policy.classify(text[:10_000])
    runs = []
    findings = 0
    for _ in range(3):
        start = time.perf_counter()
        classification = policy.classify(text)
        runs.append(time.perf_counter() - start)
        findings = len(classification.findings)
    best = min(runs)
    return {
        "bytes": size,
        "characters": len(text),
        "findings": findings,
        "seconds_best_of_3": round(best, 4),
        "mb_per_s": round(size / best / 1_000_000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--decisions", type=int, default=50_000)
    parser.add_argument("--megabytes", type=float, default=4.0)
    args = parser.parse_args()
    start = time.perf_counter()
    policy = generate_policy(args.rules)
    load_s = time.perf_counter() - start
    result = {
        "benchmark": "sovra.policy",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rules": len(policy.rules),
        "policy_load_ms": round(load_s * 1000, 1),
        "decide": bench_decisions(policy, args.decisions),
        "classify": bench_classify(policy, args.megabytes),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
