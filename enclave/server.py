"""The enclave process: gRPC EnclaveService over mTLS, key rotation and broker registration.

``serve(config)`` starts everything and returns a :class:`RunningEnclave`; it is used by the
``sovra enclave serve`` command, by ``sovra up`` and, in-process, by tests. Only the broker
identity may call Process/ProcessStream; health and reflection answer any mTLS peer.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Final, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from enclave.config import ConfigError, EnclaveConfig, split_host_port
from enclave.keys import EpochKey, KeyRing, KeyRotator
from enclave.measurement import measure
from enclave.processor import OwnIdentity, Refused, RequestProcessor
from enclave.registration import Registrar
from enclave.replay import ReplayCache
from enclave.tee import TEEBackend, build_tee
from enclave.tee_sim import sim_log
from enclave.training.service import add_training_service
from enclave.workloads import Workload, build_workload
from sovra.pki import Identity
from sovra.systemd import notify
from sovra.tls import TLSFiles, peer_identity, secure_channel, server_credentials
from sovra.v1 import enclave_pb2, enclave_pb2_grpc

log = sim_log(__name__)

MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
SERVICE_NAME: Final = enclave_pb2.DESCRIPTOR.services_by_name["EnclaveService"].full_name
READY_FILE: Final = "ready.json"
_WORKERS: Final = 16
_GRPC_OPTIONS: Final = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# gRPC's own reconnect backoff (1 s → 120 s by default) would outlast ours; keep it in step.
_BROKER_CHANNEL_OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
]

Clock = Callable[[], float]


class EnclaveServicer(enclave_pb2_grpc.EnclaveServiceServicer):
    def __init__(self, processor: RequestProcessor) -> None:
        self._processor = processor

    def Process(
        self, request: enclave_pb2.SealedRequest, context: grpc.ServicerContext
    ) -> enclave_pb2.SealedFrame:
        _authorize(context)
        try:
            frame = self._processor.process(request.envelope)
        except Refused as exc:
            _refuse(context, exc)
        except Exception as exc:
            _internal(context, exc)
        return enclave_pb2.SealedFrame(frame=frame)

    def ProcessStream(
        self, request: enclave_pb2.SealedRequest, context: grpc.ServicerContext
    ) -> Iterator[enclave_pb2.SealedFrame]:
        _authorize(context)
        try:
            frames = self._processor.process_stream(request.envelope)
        except Refused as exc:
            _refuse(context, exc)
        except Exception as exc:
            _internal(context, exc)
        for frame in frames:
            yield enclave_pb2.SealedFrame(frame=frame)


def _authorize(context: grpc.ServicerContext) -> None:
    peer = peer_identity(context)
    if peer != Identity.broker():
        log.warning("refused EnclaveService call from %s: only the broker may call", peer)
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"only {Identity.broker().uri()} may call EnclaveService (peer: {peer or 'unknown'})",
        )


def _refuse(context: grpc.ServicerContext, exc: Refused) -> NoReturn:
    log.info("refused request: %s %s", exc.code.name, exc.message)
    context.abort(exc.code, exc.message)
    raise AssertionError("context.abort returned")  # abort raises; this satisfies NoReturn


def _internal(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    log.error("request failed unexpectedly (%s)", type(exc).__name__)  # text may hold data
    context.abort(grpc.StatusCode.INTERNAL, "sim enclave internal error")
    raise AssertionError("context.abort returned")


class RunningEnclave:
    """A started enclave. ``address`` is what the broker dials (the bound host:port)."""

    def __init__(
        self,
        *,
        config: EnclaveConfig,
        server: grpc.Server,
        health_servicer: health.HealthServicer,
        address: str,
        tee: TEEBackend,
        processor: RequestProcessor,
        keys: KeyRing,
        workload: Workload,
        notify_systemd: bool,
    ) -> None:
        self.config = config
        self.address = address
        self.tee = tee
        self.measurement = tee.measurement
        self.processor = processor
        self.keys = keys
        self.registered = threading.Event()
        self._server = server
        self._health = health_servicer
        self._workload = workload
        self._notify_systemd = notify_systemd
        self._registrar: Registrar | None = None
        self._rotator: KeyRotator | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def _start_background(self, files: TLSFiles) -> None:
        self._rotator = KeyRotator(self.keys, self._announce)
        self._rotator.start()
        if not self.config.broker:
            self._on_registered()  # standalone (no broker): ready as soon as it listens
            return
        channel = secure_channel(
            self.config.broker,
            files,
            server_identity=Identity.broker(),
            options=_BROKER_CHANNEL_OPTIONS,
        )
        self._registrar = Registrar(
            channel=channel,
            tee=self.tee,
            keys=self.keys,
            models=self._workload.models,
            address=self.address,
            on_registered=self._on_registered,
        )
        self._registrar.start()

    def rotate_keys(self) -> EpochKey:
        """Rotate now (operators, tests) and announce the new key list to the broker."""
        key = self.keys.rotate()
        self._announce(key)
        return key

    def _announce(self, key: EpochKey) -> None:
        log.info("rotated to key epoch %d", key.epoch)
        if self._registrar is not None:
            self._registrar.keys_rotated()

    def _on_registered(self) -> None:
        if self.registered.is_set():
            return
        self.registered.set()
        self._write_ready_file()
        if self._notify_systemd:
            notify("READY=1")

    def _ready_path(self) -> Path:
        return self.config.state_dir / READY_FILE

    def _write_ready_file(self) -> None:
        # Only public facts: the broker and every edge see these too.
        doc = {
            "enclave_id": self.config.enclave_id,
            "address": self.address,
            "measurement": self.measurement,
            "simulated": self.tee.simulated,
            "pid": os.getpid(),
        }
        try:
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._ready_path().with_suffix(".tmp")
            tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
            tmp.replace(self._ready_path())
        except OSError as exc:
            log.warning("cannot write ready file in %s: %s", self.config.state_dir, exc.strerror)

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds). Idempotent."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            if self._notify_systemd:
                notify("STOPPING=1")
            self._health.enter_graceful_shutdown()
            for part in (self._rotator, self._registrar):
                if part is not None:
                    part.stop()
            self._server.stop(grace).wait()
            self._workload.close()
            self._ready_path().unlink(missing_ok=True)
            self._stopped.set()
        log.info("enclave %s stopped", self.config.enclave_id)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped; False if ``timeout`` passed first."""
        return self._stopped.wait(timeout)


