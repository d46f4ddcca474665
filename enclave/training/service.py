"""``EnclaveTraining``: the gRPC face of training inside the enclave (docs/training.md).

Only the broker identity may call it, as for ``EnclaveService``. Job envelopes and scoring
requests are opened by :meth:`RequestProcessor.open_sealed`, so they pass exactly the checks an
inference request passes (signature, recipient key epoch, freshness, replay, sealed constraints
against this enclave's own attested identity) before anything is decrypted.

Receipts are signed with the Ed25519 receipt key of the HPKE key epoch the job was sealed to
(``enclave/keys.py``): generated inside the enclave, never exported, and bound into that epoch's
attestation evidence together with the HPKE key. Anyone holding the evidence can therefore check
a receipt's signature (``docs/training.md``); the edge also records the receipt in its
hash-chained audit log.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, NoReturn

import cbor2
import grpc

from enclave.processor import Refused, RequestProcessor
from enclave.tee_sim import sim_log
from enclave.training import algorithms
from enclave.training.jobs import (
    CANCELLED,
    COMPLETED,
    FAILED,
    TRAINING,
    Job,
    JobContext,
    JobTable,
    Sealed,
    Spool,
)
from sovra.envelope import ReplyWriter
from sovra.pki import Identity
from sovra.tls import peer_identity
from sovra.training import (
    ARTIFACT_SLICE_BYTES,
    JOB_ID_LEN,
    RECEIPT_TYPE,
    RECEIPT_VERSION,
    BadProof,
    JobKeys,
    JobSpec,
    ResultHead,
    TrainingWireError,
    artifact_frame,
    end_frame,
    error_frame,
    open_artifact,
    seal_artifact,
    sign_receipt,
)
from sovra.v1 import enclave_pb2, training_pb2, training_pb2_grpc

log = sim_log(__name__)

MAX_JOBS: Final = 16
MAX_CONCURRENT_TRAINING: Final = 2
MAX_HISTORY: Final = 256
#: Training is in memory (scikit-learn): larger datasets are refused after upload, clearly.
MAX_TRAIN_BYTES = 2 * 1024**3
SERVICE_NAME: Final = training_pb2.DESCRIPTOR.services_by_name["EnclaveTraining"].full_name

_SERVICES: weakref.WeakKeyDictionary[RequestProcessor, TrainingServicer] = (
    weakref.WeakKeyDictionary()
)


def service_for(processor: RequestProcessor) -> TrainingServicer | None:
    """The training service registered for ``processor`` (operators' views and tests)."""
    return _SERVICES.get(processor)


def add_training_service(server: grpc.Server, processor: RequestProcessor) -> TrainingServicer:
    servicer = TrainingServicer(processor)
    _register(servicer, server)
    _SERVICES[processor] = servicer
    return servicer


def _register(servicer: TrainingServicer, server: grpc.Server) -> None:
    """Like the generated ``add_EnclaveTrainingServicer_to_server``, but ``Upload`` takes the
    serialized ``UploadRequest`` bytes: a chunk is read in place (:func:`upload_fields`), not
    parsed into a message and copied out of it."""
    pb, frame = training_pb2, enclave_pb2.SealedFrame.SerializeToString
    handlers = {
        "OpenJob": grpc.unary_unary_rpc_method_handler(
            servicer.OpenJob, pb.OpenJobRequest.FromString, pb.JobAck.SerializeToString
        ),
        "Upload": grpc.stream_stream_rpc_method_handler(
            servicer.Upload, None, pb.JobAck.SerializeToString
        ),
        "GetJob": grpc.unary_unary_rpc_method_handler(
            servicer.GetJob, pb.JobRef.FromString, pb.JobStatus.SerializeToString
        ),
        "FetchResult": grpc.unary_stream_rpc_method_handler(
            servicer.FetchResult, pb.JobRef.FromString, frame
        ),
        "CloseJob": grpc.unary_unary_rpc_method_handler(
            servicer.CloseJob, pb.CloseJobRequest.FromString, pb.CloseJobResponse.SerializeToString
        ),
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score, pb.ScoreRequest.FromString, frame
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def upload_fields(raw: bytes) -> tuple[bytes, Sealed]:
    """``(job_id, chunk)`` of a serialized ``UploadRequest``. Laid out as the edge writes it
    (field 1, then field 2, nothing else) the chunk is a view into ``raw``; anything else is
    parsed by protobuf. Refused (INVALID_ARGUMENT) if it is not an ``UploadRequest``."""
    start = 2 + JOB_ID_LEN
    if raw[:2] == _JOB_ID_TAG and len(raw) >= start:
        if len(raw) == start:
            return raw[2:start], b""
        length = _varint(raw, start + 1) if raw[start] == 0x12 else None
        if length is not None and length[1] + length[0] == len(raw):
            return raw[2:start], memoryview(raw)[length[1] :]
    try:
        request = training_pb2.UploadRequest.FromString(raw)
    except Exception:  # protobuf DecodeError
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed upload request") from None
    return request.job_id, request.chunk


_JOB_ID_TAG: Final = bytes([0x0A, JOB_ID_LEN])  # field 1 (job_id), length 16


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, position after it) of the protobuf varint at ``pos``, or None."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        value |= (data[i] & 0x7F) << shift
        if not data[i] & 0x80:
            return value, i + 1
        shift += 7
    return None


class TrainingServicer(training_pb2_grpc.EnclaveTrainingServicer):
    def __init__(self, processor: RequestProcessor, *, max_jobs: int = MAX_JOBS) -> None:
        self._processor = processor
        self.jobs = JobTable(max_jobs)
        # Per closed job: how often each chunk index was stored, refusals by status (no data).
        self.history: OrderedDict[bytes, tuple[Counter[int], Counter[str]]] = OrderedDict()
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_TRAINING)
        self._spool_root = Path(tempfile.mkdtemp(prefix="sovra-enclave-spool-"))
        # The spool holds only ciphertext under in-memory keys; still, leave nothing behind.
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._spool_root, True)
        atexit.register(self._finalizer)

    # -- job lifecycle --------------------------------------------------------------------

    def OpenJob(
        self, request: training_pb2.OpenJobRequest, context: grpc.ServicerContext
    ) -> training_pb2.JobAck:
        _authorize(context)
        try:
            return self._open_job(request)
        except Refused as exc:
            _refuse(context, exc)

    def _open_job(self, request: training_pb2.OpenJobRequest) -> training_pb2.JobAck:
        header, payload, _reply = self._processor.open_sealed(
            request.envelope, operations=("train",)
        )
        if len(header.recipients) != 1:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a job envelope names one enclave")
        try:
            spec = JobSpec.decode(payload)
        except TrainingWireError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"job spec: {exc}") from None
        if spec.job_id != request.job_id:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT, "job id does not match the sealed job spec"
            )
        epoch = header.recipients[0].epoch
        key = self._processor.keys.get(epoch)
        if key is None:  # rotated away since the envelope opened
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"key epoch {epoch} is not held (expired or rotated away); refresh the directory",
            )
        me = self._processor.identity
        ctx = JobContext(
            tenant=header.tenant,
            app=header.app,
            policy_id=header.policy_id,
            model=header.model,
            enclave_id=me.enclave_id,
            epoch=epoch,
            measurement=me.measurement,
            tee_type=me.tee_type,
            simulated=me.simulated,
            region=me.region,
            key_sha256=hashlib.sha256(key.public_bytes).hexdigest(),
            receipt_key=key.receipt_key,
        )
        keys = JobKeys.derive(spec.job_id, spec.job_key)
        fresh = Job(
            spec=spec,
            keys=keys,
            context=ctx,
            spool=Spool(self._spool_root, spec.job_id.hex(), keys),
            opened_ms=int(time.time() * 1000),
        )
        job = self.jobs.add(fresh)
        if job is not fresh:
            fresh.spool.remove()
            # The same job re-opened (the edge lost our answer): same key, same job.
            if job.keys.chunk_key != keys.chunk_key:
                raise Refused(
                    grpc.StatusCode.ALREADY_EXISTS, "a different job with this id is open here"
                )
        log.info(
            "training job %s opened: %d chunks, algorithm %s (tenant %s)",
            spec.job_id.hex(), spec.chunks, spec.algorithm, header.tenant,
        )  # fmt: skip
        return self._ack(job)

    def Upload(  # type: ignore[override]  # serialized requests in: see _register
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[training_pb2.JobAck]:
        _authorize(context)
        complete: list[Job] = []
        try:
            for raw in request_iterator:
                job_id, chunk = upload_fields(raw)
                job = self.jobs.get(job_id)
                if chunk:
                    job.accept(chunk, complete.append)
                yield self._ack(job)
                while complete:  # after the final ack is on its way
                    self._start_training(complete.pop())
        except Refused as exc:
            _refuse(context, exc)
        finally:
            for job in complete:  # the stream ended right after the final chunk
                self._start_training(job)

    def GetJob(
        self, request: training_pb2.JobRef, context: grpc.ServicerContext
    ) -> training_pb2.JobStatus:
        _authorize(context)
        try:
            job = self.jobs.get(request.job_id)
        except Refused as exc:
            _refuse(context, exc)
        with job.lock:
            state, next_chunk = job.state, job.next_chunk
        return training_pb2.JobStatus(
            job_id=job.job_id,
            state=state,
            next_chunk=next_chunk,
            mac=job.keys.status_mac(state, next_chunk),
            enclave_id=self._processor.identity.enclave_id,
        )

    def FetchResult(
        self, request: training_pb2.JobRef, context: grpc.ServicerContext
    ) -> Iterator[enclave_pb2.SealedFrame]:
        _authorize(context)
        try:
            job = self.jobs.get(request.job_id)
            frames = self._result_frames(job)
        except Refused as exc:
            _refuse(context, exc)
        for frame in frames:
            yield enclave_pb2.SealedFrame(frame=frame)

    def CloseJob(
        self, request: training_pb2.CloseJobRequest, context: grpc.ServicerContext
    ) -> training_pb2.CloseJobResponse:
        _authorize(context)
        try:
            job = self.jobs.get(request.job_id)
            job.keys.check_close(request.cancel, request.proof)
        except Refused as exc:
            _refuse(context, exc)
        except BadProof as exc:
            _refuse(context, Refused(grpc.StatusCode.PERMISSION_DENIED, str(exc)))
        with job.lock:
            if request.cancel and job.state not in (COMPLETED, FAILED):
                job.state = CANCELLED
            job.result_frames = None
        self.jobs.remove(job.job_id)
        job.spool.remove()
        self._remember(job)
        log.info("training job %s closed (%s)", job.job_id.hex(), job.state)
        return training_pb2.CloseJobResponse()

    def _remember(self, job: Job) -> None:
        with job.lock:
            self.history[job.job_id] = (Counter(job.accepted), Counter(job.refused))
        while len(self.history) > MAX_HISTORY:
            self.history.popitem(last=False)

    def chunk_stats(self, job_id: bytes) -> tuple[Counter[int], Counter[str]]:
        """(times each chunk index was stored, refusals by gRPC status) of a job."""
        try:
            job = self.jobs.get(job_id)
        except Refused:
            return self.history.get(job_id, (Counter(), Counter()))
        with job.lock:
            return Counter(job.accepted), Counter(job.refused)

    # -- scoring --------------------------------------------------------------------------

    def Score(
        self, request: training_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> enclave_pb2.SealedFrame:
        _authorize(context)
        try:
            _header, payload, reply_keys = self._processor.open_sealed(
                request.envelope, operations=("score",), check_model=False
            )
        except Refused as exc:
            _refuse(context, exc)
        writer = ReplyWriter(reply_keys)
        try:
            doc = self._score(payload, request.artifact)
        except algorithms.TrainingError as exc:
            doc = _error(exc.code, exc.message)
        except Exception as exc:
            log.error("scoring failed unexpectedly (%s)", type(exc).__name__)
            doc = _error("internal_error", "scoring failed in the enclave (internal error)")
        return enclave_pb2.SealedFrame(frame=writer.frame(_json(doc), final=True))

    def _score(self, payload: bytes, artifact_ct: bytes) -> dict[str, Any]:
        try:
            doc = cbor2.loads(payload)
        except Exception:
            raise algorithms.TrainingError(
                "scoring payload is not CBOR", "invalid_payload"
            ) from None
        fields = {"v", "job", "model", "ak", "an", "asha", "records"}
        if not isinstance(doc, dict) or set(doc) != fields or doc["v"] != 1:
            raise algorithms.TrainingError(
                "scoring payload has the wrong fields", "invalid_payload"
            )
        try:
            artifact = open_artifact(doc["job"], doc["ak"], doc["an"], artifact_ct, doc["asha"])
        except (TrainingWireError, TypeError):
            raise algorithms.TrainingError(
                "the model artifact does not open with the released key", "invalid_artifact"
            ) from None
        result = algorithms.score(artifact, doc["records"], self._embedder())
        result["object"] = "sovra.scores"
        result["model_id"] = doc["model"]
        return result

    # -- training -------------------------------------------------------------------------

    def _start_training(self, job: Job) -> None:
        thread = threading.Thread(
            target=self._train, args=(job,), name=f"sim-train-{job.job_id.hex()[:8]}", daemon=True
        )
        thread.start()

    def _train(self, job: Job) -> None:
        with self._slots:
            try:
                frames = self._run(job)
                state = COMPLETED
            except algorithms.TrainingError as exc:
                frames, state = None, FAILED
                failure = (exc.code, exc.message)
            except Exception as exc:
                log.error("training job %s failed (%s)", job.job_id.hex(), type(exc).__name__)
                frames, state = None, FAILED
                failure = ("internal_error", "training failed (internal error)")
        with job.lock:
            job.ended_ms = int(time.time() * 1000)
            if job.state == TRAINING:
                job.state = state
                job.result_frames = frames
                if frames is None:
                    job.failure = failure  # sealed into an error frame when fetched
        job.spool.remove()
        log.info("training job %s %s", job.job_id.hex(), job.state)

    def _run(self, job: Job) -> list[bytes]:
        spec, ctx = job.spec, job.context
        if job.received_bytes > MAX_TRAIN_BYTES:
            raise algorithms.TrainingError(
                f"the dataset ({job.received_bytes} bytes) is larger than this enclave trains in "
                f"memory ({MAX_TRAIN_BYTES} bytes)",
                "dataset_too_large",
            )
        embedder = self._embedder() if spec.algorithm == "text_embedding_classifier" else None
        with job.data() as data:
            result = algorithms.train(
                algorithm=spec.algorithm,
                task=spec.task,
                target=spec.target,
                params=spec.params,
                data=data,
                text_column=spec.text_column,
                embedder=embedder,
                embedding_model=ctx.model,
            )
        ended = int(time.time() * 1000)
        artifact_key, nonce, ciphertext, digest = seal_artifact(spec.job_id, result.artifact)
        signer = ctx.receipt_key
        if signer is None:
            raise algorithms.TrainingError(
                "the job has no receipt key (its key epoch was not held)", "internal_error"
            )
        signer_hex = signer.public_key().public_bytes_raw().hex()
        receipt = {
            "v": RECEIPT_VERSION,
            "type": RECEIPT_TYPE,
            "job": spec.job_id.hex(),
            "tenant": ctx.tenant,
            "app": ctx.app,
            "policy": ctx.policy_id,
            "dataset": {
                "sha256": job.dataset_sha256.hex(),
                "bytes": job.received_bytes,
                "chunks": job.next_chunk,
                "rows": result.rows,
                "format": spec.data_format,
            },
            "algorithm": spec.algorithm,
            "task": spec.task,
            "target": spec.target,
            "params": result.params,
            "measurement": {
                "enclave": ctx.measurement,
                "base_model": ctx.model,
                "artifact_sha256": digest.hex(),
            },
            "metrics": result.metrics,
            "holdout": result.holdout,
            "attestation": {
                "enclave_id": ctx.enclave_id,
                "epoch": ctx.epoch,
                "measurement": ctx.measurement,
                "tee_type": ctx.tee_type,
                "simulated": ctx.simulated,
                "region": ctx.region,
                "key_sha256": ctx.key_sha256,
                "result_sha256": spec.attestation_sha256.hex(),
            },
            "started_ms": job.started_ms,
            "ended_ms": ended,
            "signer": signer_hex,
        }
        receipt_bytes, signature = sign_receipt(receipt, signer)
        head = ResultHead(
            receipt=receipt_bytes,
            signature=signature,
            signer=bytes.fromhex(signer_hex),
            artifact_key=artifact_key,
            artifact_nonce=nonce,
            artifact_len=len(ciphertext),
            artifact_sha256=digest,
        )
        writer = ReplyWriter(job.keys.result)
        frames = [writer.frame(head.encode())]
        for start in range(0, len(ciphertext), ARTIFACT_SLICE_BYTES):
            frames.append(
                writer.frame(artifact_frame(ciphertext[start : start + ARTIFACT_SLICE_BYTES]))
            )
        frames.append(writer.frame(end_frame(), final=True))
        return frames

    def _result_frames(self, job: Job) -> list[bytes]:
        with job.lock:
            if job.result_frames is not None:
                return list(job.result_frames)
            if job.state == FAILED:
                code, message = job.failure or ("training_failed", "training failed")
                writer = ReplyWriter(job.keys.result)
                return [writer.frame(error_frame(code, message), final=True)]
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job is {job.state}; its result is not ready",
            )

    def _embedder(self) -> algorithms.Embedder | None:
        workload = self._processor.workload
        if type(workload).__name__ != "LlamaWorkload":
            return None
        model = workload.models[0]

        def embed(texts: list[str]) -> list[list[float]]:
            result = workload.embeddings({"model": model, "input": texts})
            return [list(item["embedding"]) for item in result["data"]]

        return embed

    def _ack(self, job: Job) -> training_pb2.JobAck:
        with job.lock:
            next_chunk, complete = job.next_chunk, job.complete
        return training_pb2.JobAck(
            job_id=job.job_id,
            next_chunk=next_chunk,
            complete=complete,
            mac=job.keys.ack_mac(next_chunk, complete),
            enclave_id=self._processor.identity.enclave_id,
        )


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _authorize(context: grpc.ServicerContext) -> None:
    peer = peer_identity(context)
    if peer != Identity.broker():
        log.warning("refused EnclaveTraining call from %s: only the broker may call", peer)
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"only {Identity.broker().uri()} may call EnclaveTraining (peer: {peer or 'unknown'})",
        )


def _refuse(context: grpc.ServicerContext, exc: Refused) -> NoReturn:
    log.info("refused training call: %s %s", exc.code.name, exc.message)
    context.abort(exc.code, exc.message)
    raise AssertionError("context.abort returned")
