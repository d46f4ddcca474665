"""Registration with the broker and heartbeats, in one background thread.

Register: Challenge → evidence for every held key bound to the nonce → Register. Then heartbeat at
the interval the broker asks for. After a key rotation the next heartbeat carries the full key
list with fresh evidence bound to a fresh challenge. A broker that no longer knows this enclave
(FAILED_PRECONDITION, e.g. after a restart) gets a new registration. While the broker is
unreachable, retries back off from 0.2 s to 5 s; a refusal is logged with the broker's reason and
retried slowly, since it usually needs an operator (reference values, certificates).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final

import grpc

from enclave.keys import EpochKey, KeyRing
from enclave.tee import TEEBackend
from enclave.tee_sim import sim_log
from sovra.v1 import broker_pb2, broker_pb2_grpc

log = sim_log(__name__)

BACKOFF_START_S: Final = 0.2
BACKOFF_MAX_S: Final = 5.0
REFUSED_RETRY_S: Final = 30.0
RPC_TIMEOUT_S: Final = 10.0
_DEFAULT_INTERVAL_S: Final = 10
_UNREACHABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class _NotRegistered(Exception):
    """The broker forgot us; register again."""


class Registrar:
    def __init__(
        self,
        *,
        channel: grpc.Channel,
        tee: TEEBackend,
        keys: KeyRing,
        models: tuple[str, ...],
        address: str,
        on_registered: Callable[[], None],
    ) -> None:
        self._stub = broker_pb2_grpc.EnclaveRegistryStub(channel)
        self._channel = channel
        self._tee = tee
        self._keys = keys
        self._models = models
        self._address = address
        self._on_registered = on_registered
        self._stopped = False
        self._keys_changed = False
        self._lock = threading.Condition()  # guards the two flags; notified when either is set
        self._thread = threading.Thread(target=self._run, name="sim-enclave-registrar", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=RPC_TIMEOUT_S + 1)
        self._channel.close()

    def keys_rotated(self) -> None:
        """Called by the key rotator: announce the new key list now."""
        with self._lock:
            self._keys_changed = True
            self._lock.notify_all()

    def _sleep(self, seconds: float, *, wake_for_keys: bool) -> None:
        """Wait ``seconds``; stop ends it early, and so do new keys if ``wake_for_keys``.

        Backoff waits ignore new keys: the next attempt announces them anyway.
        """
        with self._lock:
            self._lock.wait_for(
                lambda: self._stopped or (wake_for_keys and self._keys_changed), timeout=seconds
            )

    def _run(self) -> None:
        backoff = BACKOFF_START_S
        interval: float | None = None  # None: not registered
        while not self._stopped:
            try:
                if interval is None:
                    interval = self._register()
                    self._on_registered()
                else:
                    interval = self._heartbeat() or interval
                backoff = BACKOFF_START_S
                self._sleep(interval, wake_for_keys=True)
            except _NotRegistered:
                log.warning(
                    "broker does not know enclave %s any more; re-registering", self._tee.enclave_id
                )
                interval = None
            except grpc.RpcError as exc:
                delay = self._after_error(exc, backoff, registered=interval is not None)
                self._sleep(delay, wake_for_keys=False)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            except Exception as exc:  # keep the thread alive; the next attempt may succeed
                log.error(
                    "registration loop failed (%s); retry in %.0fs",
                    type(exc).__name__,
                    REFUSED_RETRY_S,
                )
                self._sleep(REFUSED_RETRY_S, wake_for_keys=False)

    def _after_error(self, exc: grpc.RpcError, backoff: float, *, registered: bool) -> float:
        """Log a failed call; return how long to wait before the next attempt."""
        code, details = _status(exc)
        what = "heartbeat" if registered else "registration"
        if code in _UNREACHABLE:
            log.info("broker unreachable (%s); %s retry in %.1fs", code.name, what, backoff)
            return backoff
        log.warning(
            "broker refused %s (%s: %s); retry in %.0fs", what, code.name, details, REFUSED_RETRY_S
        )
        return REFUSED_RETRY_S

    def _register(self) -> int:
        with self._lock:
            self._keys_changed = False  # this registration carries every key held from here on
        nonce = self._challenge()
        descriptor = broker_pb2.EnclaveDescriptor(
            enclave_id=self._tee.enclave_id,
            region=self._tee.region,
            tee_type=self._tee.tee_type,
            simulated=self._tee.simulated,
            models=list(self._models),
            keys=self._key_messages(nonce),
        )
        request = broker_pb2.RegisterRequest(enclave=descriptor, address=self._address, nonce=nonce)
        response = self._stub.Register(request, timeout=RPC_TIMEOUT_S)
        log.info(
            "registered enclave %s at %s with the broker (status %r)",
            self._tee.enclave_id,
            self._address,
            response.status,
        )
        return response.heartbeat_interval_s or _DEFAULT_INTERVAL_S

    def _heartbeat(self) -> int:
        with self._lock:
            announce, self._keys_changed = self._keys_changed, False
        request = broker_pb2.HeartbeatRequest(enclave_id=self._tee.enclave_id)
        try:
            if announce:
                nonce = self._challenge()
                request.nonce = nonce
                request.keys.extend(self._key_messages(nonce))
            response = self._stub.Heartbeat(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            if announce:
                with self._lock:
                    self._keys_changed = True  # still to be announced next time
            if _status(exc)[0] == grpc.StatusCode.FAILED_PRECONDITION:
                raise _NotRegistered from None
            raise
        if announce:
            log.info("announced key epochs %s to the broker", [k.epoch for k in request.keys])
        return response.heartbeat_interval_s

    def _challenge(self) -> bytes:
        response = self._stub.Challenge(broker_pb2.ChallengeRequest(), timeout=RPC_TIMEOUT_S)
        return bytes(response.nonce)

    def _key_messages(self, nonce: bytes) -> list[broker_pb2.EnclaveKey]:
        return [self._key_message(key, nonce) for key in self._keys.active()]

    def _key_message(self, key: EpochKey, nonce: bytes) -> broker_pb2.EnclaveKey:
        attestation = self._tee.attest(key, nonce)
        return broker_pb2.EnclaveKey(
            epoch=key.epoch,
            kem=key.kem,
            public_key=key.public_bytes,
            not_after_ms=key.not_after_ms,
            evidence_format=attestation.evidence_format,
            evidence=attestation.evidence,
            nonce=nonce,
            receipt_public_key=key.receipt_public_bytes,
        )


def _status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, grpc.Call) else ""
    return code, details or ""
