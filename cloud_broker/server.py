"""The broker's gRPC server: EnclaveRegistry and EdgeGateway servicers, health, reflection.

Callers are known only by the identity in their verified client certificate (mTLS). Every refusal
leaves as a gRPC status with a message; an unexpected error leaves as INTERNAL and is logged by
type and stack only, because exception messages may quote values the broker must not log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from attestation.reference_values import ReferenceValuesFile
from attestation.verifier import OfferedKey
from cloud_broker import db, ear_key
from cloud_broker.config import BrokerConfig, TenantPolicy
from cloud_broker.dispatch import MAX_MESSAGE_BYTES, Dispatcher, EnclaveLinks
from cloud_broker.errors import BrokerError, streaming_handler, unary_handler
from cloud_broker.policy import QuotaStore
from cloud_broker.registry import (
    Announcement,
    Clock,
    EvictionLoop,
    PeriodicTask,
    ReappraisalLoop,
    Registry,
)
from cloud_broker.training import add_training_service
from sovra.pki import Identity
from sovra.tls import peer_identity, server_credentials
from sovra.v1 import broker_pb2, broker_pb2_grpc, enclave_pb2

log = logging.getLogger(__name__)

WORKERS: Final = 16
BROKER_STATUS_ADMITTED: Final = "admitted"
SERVICE_NAMES: Final = (
    broker_pb2.DESCRIPTOR.services_by_name["EnclaveRegistry"].full_name,
    broker_pb2.DESCRIPTOR.services_by_name["EdgeGateway"].full_name,
)


class ServeError(Exception):
    """The broker could not start (for example, the listen address is taken)."""


def _caller(context: grpc.ServicerContext, kind: str, service: str) -> Identity:
    identity = peer_identity(context)
    if identity is None or identity.kind != kind:
        who = identity.uri() if identity else "no Sovra identity"
        raise BrokerError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{service} accepts {kind} identities only; caller is {who}",
        )
    return identity


def _offered(enclave_id: str, key: broker_pb2.EnclaveKey) -> OfferedKey:
    return OfferedKey(
        enclave_id=enclave_id,
        epoch=key.epoch,
        kem=key.kem,
        public_key=key.public_key,
        not_after_ms=key.not_after_ms,
        evidence_format=key.evidence_format,
        evidence=key.evidence,
        nonce=key.nonce,
        receipt_public_key=key.receipt_public_key,
    )


class EnclaveRegistryServicer(broker_pb2_grpc.EnclaveRegistryServicer):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def _enclave(self, context: grpc.ServicerContext) -> str:
        return _caller(context, "enclave", "EnclaveRegistry").name

    @unary_handler
    def Challenge(
        self, request: broker_pb2.ChallengeRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ChallengeResponse:
        challenge = self._registry.challenge(self._enclave(context))
        return broker_pb2.ChallengeResponse(
            nonce=challenge.nonce, expires_at_ms=challenge.expires_at_ms
        )

    @unary_handler
    def Register(
        self, request: broker_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> broker_pb2.RegisterResponse:
        caller = self._enclave(context)
        d = request.enclave
        announcement = Announcement(
            enclave_id=d.enclave_id,
            address=request.address,
            region=d.region,
            tee_type=d.tee_type,
            simulated=d.simulated,
            models=tuple(d.models),
            keys=tuple(_offered(d.enclave_id, k) for k in d.keys),
        )
        self._registry.register(caller, announcement, request.nonce)
        return broker_pb2.RegisterResponse(
            heartbeat_interval_s=self._registry.heartbeat_interval_s, status=db.STATUS_ADMITTED
        )

    @unary_handler
    def Heartbeat(
        self, request: broker_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> broker_pb2.HeartbeatResponse:
        caller = self._enclave(context)
        keys = [_offered(caller, k) for k in request.keys]
        self._registry.heartbeat(caller, request.enclave_id, keys, request.nonce)
        return broker_pb2.HeartbeatResponse(
            heartbeat_interval_s=self._registry.heartbeat_interval_s
        )


class EdgeGatewayServicer(broker_pb2_grpc.EdgeGatewayServicer):
    def __init__(self, config: BrokerConfig, registry: Registry, dispatcher: Dispatcher) -> None:
        self._tenants = config.tenants
        self._policy = config.policy
        self._registry = registry
        self._dispatcher = dispatcher

    def _allowed(
        self, tenant: TenantPolicy, entries: Sequence[db.EnclaveEntry]
    ) -> list[db.EnclaveEntry]:
        """The directory as the broker policy lets the tenant see it (Dispatch enforces it)."""
        policy = self._policy
        rules = policy.rules_for(tenant.name) if policy is not None else None
        if policy is None or rules is None:
            return list(entries)
        return [
            e
            for e in entries
            if policy.excludes(rules, e.enclave.enclave_id, e.enclave.region) is None
        ]

    def _tenant(self, context: grpc.ServicerContext) -> TenantPolicy:
        name = _caller(context, "edge", "EdgeGateway").name
        policy = self._tenants.get(name)
        if policy is None:
            raise BrokerError(
                grpc.StatusCode.UNAUTHENTICATED, f"tenant {name!r} is not configured on this broker"
            )
        return policy

    @unary_handler
    def ListEnclaves(
        self, request: broker_pb2.ListEnclavesRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ListEnclavesResponse:
        tenant = self._tenant(context)
        entries = self._allowed(tenant, self._registry.directory(tenant, request.model))
        return broker_pb2.ListEnclavesResponse(
            enclaves=[_descriptor(e) for e in entries],
            generated_at_ms=self._registry.now_ms(),
            ear_verifier_key=self._registry.ear_verifier_key_pem,
        )

    @unary_handler
    def ListModels(
        self, request: broker_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> broker_pb2.ListModelsResponse:
        tenant = self._tenant(context)
        entries = self._allowed(tenant, self._registry.directory(tenant))
        models = sorted({m for e in entries for m in e.enclave.model_list})
        return broker_pb2.ListModelsResponse(models=models)

    @unary_handler
    def Dispatch(
        self, request: enclave_pb2.SealedRequest, context: grpc.ServicerContext
    ) -> broker_pb2.DispatchReply:
        tenant = self._tenant(context)
        enclave_id, frame = self._dispatcher.dispatch(tenant, request.envelope, context)
        return broker_pb2.DispatchReply(enclave_id=enclave_id, frame=frame)

    @streaming_handler
    def DispatchStream(
        self, request: enclave_pb2.SealedRequest, context: grpc.ServicerContext
    ) -> Iterator[broker_pb2.DispatchReply]:
        tenant = self._tenant(context)
        for enclave_id, frame in self._dispatcher.dispatch_stream(
            tenant, request.envelope, context
        ):
            yield broker_pb2.DispatchReply(enclave_id=enclave_id, frame=frame)


def _descriptor(entry: db.EnclaveEntry) -> broker_pb2.EnclaveDescriptor:
    e = entry.enclave
    return broker_pb2.EnclaveDescriptor(
        enclave_id=e.enclave_id,
        region=e.region,
        tee_type=e.tee_type,
        simulated=e.simulated,
        models=e.model_list,
        broker_status=BROKER_STATUS_ADMITTED,
        keys=[
            broker_pb2.EnclaveKey(
                epoch=k.epoch,
                kem=k.kem,
                public_key=k.public_key,
                not_after_ms=k.not_after_ms,
                evidence_format=k.evidence_format,
                evidence=k.evidence,
                ear=k.ear,
                nonce=k.nonce or b"",
                receipt_public_key=k.receipt_public_key or b"",
            )
            for k in entry.keys
        ],
    )


class RunningBroker:
    """A started broker. ``stop`` ends it; ``wait`` blocks until it has ended."""

    def __init__(
        self,
        server: grpc.Server,
        host: str,
        port: int,
        registry: Registry,
        dispatcher: Dispatcher,
        links: EnclaveLinks,
        health_servicer: health.HealthServicer,
        eviction: EvictionLoop,
        reappraisal: PeriodicTask | None = None,
    ) -> None:
        self.port = port
        self.address = f"{host}:{port}"
        self.registry = registry
        self.dispatcher = dispatcher
        self._server = server
        self._links = links
        self._health = health_servicer
        self._eviction = eviction
        self._reappraisal = reappraisal
        self._stopped = threading.Event()

    def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new calls, give running ones ``grace`` seconds, then release everything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._health.enter_graceful_shutdown()
        self._eviction.stop()
        if self._reappraisal is not None:
            self._reappraisal.stop()
        self._server.stop(grace).wait()
        self._links.close()
        self.dispatcher.close()  # no dispatch runs now: write the queued requests rows
        self.registry.engine.dispose()
        log.info("broker stopped address=%s", self.address)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has terminated; False if ``timeout`` passed first."""
        return bool(self._server.wait_for_termination(timeout))


