"""The broker-side policy (``policy = "broker-policy.yaml"``): per tenant allowed regions,
jurisdictions and enclave pools (directory and Dispatch), and quotas (requests/min as a token
bucket, "tokens"/day as reply frames), kept in the broker database across restarts.

Real broker, real gRPC + mTLS, the test enclaves of ``test_broker``. Time is injected: no sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import test_broker
from sqlmodel import create_engine
from test_broker import (
    MODEL,
    REGION,
    RPC_TIMEOUT,
    BrokerRig,
    TestEnclave,
    assert_status,
    rpc_error,
    seal,
    sealed_request,
    write_config,
)

from cloud_broker.config import BrokerConfig, ConfigError
from cloud_broker.errors import BrokerError
from cloud_broker.policy import BrokerPolicy, BrokerPolicyError, Quotas, QuotaStore, TenantRules
from sovra.pki import IssuedCert
from sovra.v1 import broker_pb2

# The fixtures of test_broker (PKI, simulated vendor, reference values, enclaves, brokers).
pki = test_broker.pki
vendor = test_broker.vendor
rv_path = test_broker.rv_path
enclaves = test_broker.enclaves
make_broker = test_broker.make_broker

EU = "eu-west-1"
POLICY = f"""
version: 1
regions: {{{REGION}: CN, {EU}: EU}}
pools:
  general: ["e1", "e2"]
  reserved: ["e3"]
tenants:
  demo:
    id: demo-residency
    jurisdictions: [CN]
    pools: [general]
    quotas: {{requests_per_min: 3}}
"""
FRAMES_POLICY = """
version: 1
tenants:
  demo:
    quotas: {tokens_per_day: 5}
