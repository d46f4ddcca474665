"""The enclave's attester, whichever backend produces its evidence (``[tee] backend``).

* ``sim`` (:mod:`enclave.tee_sim`): SIMULATED composite CVM + NPU evidence, no hardware.
* ``configfs-tsm`` (:mod:`enclave.tee_tsm`): the TEE's own report through Linux configfs-tsm
  (an Arm CCA token on a realm), with the key binding hash as report data.

Both bind a key epoch the same way: report data =
``SHA-512(pk || be64(epoch) || nonce || receipt pk)`` (:func:`attestation.sim.report_data`),
``nonce`` being the broker's challenge, ``receipt pk`` the epoch's Ed25519 receipt public key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from enclave.config import TEESection
from enclave.keys import EpochKey


@dataclass(frozen=True)
class Attestation:
    """Evidence for one key: the format name relying parties dispatch on, and the bytes."""

    evidence_format: str
    evidence: bytes


class TEEBackend(Protocol):
    """What the enclave needs from its attester: its attested identity and evidence per key."""

    @property
    def enclave_id(self) -> str: ...

    @property
    def region(self) -> str: ...

    @property
    def measurement(self) -> str: ...

    @property
    def tee_type(self) -> str: ...

    @property
    def simulated(self) -> bool: ...

    def attest(self, key: EpochKey, nonce: bytes) -> Attestation: ...


def build_tee(
    section: TEESection,
    *,
    enclave_id: str,
    region: str,
    measurement: str,
    clock: Callable[[], float],
) -> TEEBackend:
    """The backend ``[tee] backend`` names (``measurement``: the software measurement, used by
    the sim backend; a real TEE reports the platform's own)."""
    # Imported here: both backend modules import this one (for Attestation).
    if section.backend == "configfs-tsm":
        from enclave.tee_tsm import TsmTEE

        return TsmTEE.from_config(section, enclave_id=enclave_id, region=region)
    from enclave.tee_sim import SimTEE

    return SimTEE.from_config(
        section, enclave_id=enclave_id, region=region, measurement=measurement, clock=clock
    )