def serve(
    config: EnclaveConfig,
    *,
    workload: Workload | None = None,
    clock: Clock = time.time,
    notify_systemd: bool = False,
) -> RunningEnclave:
    """Start the enclave described by ``config``; returns once it listens.

    Registration with ``config.broker`` proceeds in the background (``RunningEnclave.registered``
    is set after the first success). An empty ``broker`` runs standalone, for tests.
    ``workload`` replaces the configured one (tests); ``clock`` drives key and request times.
    """
    workload = workload or build_workload(config.workload)
    try:
        return _start(config, workload, clock, notify_systemd)
    except BaseException:
        workload.close()
        raise


def _start(
    config: EnclaveConfig, workload: Workload, clock: Clock, notify_systemd: bool
) -> RunningEnclave:
    measurement = measure(config.workload)
    tee = build_tee(
        config.tee,
        enclave_id=config.enclave_id,
        region=config.region,
        measurement=measurement,
        clock=clock,
    )
    keys = KeyRing(config.keys.kem, config.keys.rotate_s, config.keys.overlap_s, clock)
    keys.rotate()  # epoch 1
    processor = build_processor(config, tee, keys, workload, clock)
    files = TLSFiles(cert=config.tls.cert, key=config.tls.key, ca=config.tls.ca)
    server, health_servicer, port = _grpc_server(config.listen, files, processor)
    host, _ = split_host_port(config.listen, "listen")
    address = config.advertise or f"{host}:{port}"
    running = RunningEnclave(
        config=config,
        server=server,
        health_servicer=health_servicer,
        address=address,
        tee=tee,
        processor=processor,
        keys=keys,
        workload=workload,
        notify_systemd=notify_systemd,
    )
    try:
        running._start_background(files)
    except BaseException:
        running.stop(grace=0)
        raise
    log.info(
        "enclave %s serving on %s (measurement %s, %s)",
        config.enclave_id,
        address,
        tee.measurement,
        "SIMULATED TEE" if tee.simulated else f"TEE {tee.tee_type}",
    )
    return running


def build_processor(
    config: EnclaveConfig, tee: TEEBackend, keys: KeyRing, workload: Workload, clock: Clock
) -> RequestProcessor:
    identity = OwnIdentity(
        enclave_id=config.enclave_id,
        region=config.region,
        tee_type=tee.tee_type,
        simulated=tee.simulated,
        measurement=tee.measurement,
    )
    replay = ReplayCache(config.replay.max_entries, clock)
    return RequestProcessor(identity, keys, replay, workload, config.replay, clock)


def _grpc_server(
    listen: str, files: TLSFiles, processor: RequestProcessor
) -> tuple[grpc.Server, health.HealthServicer, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="sim-enclave-rpc"),
        options=_GRPC_OPTIONS,
    )
    enclave_pb2_grpc.add_EnclaveServiceServicer_to_server(EnclaveServicer(processor), server)
    add_training_service(server, processor)  # docs/training.md
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_secure_port(listen, server_credentials(files))
    except RuntimeError:
        port = 0
    if port == 0:
        server.stop(None)
        raise ConfigError(f"listen {listen}: cannot bind (address in use or not local?)")
    server.start()
    return server, health_servicer, port
