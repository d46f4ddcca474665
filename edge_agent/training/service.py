"""Training on the edge: datasets, jobs and their worker, receipts, scoring (docs/training.md).

:class:`TrainingService` is used by the running agent (HTTP routes and a worker thread) and by
CLI processes on the same state directory; SQLite (``training.db``) and the outbox are the shared
truth, and a job is advanced by one process at a time (a lease in the job row).

A job moves ``queued`` → ``uploading`` → ``training`` → ``completed`` | ``failed`` |
``cancelled``:

* queued: the dataset is re-read and transformed row by row under the job's plan, cut into
  chunks, each sealed under the job key and written to the outbox; then one verified enclave is
  chosen and the job envelope (the job key HPKE-wrapped to its key) is opened there;
* uploading: chunks go up in one stream with a window of ``[training] window`` unacknowledged
  chunks; each authenticated ack moves the persisted position and deletes acknowledged chunks.
  A broken stream (network, broker restart, agent killed) resumes from the enclave's position;
* training: the enclave trains; the edge polls the authenticated status, then fetches the sealed
  result, verifies the receipt (signature, binding to the attestation result it recorded when it
  opened the job, dataset digest), stores the artifact as sealed by the enclave and its key
  sealed at rest, appends an audit record and closes the job at the enclave.

If the enclave lost the job (it restarted), the job starts over from its dataset with a new job
key, at most ``[training] max_attempts`` times.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cbor2
import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519

from attestation import receipts as receipt_bundles
from attestation.reference_values import ReferenceValuesFile
from edge_agent.config import EdgeConfig
from edge_agent.policy import policy_id_for
from edge_agent.training import datasets as ds
from edge_agent.training.client import TrainingCallError, TrainingClient, upload_request
from edge_agent.training.config import TrainingConfig
from edge_agent.training.outbox import Outbox, OutboxFull
from edge_agent.training.plan import (
    TrainingPlan,
    TrainingRefused,
    classify_builtin,
    classify_with_policy,
    column_classes,
    plan_with_config,
    plan_with_policy,
)
from edge_agent.training.store import DatasetRecord, StoreError, TrainingStore, now_ms
from edge_agent.training.transform import Chunker, Transformer
from edge_agent.trusted_set import TrustedEnclaveSet, TrustedKey, wall_clock_ms
from sovra import suites
from sovra.audit import AuditLog
from sovra.envelope import (
    Constraints,
    EnvelopeError,
    Header,
    ReplyReader,
    new_request_id,
    seal_request,
)
from sovra.policy import Policy
from sovra.tls import TLSFiles
from sovra.training import (
    ALGORITHMS,
    TASKS,
    TERMINAL_STATES,
    BadProof,
    JobKeys,
    JobSpec,
    ReceiptInvalid,
    ResultHead,
    TrainingWireError,
    attestation_digest,
    model_id,
    new_job_id,
    new_job_key,
    open_artifact,
    parse_job_id,
    result_frame_kind,
    verify_receipt,
)

log = logging.getLogger("sovra.edge.training")

AUDIT_KIND: Final = "training"
LEASE_MS: Final = 60_000
MAX_RECORDS: Final = 10_000
RETRYABLE: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

Progress = Callable[[dict[str, Any]], None]
AckHook = Callable[[str, int, str], None]


class TrainingError(Exception):
    """A request about training that cannot be served: ``status`` is the HTTP status to use."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Retry(Exception):
    """A transient failure: keep the job's state, try again on the next round."""


class _Restart(Exception):
    """The enclave lost the job: start over from the dataset (bounded by max_attempts)."""


@dataclass(frozen=True)
class EdgeIdentity:
    tenant: str
    suite: str
    request_ttl_s: int
    candidates: int
    constraints: Constraints


