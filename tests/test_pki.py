"""Dev PKI (sovra.pki) and gRPC mTLS glue (sovra.tls), with real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime as dt
import stat
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sovra.pki import (
    DevCA,
    Identity,
    PKIError,
    build_certificate,
    generate_key,
    init_pki,
    main,
)
from sovra.tls import (
    TLSConfigError,
    TLSFiles,
    aio_secure_channel,
    channel_credentials,
    peer_identity,
    secure_channel,
    server_credentials,
)

RPC_TIMEOUT = 5.0
EXPECTED_STEMS = {"broker-broker", "edge-demo", "edge-acme", "enclave-enclave-1", "enclave-e2"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "dev-pki"
    init_pki(directory, tenants=("demo", "acme"), enclaves=("enclave-1", "e2"))
    return directory


@pytest.fixture(scope="module")
def other_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("other-pki")
    ca = DevCA.create(directory, "Rogue CA")
    ca.issue(Identity.edge("demo"))
    return directory


# --------------------------------------------------------------------------------------------
# files & certificates
# --------------------------------------------------------------------------------------------


def test_init_pki_writes_files_with_modes(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "pki"
    issued = init_pki(directory)
    assert set(issued) == {"broker-broker", "edge-demo", "enclave-enclave-1", "enclave-enclave-2"}
    assert _mode(directory) == 0o700
    expected = {"ca.pem", "ca.key"}
    for stem, item in issued.items():
        assert item.cert_path == directory / f"{stem}.pem"
        assert item.key_path == directory / f"{stem}.key"
        assert item.ca_path == directory / "ca.pem"
        assert item.identity.file_stem == stem
        expected |= {item.cert_path.name, item.key_path.name}
    assert {p.name for p in directory.iterdir()} == expected  # no stray temp files
    for path in directory.iterdir():
        if path.suffix == ".key":
            assert _mode(path) == 0o600, path
            pem = path.read_bytes()
            assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # unencrypted PKCS#8
            key = serialization.load_pem_private_key(pem, password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            assert isinstance(key.curve, ec.SECP256R1)
        else:
            assert _mode(path) == 0o644, path
    assert issued["broker-broker"].identity == Identity.broker()
    assert issued["edge-demo"].identity == Identity.edge("demo")
    assert issued["enclave-enclave-2"].identity == Identity.enclave("enclave-2")


def test_certs_chain_to_ca_and_carry_identity(pki_dir: Path) -> None:
    ca_cert = _load_cert(pki_dir / "ca.pem")
    ca_bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_bc.ca and ca_bc.path_length == 0
    assert ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ca_days = (ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc).days
    assert 5 * 365 <= ca_days <= 5 * 366
    ca_cert.verify_directly_issued_by(ca_cert)  # self-signed
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    ca = DevCA.load(pki_dir)
    identities = {
        "broker-broker": Identity.broker(),
        "edge-demo": Identity.edge("demo"),
        "edge-acme": Identity.edge("acme"),
        "enclave-enclave-1": Identity.enclave("enclave-1"),
        "enclave-e2": Identity.enclave("e2"),
    }
    assert set(identities) == EXPECTED_STEMS
    for stem, ident in identities.items():
        cert = _load_cert(pki_dir / f"{stem}.pem")
        cert.verify_directly_issued_by(ca_cert)  # raises InvalidSignature if not
        ca.verify(cert)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ident.uri()]
        assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", ident.dns_name()}
        assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
            "127.0.0.1",
            "::1",
        }
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and not bc.value.ca
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        assert 365 <= days <= 366
        assert cert.not_valid_before_utc <= dt.datetime.now(dt.UTC) <= cert.not_valid_after_utc


def test_cert_from_other_ca_does_not_verify(pki_dir: Path, other_ca_dir: Path) -> None:
    rogue = _load_cert(other_ca_dir / "edge-demo.pem")
    with pytest.raises(PKIError, match="not issued by this CA"):
        DevCA.load(pki_dir).verify(rogue)


def test_custom_hosts(tmp_path: Path) -> None:
    issued = init_pki(tmp_path, tenants=(), enclaves=(), hosts=("broker.example.com", "10.0.0.7"))
    cert = _load_cert(issued["broker-broker"].cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.com", "broker.sovra.local"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]


def test_build_certificate_generic_vendor_root(tmp_path: Path) -> None:
    """The generic builder also serves e.g. a simulated TEE vendor root issuing device certs."""
    root_key = generate_key()
    root = build_certificate(
        subject_cn="Sim TEE Vendor Root",
        public_key=root_key.public_key(),
        issuer_cert=None,
        issuer_key=root_key,
        is_ca=True,
        path_length=1,
        days=3650,
    )
    root.verify_directly_issued_by(root)
    device_key = generate_key()
    device = build_certificate(
        subject_cn="device-0001",
        public_key=device_key.public_key(),
        issuer_cert=root,
        issuer_key=root_key,
        is_ca=False,
        days=30,
    )
    device.verify_directly_issued_by(root)
    assert device.issuer == root.subject
    assert not device.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        device.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    with pytest.raises(ValueError, match="does not match"):
        build_certificate(
            subject_cn="x",
            public_key=device_key.public_key(),
            issuer_cert=root,
            issuer_key=device_key,
            is_ca=False,
            days=1,
        )


def test_refuses_to_overwrite_existing_ca(tmp_path: Path) -> None:
    init_pki(tmp_path, enclaves=())
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(PKIError, match="refusing to overwrite"):
        init_pki(tmp_path)
    with pytest.raises(PKIError, match="refusing to overwrite"):
        DevCA.create(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before
    issued = init_pki(tmp_path, force=True, enclaves=())
    after = (tmp_path / "ca.pem").read_bytes()
    assert after != before
    _load_cert(issued["edge-demo"].cert_path).verify_directly_issued_by(
        x509.load_pem_x509_certificate(after)
    )


def test_longest_names(tmp_path: Path) -> None:
    issued = init_pki(tmp_path, tenants=("t" * 63,), enclaves=("e" * 63,))
    for item in issued.values():
        cert = _load_cert(item.cert_path)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [item.identity.uri()]
    with pytest.raises(PKIError, match="invalid enclave id"):
        init_pki(tmp_path / "x", enclaves=("e" * 64,))


def test_init_validates_names_before_writing(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="invalid tenant"):
        init_pki(tmp_path / "x", tenants=("ok", "../evil"))
    with pytest.raises(PKIError, match="duplicate identity"):
        init_pki(tmp_path / "x", enclaves=("e1", "e1"))
    with pytest.raises(PKIError, match="invalid host"):
        init_pki(tmp_path / "x", hosts=("localhost", "bad host"))
    assert not (tmp_path / "x").exists()


def test_load_missing_and_corrupt_ca(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match=r"CA certificate not found: .*ca\.pem"):
        DevCA.load(tmp_path)
    DevCA.create(tmp_path)
    DevCA.load(tmp_path)  # sanity
    (tmp_path / "ca.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    with pytest.raises(PKIError, match=r"CA certificate .*ca\.pem is corrupt"):
        DevCA.load(tmp_path)
    DevCA.create(tmp_path, force=True)
    (tmp_path / "ca.key").write_bytes(b"not a key")
    with pytest.raises(PKIError, match=r"CA private key .*ca\.key is corrupt"):
        DevCA.load(tmp_path)
    DevCA.create(tmp_path, force=True)
    other = DevCA.create(tmp_path / "other")
    (tmp_path / "ca.key").write_bytes(other.key_path.read_bytes())
    with pytest.raises(PKIError, match="does not match"):
        DevCA.load(tmp_path)


# --------------------------------------------------------------------------------------------
# identities
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("identity", "uri"),
    [
        (Identity.broker(), "spiffe://sovra.local/broker"),
        (Identity.edge("demo"), "spiffe://sovra.local/tenant/demo/edge"),
        (Identity.enclave("enclave-1"), "spiffe://sovra.local/enclave/enclave-1"),
    ],
)
def test_identity_uri_round_trip(identity: Identity, uri: str) -> None:
    assert identity.uri() == uri
    assert Identity.from_uri(uri) == identity
    assert Identity.from_uri(identity.uri()) == identity


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://example.org/broker",
        "spiffe://sovra.local/",
        "spiffe://sovra.local/brokers",
        "spiffe://sovra.local/broker/extra",
        "spiffe://sovra.local/tenant/demo",
        "spiffe://sovra.local/tenant/demo/edge/x",
        "spiffe://sovra.local/tenant//edge",
        "spiffe://sovra.local/tenant/../edge",
        "spiffe://sovra.local/enclave/",
        "spiffe://sovra.local/enclave/UPPER",
        "spiffe://sovra.local/unknown/x",
        "https://sovra.local/broker",
        "SPIFFE://sovra.local/broker",
        "",
    ],
)
def test_identity_rejects_foreign_uris(uri: str) -> None:
    with pytest.raises(ValueError, match="Sovra identity URI"):
        Identity.from_uri(uri)


def test_identity_validation() -> None:
    with pytest.raises(ValueError, match="broker identity name"):
        Identity("broker", "other")
    with pytest.raises(ValueError, match="unknown identity kind"):
        Identity("admin", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid enclave id"):
        Identity.enclave("a/b")
    assert Identity.edge("demo").dns_name() == "demo.edge.sovra.local"
    assert Identity.enclave("e-1").dns_name() == "e-1.enclave.sovra.local"
    assert Identity.broker().dns_name() == "broker.sovra.local"


# --------------------------------------------------------------------------------------------
# TLS files
# --------------------------------------------------------------------------------------------


def test_tls_files_errors_name_the_file(pki_dir: Path, tmp_path: Path) -> None:
    good = TLSFiles.from_pki_dir(pki_dir, Identity.edge("demo"))
    cert, key, ca = good.load()
    assert cert.startswith(b"-----BEGIN CERTIFICATE")
    assert b"PRIVATE KEY" in key
    assert ca == (pki_dir / "ca.pem").read_bytes()

    missing = TLSFiles(cert=good.cert, key=tmp_path / "nope.key", ca=good.ca)
    with pytest.raises(TLSConfigError, match=r"private key file not found: .*nope\.key"):
        missing.load()
    with pytest.raises(TLSConfigError, match=r"nope\.key"):
        channel_credentials(missing)

    bad_ca = tmp_path / "bad-ca.pem"
    bad_ca.write_text("hello")
    with pytest.raises(TLSConfigError, match=r"CA bundle .*bad-ca\.pem"):
        TLSFiles(cert=good.cert, key=good.key, ca=bad_ca).load()

    mismatched = TLSFiles(cert=good.cert, key=pki_dir / "broker-broker.key", ca=good.ca)
    with pytest.raises(TLSConfigError, match="does not match certificate"):
        mismatched.load()

    key_obj = serialization.load_pem_private_key(good.key.read_bytes(), password=None)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        key_obj.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(TLSConfigError, match=r"enc\.key is encrypted"):
        TLSFiles(cert=good.cert, key=encrypted, ca=good.ca).load()


# --------------------------------------------------------------------------------------------
# real gRPC mTLS
# --------------------------------------------------------------------------------------------


class RecordingHealth(health.HealthServicer):
    """Health servicer that records the authenticated peer of every Check call."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[Identity | None] = []

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.peers.append(peer_identity(context))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Server:
    port: int
    servicer: RecordingHealth

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def broker_server(pki_dir: Path) -> Iterator[Server]:
    servicer = RecordingHealth()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(TLSFiles.from_pki_dir(pki_dir, Identity.broker()))
    )
    assert port > 0
    server.start()
    try:
        yield Server(port, servicer)
    finally:
        server.stop(None)


