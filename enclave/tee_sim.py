"""SIMULATED TEE backend: software evidence signed by a simulated device key. NO HARDWARE
PROTECTION.

The device key and certificate come from the simulated vendor root (``attestation.sim_vendor``);
evidence (``sovra-sim-tee/2``) is a composite of a CVM report and one report per simulated NPU
(``[tee] npus``, firmware ``[tee] npu_firmware``), each NPU report bound to the CVM report data.
The same simulated device key signs the NPU reports: in the simulation it stands for the board's
vendor-provisioned identity, and separate per-NPU keys would be more files but no more protection
(every simulated key is a file on the same host). Evidence says ``simulated: true`` and
verifiers accept it only where reference values allow simulation. Every log line of this runtime
goes through :func:`sim_log`, so it names the simulation too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation import sim
from enclave.config import ConfigError, TEESection
from enclave.keys import EpochKey
from enclave.tee import Attestation

TEE_LABEL: Final = "SIMULATED TEE (sim)"


class _SimLogAdapter(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return f"[sim] {msg}", kwargs


def sim_log(name: str) -> logging.LoggerAdapter:
    """A logger whose every line is marked as coming from the simulated TEE."""
    return _SimLogAdapter(logging.getLogger(name), {})


log = sim_log(__name__)


@dataclass(frozen=True)
class SimTEE:
    """The simulated attester of one enclave: who it is and how it signs evidence."""

    enclave_id: str
    region: str
    measurement: str
    device_key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...] = field(repr=False)
    clock: Callable[[], float] = field(repr=False)
    tee_type: str = sim.SIM_TEE_TYPE
    simulated: bool = True
    evidence_format: str = sim.SIM_FORMAT
    npus: int = 1
    npu_firmware: str = sim.DEFAULT_NPU_FIRMWARE

    @classmethod
    def from_config(
        cls,
        section: TEESection,
        *,
        enclave_id: str,
        region: str,
        measurement: str,
        clock: Callable[[], float],
    ) -> SimTEE:
        if section.device_key is None or section.device_cert is None:
            raise ConfigError("tee.device_key and tee.device_cert are required for backend 'sim'")
        key = _load_device_key(section.device_key)
        chain = tuple(_load_cert(p) for p in (section.device_cert, *section.device_chain))
        if key.public_key() != chain[0].public_key():
            raise ConfigError(
                f"tee.device_key {section.device_key} does not match tee.device_cert "
                f"{section.device_cert}"
            )
        log.warning(
            "SIMULATED TEE backend (sim): no hardware protection; %d simulated NPU(s), firmware %s",
            section.npus,
            section.npu_firmware,
        )
        return cls(
            enclave_id, region, measurement, key, chain, clock,
            npus=section.npus, npu_firmware=section.npu_firmware,
        )  # fmt: skip

    @property
    def npu_measurement(self) -> str:
        """The simulated NPUs' firmware measurement (what ``npu_measurements`` must list)."""
        return sim.npu_measurement(self.npu_firmware)

    def attest(self, key: EpochKey, nonce: bytes) -> Attestation:
        return Attestation(self.evidence_format, self.evidence(key, nonce))

    def evidence(self, key: EpochKey, nonce: bytes) -> bytes:
        """Composite evidence binding ``key`` (HPKE and receipt public keys, epoch, expiry) to the
        challenge ``nonce``, with one NPU report per simulated NPU bound to the CVM report data."""
        claims = sim.SimClaims(
            enclave_id=self.enclave_id,
            region=self.region,
            measurement=self.measurement,
            report_data=sim.report_data(
                key.public_bytes, key.epoch, nonce, key.receipt_public_bytes
            ),
            nonce=nonce,
            epoch=key.epoch,
            kem=key.kem,
            key_not_after_ms=key.not_after_ms,
            issued_at_ms=int(self.clock() * 1000),
            tee_type=self.tee_type,
            npus=self.npus,
            receipt_key=key.receipt_public_bytes,
        )
        npus = sim.npu_claims_for(claims, self.npu_firmware)
        return sim.encode_evidence(claims, self.device_key, self.chain, npus=npus)


def _load_device_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"tee.device_key {path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, TypeError):
        raise ConfigError(f"tee.device_key {path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"tee.device_key {path}: must be an EC key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"tee certificate {path}: cannot read ({exc.strerror or exc})") from None
    except ValueError:
        raise ConfigError(f"tee certificate {path}: not a PEM certificate") from None