class TrainingService:
    def __init__(
        self,
        *,
        state_dir: Path,
        config: TrainingConfig,
        identity: EdgeIdentity,
        broker: str,
        tls: TLSFiles,
        reference_values: Path | ReferenceValuesFile,
        signing_key: ed25519.Ed25519PrivateKey,
        audit: AuditLog,
        policy: Callable[[], Policy | None],
        config_policy_id: str,
        on_ack: AckHook | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.store = TrainingStore(state_dir)
        self.outbox = Outbox(self.store.outbox_dir, config.outbox_max_bytes)
        self._broker = broker
        self._tls = tls
        self._signing_key = signing_key
        self._audit = audit
        self._policy = policy
        self._config_policy_id = config_policy_id
        self._on_ack = on_ack
        rv = (
            reference_values
            if isinstance(reference_values, ReferenceValuesFile)
            else ReferenceValuesFile(reference_values)
        )
        self._trusted = TrustedEnclaveSet(rv, wall_clock_ms, audit=audit)
        self._kem = suites.suite_by_name(identity.suite).kem
        self._lock = threading.RLock()
        self._client: TrainingClient | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy: set[str] = set()  # jobs a thread of this process is advancing

    # -- lifecycle ------------------------------------------------------------------------

    def client(self) -> TrainingClient:
        with self._lock:
            if self._client is None:
                self._client = TrainingClient(self._broker, self._tls)
            return self._client

    def start(self) -> None:
        """Start the background worker (the running agent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="sovra-training", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def close(self) -> None:
        self.stop()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        self.store.close()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                for job_id in self.store.runnable():
                    if self._stop.is_set():
                        break
                    self.advance(job_id)
            except Exception as exc:  # the worker must survive anything one job does
                log.error("training worker round failed (%s)", type(exc).__name__)
            self._stop.wait(self.config.poll_s)

    # -- datasets -------------------------------------------------------------------------

    def register_dataset(self, path: Path, name: str, labels: str | None = None) -> DatasetRecord:
        ds.check_name(name)
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise ds.DatasetError(f"{path}: no such file")
        fmt = ds.detect_format(path)
        if self.store.dataset(name) is not None:
            raise ds.DatasetError(f"a dataset named {name!r} is already registered")
        policy = self._current_policy()
        declared = ds.parse_labels(labels, policy.classes if policy is not None else None)

        def classify(text: str) -> tuple[dict[str, int], list[str]]:
            if policy is not None:
                return classify_with_policy(policy, text)
            return classify_builtin(text)

        found = ds.inspect(
            path, fmt, labels=declared, classify=classify, sample_rows=self.config.sample_rows
        )
        record = DatasetRecord(
            name=name,
            path=str(path),
            format=found.format,
            size=found.size,
            sha256=found.sha256,
            rows=found.rows,
            columns=found.columns,
            created_at_ms=now_ms(),
            pseudonym_key=os.urandom(32),
        )
        self.store.add_dataset(record)
        self._audit.append(
            AUDIT_KIND,
            {
                "event": "dataset_registered",
                "dataset": name,
                "sha256": found.sha256,
                "rows": found.rows,
                "columns": [c["name"] for c in found.columns],
            },
        )
        return record

    def dataset(self, name: str) -> DatasetRecord:
        record = self.store.dataset(name)
        if record is None:
            raise TrainingError(404, "dataset_not_found", f"no dataset named {name!r}")
        return record

    def remove_dataset(self, name: str) -> None:
        self.dataset(name)
        self.store.remove_dataset(name)
        self._audit.append(AUDIT_KIND, {"event": "dataset_removed", "dataset": name})

    # -- jobs -----------------------------------------------------------------------------

    def _current_policy(self) -> Policy | None:
        try:
            return self._policy()
        except Exception as exc:
            raise TrainingError(503, "policy_unavailable", f"no policy is active: {exc}") from None

    def plan(self, app: str, record: DatasetRecord, target: str, base_model: str) -> TrainingPlan:
        """Decide a job on ``record`` now (re-detecting over a fresh sample)."""
        columns = [c["name"] for c in record.columns]
        declared = {c["name"]: c.get("declared", []) for c in record.columns}
        samples = ds.sample_columns(
            Path(record.path), record.format, columns, self.config.sample_rows
        )
        policy = self._current_policy()
        classes = column_classes(columns, declared, samples, policy)
        if policy is not None:
            return plan_with_policy(
                policy,
                app=app,
                base_model=base_model,
                columns=columns,
                classes=classes,
                target=target,
                edge_constraints=self.identity.constraints,
            )
        return plan_with_config(
            self.config,
            policy_id=self._config_policy_id,
            app=app,
            columns=columns,
            classes=classes,
            target=target,
            edge_constraints=self.identity.constraints,
        )

    def create_job(
        self,
        *,
        app: str,
        dataset: str,
        task: str,
        target: str,
        algorithm: str = "logistic_regression",
        params: Mapping[str, Any] | None = None,
        base_model: str,
        text_column: str = "",
    ) -> dict[str, Any]:
        if task not in TASKS:
            raise TrainingError(400, "invalid_task", f"task must be one of {', '.join(TASKS)}")
        if algorithm not in ALGORITHMS:
            raise TrainingError(
                400, "invalid_algorithm", f"algorithm must be one of {', '.join(ALGORITHMS)}"
            )
        if algorithm == "logistic_regression" and task == "regression":
            raise TrainingError(
                400,
                "invalid_algorithm",
                "logistic_regression is a classifier; use gradient_boosting for regression",
            )
        if not base_model:
            raise TrainingError(400, "invalid_model", "a base model (enclave pool) is required")
        params = dict(params or {})
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in params.values()):
            raise TrainingError(400, "invalid_parameter", "params values must be numbers")
        record = self.dataset(dataset)
        if target not in [c["name"] for c in record.columns]:
            raise TrainingError(
                400, "invalid_target", f"target column {target!r} is not in dataset {dataset!r}"
            )
        try:
            plan = self.plan(app, record, target, base_model)
        except TrainingRefused as exc:
            self._audit.append(
                AUDIT_KIND,
                {
                    "event": "job_refused",
                    "app": app,
                    "dataset": dataset,
                    "code": exc.code,
                    "reason": exc.message,
                },
            )
            raise TrainingError(403, exc.code, exc.message) from None
        except ds.DatasetError as exc:
            raise TrainingError(409, "dataset_unreadable", str(exc)) from None
        job_id = new_job_id().hex()
        self.store.add_job(
            {
                "id": job_id,
                "app": app,
                "dataset": dataset,
                "task": task,
                "target": target,
                "algorithm": algorithm,
                "params": json.dumps(params, sort_keys=True),
                "base_model": base_model,
                "text_column": text_column,
                "policy_id": plan.policy_id,
                "rule_id": plan.rule_id,
                "plan": plan.to_json(),
                "constraints": json.dumps(
                    {
                        "regions": plan.regions,
                        "tee_types": plan.tee_types,
                        "allow_simulated": plan.allow_simulated,
                    }
                ),
                "state": "queued",
                "chunk_bytes": self.config.chunk_bytes,
            }
        )
        self._audit.append(
            AUDIT_KIND,
            {
                "event": "job_created",
                "job": job_id,
                "app": app,
                "dataset": dataset,
                "algorithm": algorithm,
                "task": task,
                "policy_id": plan.policy_id,
                "rule": plan.rule_id,
                "actions": plan.actions,
            },
        )
        return self.job_view(job_id)

    def _job(self, job_id: str, app: str | None = None) -> dict[str, Any]:
        try:
            raw = parse_job_id(job_id).hex()
        except ValueError as exc:
            raise TrainingError(404, "job_not_found", str(exc)) from None
        job = self.store.job(raw)
        if job is None or (app is not None and job["app"] != app):
            raise TrainingError(404, "job_not_found", f"no training job {job_id}")
        return job

    def job_view(self, job_id: str, app: str | None = None) -> dict[str, Any]:
        return public_job(self._job(job_id, app), self.outbox)

    def jobs(self, app: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return [public_job(j, self.outbox) for j in self.store.jobs(app=app, limit=limit)]

    def cancel(self, job_id: str, app: str | None = None) -> dict[str, Any]:
        job = self._job(job_id, app)
        if job["state"] in TERMINAL_STATES:
            return public_job(job, self.outbox)
        self.store.update_job(job["id"], cancel_requested=1)
        if self._take(job["id"]):  # else its owner cancels it within a second or so
            try:
                self._cancel_now(self.store.job(job["id"]) or job)
            finally:
                self._give_back(job["id"])
        return self.job_view(job["id"])

    def _take(self, job_id: str) -> bool:
        """The job's lease for this thread: no other process, and no other thread of ours."""
        with self._lock:
            if job_id in self._busy:
                return False
            self._busy.add(job_id)
        if self.store.claim(job_id, LEASE_MS):
            return True
        with self._lock:
            self._busy.discard(job_id)
        return False

    def _give_back(self, job_id: str) -> None:
        self.store.release(job_id)
        with self._lock:
            self._busy.discard(job_id)

    def _cancel_now(self, job: dict[str, Any]) -> None:
        """Clean up everywhere: the enclave's job and spool, the broker's row, our outbox."""
        if job["opened"] and job["job_key"]:
            keys = self._keys(job)
            try:
                self.client().close_job(keys.job_id, True, keys.close_proof(True))
            except TrainingCallError as exc:
                log.warning("cancel: enclave close failed for job %s: %s", job["id"], exc.code.name)
        self.outbox.remove_job(job["id"])
        self.store.update_job(job["id"], state="cancelled", finished_at_ms=now_ms(), job_key=None)
        self._audit.append(AUDIT_KIND, {"event": "job_cancelled", "job": job["id"]})
        log.info("training job %s cancelled", job["id"])

    # -- the state machine ----------------------------------------------------------------

    def advance(
        self, job_id: str, *, wait: bool = False, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Move the job as far as it can go now (``wait``: until it is finished)."""
        raw = parse_job_id(job_id).hex()
        while True:
            if not self._take(raw):
                job = self.store.job(raw) or {}
                if not wait or job.get("state") in TERMINAL_STATES:
                    return job
                if progress is not None:
                    progress(public_job(job, self.outbox))
                time.sleep(self.config.poll_s)  # another process holds it: poll, nothing else
                continue
            try:
                job = self._step(raw, progress)
            finally:
                self._give_back(raw)
            if job["state"] in TERMINAL_STATES or not wait:
                return job
            if progress is not None:
                progress(public_job(job, self.outbox))
            if job["state"] == "training" or job["error_code"]:
                time.sleep(self.config.poll_s)  # polling the enclave / retrying: pace it

    def _step(self, job_id: str, progress: Progress | None) -> dict[str, Any]:
        for _ in range(8):  # each state once or twice per call at most
            job = self.store.job(job_id)
            if job is None:
                raise TrainingError(404, "job_not_found", f"no training job {job_id}")
            state = job["state"]
            if state in TERMINAL_STATES:
                return job
            if job["cancel_requested"]:
                self._cancel_now(job)
                continue
            try:
                if state == "queued":
                    self._prepare(job)
                elif state == "uploading":
                    self._upload(job, progress)
                elif state == "training" and not self._poll(job):
                    return self.store.job(job_id) or job
            except _Retry as exc:
                self.store.update_job(job_id, error_code="retrying", error=str(exc)[:500])
                return self.store.job(job_id) or job
            except _Restart as exc:
                self._restart(job, str(exc))
            except OutboxFull as exc:
                self.outbox.remove_job(job_id)
                self._fail(job, OutboxFull.code, str(exc))
            except (TrainingRefused, TrainingError) as exc:
                self._fail(job, exc.code, exc.message)
            except ds.DatasetError as exc:
                self._fail(job, "dataset_unreadable", str(exc))
            except TrainingCallError as exc:
                self._fail(job, "broker_refused", f"{exc.code.name}: {exc.details}")
            except (TrainingWireError, EnvelopeError) as exc:
                self._fail(job, "integrity_failure", str(exc))
        return self.store.job(job_id) or {}

    def _fail(self, job: dict[str, Any], code: str, message: str) -> None:
        log.warning("training job %s failed: %s: %s", job["id"], code, message)
        if job["opened"] and job["job_key"]:
            keys = self._keys(job)
            with contextlib.suppress(TrainingCallError):
                self.client().close_job(keys.job_id, True, keys.close_proof(True))
        self.outbox.remove_job(job["id"])
        self.store.update_job(
            job["id"],
            state="failed",
            error_code=code,
            error=message[:1000],
            finished_at_ms=now_ms(),
            job_key=None,
        )
        self._audit.append(
            AUDIT_KIND, {"event": "job_failed", "job": job["id"], "code": code, "reason": message}
        )

    def _restart(self, job: dict[str, Any], reason: str) -> None:
        attempts = job["attempts"] + 1
        if attempts >= self.config.max_attempts:
            self._fail(job, "enclave_lost_job", f"{reason}; gave up after {attempts} attempts")
            return
        log.warning("training job %s starts over (attempt %d): %s", job["id"], attempts + 1, reason)
        self.outbox.remove_job(job["id"])
        self.store.update_job(
            job["id"],
            state="queued",
            spooled=0,
            opened=0,
            acked=0,
            job_key=None,
            attempts=attempts,
            error_code="restarted",
            error=reason[:500],
        )

    def _keys(self, job: dict[str, Any]) -> JobKeys:
        key = self.store.open_secret(job["id"], "job_key", job["job_key"])
        return JobKeys.derive(bytes.fromhex(job["id"]), key)

    # queued -> uploading

    def _prepare(self, job: dict[str, Any]) -> None:
        if not job["spooled"]:
            self._spool(job)
            job = self.store.job(job["id"]) or job
        self._open(job)

    def _spool(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        record = self.dataset(job["dataset"])
        plan = TrainingPlan.from_json(job["plan"])
        job_key = new_job_key()
        keys = JobKeys.derive(bytes.fromhex(job_id), job_key)
        self.store.update_job(job_id, job_key=self.store.seal_secret(job_id, "job_key", job_key))
        self.outbox.remove_job(job_id)
        columns = [c["name"] for c in record.columns]
        transformer = Transformer(columns, plan.actions, record.pseudonym_key)

        def emit(index: int, final: bool, data: bytes) -> None:
            self.outbox.put(job_id, index, *keys.seal_chunk_parts(index, final, data))

        chunker = Chunker(job["chunk_bytes"], emit)
        rows = 0
        with ds.open_rows(Path(record.path), record.format, schema=columns) as source:

            def counted() -> Iterator[list[Any]]:
                nonlocal rows
                for row in source.rows:
                    rows += 1
                    yield row

            for block in transformer.stream(counted()):
                chunker.feed(block)
            source_digest = source.digest()
        if source_digest != record.sha256:
            self.outbox.remove_job(job_id)
            raise TrainingError(
                409,
                "dataset_changed",
                f"dataset {record.name!r} changed since it was registered (digest differs); "
                "register it again",
            )
        count = chunker.close()
        self.store.update_job(
            job_id,
            chunks=count,
            total_bytes=chunker.total,
            rows=rows,
            source_sha256=source_digest,
            transformed_sha256=chunker.digest.hexdigest(),
            spooled=1,
            acked=0,
            opened=0,
            error_code="",
            error="",
        )
        log.info(
            "training job %s spooled: %d rows, %d chunks, %d bytes",
            job_id,
            rows,
            count,
            chunker.total,
        )

    def _candidate(self, model: str, constraints: Constraints) -> TrustedKey:
        client = self.client()
        try:
            listing = client.list_enclaves()
        except TrainingCallError as exc:
            raise _Retry(f"cannot list enclaves: {exc.code.name}") from None
        with self._lock:
            self._trusted.sync(listing.enclaves)
            found = self._trusted.candidates(model, 1, constraints, kem=self._kem)
        if not found:
            raise _Retry(
                f"no enclave verified by this edge serves {model!r} within the job's constraints"
            )
        return found[0]

    def _open(self, job: dict[str, Any]) -> None:
        plan = TrainingPlan.from_json(job["plan"])
        candidate = self._candidate(job["base_model"], plan.constraints)
        # The verified result (with the receipt key the evidence binds) and the evidence itself:
        # receipts are checked against it, and exported with it (docs/training.md).
        record = receipt_bundles.attestation_record(
            candidate.result,
            kem=candidate.kem,
            key_sha256=candidate.key_sha256,
            offer=candidate.offer,
        )
        att_sha = attestation_digest(record)
        keys = self._keys(job)
        job_key = self.store.open_secret(job["id"], "job_key", job["job_key"])
        spec = JobSpec(
            job_id=keys.job_id,
            job_key=job_key,
            algorithm=job["algorithm"],
            task=job["task"],
            target=job["target"],
            params=json.loads(job["params"]),
            chunks=job["chunks"],
            total_bytes=job["total_bytes"],
            dataset_sha256=bytes.fromhex(job["transformed_sha256"]),
            attestation_sha256=att_sha,
            text_column=job["text_column"],
        )
        issued = wall_clock_ms()
        header = Header(
            suite=self.identity.suite,
            request_id=new_request_id(),
            tenant=self.identity.tenant,
            app=job["app"],
            model=job["base_model"],
            operation="train",
            stream=False,
            labels=plan.labels,
            constraints=plan.constraints,
            policy_id=plan.policy_id,
            issued_at_ms=issued,
            expires_at_ms=issued + self.identity.request_ttl_s * 1000,
            recipients=(candidate.recipient,),
            edge_key=self._signing_key.public_key().public_bytes_raw(),
        )
        envelope, _secrets = seal_request(
            header, spec.encode(), [(candidate.recipient, candidate.public_key)], self._signing_key
        )
        self.store.update_job(
            job["id"],
            enclave_id=candidate.enclave_id,
            epoch=candidate.epoch,
            attestation=json.dumps(record, sort_keys=True),
            attestation_sha256=att_sha.hex(),
        )
        try:
            ack = self.client().open_job(keys.job_id, envelope)
        except TrainingCallError as exc:
            if exc.code in RETRYABLE or exc.code == grpc.StatusCode.NOT_FOUND:
                raise _Retry(f"opening the job: {exc.code.name}: {exc.details}") from None
            raise
        keys.check_ack(ack.next_chunk, ack.complete, ack.mac)
        if ack.enclave_id != candidate.enclave_id:
            raise TrainingWireError("the broker placed the job on another enclave than sealed to")
        self.store.update_job(
            job["id"],
            opened=1,
            state="training" if ack.complete else "uploading",
            acked=ack.next_chunk,
            error_code="",
            error="",
        )
        self.outbox.delete_below(job["id"], ack.next_chunk)
        self._audit.append(
            AUDIT_KIND,
            {
                "event": "job_opened",
                "job": job["id"],
                "enclave_id": candidate.enclave_id,
                "epoch": candidate.epoch,
                "simulated": candidate.result.simulated,
                "measurement": candidate.result.measurement,
                "attestation_sha256": att_sha.hex(),
                "chunks": job["chunks"],
                "dataset_sha256": job["transformed_sha256"],
            },
        )
        log.info("training job %s opened at %s", job["id"], candidate.enclave_id)

    # uploading -> training

    def _upload(self, job: dict[str, Any], progress: Progress | None) -> None:
        job_id = job["id"]
        keys = self._keys(job)
        total = job["chunks"]
        window = threading.Semaphore(self.config.window)
        stop = threading.Event()
        started = threading.Event()
        start_at = {"index": total}

        def requests() -> Iterator[bytes]:
            yield upload_request(keys.job_id)
            while not started.wait(0.5):
                if stop.is_set():
                    return
            for index in range(start_at["index"], total):
                while not window.acquire(timeout=0.5):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                yield self.outbox.message(job_id, index)  # the serialized request, as stored

        call = self.client().upload(requests())
        first = True
        deleted = 0  # outbox chunks below this index are gone
        checked = time.monotonic()
        try:
            for ack in call:
                keys.check_ack(ack.next_chunk, ack.complete, ack.mac)
                if first:
                    first = False
                    if not ack.complete and not self.outbox.has(job_id, ack.next_chunk):
                        raise _Restart(
                            f"the enclave needs chunk {ack.next_chunk}, which this edge no "
                            "longer holds"
                        )
                    start_at["index"] = deleted = ack.next_chunk
                    self.outbox.delete_below(job_id, ack.next_chunk)
                    started.set()
                else:
                    window.release()
                if self._on_ack is not None:
                    self._on_ack(job_id, ack.next_chunk, "received")
                self.store.update_job(job_id, acked=ack.next_chunk, error_code="", error="")
                for index in range(deleted, ack.next_chunk):
                    self.outbox.delete(job_id, index)
                deleted = max(deleted, ack.next_chunk)
                if self._on_ack is not None:
                    self._on_ack(job_id, ack.next_chunk, "persisted")
                if progress is not None:
                    progress(public_job(self.store.job(job_id) or job, self.outbox))
                if ack.complete:
                    break
                if time.monotonic() - checked > 1.0:  # at most once a second: lease, cancel
                    checked = time.monotonic()
                    self.store.claim(job_id, LEASE_MS)
                    if (self.store.job(job_id) or {}).get("cancel_requested"):
                        return
        except TrainingCallError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                raise _Restart(f"the enclave does not know the job: {exc.details}") from None
            if exc.code in RETRYABLE:
                raise _Retry(f"upload interrupted: {exc.code.name}: {exc.details}") from None
            if exc.code in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE):
                raise _Retry(f"upload out of step, resuming: {exc.details}") from None
            raise
        except BadProof as exc:
            raise _Retry(f"ignored an acknowledgement that does not verify: {exc}") from None
        finally:
            stop.set()
            started.set()
            call.cancel()
        current = self.store.job(job_id) or job
        if current["acked"] >= total:
            self.outbox.remove_job(job_id)
            self.store.update_job(job_id, state="training")
            log.info("training job %s uploaded (%d chunks)", job_id, total)
        else:
            raise _Retry(f"upload stream ended at chunk {current['acked']} of {total}")

    # training -> completed | failed

    def _poll(self, job: dict[str, Any]) -> bool:
        """True if the job moved on (finished), False if it is still training."""
        keys = self._keys(job)
        try:
            status = self.client().get_job(keys.job_id)
        except TrainingCallError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                raise _Restart(f"the enclave does not know the job: {exc.details}") from None
            if exc.code in RETRYABLE:
                raise _Retry(f"status: {exc.code.name}: {exc.details}") from None
            raise
        keys.check_status(status.state, status.next_chunk, status.mac)
        if status.state == "receiving":
            self.store.update_job(job["id"], state="uploading", acked=status.next_chunk)
            return True
        if status.state == "training":
            if job["error_code"]:
                self.store.update_job(job["id"], error_code="", error="")
            return False
        self._fetch(job, keys)
        return True

    def _fetch(self, job: dict[str, Any], keys: JobKeys) -> None:
        job_id = job["id"]
        reader = ReplyReader(keys.result)
        head: ResultHead | None = None
        artifact_path = self.store.artifact_path(job_id)
        tmp = artifact_path.with_suffix(".tmp")
        received = 0
        try:
            with tmp.open("wb") as out:
                for reply in self.client().fetch_result(keys.job_id):
                    if reply.enclave_id != job["enclave_id"]:
                        raise TrainingWireError("the result came from another enclave")
                    kind, fields = result_frame_kind(reader.open(reply.frame))
                    if kind == "error":
                        raise TrainingError(422, fields["code"], f"enclave: {fields['message']}")
                    if kind == "receipt":
                        head = fields["head"]
                    elif kind == "artifact":
                        out.write(fields["data"])
                        received += len(fields["data"])
                    if reader.done:
                        break
            reader.finish()
        except TrainingCallError as exc:
            tmp.unlink(missing_ok=True)
            if exc.code in RETRYABLE:
                raise _Retry(f"fetching the result: {exc.code.name}") from None
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if head is None or received != head.artifact_len:
            tmp.unlink(missing_ok=True)
            raise TrainingWireError("the result has no receipt or a truncated artifact")
        receipt = verify_receipt(head.receipt, head.signature, head.signer)
        problems = check_binding(receipt, job, self.identity.tenant)
        if receipt["measurement"]["artifact_sha256"] != head.artifact_sha256.hex():
            problems.append("artifact digest differs from the receipt")
        open_artifact(
            keys.job_id,
            head.artifact_key,
            head.artifact_nonce,
            tmp.read_bytes(),
            head.artifact_sha256,
        )
        if problems:
            tmp.unlink(missing_ok=True)
            raise TrainingWireError("receipt does not match the job: " + "; ".join(problems))
        os.replace(tmp, artifact_path)
        self.store.update_job(
            job_id,
            state="completed",
            receipt=head.receipt,
            receipt_sig=head.signature,
            receipt_signer=head.signer,
            metrics=json.dumps(receipt["metrics"], sort_keys=True),
            artifact_key=self.store.seal_secret(job_id, "artifact_key", head.artifact_key),
            artifact_nonce=head.artifact_nonce,
            artifact_sha256=head.artifact_sha256,
            finished_at_ms=now_ms(),
            error_code="",
            error="",
        )
        self._audit.append(
            AUDIT_KIND,
            {
                "event": "job_completed",
                "job": job_id,
                "receipt_sha256": hashlib.sha256(head.receipt).hexdigest(),
                "signer": head.signer.hex(),
                "enclave_id": job["enclave_id"],
                "epoch": job["epoch"],
                "dataset_sha256": receipt["dataset"]["sha256"],
                "artifact_sha256": head.artifact_sha256.hex(),
                "metrics": receipt["metrics"],
                "policy_id": job["policy_id"],
            },
        )
        try:
            self.client().close_job(keys.job_id, False, keys.close_proof(False))
        except TrainingCallError as exc:
            log.warning("could not close job %s at the enclave: %s", job_id, exc.code.name)
        self.store.update_job(job_id, job_key=None)
        log.info("training job %s completed: %s", job_id, receipt["metrics"])

    # -- receipts -------------------------------------------------------------------------

    def receipt(self, job_id: str, app: str | None = None) -> dict[str, Any]:
        job = self._job(job_id, app)
        if not job["receipt"]:
            raise TrainingError(
                409, "no_receipt", f"job {job_id} has no receipt (state {job['state']})"
            )
        return {
            "object": "sovra.training.receipt",
            "receipt": cbor2.loads(job["receipt"]),
            "receipt_cbor": job["receipt"].hex(),
            "signature": job["receipt_sig"].hex(),
            "signer": job["receipt_signer"].hex(),
        }

    def verify(
        self, job_id: str, app: str | None = None, *, recompute: bool = True
    ) -> dict[str, Any]:
        """Check a stored receipt: signature, the audit record of its signer, the binding to the
        attestation result recorded at open, and (``recompute``) the dataset digest recomputed
        from the local dataset under the job's plan."""
        job = self._job(job_id, app)
        checks: list[dict[str, Any]] = []

        def check(name: str, ok: bool, detail: str = "") -> None:
            checks.append({"check": name, "ok": ok, "detail": detail})

        if not job["receipt"]:
            raise TrainingError(409, "no_receipt", f"job {job_id} has no receipt")
        record = json.loads(job["attestation"]) if job["attestation"] else {}
        attested = _attested_receipt_key(record)
        try:
            if attested is None:
                raise ReceiptInvalid(
                    "the attestation result recorded for the job binds no receipt key"
                )
            # Checked with the receipt key the evidence bound for the enclave and epoch the job
            # was sealed to (recorded at open), never with a key the result frames carried.
            receipt = verify_receipt(job["receipt"], job["receipt_sig"], attested)
            check(
                "signature",
                True,
                f"Ed25519 by receipt key {attested.hex()[:16]}... bound in the attestation "
                f"evidence of {record.get('enclave_id')} epoch {record.get('epoch')}",
            )
        except ReceiptInvalid as exc:
            check("signature", False, str(exc))
            return {"job": model_id(bytes.fromhex(job["id"])), "ok": False, "checks": checks}
        recorded = self._audit_record(job["id"])
        digest = hashlib.sha256(job["receipt"]).hexdigest()
        if recorded is None:
            check("audit", False, "no job_completed record in the audit log")
        else:
            same = recorded.get("receipt_sha256") == digest and recorded.get("signer") == (
                job["receipt_signer"].hex()
            )
            chain = self._audit.verify()
            check(
                "audit",
                same and chain.ok,
                "receipt and signer match the audit record; chain intact"
                if same and chain.ok
                else (
                    "audit chain broken"
                    if not chain.ok
                    else "receipt or signer differ from the audit record"
                ),
            )
        problems = check_binding(receipt, job, self.identity.tenant)
        check(
            "binding",
            not problems,
            "; ".join(problems) or "attestation result, job and dataset fields match",
        )
        try:
            bundle = self._bundle(job)
            verified = receipt_bundles.verify_bundle(bundle, self._trusted.reference_values)
            check(
                "evidence",
                True,
                "the recorded evidence binds the receipt key and appraises under this edge's "
                f"reference values (as of {verified.result.verified_at_ms} ms)",
            )
        except TrainingError as exc:
            check("evidence", False, exc.message)
        except receipt_bundles.BundleRefused as exc:
            check("evidence", False, f"{exc.check}: {exc.reason}")
        if recompute:
            try:
                digest_now, chunks_now, size_now = self.recompute_digest(job)
                ok = (
                    digest_now == receipt["dataset"]["sha256"]
                    and size_now == receipt["dataset"]["bytes"]
                    and chunks_now == receipt["dataset"]["chunks"]
                )
                check("dataset", ok, f"transformed dataset sha256 {digest_now}")
            except (TrainingError, ds.DatasetError, StoreError) as exc:
                check("dataset", False, str(exc))
        return {
            "job": model_id(bytes.fromhex(job["id"])),
            "ok": all(c["ok"] for c in checks),
            "checks": checks,
            "receipt": receipt,
        }

    def export_receipt(self, job_id: str, app: str | None = None) -> dict[str, Any]:
        """The receipt with the evidence that binds its signing key, for third parties
        (``sovra attest verify-receipt``; :mod:`attestation.receipts`)."""
        return self._bundle(self._job(job_id, app))

    def _bundle(self, job: dict[str, Any]) -> dict[str, Any]:
        if not job["receipt"]:
            raise TrainingError(409, "no_receipt", f"job {job['id']} has no receipt")
        record = json.loads(job["attestation"]) if job["attestation"] else {}
        try:
            return receipt_bundles.export_bundle(
                job["receipt"], job["receipt_sig"], job["receipt_signer"], record
            )
        except ValueError as exc:
            raise TrainingError(409, "no_evidence", str(exc)) from None

    def _audit_record(self, job_id: str) -> dict[str, Any] | None:
        found = None
        for entry in self._audit.entries():
            record = entry.record
            if (
                entry.kind == AUDIT_KIND
                and record.get("event") == "job_completed"
                and record.get("job") == job_id
            ):
                found = record
        return found

    def recompute_digest(self, job: dict[str, Any]) -> tuple[str, int, int]:
        """(sha256 hex, chunks, bytes) of the job's transformed dataset, recomputed now."""
        record = self.dataset(job["dataset"])
        plan = TrainingPlan.from_json(job["plan"])
        columns = [c["name"] for c in record.columns]
        transformer = Transformer(columns, plan.actions, record.pseudonym_key)
        chunker = Chunker(job["chunk_bytes"], lambda _i, _f, _d: None)
        with ds.open_rows(Path(record.path), record.format, schema=columns) as source:
            for block in transformer.stream(source.rows):
                chunker.feed(block)
            if source.digest() != record.sha256:
                raise TrainingError(
                    409, "dataset_changed", "the dataset file changed since registration"
                )
        chunks = chunker.close()
        return chunker.digest.hexdigest(), chunks, chunker.total

    # -- models and scoring ---------------------------------------------------------------

    def model_ids(self, app: str | None = None) -> list[str]:
        return [model_id(bytes.fromhex(j["id"])) for j in self.store.models(app)]

    def score(self, app: str, model: str, records: Sequence[Any]) -> dict[str, Any]:
        job = self._job(model, app)
        if job["state"] != "completed":
            raise TrainingError(404, "model_not_found", f"model {model} is not trained (yet)")
        if (
            not isinstance(records, list)
            or not records
            or not all(isinstance(r, dict) for r in records)
        ):
            raise TrainingError(
                400, "invalid_records", "'records' must be a non-empty list of objects"
            )
        if len(records) > MAX_RECORDS:
            raise TrainingError(
                400, "too_many_records", f"at most {MAX_RECORDS} records per request"
            )
        record = self.dataset(job["dataset"])
        trained = TrainingPlan.from_json(job["plan"])
        try:
            plan = self.plan(app, record, job["target"], job["base_model"])
        except TrainingRefused as exc:
            raise TrainingError(403, exc.code, exc.message) from None
        if plan.actions != trained.actions:
            raise TrainingError(
                409,
                "policy_changed",
                "the policy now transforms the dataset's columns differently than when the model "
                "was trained; train it again",
            )
        transformer = Transformer(
            [c["name"] for c in record.columns], plan.actions, record.pseudonym_key
        )
        outbound = []
        for item in records:
            row = transformer.record(item)
            row.pop(job["target"], None)
            outbound.append(row)
        artifact_key = self.store.open_secret(job["id"], "artifact_key", job["artifact_key"])
        payload = cbor2.dumps(
            {
                "v": 1,
                "job": bytes.fromhex(job["id"]),
                "model": model_id(bytes.fromhex(job["id"])),
                "ak": artifact_key,
                "an": job["artifact_nonce"],
                "asha": job["artifact_sha256"],
                "records": outbound,
            },
            canonical=True,
        )
        candidates = self._candidates_for_scoring(job["base_model"], plan.constraints)
        issued = wall_clock_ms()
        header = Header(
            suite=self.identity.suite,
            request_id=new_request_id(),
            tenant=self.identity.tenant,
            app=app,
            model=job["base_model"],
            operation="score",
            stream=False,
            labels=plan.labels,
            constraints=plan.constraints,
            policy_id=plan.policy_id,
            issued_at_ms=issued,
            expires_at_ms=issued + self.identity.request_ttl_s * 1000,
            recipients=tuple(c.recipient for c in candidates),
            edge_key=self._signing_key.public_key().public_bytes_raw(),
        )
        envelope, secrets = seal_request(
            header, payload, [(c.recipient, c.public_key) for c in candidates], self._signing_key
        )
        artifact = self.store.artifact_path(job["id"]).read_bytes()
        try:
            reply = self.client().score(envelope, artifact)
        except TrainingCallError as exc:
            status = 503 if exc.code in RETRYABLE or exc.code == grpc.StatusCode.NOT_FOUND else 502
            raise TrainingError(
                status, "scoring_unavailable", f"broker: {exc.code.name}: {exc.details}"
            ) from None
        if reply.enclave_id not in {c.enclave_id for c in candidates}:
            raise TrainingError(
                502,
                "reply_integrity_failure",
                "the broker named an enclave that was not a candidate",
            )
        reader = ReplyReader(secrets.reply_keys)
        try:
            plaintext = reader.open(reply.frame)
            reader.finish()
        except EnvelopeError as exc:
            raise TrainingError(502, "reply_integrity_failure", str(exc)) from None
        try:
            doc = json.loads(plaintext)
        except ValueError:
            raise TrainingError(502, "bad_enclave_reply", "the enclave reply is not JSON") from None
        if not isinstance(doc, dict):
            raise TrainingError(502, "bad_enclave_reply", "the enclave reply is not an object")
        error = doc.get("error")
        self._audit.append(
            AUDIT_KIND,
            {
                "event": "score",
                "request_id": header.request_id_hex,
                "app": app,
                "model": model,
                "records": len(records),
                "served_by": reply.enclave_id,
                "policy_id": plan.policy_id,
                "outcome": "error" if error else "ok",
            },
        )
        if isinstance(error, dict):
            raise TrainingError(
                400, str(error.get("code") or "score_failed"), str(error.get("message"))[:500]
            )
        doc["served_by"] = reply.enclave_id
        return doc

    def _candidates_for_scoring(self, model: str, constraints: Constraints) -> list[TrustedKey]:
        try:
            listing = self.client().list_enclaves()
        except TrainingCallError as exc:
            raise TrainingError(
                503, "enclaves_unavailable", f"cannot list enclaves: {exc.details}"
            ) from None
        with self._lock:
            self._trusted.sync(listing.enclaves)
            found = self._trusted.candidates(
                model, self.identity.candidates, constraints, kem=self._kem
            )
        if not found:
            raise TrainingError(
                503, "no_enclave_available", f"no enclave verified by this edge serves {model!r}"
            )
        return found


def check_binding(receipt: Mapping[str, Any], job: Mapping[str, Any], tenant: str) -> list[str]:
    """Differences between a verified receipt and what the edge recorded for the job."""
    problems: list[str] = []
    expected_att = json.loads(job["attestation"]) if job["attestation"] else {}
    att = receipt["attestation"]
    result = expected_att.get("result", {})
    pairs = [
        ("attestation.enclave_id", att["enclave_id"], expected_att.get("enclave_id")),
        ("attestation.epoch", att["epoch"], expected_att.get("epoch")),
        ("attestation.key_sha256", att["key_sha256"], expected_att.get("key_sha256")),
        ("attestation.measurement", att["measurement"], result.get("measurement")),
        ("attestation.tee_type", att["tee_type"], result.get("tee_type")),
        ("attestation.simulated", att["simulated"], result.get("simulated")),
        ("attestation.result_sha256", att["result_sha256"], job["attestation_sha256"]),
        # the receipt key bound in the attestation result the edge recorded at open
        ("signer", receipt["signer"], result.get("receipt_public_key") or None),
        ("job", receipt["job"], job["id"]),
        ("app", receipt["app"], job["app"]),
        ("policy", receipt["policy"], job["policy_id"]),
        ("algorithm", receipt["algorithm"], job["algorithm"]),
        ("task", receipt["task"], job["task"]),
        ("target", receipt["target"], job["target"]),
        ("dataset.sha256", receipt["dataset"]["sha256"], job["transformed_sha256"]),
        ("dataset.chunks", receipt["dataset"]["chunks"], job["chunks"]),
        ("dataset.bytes", receipt["dataset"]["bytes"], job["total_bytes"]),
        ("measurement.enclave", receipt["measurement"]["enclave"], result.get("measurement")),
    ]
    for name, got, want in pairs:
        if got != want:
            problems.append(f"{name} differs from the edge's record")
    if expected_att and attestation_digest(expected_att).hex() != job["attestation_sha256"]:
        problems.append("the recorded attestation result does not match its digest")
    if receipt["tenant"] != tenant:
        problems.append("tenant differs from this edge's tenant")
    return problems


def _attested_receipt_key(record: Mapping[str, Any]) -> bytes | None:
    """The receipt key bound in a recorded attestation result, if it names one."""
    result = record.get("result")
    value = result.get("receipt_public_key") if isinstance(result, Mapping) else None
    if not isinstance(value, str) or len(value) != 64:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def public_job(job: Mapping[str, Any], outbox: Outbox | None = None) -> dict[str, Any]:
    """The job as shown to apps and operators: metadata only (no keys, no data)."""
    plan = TrainingPlan.from_json(job["plan"])
    chunks = job["chunks"]
    acked = job["acked"]
    if job["state"] in ("training", "completed"):
        fraction = 1.0
    elif chunks:
        fraction = acked / chunks
    else:
        fraction = 0.0
    error = None
    if job["error_code"]:
        error = {"code": job["error_code"], "message": job["error"]}
    view: dict[str, Any] = {
        "object": "sovra.training.job",
        "id": model_id(bytes.fromhex(job["id"])),
        "app": job["app"],
        "dataset": job["dataset"],
        "task": job["task"],
        "target": job["target"],
        "algorithm": job["algorithm"],
        "params": json.loads(job["params"]),
        "base_model": job["base_model"],
        "state": job["state"],
        "progress": {
            "chunks": chunks,
            "acked": acked,
            "bytes": job["total_bytes"],
            "rows": job["rows"],
            "fraction": round(fraction, 4),
        },
        "policy": plan.summary(),
        "enclave": {"id": job["enclave_id"], "epoch": job["epoch"]} if job["enclave_id"] else None,
        "dataset_sha256": job["transformed_sha256"] or None,
        "metrics": json.loads(job["metrics"]) if job["metrics"] else None,
        "model": model_id(bytes.fromhex(job["id"])) if job["state"] == "completed" else None,
        "error": error,
        "attempts": job["attempts"] + 1,
        "created_at": job["created_at_ms"] // 1000,
        "finished_at": job["finished_at_ms"] // 1000 if job["finished_at_ms"] else None,
    }
    if outbox is not None and job["state"] in ("queued", "uploading"):
        view["progress"]["outbox_bytes"] = outbox.job_bytes(job["id"]) if job["spooled"] else 0
    return view


def edge_identity(config: EdgeConfig) -> EdgeIdentity:
    c = config.constraints
    return EdgeIdentity(
        tenant=config.tenant,
        suite=config.suite,
        request_ttl_s=config.request_ttl_s,
        candidates=config.candidates,
        constraints=Constraints(
            regions=c.regions,
            tee_types=c.tee_types,
            measurements=(),
            allow_simulated=c.allow_simulated,
        ),
    )


def for_runtime(runtime: Any) -> TrainingService:
    """The training service of a running agent (``EdgeRuntime``): its identity key, audit log,
    reference values and active policy."""
    config: EdgeConfig = runtime.config
    decider = runtime.policy

    def current_policy() -> Policy | None:
        if getattr(decider, "mode", "config") == "config":
            return None
        policy: Policy = decider.policy  # raises when no policy is active
        return policy

    rv = getattr(runtime.trusted, "_rv", None)
    return TrainingService(
        state_dir=config.state_dir,
        config=config.training,
        identity=edge_identity(config),
        broker=config.broker,
        tls=config.tls,
        reference_values=rv if isinstance(rv, ReferenceValuesFile) else config.reference_values,
        signing_key=runtime.signing_key,
        audit=runtime.audit,
        policy=current_policy,
        config_policy_id=policy_id_for(config.apps),
    )


def for_cli(
    config: EdgeConfig, *, audit: AuditLog, on_ack: AckHook | None = None
) -> TrainingService:
    """A training service working on ``config``'s state directory from another process (CLI,
    tests): the same identity key, audit log and policy the agent uses."""
    from edge_agent import identity
    from edge_agent.training.plan import load_policy_for_cli

    loaded: list[Policy | None] = []

    def current_policy() -> Policy | None:
        if not loaded:
            loaded.append(load_policy_for_cli(config))
        return loaded[0]

    return TrainingService(
        state_dir=config.state_dir,
        config=config.training,
        identity=edge_identity(config),
        broker=config.broker,
        tls=config.tls,
        reference_values=config.reference_values,
        signing_key=identity.load_or_create(config.identity_key_path),
        audit=audit,
        policy=current_policy,
        config_policy_id=policy_id_for(config.apps),
        on_ack=on_ack,
    )
