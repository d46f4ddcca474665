"""Wiring: everything one running edge agent holds, built from its config."""

from __future__ import annotations

import os
from typing import Final

from attestation.errors import ReferenceValuesInvalid
from attestation.reference_values import ReferenceValues
from edge_agent import identity
from edge_agent.api_keys import ApiKeys
from edge_agent.broker_client import BrokerClient
from edge_agent.config import EdgeConfig
from edge_agent.dispatcher import Dispatcher
from edge_agent.policy import ConfigPolicy
from edge_agent.trusted_set import TrustedEnclaveSet, wall_clock_ms
from sovra.audit import AuditError, AuditLog
from sovra.tls import TLSConfigError

AUDIT_KIND: Final = "edge"


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
            reference_values = ReferenceValues.load(config.reference_values)
            config.tls.load()
            self.signing_key = identity.load_or_create(config.identity_key_path)
            self.audit = AuditLog(config.audit_path)
        except _START_ERRORS as exc:
            raise EdgeStartError(f"{config.source}: {exc}") from None
        self.api_keys = ApiKeys(config.apps)
        self.policy = ConfigPolicy(config.apps)
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
        )

    @property
    def edge_key_hex(self) -> str:
        return identity.public_bytes(self.signing_key).hex()

    async def start(self) -> None:
        await self.broker.open()
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
        await self.broker.close()
        self.audit.append(AUDIT_KIND, {"event": "stop", "pid": os.getpid()})

    def close(self) -> None:
        self.audit.close()
