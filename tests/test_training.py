"""Confidential training, below the network: the chunk, ack and receipt formats, the enclave's
chunk acceptance, the policy transform, the outbox, datasets, planning and the algorithms."""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import cbor2
import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.training import datasets as ds
from edge_agent.training.config import TrainingConfig
from edge_agent.training.outbox import Outbox, OutboxFull
from edge_agent.training.plan import (
    TrainingRefused,
    column_classes,
    plan_with_config,
    plan_with_policy,
)
from edge_agent.training.transform import Chunker, Transformer, pseudonym
from enclave.processor import Refused
from enclave.training import algorithms
from enclave.training.jobs import FAILED, TRAINING, Job, JobContext, Spool
from sovra.envelope import Constraints
from sovra.policy import Policy, PolicyInvalid
from sovra.training import (
    CHUNK_MAGIC,
    RECEIPT_FIELDS,
    BadProof,
    ChunkRejected,
    JobKeys,
    JobSpec,
    MalformedMessage,
    ReceiptInvalid,
    attestation_digest,
    new_job_id,
    new_job_key,
    open_artifact,
    parse_chunk,
    seal_artifact,
    sign_receipt,
    verify_receipt,
)
from sovra.training_demo import LABELS, write_hospital_csv

EXAMPLE_POLICY = Path(__file__).resolve().parents[1] / "examples" / "policy"
EDGE = Constraints(regions=("cn-north-1",), allow_simulated=True)


def _keys() -> JobKeys:
    return JobKeys.derive(new_job_id(), new_job_key())


# -- chunks, acks, proofs ----------------------------------------------------------------------


def test_chunks_open_only_for_their_job_and_position() -> None:
    keys, other = _keys(), _keys()
    chunk = keys.seal_chunk(3, False, b"rows,of,data\n")
    assert keys.open_chunk(chunk) == (3, False, b"rows,of,data\n")
    obj = cbor2.loads(chunk)

    def mutated(i: int, value: Any) -> bytes:
        copy_ = list(obj)
        copy_[i] = value
        return cbor2.dumps(copy_)

    flipped = bytearray(obj[5])
    flipped[0] ^= 1
    for bad in (
        mutated(2, 4),  # moved to another position
        mutated(3, True),  # forged end marker
        mutated(5, bytes(flipped)),  # tampered ciphertext
    ):
        with pytest.raises(ChunkRejected):
            keys.open_chunk(bad)
    with pytest.raises(ChunkRejected, match="another job"):
        other.open_chunk(chunk)
    same_id = JobKeys.derive(keys.job_id, new_job_key())  # same job id, another key
    with pytest.raises(ChunkRejected):
        same_id.open_chunk(chunk)
    with pytest.raises(MalformedMessage):
        keys.open_chunk(b"\xff not cbor")


