"""``sovra edge dataset|train|jobs ...``: training from the command line (docs/training.md).

These commands work on the edge's state directory (``--config``), like ``sovra edge audit``:
they need no API key, and act as the operator of the edge for the app named with ``--app``.
A job created here is run by the agent's worker when the agent runs; ``train --wait`` (or
``jobs show --follow`` when no agent runs) runs it in this process instead, with a progress bar.

Exit codes: 0 ok; 1 refused, failed or not verified; 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from edge_agent.config import ConfigError, EdgeConfig


def register(sub: Any) -> None:
    """Add ``dataset``, ``train`` and ``jobs`` to the ``sovra edge`` subcommands."""
    dataset = sub.add_parser("dataset", help="register and inspect local training datasets")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True)
    add = dsub.add_parser("add", help="register a CSV, JSONL or Parquet file (it is not copied)")
    add.add_argument("path", type=Path)
    add.add_argument("--name", required=True, help="dataset name (1-64 of [A-Za-z0-9._-])")
    add.add_argument("--labels", help="declared column classes: col=class,col2=class")
    _common(add)
    add.set_defaults(func=_dataset_add)
    lst = dsub.add_parser("list", help="registered datasets")
    _common(lst)
    lst.set_defaults(func=_dataset_list)
    show = dsub.add_parser("show", help="schema, digest and column classes of a dataset")
    show.add_argument("name")
    _common(show)
    show.set_defaults(func=_dataset_show)
    remove = dsub.add_parser("remove", help="forget a dataset (the file stays where it is)")
    remove.add_argument("name")
    _common(remove)
    remove.set_defaults(func=_dataset_remove)

    train = sub.add_parser("train", help="start a training job on a registered dataset")
    train.add_argument("--dataset", required=True)
    train.add_argument("--task", choices=("classification", "regression"), required=True)
    train.add_argument("--target", required=True, help="the column to predict")
    train.add_argument(
        "--algorithm",
        choices=("logistic_regression", "gradient_boosting", "text_embedding_classifier"),
        default="logistic_regression",
    )
    train.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=NUMBER",
        help="algorithm parameter (repeatable), e.g. C=0.5, max_iter=200",
    )
    train.add_argument("--text-column", default="", help="text_embedding_classifier: the text")
    train.add_argument("--app", help="the app the job runs as (default: the one allowed)")
    train.add_argument("--base-model", help="enclave pool model (default: the app's first)")
    train.add_argument("--wait", action="store_true", help="run it here until it finishes")
    _common(train)
    train.set_defaults(func=_train)

    jobs = sub.add_parser("jobs", help="training jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    jl = jsub.add_parser("list", help="recent jobs")
    _common(jl)
    jl.set_defaults(func=_jobs_list)
    js = jsub.add_parser("show", help="one job")
    js.add_argument("id")
    js.add_argument("--follow", action="store_true", help="show progress until it finishes")
    _common(js)
    js.set_defaults(func=_jobs_show)
    jc = jsub.add_parser("cancel", help="cancel a job and clean up everywhere")
    jc.add_argument("id")
    _common(jc)
    jc.set_defaults(func=_jobs_cancel)
    jr = jsub.add_parser("receipt", help="print (and --verify) the signed training receipt")
    jr.add_argument("id")
    jr.add_argument(
        "--verify",
        action="store_true",
        help="check signature, audit record, attestation binding, evidence, dataset digest",
    )
    jr.add_argument(
        "--export",
        type=Path,
        metavar="FILE",
        help="write the receipt with the attestation evidence that binds its signing key (JSON; "
        "verify anywhere with `sovra attest verify-receipt`)",
    )
    _common(jr)
    jr.set_defaults(func=_jobs_receipt)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="edge TOML config file")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


@contextmanager
def _service(args: argparse.Namespace) -> Iterator[Any]:
    from edge_agent.training.service import for_cli
    from sovra.audit import AuditLog

    config = EdgeConfig.from_toml(args.config)
    with AuditLog(config.audit_path) as audit:
        service = for_cli(config, audit=audit)
        try:
            yield service
        finally:
            service.close()


def _run(args: argparse.Namespace, body: Any) -> int:
    from edge_agent.training.datasets import DatasetError
    from edge_agent.training.plan import TrainingRefused
    from edge_agent.training.service import TrainingError
    from edge_agent.training.store import StoreError
    from sovra.policy import PolicyError

    try:
        with _service(args) as service:
            result: int = body(service)
            return result
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except TrainingError as exc:
        return _fail(f"{exc.code}: {exc.message}", 2 if exc.status in (400, 404) else 1)
    except TrainingRefused as exc:
        return _fail(f"{exc.code}: {exc.message}")
    except (DatasetError, StoreError) as exc:
        return _fail(str(exc), 2)
    except PolicyError as exc:
        return _fail(f"policy: {exc}", 2)


def _print(args: argparse.Namespace, doc: Any, text: str) -> None:
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False, default=str))
    else:
        print(text)


# -- datasets -----------------------------------------------------------------------------------


def _dataset_add(args: argparse.Namespace) -> int:
    def body(service: Any) -> int:
        record = service.register_dataset(args.path, args.name, args.labels)
        doc = record.public()
        _print(args, doc, _dataset_text(doc))
        return 0

    return _run(args, body)


def _dataset_list(args: argparse.Namespace) -> int:
    def body(service: Any) -> int:
        docs = [d.public() for d in service.store.datasets()]
        lines = [
            f"{d['name']:20} {d['format']:8} {d['rows']:>9} rows  {d['sha256'][:16]}  {d['path']}"
            for d in docs
        ]
        _print(args, docs, "\n".join(lines) or "no datasets registered")
        return 0

    return _run(args, body)


def _dataset_show(args: argparse.Namespace) -> int:
    def body(service: Any) -> int:
        doc = service.dataset(args.name).public()
        _print(args, doc, _dataset_text(doc))
        return 0

    return _run(args, body)


def _dataset_remove(args: argparse.Namespace) -> int:
    def body(service: Any) -> int:
        service.remove_dataset(args.name)
        _print(args, {"removed": args.name}, f"removed dataset {args.name} (the file is untouched)")
        return 0

    return _run(args, body)


def _dataset_text(doc: dict[str, Any]) -> str:
    lines = [
        f"dataset {doc['name']}: {doc['format']}, {doc['rows']} rows, {doc['size']} bytes",
        f"  file:   {doc['path']}",
        f"  sha256: {doc['sha256']}",
        "  columns:",
    ]
    for c in doc["columns"]:
        classes = sorted(set(c["declared"]) | set(c.get("detected_classes", [])))
        found = ", ".join(f"{k}={v}" for k, v in sorted(c["detected"].items()))
        extra = f"  classes: {', '.join(classes)}" if classes else ""
        extra += f"  detected: {found}" if found else ""
        lines.append(f"    {c['name']:28} {c['type']:8}{extra}")
    return "\n".join(lines)


# -- jobs ---------------------------------------------------------------------------------------


def _params(items: list[str]) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--param {item!r} is not NAME=NUMBER")
        try:
            out[name] = int(value) if value.lstrip("+-").isdigit() else float(value)
        except ValueError:
            raise ValueError(f"--param {item!r}: {value!r} is not a number") from None
    return out


def _default_app(service: Any, config: EdgeConfig) -> str:
    policy = service._current_policy()
    if policy is None:
        allowed = list(config.training.apps)
    else:
        allowed = [
            a.name
            for a in policy.spec.applications.values()
            if "training" in a.purposes
            and (not config.apps or a.name in {x.name for x in config.apps})
        ]
    if len(allowed) == 1:
        return allowed[0]
    raise ValueError(f"--app is required (apps allowed to train: {', '.join(allowed) or 'none'})")


def _default_model(config: EdgeConfig, app: str) -> str:
    for a in config.apps:
        if a.name == app and a.models:
            return a.models[0]
    models = [m for a in config.apps for m in a.models]
    if models:
        return models[0]
    raise ValueError("--base-model is required (no model in the edge config's [[apps]])")


def _train(args: argparse.Namespace) -> int:
    def body(service: Any) -> int:
        config = EdgeConfig.from_toml(args.config)
        try:
            params = _params(args.param)
            app = args.app or _default_app(service, config)
            model = args.base_model or _default_model(config, app)
        except ValueError as exc:
            return _fail(str(exc), 2)
        job = service.create_job(
            app=app,
            dataset=args.dataset,
            task=args.task,
            target=args.target,
            algorithm=args.algorithm,
            params=params,
            base_model=model,
            text_column=args.text_column,
        )
        if not args.wait:
            _print(args, job, job["id"])
            return 0
        print(job["id"], file=sys.stderr if args.json else sys.stdout, flush=True)
        bar = ProgressBar(sys.stderr)
        service.advance(job["id"], wait=True, progress=bar.update)
        final = service.job_view(job["id"])
        bar.done(final)
        _print(args, final, _job_text(final))
        return 0 if final["state"] == "completed" else 1

    return _run(args, body)


def _jobs_list(args: argparse.Namespace) -> int:
    def body(service: Any) -> int:
        jobs = service.jobs()
        lines = [
            f"{j['id']}  {j['state']:10} {j['app']:20} {j['dataset']:16} {j['algorithm']:24} "
            f"{_metric(j)}"
            for j in jobs
        ]
        _print(args, jobs, "\n".join(lines) or "no training jobs")
        return 0

    return _run(args, body)


def _jobs_show(args: argparse.Namespace) -> int:
    def body(service: Any) -> int:
        job = service.job_view(args.id)
        if args.follow and job["state"] not in ("completed", "failed", "cancelled"):
            bar = ProgressBar(sys.stderr)
            service.advance(job["id"], wait=True, progress=bar.update)
            job = service.job_view(args.id)
            bar.done(job)
        _print(args, job, _job_text(job))
        return 0 if job["state"] != "failed" else 1

    return _run(args, body)


def _jobs_cancel(args: argparse.Namespace) -> int:
    def body(service: Any) -> int:
        job = service.cancel(args.id)
        _print(args, job, f"{job['id']}: {job['state']}")
        return 0

    return _run(args, body)


def _jobs_receipt(args: argparse.Namespace) -> int:
    def body(service: Any) -> int:
        if args.export is not None:
            bundle = service.export_receipt(args.id)
            try:
                args.export.write_text(json.dumps(bundle, indent=2, sort_keys=True) + "\n")
            except OSError as exc:
                return _fail(f"cannot write {args.export}: {exc.strerror or exc}", 2)
            if not args.verify:
                _print(
                    args,
                    {"exported": str(args.export), "type": bundle["type"]},
                    f"receipt and evidence written to {args.export}",
                )
                return 0
        if not args.verify:
            doc = service.receipt(args.id)
            _print(
                args, doc, json.dumps(doc["receipt"], indent=2, ensure_ascii=False, sort_keys=True)
            )
            return 0
        report = service.verify(args.id)
        lines = [
            f"{'ok  ' if c['ok'] else 'FAIL'} {c['check']:10} {c['detail']}"
            for c in report["checks"]
        ]
        lines.append(
            f"receipt of {report['job']}: {'VERIFIED' if report['ok'] else 'NOT VERIFIED'}"
        )
        _print(args, report, "\n".join(lines))
        return 0 if report["ok"] else 1

    return _run(args, body)


def _metric(job: dict[str, Any]) -> str:
    metrics = job.get("metrics") or {}
    return "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, float))


def _job_text(job: dict[str, Any]) -> str:
    p = job["progress"]
    lines = [
        f"job {job['id']}: {job['state']}",
        f"  app {job['app']}, dataset {job['dataset']}, {job['task']} of {job['target']!r} "
        f"with {job['algorithm']} on {job['base_model']}",
        f"  policy {job['policy']['policy_id']} rule {job['policy']['rule']} "
        f"({job['policy']['effect']})",
        f"  progress {p['acked']}/{p['chunks']} chunks, {p['bytes']} bytes, {p['rows']} rows",
    ]
    actions = [
        f"{c}={v['action']}" for c, v in job["policy"]["columns"].items() if v["action"] != "keep"
    ]
    if actions:
        lines.append(f"  columns {', '.join(actions)} (others kept)")
    if job["enclave"]:
        lines.append(f"  enclave {job['enclave']['id']} epoch {job['enclave']['epoch']}")
    if job["metrics"]:
        lines.append(f"  hold-out metrics {_metric(job)}")
    if job["model"]:
        lines.append(f"  model {job['model']}")
    if job["error"]:
        lines.append(f"  error {job['error']['code']}: {job['error']['message']}")
    return "\n".join(lines)


class ProgressBar:
    """A one-line progress bar on a terminal; plain lines (on change) otherwise."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last = ""
        self._last_at = 0.0

    def update(self, job: dict[str, Any]) -> None:
        p = job["progress"]
        fraction = p["fraction"]
        filled = int(self.WIDTH * fraction)
        mib = p["bytes"] / (1024 * 1024)
        line = (
            f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction * 100:5.1f}% "
            f"{p['acked']}/{p['chunks']} chunks {fraction * mib:.1f}/{mib:.1f} MiB {job['state']}"
        )
        if job.get("error") and job["error"]["code"] == "retrying":
            line += " (retrying)"
        if self._tty:
            self._stream.write("\r" + line.ljust(len(self._last)))
            self._stream.flush()
        elif line != self._last and (
            time.monotonic() - self._last_at > 2 or job["state"] != "uploading"
        ):
            self._stream.write(line + "\n")
            self._last_at = time.monotonic()
        self._last = line

    def done(self, job: dict[str, Any]) -> None:
        self.update(job)
        if self._tty:
            self._stream.write("\n")
        self._stream.flush()
