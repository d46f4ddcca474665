"""Wiring: everything one running edge agent holds, built from its config."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Final

from attestation.errors import ReferenceValuesInvalid
from attestation.reference_values import ReferenceValuesFile
from edge_agent import identity
from edge_agent.api_keys import ApiKeys
from edge_agent.broker_client import BrokerClient
from edge_agent.config import EdgeConfig
from edge_agent.dispatcher import Dispatcher
from edge_agent.local_model import LocalModel
from edge_agent.policy import (
    STATUS_FILE,
    ConfigPolicy,
    EnginePolicy,
    PolicyDecider,
    PolicyUnavailable,
    ReloadResult,
)
from edge_agent.training import service as training_service
from edge_agent.training.store import StoreError
from edge_agent.trusted_set import TrustedEnclaveSet, wall_clock_ms
from sovra import systemd
from sovra.audit import AuditError, AuditLog
from sovra.policy import MappingStore, MappingStoreError
from sovra.tls import TLSConfigError

AUDIT_KIND: Final = "edge"

log = logging.getLogger("sovra.edge")


_START_ERRORS: Final = (
    OSError,
    ReferenceValuesInvalid,
    TLSConfigError,
    identity.IdentityError,
    AuditError,
)


class EdgeStartError(Exception):
    """The edge cannot start: bad reference values, TLS files, identity key or state dir."""


class EdgeRuntime:
    def __init__(self, config: EdgeConfig) -> None:
        """Load everything that can be wrong on disk now, so errors surface before serving."""
        self.config = config
        try:
            config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Re-read at every directory refresh: revocations apply within directory_refresh_s.
            reference_values = ReferenceValuesFile(config.reference_values)
            config.tls.load()
            self.signing_key = identity.load_or_create(config.identity_key_path)
            self.audit = AuditLog(config.audit_path)
        except _START_ERRORS as exc:
            raise EdgeStartError(f"{config.source}: {exc}") from None
        self.api_keys = ApiKeys(config.apps)
        self.mappings: MappingStore | None = None
        self.local_model: LocalModel | None = None
        try:
            self.policy: PolicyDecider = self._load_policy()
        except EdgeStartError:
            self.audit.close()
            raise
        self._poll_task: asyncio.Task[None] | None = None
        self.trusted = TrustedEnclaveSet(reference_values, wall_clock_ms, audit=self.audit)
        self.broker = BrokerClient(
            config.broker,
            config.tls,
            refresh_s=config.directory_refresh_s,
            request_timeout_s=config.request_ttl_s,
        )
        self.dispatcher = Dispatcher(
            config,
            policy=self.policy,
            trusted=self.trusted,
            broker=self.broker,
            signing_key=self.signing_key,
            audit=self.audit,
            mappings=self.mappings,
            mapping_ttl_s=config.policy.mapping_ttl_s if config.policy else 3600,
            local=self.local_model,
        )
        try:
            self.training = training_service.for_runtime(self)  # docs/training.md
        except (OSError, StoreError) as exc:
            self.close()
            raise EdgeStartError(f"{config.source}: training state: {exc}") from None

    def _load_policy(self) -> PolicyDecider:
        """The config allow-list, or the policy engine with its first policy active."""
        config = self.config
        cfg = config.policy
        if cfg is None:
            return ConfigPolicy(config.apps)
        engine = EnginePolicy(
            cfg, config.apps, status_path=config.state_dir / STATUS_FILE, audit=self.audit
        )
        try:
            engine.start()
            if not cfg.mapping_key.exists():
                MappingStore.generate_key(cfg.mapping_key)
            self.mappings = MappingStore(cfg.mapping_db, cfg.mapping_key)
        except (PolicyUnavailable, MappingStoreError, OSError) as exc:
            raise EdgeStartError(f"{config.source}: [policy]: {exc}") from None
        if cfg.local_upstream:
            self.local_model = LocalModel(
                cfg.local_upstream, cfg.local_model, timeout_s=config.request_ttl_s
            )
        return engine

    def reload_policy(self, trigger: str = "manual") -> ReloadResult:
        """Try the policy source now (blocking: git runs); keeps the last good policy."""
        return self.policy.reload(trigger)

    def reload_from_signal(self) -> ReloadResult:
        """SIGHUP / ``systemctl reload``: tell systemd we are reloading, reload, ready again."""
        monotonic_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_us}")
        try:
            return self.reload_policy("sighup")
        finally:
            systemd.notify("READY=1")

    async def _poll_policy(self, interval_s: int) -> None:
        while True:
            await asyncio.sleep(interval_s)  # schedule, not a timing assumption
            try:
                await asyncio.to_thread(self.reload_policy, "poll")
                if self.mappings is not None:
                    await asyncio.to_thread(self.mappings.purge_expired)
            except Exception as exc:  # keep polling whatever one attempt did
                log.error("policy poll failed (%s)", type(exc).__name__)

    @property
    def edge_key_hex(self) -> str:
        return identity.public_bytes(self.signing_key).hex()

    async def start(self) -> None:
        await self.broker.open()
        self.training.start()
        cfg = self.config.policy
        if cfg is not None and cfg.poll_s > 0:
            self._poll_task = asyncio.create_task(self._poll_policy(cfg.poll_s))
        self.audit.append(
            AUDIT_KIND,
            {
                "event": "start",
                "tenant": self.config.tenant,
                "policy_id": self.policy.policy_id,
                "suite": self.config.suite,
                "edge_key": self.edge_key_hex,
                "pid": os.getpid(),
            },
        )

    async def stop(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        if self.local_model is not None:
            await self.local_model.close()
        await self.broker.close()
        await asyncio.to_thread(self.training.stop)
        self.audit.append(AUDIT_KIND, {"event": "stop", "pid": os.getpid()})

    def close(self) -> None:
        if self.mappings is not None:
            self.mappings.close()
        training = getattr(self, "training", None)
        if training is not None:
            training.close()
        self.audit.close()