def _check(channel: grpc.Channel) -> health_pb2.HealthCheckResponse:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT
    )


@pytest.mark.parametrize(
    "client", [Identity.edge("demo"), Identity.edge("acme"), Identity.enclave("enclave-1")]
)
def test_mtls_accepts_ca_issued_client_and_sees_identity(
    pki_dir: Path, broker_server: Server, client: Identity
) -> None:
    files = TLSFiles.from_pki_dir(pki_dir, client)
    with secure_channel(broker_server.target, files) as channel:
        resp = _check(channel)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert broker_server.servicer.peers[-1] == client


def test_mtls_localhost_target_verifies(pki_dir: Path, broker_server: Server) -> None:
    files = TLSFiles.from_pki_dir(pki_dir, Identity.edge("demo"))
    with secure_channel(f"localhost:{broker_server.port}", files) as channel:
        assert _check(channel).status == health_pb2.HealthCheckResponse.SERVING


def test_server_identity_pinning(pki_dir: Path, broker_server: Server) -> None:
    files = TLSFiles.from_pki_dir(pki_dir, Identity.edge("demo"))
    with secure_channel(broker_server.target, files, server_identity=Identity.broker()) as ch:
        assert _check(ch).status == health_pb2.HealthCheckResponse.SERVING
    # Same CA, same host, but the server is not enclave-1: the handshake must fail.
    calls_before = len(broker_server.servicer.peers)
    wrong = Identity.enclave("enclave-1")
    with (
        secure_channel(broker_server.target, files, server_identity=wrong) as ch,
        pytest.raises(grpc.RpcError) as excinfo,
    ):
        _check(ch)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(broker_server.servicer.peers) == calls_before
    with pytest.raises(ValueError, match="not both"):
        secure_channel(
            broker_server.target,
            files,
            server_identity=wrong,
            options=[("grpc.ssl_target_name_override", "localhost")],
        )