def test_chunks_are_written_as_cbor_and_read_in_place() -> None:
    """seal_chunk writes exactly what cbor2 would; parse_chunk reads that layout without copying
    the ciphertext, and any other valid encoding of the same chunk the generic way."""
    keys = _keys()
    for index in (0, 23, 24, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32):
        for size in (0, 7, 23, 24, 255, 256, 65_519, 65_520, 70_000):
            final = index % 2 == 1
            plaintext = bytes(range(256)) * (size // 256) + b"p" * (size % 256)
            chunk = keys.seal_chunk(index, final, plaintext)
            obj = cbor2.loads(chunk)
            assert chunk == cbor2.dumps(obj) and obj[:4] == [CHUNK_MAGIC, keys.job_id, index, final]
            header = parse_chunk(chunk)
            assert isinstance(header.ciphertext, memoryview)  # a view, not a copy
            assert (header.index, header.final, header.nonce) == (index, final, obj[4])
            assert bytes(header.ciphertext) == obj[5]
            assert keys.open_chunk(memoryview(chunk)) == (index, final, plaintext)
    chunk = keys.seal_chunk(300, False, b"rows\n")
    obj = cbor2.loads(chunk)
    # other encodings of the same chunk (a longer-than-needed index head; trailing bytes, which
    # the generic decoder ignores) give what the generic decoder always gave
    long_index = chunk.replace(b"\x19\x01\x2c", b"\x1a\x00\x00\x01\x2c", 1)
    assert cbor2.loads(long_index) == obj
    assert isinstance(parse_chunk(chunk + b"\x00").ciphertext, bytes)  # the generic way
    for other in (long_index, chunk + b"\x00"):
        assert parse_chunk(other).index == 300
        assert keys.open_chunk(other) == (300, False, b"rows\n")
    for bad in (chunk[:-1], chunk[:30], b"\x86" + chunk[1:20]):
        with pytest.raises((MalformedMessage, ChunkRejected)):
            keys.open_chunk(bad)


def test_upload_requests_are_read_in_place_by_the_enclave() -> None:
    from edge_agent.training.client import upload_request
    from enclave.training.service import upload_fields
    from sovra.v1 import training_pb2

    job = new_job_id()
    for chunk in (b"x", b"y" * 200, b"z" * 70_000):
        job_id, view = upload_fields(upload_request(job, chunk))
        assert job_id == job and isinstance(view, memoryview) and view == chunk
    assert upload_fields(upload_request(job)) == (job, b"")
    # other encodings of the same message (fields reversed, an unknown field): parsed by protobuf
    message = training_pb2.UploadRequest(job_id=job, chunk=b"abc").SerializeToString()
    reversed_ = message[18:] + message[:18]
    assert upload_fields(reversed_) == (job, b"abc")
    assert upload_fields(message + b"\x18\x01") == (job, b"abc")
    for bad in (b"\x0a\x10" + job + b"\x12\x05abc", b"\xff\xff", message[:-1]):
        with pytest.raises(Refused) as info:
            upload_fields(bad)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_acks_status_and_close_proofs_are_bound_to_the_job_key() -> None:
    keys, other = _keys(), _keys()
    keys.check_ack(5, False, keys.ack_mac(5, False))
    for mac in (keys.ack_mac(6, False), keys.ack_mac(5, True), other.ack_mac(5, False)):
        with pytest.raises(BadProof):
            keys.check_ack(5, False, mac)
    keys.check_status("training", 9, keys.status_mac("training", 9))
    with pytest.raises(BadProof):
        keys.check_status("completed", 9, keys.status_mac("training", 9))
    keys.check_close(True, keys.close_proof(True))
    with pytest.raises(BadProof):
        keys.check_close(False, keys.close_proof(True))


def test_job_spec_round_trip_and_validation() -> None:
    spec = JobSpec(
        job_id=new_job_id(),
        job_key=new_job_key(),
        target="y",
        params={"C": 0.5},
        chunks=2,
        total_bytes=10,
        dataset_sha256=b"\x01" * 32,
        attestation_sha256=b"\x02" * 32,
    )
    assert JobSpec.decode(spec.encode()) == spec
    with pytest.raises(MalformedMessage):
        JobSpec(**{**spec.__dict__, "algorithm": "svm"}).encode()
    doc = cbor2.loads(spec.encode())
    doc["extra"] = 1
    with pytest.raises(MalformedMessage):
        JobSpec.decode(cbor2.dumps(doc, canonical=True))


def test_artifacts_open_only_with_their_key_and_job() -> None:
    job = new_job_id()
    key, nonce, ct, digest = seal_artifact(job, b"model bytes")
    assert open_artifact(job, key, nonce, ct, digest) == b"model bytes"
    with pytest.raises(Exception, match="authentication"):
        open_artifact(new_job_id(), key, nonce, ct, digest)
    with pytest.raises(Exception, match="authentication"):
        open_artifact(job, key, nonce, ct[:-1] + bytes([ct[-1] ^ 1]), digest)


# -- receipts ----------------------------------------------------------------------------------


def _receipt(signer: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "sovra-training-receipt",
        "job": "00" * 16,
        "tenant": "demo",
        "app": "research",
        "policy": "dir:abc",
        "dataset": {"sha256": "aa" * 32, "bytes": 100, "chunks": 1, "rows": 5, "format": "csv"},
        "algorithm": "logistic_regression",
        "task": "classification",
        "target": "y",
        "params": {"C": 1.0},
        "measurement": {"enclave": "ab" * 48, "base_model": "m", "artifact_sha256": "cd" * 32},
        "metrics": {"roc_auc": 0.97, "accuracy": 0.93},
        "holdout": {"fraction": 0.25, "seed": 0, "train_rows": 4, "test_rows": 1},
        "attestation": {
            "enclave_id": "enclave-1",
            "epoch": 1,
            "measurement": "ab" * 48,
            "tee_type": "sim-ascend-cvm",
            "simulated": True,
            "region": "cn-north-1",
            "key_sha256": "ef" * 32,
            "result_sha256": "12" * 32,
        },
        "started_ms": 1,
        "ended_ms": 2,
        "signer": signer.public_key().public_bytes_raw().hex(),
    }


def _leaves(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in _leaves(v, (*path, k))]
    return [path]


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    return value + "x"


def test_receipt_tampering_of_any_field_is_detected() -> None:
    signer = ed25519.Ed25519PrivateKey.generate()
    receipt = _receipt(signer)
    data, signature = sign_receipt(receipt, signer)
    public = signer.public_key().public_bytes_raw()
    assert verify_receipt(data, signature, public) == receipt
    leaves = _leaves(receipt)
    assert {p[0] for p in leaves} == set(RECEIPT_FIELDS)
    for path in leaves:
        forged = copy.deepcopy(receipt)
        target = forged
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = _changed(target[path[-1]])
        with pytest.raises(ReceiptInvalid):
            verify_receipt(cbor2.dumps(forged, canonical=True), signature, public)
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(ReceiptInvalid):  # someone else's key, even with a valid signature
        resigned = {**receipt, "signer": other.public_key().public_bytes_raw().hex()}
        data2, sig2 = sign_receipt(resigned, other)
        verify_receipt(data2, sig2, public)
    with pytest.raises(ReceiptInvalid):  # not canonical
        verify_receipt(cbor2.dumps(receipt), signature, public)


# -- the enclave's chunk acceptance ------------------------------------------------------------


def _job(tmp_path: Path, plaintexts: list[bytes]) -> tuple[Job, JobKeys, list[bytes]]:
    keys = _keys()
    data = b"".join(plaintexts)
    spec = JobSpec(
        job_id=keys.job_id,
        job_key=new_job_key(),  # not used by Job itself; keys are passed separately
        target="y",
        chunks=len(plaintexts),
        total_bytes=len(data),
        dataset_sha256=hashlib.sha256(data).digest(),
        attestation_sha256=b"\x00" * 32,
    )
    ctx = JobContext("t", "a", "p", "m", "e", 1, "meas", "sim", True, "r", "k")
    job = Job(spec=spec, keys=keys, context=ctx, spool=Spool(tmp_path, keys.job_id.hex(), keys))
    chunks = [keys.seal_chunk(i, i == len(plaintexts) - 1, p) for i, p in enumerate(plaintexts)]
    return job, keys, chunks


def _refused(job: Job, chunk: bytes, code: grpc.StatusCode) -> None:
    with pytest.raises(Refused) as info:
        job.accept(chunk, lambda _j: None)
    assert info.value.code == code, info.value.message


def test_enclave_accepts_each_chunk_once_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Spool, "MEMORY_BYTES", 100)  # the first chunk in memory, then disk
    job, keys, chunks = _job(tmp_path, [b"a,b\n", b"1,2\n", b"3,4\n"])
    other, _, foreign = _job(tmp_path, [b"x\n", b"y\n"])
    started: list[Job] = []
    job.accept(chunks[0], started.append)
    _refused(job, chunks[0], grpc.StatusCode.ALREADY_EXISTS)  # duplicate
    _refused(job, chunks[2], grpc.StatusCode.OUT_OF_RANGE)  # reordered
    _refused(job, foreign[1], grpc.StatusCode.INVALID_ARGUMENT)  # another job's
    tampered = bytearray(chunks[1])
    tampered[-1] ^= 1
    _refused(job, bytes(tampered), grpc.StatusCode.INVALID_ARGUMENT)
    # the same position sealed with the end marker forged
    _refused(job, keys.seal_chunk(1, True, b"1,2\n"), grpc.StatusCode.INVALID_ARGUMENT)
    assert job.next_chunk == 1 and not started
    job.accept(chunks[1], started.append)
    job.accept(chunks[2], started.append)
    assert started == [job] and job.state == TRAINING
    assert job.accepted == Counter({0: 1, 1: 1, 2: 1})
    assert job.data().read() == b"a,b\n1,2\n3,4\n"
    assert len(list(tmp_path.glob("job-*/*"))) == 2  # spilled to disk, still sealed
    assert all(b"3,4" not in p.read_bytes() for p in tmp_path.glob("job-*/*"))
    assert job.refused[grpc.StatusCode.ALREADY_EXISTS.name] == 1
    _refused(job, chunks[2], grpc.StatusCode.FAILED_PRECONDITION)  # nothing after the end
    other.spool.remove()