"""


def broker_with(
    make_broker: Callable[..., BrokerRig], tmp_path: Path, policy: str, extra: str = ""
) -> BrokerRig:
    (tmp_path / "broker-policy.yaml").write_text(policy)
    return make_broker(extra=extra, policy='"broker-policy.yaml"')


def admit(rig: BrokerRig, enclave: TestEnclave, region: str) -> None:
    """Register ``enclave`` as being in ``region`` (its evidence says so too)."""
    stub = rig.registry_stub(enclave.identity)
    nonce = stub.Challenge(broker_pb2.ChallengeRequest(), timeout=RPC_TIMEOUT).nonce
    descriptor = broker_pb2.EnclaveDescriptor(
        enclave_id=enclave.id, region=region, tee_type="sim-ascend-cvm", simulated=True,
        models=[MODEL], keys=[enclave.offered_key(nonce, region=region)],
    )  # fmt: skip
    request = broker_pb2.RegisterRequest(enclave=descriptor, address=enclave.address, nonce=nonce)
    assert stub.Register(request, timeout=RPC_TIMEOUT).status == "admitted"


def test_policy_file_is_validated_with_file_and_key(
    tmp_path: Path, pki: dict[str, IssuedCert], rv_path: Path
) -> None:
    policy_path = tmp_path / "broker-policy.yaml"
    config_path = write_config(tmp_path, pki, rv_path, policy='"broker-policy.yaml"')
    policy_path.write_text(POLICY)
    config = BrokerConfig.from_toml(config_path)
    assert config.policy is not None
    rules = config.policy.rules_for("demo")
    assert rules is not None and rules.rule_id == "demo-residency"
    assert rules.quotas == Quotas(requests_per_min=3)
    assert config.policy.rules_for("other") is None
    assert config.policy.id.startswith("broker-policy:")
    cases = {
        "tenants: {demo: {quota: {}}}": "tenants.demo.quota: unknown key",
        "tenants: {demo: {quotas: {requests_per_min: 0}}}": "requests_per_min: must be a positive",
        "tenants: {demo: {quotas: {tokens_per_day: true}}}": "tokens_per_day: must be a positive",
        "tenants: {demo: {pools: [gpu]}}": "tenants.demo.pools: undefined pool 'gpu'",
        "tenants: {demo: {regions: []}}": "tenants.demo.regions: must not be empty",
        "tenants: {demo: {regions: cn}}": "tenants.demo.regions: must be a list",
        "version: 2": "version: must be 1",
        "tenants: [demo]": "tenants: must be a mapping",
        "tenants: {demo: {": "not valid YAML",
        "surprise: 1": "surprise: unknown key",
    }
    for text, message in cases.items():
        policy_path.write_text(text)
        with pytest.raises(ConfigError, match=r"broker\.toml: policy: .*broker-policy\.yaml"):
            BrokerConfig.from_toml(config_path)
        with pytest.raises(BrokerPolicyError, match=message.replace("[", r"\[")):
            BrokerPolicy.load(policy_path)
    policy_path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(BrokerPolicyError, match="not UTF-8"):
        BrokerPolicy.load(policy_path)
    policy_path.unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        BrokerConfig.from_toml(config_path)


def test_regions_jurisdictions_and_pools_limit_directory_and_dispatch(
    make_broker: Callable[..., BrokerRig],
    enclaves: dict[str, TestEnclave],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cloud_broker")
    rig = broker_with(
        make_broker, tmp_path, POLICY.replace("requests_per_min: 3", "requests_per_min: 100")
    )
    e1, e2, e3 = enclaves["e1"], enclaves["e2"], enclaves["e3"]
    admit(rig, e1, REGION)  # CN, pool general: allowed
    admit(rig, e2, EU)  # EU: outside the tenant's jurisdictions
    admit(rig, e3, REGION)  # CN, but pool reserved
    edge = rig.edge()
    listed = edge.ListEnclaves(broker_pb2.ListEnclavesRequest(), timeout=RPC_TIMEOUT)
    assert [d.enclave_id for d in listed.enclaves] == ["e1"]
    assert edge.ListModels(broker_pb2.ListModelsRequest(), timeout=RPC_TIMEOUT).models == [MODEL]

    refused = seal([e2, e3])
    err = rpc_error(lambda: edge.Dispatch(sealed_request(refused), timeout=RPC_TIMEOUT))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "broker policy rule 'demo-residency'")
    assert "e2: region 'eu-west-1' is in jurisdiction 'EU'" in err.details()
    assert "e3: enclave 'e3' is in none of the pools ['general']" in err.details()
    assert e2.calls == e3.calls == 0  # nothing was forwarded
    # A candidate outside the rules is dropped; the allowed one serves.
    reply = edge.Dispatch(sealed_request(seal([e2, e1])), timeout=RPC_TIMEOUT)
    assert reply.enclave_id == "e1" and e2.calls == 0
    rows = {r["request_id"]: r for r in rig.request_rows()}
    assert rows[refused.request_id.hex()]["status"] == "PERMISSION_DENIED"
    assert "dispatch refused by broker policy" in caplog.text
    assert "rule=demo-residency" in caplog.text


def test_tenants_the_policy_does_not_name_keep_the_config_rules(
    make_broker: Callable[..., BrokerRig], enclaves: dict[str, TestEnclave], tmp_path: Path
) -> None:
    rig = broker_with(make_broker, tmp_path, POLICY, extra="[tenants.other]\n")
    e2 = enclaves["e2"]
    admit(rig, e2, EU)
    other = rig.edge("other")
    for _ in range(5):  # no quota, no residency rule for "other"
        reply = other.Dispatch(sealed_request(seal([e2], tenant="other")), timeout=RPC_TIMEOUT)
        assert reply.enclave_id == "e2"


def test_requests_per_minute_survive_a_restart(
    make_broker: Callable[..., BrokerRig], enclaves: dict[str, TestEnclave], tmp_path: Path
) -> None:
    rig = broker_with(make_broker, tmp_path, POLICY)
    e1 = enclaves["e1"]
    admit(rig, e1, REGION)
    edge = rig.edge()
    for _ in range(3):
        edge.Dispatch(sealed_request(seal([e1], clock=rig.clock)), timeout=RPC_TIMEOUT)
    over = seal([e1], clock=rig.clock)
    err = rpc_error(lambda: edge.Dispatch(sealed_request(over), timeout=RPC_TIMEOUT))
    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota requests_per_min (3)")
    assert "tenant 'demo'" in err.details() and "the next request is allowed in" in err.details()
    assert e1.calls == 3
    statuses = [r["status"] for r in rig.request_rows()]
    assert statuses == ["OK", "OK", "OK", "RESOURCE_EXHAUSTED"]

    # A restarted broker (same database) still knows the bucket is empty.
    rig.broker.stop(0)
    again = make_broker(policy='"broker-policy.yaml"')
    edge = again.edge()
    err = rpc_error(lambda: edge.Dispatch(sealed_request(seal([e1])), timeout=RPC_TIMEOUT))
    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "requests_per_min")
    # The quota table holds counters only.
    quotas = again.broker.dispatcher._quotas
    assert quotas is not None
    usage = quotas.usage("demo")
    assert usage is not None and usage.bucket < 1


def test_reply_frames_per_day(
    make_broker: Callable[..., BrokerRig], enclaves: dict[str, TestEnclave], tmp_path: Path
) -> None:
    rig = broker_with(make_broker, tmp_path, FRAMES_POLICY)
    e1 = enclaves["e1"]
    admit(rig, e1, REGION)
    edge = rig.edge()
    for _ in range(2):  # each streamed reply is 3 frames
        frames = list(edge.DispatchStream(sealed_request(seal([e1], stream=True)), timeout=10))
        assert len(frames) == 3
    err = rpc_error(
        lambda: list(edge.DispatchStream(sealed_request(seal([e1], stream=True)), timeout=10))
    )
    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota tokens_per_day (5, counted")
    tomorrow = datetime.now(UTC).date().toordinal() + 1
    assert datetime.fromordinal(tomorrow).date().isoformat() + "T00:00:00Z" in err.details()
    err = rpc_error(lambda: edge.Dispatch(sealed_request(seal([e1])), timeout=RPC_TIMEOUT))
    assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "tokens_per_day")


def test_quota_store_refills_and_rolls_over_by_the_clock(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'q.db'}")
    now = [datetime(2025, 3, 1, 23, 57, 0, tzinfo=UTC).timestamp()]
    store = QuotaStore(engine, lambda: now[0])
    rules = TenantRules("t", "rule-t", quotas=Quotas(requests_per_min=2, tokens_per_day=10))
    store.admit(rules)
    store.admit(rules)
    with pytest.raises(BrokerError, match=r"allowed in 30\.0s"):
        store.admit(rules)
    now[0] += 30  # one request refilled (2 per minute)
    store.admit(rules)
    with pytest.raises(BrokerError, match="requests_per_min"):
        store.admit(rules)
    store.record_frames(rules, 10)
    now[0] += 60
    with pytest.raises(BrokerError, match=r"resets at 2025-03-02T00:00:00Z"):
        store.admit(rules)
    now[0] += 120  # 00:00:30 on the next day: a new day's budget
    store.admit(rules)
    again = QuotaStore(engine, lambda: now[0])  # another process, same database
    usage = again.usage("t")
    assert usage is not None and usage.day == "2025-03-02" and usage.day_frames == 0
    no_quota = TenantRules("u", "rule-u")
    for _ in range(100):
        again.admit(no_quota)  # nothing to count
    assert again.usage("u") is None