def test_mtls_refuses_client_from_other_ca(
    pki_dir: Path, other_ca_dir: Path, broker_server: Server
) -> None:
    calls_before = len(broker_server.servicer.peers)
    rogue = TLSFiles.from_pki_dir(other_ca_dir, Identity.edge("demo"))
    # The rogue client even trusts the real server: only the client cert is wrong.
    real_ca = TLSFiles(cert=rogue.cert, key=rogue.key, ca=pki_dir / "ca.pem")
    with (
        secure_channel(broker_server.target, real_ca) as channel,
        pytest.raises(grpc.RpcError) as excinfo,
    ):
        _check(channel)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(broker_server.servicer.peers) == calls_before


def test_mtls_refuses_client_without_cert(pki_dir: Path, broker_server: Server) -> None:
    calls_before = len(broker_server.servicer.peers)
    creds = grpc.ssl_channel_credentials(root_certificates=(pki_dir / "ca.pem").read_bytes())
    with (
        grpc.secure_channel(broker_server.target, creds) as channel,
        pytest.raises(grpc.RpcError) as excinfo,
    ):
        _check(channel)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(broker_server.servicer.peers) == calls_before


def test_client_refuses_server_from_other_ca(
    pki_dir: Path, other_ca_dir: Path, broker_server: Server
) -> None:
    files = TLSFiles(
        cert=pki_dir / "edge-demo.pem", key=pki_dir / "edge-demo.key", ca=other_ca_dir / "ca.pem"
    )
    with (
        secure_channel(broker_server.target, files) as channel,
        pytest.raises(grpc.RpcError) as excinfo,
    ):
        _check(channel)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE


def test_peer_identity_none_without_tls() -> None:
    servicer = RecordingHealth()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            _check(channel)
    finally:
        server.stop(None)
    assert servicer.peers == [None]


def test_aio_mtls_round_trip(pki_dir: Path) -> None:
    async def run() -> list[Identity | None]:
        servicer = RecordingHealth()
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_secure_port(
            "127.0.0.1:0",
            server_credentials(TLSFiles.from_pki_dir(pki_dir, Identity.enclave("e2"))),
        )
        await server.start()
        try:
            files = TLSFiles.from_pki_dir(pki_dir, Identity.broker())
            async with aio_secure_channel(
                f"127.0.0.1:{port}", files, server_identity=Identity.enclave("e2")
            ) as channel:
                resp = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT
                )
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(None)
        return servicer.peers

    assert asyncio.run(run()) == [Identity.broker()]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "cli"
    assert main(["init", str(directory), "--tenant", "t1", "--enclave", "x"]) == 0
    out = capsys.readouterr().out
    assert "spiffe://sovra.local/tenant/t1/edge" in out
    assert "UNENCRYPTED" in out
    assert {p.name for p in directory.iterdir()} == {
        "ca.pem",
        "ca.key",
        "broker-broker.pem",
        "broker-broker.key",
        "edge-t1.pem",
        "edge-t1.key",
        "enclave-x.pem",
        "enclave-x.key",
    }
    assert main(["init", str(directory)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
