"""configfs-tsm TEE backend: evidence from the kernel's TSM report interface (a real TEE).

For each key, report data = ``SHA-512(pk || be64(epoch) || nonce || receipt pk)`` (64 bytes,
exactly the configfs-tsm inblob; :func:`attestation.sim.report_data`) goes to
:func:`attestation.configfs_tsm.collect`; the outblob is published as evidence in the format its
provider names. Only providers Sovra can verify are accepted:
``arm_cca_guest`` -> ``arm-cca-token`` (verified by :func:`attestation.verifier.verify_key`,
whose realm challenge check binds the key).

At start the backend asks for one report (random report data) to learn the provider and the
realm initial measurement it runs under: that measurement is this enclave's identity for sealed
constraints, as relying parties see it in the token. Nothing here is simulated.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from attestation import configfs_tsm
from attestation.cca import CCAError, parse_cca_token_unverified
from attestation.cca_appraisal import CCA_FORMAT, CCA_TEE_TYPE
from attestation.configfs_tsm import TsmError, TsmReport
from attestation.sim import report_data
from enclave.config import ConfigError, TEESection
from enclave.keys import EpochKey
from enclave.tee import Attestation

log = logging.getLogger(__name__)

#: configfs-tsm provider -> (TEE type, evidence format) for the providers Sovra verifies.
SUPPORTED_PROVIDERS: Final = {"arm_cca_guest": (CCA_TEE_TYPE, CCA_FORMAT)}

Collect = Callable[[bytes], TsmReport]


@dataclass(frozen=True)
class TsmTEE:
    enclave_id: str
    region: str
    measurement: str  # the realm initial measurement (hex) of this realm's own token
    tee_type: str
    evidence_format: str
    provider: str
    collect: Collect = field(repr=False)
    simulated: bool = False

    @classmethod
    def from_config(
        cls,
        section: TEESection,
        *,
        enclave_id: str,
        region: str,
        collect: Collect | None = None,
    ) -> TsmTEE:
        """Probe the interface once; ``collect`` replaces the kernel (tests: a fake tree)."""
        collect = collect or functools.partial(configfs_tsm.collect, root=section.tsm_root)
        try:
            probe = collect(os.urandom(configfs_tsm.INBLOB_SIZE))
        except TsmError as exc:
            raise ConfigError(f"tee.backend 'configfs-tsm': {exc}") from None
        supported = SUPPORTED_PROVIDERS.get(probe.provider)
        if supported is None:
            raise ConfigError(
                f"tee.backend 'configfs-tsm': provider {probe.provider!r} produces "
                f"{probe.evidence_format or 'an unknown format'}, which Sovra cannot verify; "
                f"supported providers: {sorted(SUPPORTED_PROVIDERS)}"
            )
        tee_type, evidence_format = supported
        try:
            token = parse_cca_token_unverified(probe.outblob)
        except CCAError as exc:
            raise ConfigError(
                f"tee.backend 'configfs-tsm': the {probe.provider} report is not a CCA token "
                f"({exc})"
            ) from None
        measurement = token.realm.initial_measurement.hex()
        log.info(
            "configfs-tsm TEE backend: provider %s, realm initial measurement %s",
            probe.provider,
            measurement,
        )
        return cls(
            enclave_id=enclave_id,
            region=region,
            measurement=measurement,
            tee_type=tee_type,
            evidence_format=evidence_format,
            provider=probe.provider,
            collect=collect,
        )

    def attest(self, key: EpochKey, nonce: bytes) -> Attestation:
        """The TEE's report with report data binding ``key`` (HPKE and receipt public keys,
        epoch) to ``nonce``."""
        report = self.collect(
            report_data(key.public_bytes, key.epoch, nonce, key.receipt_public_bytes)
        )
        if report.provider != self.provider:
            raise TsmError(
                f"configfs-tsm provider changed from {self.provider} to {report.provider}"
            )
        return Attestation(self.evidence_format, report.outblob)
