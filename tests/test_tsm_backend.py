"""The enclave's configfs-tsm TEE backend against a fake configfs tree, end to end through
``verify_key``: the fake kernel answers every inblob with an Arm CCA token (built with
tests/cca_tokens.py) whose realm challenge is that inblob, as a realm's RMM would."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.configfs_tsm import TsmClient
from attestation.errors import KeyBindingMismatch
from attestation.reference_values import ReferenceValues, ReferenceValuesFile
from attestation.verifier import OfferedKey, verify_key
from enclave.config import ConfigError, EnclaveConfig, TEESection
from enclave.keys import KeyRing
from enclave.tee import build_tee
from enclave.tee_tsm import TsmTEE

try:
    from tests import cca_tokens as ct
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import cca_tokens as ct  # type: ignore[no-redef]

RIM = b"\x11" * 32  # cca_tokens' default realm initial measurement
ATTRIBUTES = ("inblob", "outblob", "auxblob", "provider", "generation", "privlevel")


class CcaKernel(TsmClient):
    """configfs-tsm in a temp dir, played by the "kernel": each inblob write bumps
    ``generation`` and yields a CCA token whose realm challenge is the inblob."""

    def __init__(self, root: Path, provider: str = "arm_cca_guest") -> None:
        super().__init__(root)
        self.provider = provider
        self.platform_key = ct.generate_key("P-384")
        self.rak = ct.generate_key("P-384")
        self.inblobs: list[bytes] = []

    def _mkdir(self, path: Path) -> None:
        super()._mkdir(path)
        for name in ATTRIBUTES:
            (path / name).write_bytes(b"")
        (path / "generation").write_text("0\n")
        (path / "provider").write_text(f"{self.provider}\n")

    def _rmdir(self, path: Path) -> None:
        shutil.rmtree(path)  # configfs drops the attribute files with the directory

    def _write_file(self, path: Path, data: bytes) -> None:
        super()._write_file(path, data)
        gen = path.parent / "generation"
        gen.write_text(f"{int(gen.read_text()) + 1}\n")
        if path.name == "inblob":
            self.inblobs.append(data)
            built = ct.build_cca_token(platform_key=self.platform_key, rak=self.rak, challenge=data)
            (path.parent / "outblob").write_bytes(built.token)


def tsm_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tsm"
    (root / "report").mkdir(parents=True)
    return root


def reference_values(tmp_path: Path, kernel: CcaKernel, **cca: object) -> ReferenceValues:
    (tmp_path / "cpak.pem").write_bytes(ct.public_pem(kernel.platform_key))
    section = {"platform_keys": ["cpak.pem"], "realm_initial_measurements": [RIM.hex()], **cca}
    return ReferenceValues.from_document({"version": 1, "cca": section}, base=tmp_path, source="rv")


@pytest.fixture
def kernel(tmp_path: Path) -> CcaKernel:
    return CcaKernel(tsm_tree(tmp_path))


@pytest.fixture
def tee(kernel: CcaKernel) -> TsmTEE:
    section = TEESection(backend="configfs-tsm", tsm_root=kernel.root)
    return TsmTEE.from_config(section, enclave_id="enc-1", region="eu-west", collect=kernel.collect)


def test_backend_learns_its_identity_from_its_own_token(tee: TsmTEE, kernel: CcaKernel) -> None:
    assert tee.measurement == RIM.hex()
    assert (tee.tee_type, tee.evidence_format, tee.simulated) == ("arm-cca", "arm-cca-token", False)
    assert len(kernel.inblobs) == 1  # one probe at start
    assert list((kernel.root / "report").iterdir()) == []  # every request directory removed


def test_key_evidence_verifies_end_to_end(tee: TsmTEE, kernel: CcaKernel, tmp_path: Path) -> None:
    keys = KeyRing("X25519", 600, 120, time.time)
    key = keys.rotate()
    nonce = os.urandom(32)
    attestation = tee.attest(key, nonce)
    assert attestation.evidence_format == "arm-cca-token"
    assert len(kernel.inblobs[-1]) == 64  # the key binding hash is the whole inblob
    offered = OfferedKey(
        enclave_id="enc-1", epoch=key.epoch, kem=key.kem, public_key=key.public_bytes,
        not_after_ms=key.not_after_ms, evidence_format=attestation.evidence_format,
        evidence=attestation.evidence, nonce=nonce, receipt_public_key=key.receipt_public_bytes,
    )  # fmt: skip
    rv = reference_values(tmp_path, kernel)

    broker_view = verify_key(offered, rv, expected_nonce=nonce)  # the challenger
    assert broker_view.status == "affirming" and broker_view.simulated is False
    assert broker_view.tee_type == "arm-cca" and broker_view.measurement == RIM.hex()
    assert broker_view.region == "" and broker_view.npus == ()  # neither is in a CCA token
    assert broker_view.expires_at_ms <= key.not_after_ms

    edge_view = verify_key(offered, rv)  # the edge: the nonce travels with the offer
    assert edge_view.enclave_id == "enc-1" and edge_view.epoch == key.epoch

    other = keys.rotate()
    swapped = OfferedKey(**{**offered.__dict__, "public_key": other.public_bytes})
    with pytest.raises(KeyBindingMismatch, match="realm challenge"):
        verify_key(swapped, rv)
    with pytest.raises(KeyBindingMismatch, match="challenge nonce issued"):
        verify_key(offered, rv, expected_nonce=os.urandom(32))
    with pytest.raises(KeyBindingMismatch, match="none came with the offer"):
        verify_key(OfferedKey(**{**offered.__dict__, "nonce": b""}), rv)
    # The realm challenge binds the receipt key too: another one, or none, is refused.
    other_receipt = OfferedKey(
        **{**offered.__dict__, "receipt_public_key": other.receipt_public_bytes}
    )
    assert broker_view.receipt_public_key == key.receipt_public_bytes.hex()
    with pytest.raises(KeyBindingMismatch, match="realm challenge"):
        verify_key(other_receipt, rv)
    with pytest.raises(KeyBindingMismatch, match="receipt public key"):
        verify_key(OfferedKey(**{**offered.__dict__, "receipt_public_key": b""}), rv)


def test_untrusted_platform_and_unaccepted_realm(
    tee: TsmTEE, kernel: CcaKernel, tmp_path: Path
) -> None:
    from attestation.errors import AppraisalFailed, UntrustedChain

    key = KeyRing("X25519", 600, 120, time.time).rotate()
    nonce = os.urandom(32)
    att = tee.attest(key, nonce)
    offered = OfferedKey(
        "enc-1", key.epoch, key.kem, key.public_bytes, key.not_after_ms,
        att.evidence_format, att.evidence, nonce, key.receipt_public_bytes,
    )  # fmt: skip
    with pytest.raises(AppraisalFailed, match="realm initial measurement"):
        verify_key(offered, reference_values(tmp_path, kernel, realm_initial_measurements=[]))
    stranger = CcaKernel(kernel.root)
    stranger.platform_key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(UntrustedChain):
        verify_key(offered, reference_values(tmp_path / "..", stranger))
    with pytest.raises(AppraisalFailed, match="no 'cca' section"):
        verify_key(
            offered, ReferenceValues.from_document({"version": 1}, base=tmp_path, source="x")
        )


def test_unsupported_provider_and_missing_interface(tmp_path: Path) -> None:
    tdx = CcaKernel(tsm_tree(tmp_path), provider="tdx_guest")
    section = TEESection(backend="configfs-tsm", tsm_root=tdx.root)
    with pytest.raises(ConfigError, match=r"tdx_guest.*cannot verify"):
        TsmTEE.from_config(section, enclave_id="e", region="r", collect=tdx.collect)
    absent = TEESection(backend="configfs-tsm", tsm_root=tmp_path / "no-tsm")
    with pytest.raises(ConfigError, match="configfs-tsm not available"):
        build_tee(absent, enclave_id="e", region="r", measurement="", clock=time.time)


def test_config_selects_the_backend(tmp_path: Path) -> None:
    text = """