def test_enclave_refuses_a_dataset_that_does_not_match_its_spec(tmp_path: Path) -> None:
    job, keys, _ = _job(tmp_path, [b"a\n", b"b\n"])
    job.accept(keys.seal_chunk(0, False, b"a\n"), lambda _j: None)
    _refused(job, keys.seal_chunk(1, True, b"c\n"), grpc.StatusCode.DATA_LOSS)
    assert job.state == FAILED and job.failure is not None


# -- the transform, the chunker, the outbox ----------------------------------------------------


def test_pseudonyms_are_keyed_consistent_and_column_scoped() -> None:
    key, other = b"k" * 32, b"o" * 32
    token = pseudonym(key, "id", "11010519491231002X")
    assert token == pseudonym(key, "id", "11010519491231002X")
    assert token.startswith("tok_") and len(token) == 36
    assert token != pseudonym(other, "id", "11010519491231002X")
    assert token != pseudonym(key, "other_id", "11010519491231002X")
    t = Transformer(["name", "id", "x", "secret"], {"name": "pseudonymise", "secret": "drop"}, key)
    assert t.out_columns == ["name", "id", "x"]
    assert t.values(["Li Wei", "110", "1.5", "HIV+"]) == [
        pseudonym(key, "name", "Li Wei"),
        "110",
        "1.5",
    ]
    assert t.record({"name": "Li Wei", "secret": "HIV+", "x": 2, "unknown": 1}) == {
        "name": pseudonym(key, "name", "Li Wei"),
        "x": 2,
    }
    text = b"".join(t.stream(iter([["a,b", None, 1, "s"]]))).decode()
    assert text == f"name,id,x\n{pseudonym(key, 'name', 'a,b')},,1\n"


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 30])
def test_chunker_cuts_exact_sizes_and_marks_the_last(size: int) -> None:
    out: list[tuple[int, bool, bytes]] = []
    chunker = Chunker(10, lambda i, f, d: out.append((i, f, d)))
    data = bytes(range(size))
    for start in range(0, size, 7):
        chunker.feed(data[start : start + 7])
    count = chunker.close()
    assert count == len(out) == max(1, -(-size // 10))
    assert [i for i, _, _ in out] == list(range(count))
    assert [f for _, f, _ in out] == [False] * (count - 1) + [True]
    assert b"".join(d for _, _, d in out) == data
    assert all(len(d) == 10 for _, _, d in out[:-1])
    assert chunker.digest.digest() == hashlib.sha256(data).digest()


def test_outbox_full_is_a_clear_error_and_loses_nothing(tmp_path: Path) -> None:
    job_a, job_b = "aa" * 16, "bb" * 16
    outbox = Outbox(tmp_path / "outbox", max_bytes=130)  # 40-byte chunks take 60 bytes each
    outbox.put(job_a, 0, b"a" * 40)
    outbox.put(job_a, 1, b"b" * 40)
    with pytest.raises(OutboxFull, match="outbox full"):
        outbox.put(job_b, 0, b"c" * 40)
    assert outbox.get(job_a, 0) == b"a" * 40 and outbox.get(job_a, 1) == b"b" * 40
    assert outbox.chunks(job_a) == [0, 1] and outbox.used() == 120
    outbox.delete_below(job_a, 1)  # the enclave acknowledged chunk 0
    assert outbox.chunks(job_a) == [1]
    outbox.put(job_b, 0, b"c" * 40)  # fits now
    assert outbox.used() == 120


def test_outbox_stores_each_chunk_as_its_upload_request(tmp_path: Path) -> None:
    from sovra.v1 import training_pb2

    keys = _keys()
    job = keys.job_id.hex()
    outbox = Outbox(tmp_path / "outbox", max_bytes=1 << 30)
    head, ct = keys.seal_chunk_parts(7, False, b"x" * 70_000)
    outbox.put(job, 7, head, ct)  # written in parts, never joined
    sealed = head + ct
    assert outbox.get(job, 7) == sealed and keys.open_chunk(sealed)[2] == b"x" * 70_000
    expected = training_pb2.UploadRequest(job_id=keys.job_id, chunk=sealed).SerializeToString()
    assert outbox.message(job, 7) == outbox.path(job, 7).read_bytes() == expected
    outbox.path(job, 8).write_bytes(sealed)  # a bare chunk, as an older version spooled it
    assert outbox.get(job, 8) == sealed and outbox.message(job, 8) == expected


# -- datasets ----------------------------------------------------------------------------------

ROWS = [["Li Wei", "11010519491231002X", 1, 2.5, "yes"], ["Wang Fang", None, 3, 4.25, "no"]]
COLUMNS = ["name", "id", "n", "x", "label"]


def _write_all_formats(tmp_path: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {
        "csv": tmp_path / "d.csv",
        "jsonl": tmp_path / "d.jsonl",
        "parquet": tmp_path / "d.parquet",
    }
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows([["" if v is None else v for v in r] for r in ROWS])
    paths["jsonl"].write_text("".join(json.dumps(dict(zip(COLUMNS, r))) + "\n" for r in ROWS))
    table = pa.table({c: [r[i] for r in ROWS] for i, c in enumerate(COLUMNS)})
    pq.write_table(table, paths["parquet"])
    return paths


def test_three_formats_read_alike_and_transform_to_the_same_bytes(tmp_path: Path) -> None:
    digests = set()
    for fmt, path in _write_all_formats(tmp_path).items():
        found = ds.inspect(
            path, fmt, labels={"name": ["confidential"]},
            classify=lambda text: ({"X": 1}, ["confidential"]) if "110105" in text else ({}, []),
            sample_rows=100,
        )  # fmt: skip
        assert found.rows == 2 and found.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        by_name = {c["name"]: c for c in found.columns}
        assert by_name["name"]["declared"] == ["confidential"]
        assert by_name["id"]["detected_classes"] == ["confidential"]
        assert by_name["n"]["type"] == "integer" and by_name["x"]["type"] == "number"
        t = Transformer(COLUMNS, {"name": "pseudonymise", "id": "drop"}, b"k" * 32)
        with ds.open_rows(path, fmt, schema=COLUMNS) as source:
            data = b"".join(t.stream(source.rows))
            assert source.digest() == found.sha256
        digests.add(hashlib.sha256(data).hexdigest())
    assert len(digests) == 1


def test_dataset_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2,3\n")
    with pytest.raises(ds.DatasetError, match="line 2 has 3 fields"):
        ds.inspect(bad, "csv", labels={}, classify=lambda t: ({}, []), sample_rows=10)
    with pytest.raises(ds.DatasetError, match="not column=class"):
        ds.parse_labels("a")
    with pytest.raises(ds.DatasetError, match="not defined by the policy"):
        ds.parse_labels("a=secret", ["public", "confidential"])
    with pytest.raises(ds.DatasetError, match="unknown format"):
        ds.detect_format(tmp_path / "x.xlsx")


# -- policy ------------------------------------------------------------------------------------


def _hospital_plan(tmp_path: Path, app: str, policy: Policy) -> Any:
    path = tmp_path / "hospital.csv"
    write_hospital_csv(path)
    declared = ds.parse_labels(LABELS, policy.classes)
    with ds.open_rows(path, "csv") as source:
        columns = source.columns
    samples = ds.sample_columns(path, "csv", columns, 200)
    classes = column_classes(columns, declared, samples, policy)
    return plan_with_policy(
        policy, app=app, base_model="smollm2-135m", columns=columns, classes=classes,
        target="diagnosis", edge_constraints=EDGE,
    )  # fmt: skip


def test_example_policy_pseudonymises_identifiers_and_drops_special_categories(
    tmp_path: Path,
) -> None:
    policy = Policy.load(EXAMPLE_POLICY)
    plan = _hospital_plan(tmp_path, "research-pipeline", policy)
    assert plan.actions["patient_name"] == "pseudonymise"
    assert plan.actions["resident_id"] == "pseudonymise"  # found by CN_RESIDENT_ID
    assert plan.actions["mrn"] == "pseudonymise"  # found by the policy's MRN detector
    assert plan.actions["brca_test"] == "drop"  # declared restricted
    assert plan.actions["mean_radius"] == plan.actions["diagnosis"] == "keep"
    assert plan.rule_id == "research-training-deidentified" and plan.policy_id == policy.id
    assert plan.regions == ["cn-north-1"] and plan.allow_simulated
    with pytest.raises(TrainingRefused, match="not allowed for application"):
        _hospital_plan(tmp_path, "clinical-assistant", policy)


def test_training_refused_when_raw_identifiers_would_be_kept(tmp_path: Path) -> None:
    files = {p.relative_to(EXAMPLE_POLICY).as_posix(): p.read_bytes()
             for p in EXAMPLE_POLICY.rglob("*.yaml")}  # fmt: skip
    files["training.yaml"] = b"training_columns: {confidential: keep, restricted: drop}\n"
    policy = Policy.from_files(files)
    with pytest.raises(TrainingRefused, match="no-raw-identifiers-for-training"):
        _hospital_plan(tmp_path, "research-pipeline", policy)


def test_training_columns_are_validated() -> None:
    files = {p.relative_to(EXAMPLE_POLICY).as_posix(): p.read_bytes()
             for p in EXAMPLE_POLICY.rglob("*.yaml")}  # fmt: skip
    files["training.yaml"] = b"training_columns: {secret: keep, confidential: shred}\n"
    with pytest.raises(PolicyInvalid) as info:
        Policy.from_files(files)
    messages = [p.message for p in info.value.problems]
    assert any("undefined class 'secret'" in m for m in messages)
    assert any("unknown column action 'shred'" in m for m in messages)


def test_config_mode_needs_the_app_listed_and_drops_classified_columns() -> None:
    config = TrainingConfig(apps=("research",), columns={"confidential": "pseudonymise"})
    classes = {"name": ["confidential"], "gene": ["restricted"]}
    columns = ["name", "gene", "x", "y"]
    plan = plan_with_config(config, policy_id="config:1", app="research", columns=columns,
                            classes=classes, target="y", edge_constraints=EDGE)  # fmt: skip
    assert plan.actions == {"name": "pseudonymise", "gene": "drop", "x": "keep", "y": "keep"}
    with pytest.raises(TrainingRefused, match="may not train"):
        plan_with_config(config, policy_id="config:1", app="other", columns=columns,
                         classes=classes, target="y", edge_constraints=EDGE)  # fmt: skip
    with pytest.raises(TrainingRefused, match="target column 'gene' is dropped"):
        plan_with_config(config, policy_id="config:1", app="research", columns=columns,
                         classes=classes, target="gene", edge_constraints=EDGE)  # fmt: skip


# -- algorithms --------------------------------------------------------------------------------


def _csv(rows: list[list[Any]], header: list[str]) -> io.BytesIO:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return io.BytesIO(text.getvalue().encode())


def test_regression_with_gradient_boosting_and_scoring() -> None:
    rows = [[x, x % 3, "ab"[x % 2], 2.0 * x + (x % 3)] for x in range(200)]
    result = algorithms.train(
        algorithm="gradient_boosting", task="regression", target="y", params={"max_iter": 50},
        data=_csv(rows, ["x", "z", "cat", "y"]),
    )  # fmt: skip
    assert result.metrics["r2"] > 0.9 and result.rows == 200
    assert result.params["features_categorical"] == ["cat"]
    scored = algorithms.score(result.artifact, [{"x": 100, "z": 1, "cat": "a"}])
    assert abs(scored["predictions"][0] - 201) < 20


def test_algorithm_refusals_are_clear() -> None:
    rows = [[x, x % 2] for x in range(40)]
    with pytest.raises(algorithms.TrainingError, match="classifier"):
        algorithms.train(algorithm="logistic_regression", task="regression", target="y",
                         params={}, data=_csv(rows, ["x", "y"]))  # fmt: skip
    with pytest.raises(algorithms.TrainingError, match="LLM runtime"):
        algorithms.train(algorithm="text_embedding_classifier", task="classification",
                         target="y", params={}, data=_csv(rows, ["x", "y"]))  # fmt: skip
    with pytest.raises(algorithms.TrainingError, match="unknown parameter 'depth'"):
        algorithms.train(algorithm="gradient_boosting", task="classification", target="y",
                         params={"depth": 3}, data=_csv(rows, ["x", "y"]))  # fmt: skip
    with pytest.raises(algorithms.TrainingError, match="target column 'nope'"):
        algorithms.train(algorithm="gradient_boosting", task="classification", target="nope",
                         params={}, data=_csv(rows, ["x", "y"]))  # fmt: skip


def test_text_classifier_on_embeddings_with_a_stand_in_embedder() -> None:
    rows = [[f"{'great good fine' if i % 2 else 'bad awful poor'} {i}", i % 2] for i in range(60)]

    def embed(texts: list[str]) -> list[list[float]]:
        return [
            [t.count("good") + t.count("great"), t.count("bad") + t.count("poor")] for t in texts
        ]

    result = algorithms.train(
        algorithm="text_embedding_classifier", task="classification", target="y", params={},
        data=_csv(rows, ["text", "y"]), embedder=embed, embedding_model="m",
    )  # fmt: skip
    assert result.metrics["accuracy"] == 1.0
    scored = algorithms.score(result.artifact, [{"text": "great good"}, {"text": "poor"}], embed)
    assert scored["predictions"] == [1, 0]
    with pytest.raises(algorithms.TrainingError, match="LLM runtime"):
        algorithms.score(result.artifact, [{"text": "good"}], None)


def test_attestation_digest_is_canonical() -> None:
    a = {"enclave_id": "e", "epoch": 1, "result": {"x": 1, "y": [1, 2]}}
    b = {"result": {"y": [1, 2], "x": 1}, "epoch": 1, "enclave_id": "e"}
    assert attestation_digest(a) == attestation_digest(b)


def test_upload_requests_are_protobuf_wire_format() -> None:
    from edge_agent.training.client import upload_request
    from sovra.v1 import training_pb2

    job = new_job_id()
    for chunk in (b"", b"x", b"y" * 200, b"z" * 70_000):
        expected = training_pb2.UploadRequest(job_id=job, chunk=chunk).SerializeToString()
        assert upload_request(job, chunk) == expected