def serve(
    config: BrokerConfig,
    *,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    clock: Clock = time.time,
) -> RunningBroker:
    """Start the broker on ``config.listen``; the returned broker reports the port it bound.

    Raises ``ReferenceValuesInvalid`` or :class:`ServeError` (EAR signing key unusable, port
    taken) when it cannot start.
    """
    reference_values = ReferenceValuesFile(config.reference_values)
    try:
        signing_key = ear_key.load_or_create(config.ear_signing_key_path)
    except ear_key.EarKeyError as exc:
        raise ServeError(str(exc)) from None
    credentials = server_credentials(config.tls)
    engine = db.open_database(config.database)
    registry = Registry(
        engine,
        reference_values,
        heartbeat_interval_s=config.heartbeat_interval_s,
        evict_after_missed=config.evict_after_missed,
        challenge_ttl_s=config.challenge_ttl_s,
        clock=clock,
        ear_signing_key=signing_key,
        reappraise_interval_s=config.reappraise_interval_s,
    )
    links = EnclaveLinks(config.tls)
    dispatcher = Dispatcher(
        registry,
        links,
        strategy=config.strategy,
        timeout_s=config.enclave_call_timeout_s,
        clock=clock,
        policy=config.policy,
        quotas=QuotaStore(engine, clock) if config.policy is not None else None,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="broker-rpc"),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    health_servicer = _add_services(server, config, registry, dispatcher)
    port = _bind(server, config.listen, credentials, engine)
    server.start()
    eviction = EvictionLoop(registry, interval_s=config.heartbeat_interval_s)
    eviction.start()
    reappraisal = ReappraisalLoop(registry)
    reappraisal.start()
    host = config.listen.rpartition(":")[0]
    log.info("broker listening address=%s:%d strategy=%s", host, port, config.strategy)
    return RunningBroker(
        server, host, port, registry, dispatcher, links, health_servicer, eviction, reappraisal
    )


def _add_services(
    server: grpc.Server, config: BrokerConfig, registry: Registry, dispatcher: Dispatcher
) -> health.HealthServicer:
    broker_pb2_grpc.add_EnclaveRegistryServicer_to_server(EnclaveRegistryServicer(registry), server)
    broker_pb2_grpc.add_EdgeGatewayServicer_to_server(
        EdgeGatewayServicer(config, registry, dispatcher), server
    )
    add_training_service(server, config, registry)  # docs/training.md
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return health_servicer


def _bind(server: grpc.Server, listen: str, credentials: Any, engine: Any) -> int:
    try:
        port = int(server.add_secure_port(listen, credentials))
    except RuntimeError as exc:
        port = 0
        log.debug("bind failed: %s", exc)
    if port == 0:
        engine.dispose()
        raise ServeError(f"cannot listen on {listen} (address in use or not local)")
    return port