enclave_id = "enc-1"
region = "eu-west"
broker = ""
state_dir = "state"
[tls]
cert = "c.pem"
key = "c.key"
ca = "ca.pem"
[workload]
kind = "openai-upstream"
models = ["m"]
"""
    path = tmp_path / "enclave.toml"
    path.write_text(text + '[tee]\nbackend = "configfs-tsm"\ntsm_root = "fake-tsm"\n')
    config = EnclaveConfig.from_toml(path)
    assert config.tee.backend == "configfs-tsm" and config.tee.tsm_root == tmp_path / "fake-tsm"
    assert config.tee.device_key is None
    path.write_text(text + '[tee]\nbackend = "sim"\n')
    with pytest.raises(ConfigError, match="required for backend 'sim'"):
        EnclaveConfig.from_toml(path)
    path.write_text(text + '[tee]\ndevice_key = "k"\ndevice_cert = "c"\nnpus = 2\n')
    sim_config = EnclaveConfig.from_toml(path)
    assert sim_config.tee.npus == 2 and sim_config.tee.npu_firmware == "7.1.0"
    for bad, message in (("npus = 17", "tee.npus"), ('npu_firmware = "new"', "npu_firmware")):
        path.write_text(text + f'[tee]\ndevice_key = "k"\ndevice_cert = "c"\n{bad}\n')
        with pytest.raises(ConfigError, match=message):
            EnclaveConfig.from_toml(path)


def test_broker_admits_reappraises_and_evicts_a_cca_key(
    tee: TsmTEE, kernel: CcaKernel, tmp_path: Path
) -> None:
    """Admission binds the challenge; the directory carries it so edges (and re-appraisal)
    can recompute the binding; a revoked realm measurement evicts at the next pass."""
    from cloud_broker.config import TenantPolicy
    from cloud_broker.db import open_database
    from cloud_broker.registry import Announcement, Registry

    reference_values(tmp_path, kernel)  # writes cpak.pem
    rv_path = tmp_path / "rv.yaml"
    rv_path.write_text(
        f"version: 1\ncca:\n  platform_keys: [cpak.pem]\n"
        f"  realm_initial_measurements: ['{RIM.hex()}']\n"
    )
    registry = Registry(
        open_database("sqlite://"), ReferenceValuesFile(rv_path),
        heartbeat_interval_s=3600, evict_after_missed=3, challenge_ttl_s=60,
    )  # fmt: skip
    key = KeyRing("X25519", 600, 120, time.time).rotate()
    nonce = registry.challenge("enc-1").nonce
    att = tee.attest(key, nonce)
    # No nonce with the offer: the broker binds (and stores) the challenge it issued.
    offered = OfferedKey(
        "enc-1", key.epoch, key.kem, key.public_bytes, key.not_after_ms,
        att.evidence_format, att.evidence, receipt_public_key=key.receipt_public_bytes,
    )  # fmt: skip
    announcement = Announcement(
        "enc-1", "10.0.0.1:7000", "eu-west", "arm-cca", False, ("m",), (offered,)
    )
    registry.register("enc-1", announcement, nonce)

    (entry,) = registry.directory(TenantPolicy("demo"))
    assert entry.enclave.region == "eu-west"  # the registered placement (a token has none)
    (row,) = entry.keys
    assert row.nonce == nonce and row.ear
    listed = OfferedKey(
        "enc-1", row.epoch, row.kem, row.public_key, row.not_after_ms, row.evidence_format,
        row.evidence, row.nonce, row.receipt_public_key or b"",
    )  # fmt: skip
    assert verify_key(listed, registry.reference_values).measurement == RIM.hex()  # an edge

    assert registry.reappraise() == []
    rv_path.write_text(rv_path.read_text() + f"revoked_measurements: ['{RIM.hex()}']\n")
    assert registry.reappraise() == ["enc-1"]
    assert registry.directory(TenantPolicy("demo")) == []
