"""``sovra demo``, training part: a hospital dataset stays on the edge, a model trains in an
attested (SIMULATED) enclave, new patients are scored through the edge, and the signed receipt
is verified. Also what ``sovra up`` adds to the edge config for training.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from sovra.stack import Stack

TRAINING_APP: Final = "research-pipeline"  # an application of the example policy that may train
DATASET: Final = "hospital"
CANARY: Final = "CANARY-PATIENT-7731"
CONFIG_COLUMNS: Final = {"confidential": "pseudonymise", "restricted": "drop"}


def add_training_app(edge: dict[str, Any]) -> str:
    """Add the training app (its own API key) to an edge config document; return the key.

    With a ``[policy]`` the policy decides what it may do; without one (config-only mode) the
    ``[training]`` table allows it to train and says what happens to classified columns.
    """
    key = "sk-sovra-" + secrets.token_urlsafe(32)
    models = [] if "policy" in edge else list(edge["apps"][0].get("models", []))
    edge["apps"].append(
        {
            "name": TRAINING_APP,
            "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
            "models": models,
        }
    )
    if "policy" not in edge:
        edge["training"] = {"apps": [TRAINING_APP], "columns": dict(CONFIG_COLUMNS)}
    return key


def run(stack: Stack) -> int:
    import logging

    import httpx

    from edge_agent.config import EdgeConfig
    from edge_agent.training.cli import ProgressBar
    from edge_agent.training.service import TrainingError, for_cli
    from sovra.audit import AuditLog
    from sovra.training_demo import LABELS, TARGET, write_hospital_csv

    for name in ("sovra.edge.training", "edge_agent.trusted_set"):
        logging.getLogger(name).setLevel(logging.WARNING)  # the demo prints what matters
    info = stack.describe()
    state = stack.options.state_dir.resolve()
    model = info["model"]
    print("\n== Confidential training (TEE: SIMULATED): the dataset stays on the edge")
    path = state / "training" / "hospital.csv"
    new_patients = write_hospital_csv(path, canary=CANARY, holdout=20)
    config = EdgeConfig.from_toml(state / "edge.toml")
    started = time.perf_counter()
    with AuditLog(config.audit_path) as audit:
        service = for_cli(config, audit=audit)
        try:
            if service.store.dataset(DATASET) is None:
                service.register_dataset(path, DATASET, LABELS)
            record = service.dataset(DATASET)
            print(
                f"-- registered {path.name}: {record.rows} rows, {len(record.columns)} columns, "
                f"sha256 {record.sha256[:16]}... (not copied anywhere)"
            )
            job = service.create_job(
                app=TRAINING_APP,
                dataset=DATASET,
                task="classification",
                target=TARGET,
                algorithm="logistic_regression",
                base_model=model,
            )
            plan = job["policy"]
            changed = {c: v for c, v in plan["columns"].items() if v["action"] != "keep"}
            print(
                f"-- policy {plan['policy_id'][:24]}... rule {plan['rule']!r} ({plan['effect']}):"
            )
            for column, v in changed.items():
                print(f"   {column:14} {v['action']:13} (class {', '.join(v['classes'])})")
            bar = ProgressBar(sys.stdout)
            service.advance(job["id"], wait=True, progress=bar.update)
            final = service.job_view(job["id"])
            bar.done(final)
            if final["state"] != "completed":
                print(f"error: training {final['state']}: {final['error']}", file=sys.stderr)
                return 1
            took = time.perf_counter() - started
            print(
                f"-- trained in enclave {final['enclave']['id']} in {took:.1f} s; hold-out "
                f"ROC AUC {final['metrics']['roc_auc']:.4f}, accuracy "
                f"{final['metrics']['accuracy']:.4f}"
            )
            receipt = service.receipt(job["id"])["receipt"]
            print("-- signed training receipt:")
            print(_indent(json.dumps(_receipt_view(receipt), indent=2, ensure_ascii=False)))
            report = service.verify(job["id"])
            print(
                "-- receipt verification: "
                + ", ".join(
                    f"{c['check']} {'ok' if c['ok'] else 'FAILED'}" for c in report["checks"]
                )
            )
        except TrainingError as exc:
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        finally:
            service.close()
    response = httpx.post(
        f"{info['edge_url']}/v1/training/models/{final['model']}/score",
        headers={"Authorization": f"Bearer {info['training_api_key']}"},
        json={"records": new_patients},
        timeout=60,
    )
    if response.status_code != 200:
        print(
            f"error: scoring failed: {response.status_code} {response.text[:300]}", file=sys.stderr
        )
        return 1
    scored = response.json()
    right = sum(p == r[TARGET] for p, r in zip(scored["predictions"], new_patients, strict=True))
    print(
        f"-- scored {len(new_patients)} new patients through the edge (served by "
        f"{scored['served_by']}): {right}/{len(new_patients)} match the held-out diagnosis"
    )
    leaked = _canary_in_broker(state)
    print(f"-- canary {CANARY!r} (a patient name and MRN) found in broker files: {leaked}")
    return 0 if report["ok"] and not leaked else 1


def _receipt_view(receipt: dict[str, Any]) -> dict[str, Any]:
    """The receipt with long parameter lists shortened for the terminal."""
    view = dict(receipt)
    params = dict(view["params"])
    for key in ("features_numeric", "features_categorical", "features_dropped"):
        if isinstance(params.get(key), list) and len(params[key]) > 4:
            params[key] = [*params[key][:3], f"... {len(params[key]) - 3} more"]
    params.pop("estimator", None)
    view["params"] = params
    return view


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.splitlines())


def _canary_in_broker(state: Path) -> bool:
    needle = CANARY.encode()
    paths = [*(state / "broker").glob("*"), state / "logs" / "broker.log"]
    return any(p.is_file() and needle in p.read_bytes() for p in paths)
