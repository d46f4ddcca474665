"""Tests for the Arm CCA attestation token verifier (attestation.cca)."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import os
import random
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from attestation.cca import (
    BindingMismatch,
    CCAError,
    CCAToken,
    ChallengeMismatch,
    InvalidTrustAnchor,
    MalformedToken,
    SignatureInvalid,
    UnsupportedAlgorithm,
    UntrustedPlatformKey,
    parse_trust_anchor,
    verify_cca_token,
)

try:
    from tests import cca_tokens as ct
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import cca_tokens as ct  # type: ignore[no-redef]

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def keys() -> dict[str, ec.EllipticCurvePrivateKey]:
    return {name: ct.generate_key(name) for name in ("P-256", "P-384", "P-521")}


@pytest.fixture(scope="module")
def good(keys: dict[str, ec.EllipticCurvePrivateKey]) -> ct.BuiltToken:
    return ct.build_cca_token(platform_key=keys["P-384"], rak=ct.generate_key("P-384"))


def build(keys: dict[str, ec.EllipticCurvePrivateKey], **kw: Any) -> ct.BuiltToken:
    kw.setdefault("platform_key", keys["P-384"])
    return ct.build_cca_token(**kw)


def verify(built: ct.BuiltToken, **kw: Any) -> CCAToken:
    return verify_cca_token(built.token, [built.platform_public_key], **kw)


@pytest.fixture(scope="module")
def vectors() -> Path:
    folder = VECTORS / "cca"
    if not folder.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the external test vectors are missing: {folder}")
        pytest.skip(f"external CCA vectors not present at {folder} (shared/ beside the checkout)")
    return folder


# --------------------------------------------------------------------------- real vectors


@pytest.mark.vectors
def test_real_tfrmm_token_verifies(vectors: Path) -> None:
    anchors = parse_trust_anchor((vectors / "tfrmm-platform.pub.pem").read_bytes())
    token = (vectors / "tfrmm-token.cbor").read_bytes()
    result = verify_cca_token(token, anchors, expected_challenge=b"\xab" * 64)
    assert result.collection_tag == 399
    assert result.platform.profile == "http://arm.com/CCA-SSD/1.0.0"
    assert result.platform.security_lifecycle == 12291
    assert [c.measurement_type for c in result.platform.software_components] == [
        "BL",
        "M1",
        "M2",
        "M3",
    ]
    assert result.platform.software_components[0].version == "3.4.2"
    assert result.platform.verification_service == "whatever.com"
    assert len(result.realm.public_key) == 97 and result.realm.public_key[0] == 4
    assert result.realm.public_key_hash_algorithm == "sha-256"
    assert len(result.realm.extensible_measurements) == 4
    assert result.realm.profile is None
    out = json.loads(json.dumps(result.to_json_dict()))
    assert out["realm"]["challenge"] == "ab" * 64


@pytest.mark.vectors
def test_real_tfrmm_wrong_challenge_and_wrong_anchor(vectors: Path) -> None:
    anchors = parse_trust_anchor((vectors / "tfrmm-platform.pub.pem").read_bytes())
    token = (vectors / "tfrmm-token.cbor").read_bytes()
    with pytest.raises(ChallengeMismatch, match="does not equal the expected"):
        verify_cca_token(token, anchors, expected_challenge=b"\xac" * 64)
    with pytest.raises(UntrustedPlatformKey, match="does not verify with any"):
        verify_cca_token(token, [ct.generate_key("P-384").public_key()])


@pytest.mark.vectors
def test_real_binding_mismatch_rejected(vectors: Path) -> None:
    ta_json = (vectors / "binding-mismatch-ta.json").read_bytes()
    anchors = parse_trust_anchor(ta_json)
    pem = parse_trust_anchor((vectors / "tfrmm-platform.pub.pem").read_bytes())
    assert anchors[0].public_numbers() == pem[0].public_numbers()
    token = (vectors / "binding-mismatch-token.cbor").read_bytes()
    with pytest.raises(BindingMismatch, match=r"not the sha-256 hash of the realm public key"):
        verify_cca_token(token, anchors)


# --------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("curve", ["P-256", "P-384", "P-521"])
@pytest.mark.parametrize("collection_tag", [399, 907])
@pytest.mark.parametrize("rak_encoding", ["raw", "cose_key"])
def test_built_tokens_verify(
    keys: dict[str, ec.EllipticCurvePrivateKey], curve: str, collection_tag: int, rak_encoding: str
) -> None:
    built = ct.build_cca_token(
        platform_key=keys[curve],
        rak=keys[curve],
        collection_tag=collection_tag,
        rak_encoding=rak_encoding,  # type: ignore[arg-type]
    )
    result = verify(built, expected_challenge=built.challenge)
    assert result.collection_tag == collection_tag
    assert result.realm.challenge == built.challenge
    assert result.realm.public_key == built.realm_claims[44237]
    assert result.platform.implementation_id == bytes(range(32))
    assert result.platform.software_components[2].measurement_type == "RMM"
    assert result.platform.software_components[2].signer_id == b"\xa3" * 32


def test_mixed_curves_other_hash_algs_and_extras(
    keys: dict[str, ec.EllipticCurvePrivateKey],
) -> None:
    built = build(
        keys,
        rak=keys["P-521"],
        rak_hash_alg="sha-512",
        tag_cose=False,
        platform_protected={2: [1], 4: b"kid"},  # crit listing a known label is fine
        realm_unprotected={4: b"rak"},
        realm_claims={265: ct.REMOVE, 99999: "unknown claims are ignored"},
        collection_tag=907,
        collection_extra_pairs=[("__cmwc_t", "tag:example.com,2025:cca")],
    )
    result = verify(built)
    assert result.realm.profile is None
    assert len(result.platform.challenge) == 64
    anchors = [keys["P-256"].public_key(), keys["P-521"].public_key(), built.platform_public_key]
    assert verify_cca_token(built.token, anchors).realm == result.realm


def test_accepts_bytearray_and_to_json(good: ct.BuiltToken) -> None:
    result = verify_cca_token(bytearray(good.token), [good.platform_public_key])
    as_json = result.to_json_dict()
    json.dumps(as_json)
    assert as_json["collection_tag"] == 399
    assert as_json["realm"]["challenge"] == good.challenge.hex()  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.realm.challenge = b""  # type: ignore[misc]


# --------------------------------------------------------------------------- signatures


def _altered(value: Any) -> Any:
    if isinstance(value, bytes):
        return bytes([value[0] ^ 0x01]) + value[1:]
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, int):
        return value + 1
    if isinstance(value, list):
        first = value[0]
        if isinstance(first, dict):
            return [{**first, 2: b"\xee" * 32}, *value[1:]]
        return [_altered(first), *value[1:]]
    raise AssertionError(value)


REALM_CLAIMS = [10, 265, 44235, 44236, 44237, 44238, 44239, 44240]
PLATFORM_CLAIMS = [10, 256, 265, 2395, 2396, 2399, 2400, 2401, 2402]


@pytest.mark.parametrize("claim", REALM_CLAIMS)
def test_tampered_realm_claim(keys: dict[str, ec.EllipticCurvePrivateKey], claim: int) -> None:
    rak = ct.generate_key("P-384")
    if claim == 44237:  # swap in another valid key: a bit flip would not be a curve point
        new = ct.raw_point(ct.generate_key("P-384"))
    elif claim == 44240:
        new = "sha-384"
    else:
        new = _altered(ct.default_realm_claims(b"\x00" * 64, b"\x04", "sha-256")[claim])
    built = build(keys, rak=rak, tamper_realm_claims={claim: new})
    with pytest.raises(SignatureInvalid, match="realm token signature does not verify") as ei:
        verify(built)
    assert not isinstance(ei.value, UntrustedPlatformKey)


@pytest.mark.parametrize("claim", PLATFORM_CLAIMS)
def test_tampered_platform_claim(keys: dict[str, ec.EllipticCurvePrivateKey], claim: int) -> None:
    built = build(keys)
    built = build(keys, tamper_platform_claims={claim: _altered(built.platform_claims[claim])})
    with pytest.raises(SignatureInvalid, match="platform token signature") as ei:
        verify(built)
    assert isinstance(ei.value, UntrustedPlatformKey)
    assert "altered" in str(ei.value)


def test_corrupted_signatures(keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
    with pytest.raises(UntrustedPlatformKey, match="platform token signature"):
        verify(build(keys, corrupt_platform_signature=True))
    with pytest.raises(SignatureInvalid, match="realm token signature"):
        verify(build(keys, corrupt_realm_signature=True))


def test_signature_wrong_length(keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
    # ES256 header on a P-384 platform key: 96-byte signature where 64 are needed
    built = build(keys, platform_alg=-7)
    with pytest.raises(SignatureInvalid, match="signature is 96 bytes; ES256 needs 64") as ei:
        verify(built)
    assert not isinstance(ei.value, UntrustedPlatformKey)


def test_untrusted_platform_key(
    good: ct.BuiltToken, keys: dict[str, ec.EllipticCurvePrivateKey]
) -> None:
    other = ct.generate_key("P-384").public_key()
    with pytest.raises(UntrustedPlatformKey, match="does not verify with any of the 1 P-384"):
        verify_cca_token(good.token, [other])
    with pytest.raises(UntrustedPlatformKey, match="none of the 2 trust anchor"):
        verify_cca_token(good.token, [keys["P-256"].public_key(), keys["P-521"].public_key()])
    with pytest.raises(UntrustedPlatformKey, match="no trust anchors"):
        verify_cca_token(good.token, [])


# --------------------------------------------------------------------------- algorithms


def test_wrong_curve_for_alg(keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
    with pytest.raises(UnsupportedAlgorithm, match="ES256, which requires a P-256 key"):
        verify(build(keys, rak=ct.generate_key("P-384"), realm_alg=-7))
    with pytest.raises(UnsupportedAlgorithm, match="ES512, which requires a P-521 key"):
        verify(build(keys, rak=keys["P-256"], rak_encoding="cose_key", realm_alg=-36))


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"platform_alg": -8}, "platform token: unsupported COSE alg -8"),
        ({"realm_alg": -257}, "realm token: unsupported COSE alg -257"),
        ({"realm_alg": "ES384"}, "unsupported COSE alg 'ES384'"),
        ({"platform_protected": {1: ct.REMOVE}}, "no 'alg'"),
        (
            {"realm_protected": {1: ct.REMOVE}, "realm_unprotected": {1: -35}},
            "'alg' must be in the protected header",
        ),
        ({"platform_protected": {2: [99], 99: 1}}, "unknown critical header parameter(s) [99]"),
        ({"realm_protected": {2: ["x-ext"], "x-ext": 1}}, "unknown critical header"),
    ],
)
def test_unsupported_algorithm_and_crit(
    keys: dict[str, ec.EllipticCurvePrivateKey], knobs: dict[str, Any], message: str
) -> None:
    with pytest.raises(UnsupportedAlgorithm) as ei:
        verify(build(keys, **knobs))
    assert message in str(ei.value)


def test_bad_rak_cose_keys(keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
    rak = ct.generate_key("P-384")
    d = rak.private_numbers().private_value.to_bytes(48, "big")
    with_d = ct.cose_key_bytes(rak, extra={-4: d})
    with pytest.raises(MalformedToken, match="contains a private key"):
        verify(build(keys, rak=rak, rak_public_bytes=with_d))
    okp = ct.cose_key_bytes(rak, extra={1: 1})
    with pytest.raises(UnsupportedAlgorithm, match="kty 1 is not EC2"):
        verify(build(keys, rak=rak, rak_public_bytes=okp))
    with pytest.raises(MalformedToken, match="not a valid point"):
        bad = ct.raw_point(rak)[:-1] + bytes([ct.raw_point(rak)[-1] ^ 1])
        verify(build(keys, rak=rak, rak_public_bytes=bad))


def test_unknown_rak_hash_alg(keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
    with pytest.raises(UnsupportedAlgorithm, match="'md5' is not one of"):
        verify(build(keys, rak_hash_alg="md5"))


# --------------------------------------------------------------------------- CBOR strictness


@pytest.mark.parametrize("cut", [1, 2, 3, 10, 40, 0.5, -40, -1])
def test_truncated(good: ct.BuiltToken, cut: float) -> None:
    n = int(len(good.token) * cut) if isinstance(cut, float) else cut % len(good.token)
    with pytest.raises(MalformedToken, match="truncated"):
        verify_cca_token(good.token[:n], [good.platform_public_key])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        b"\x1c",
        b"not cbor at all",
        bytes(random.Random(7).randrange(256) for _ in range(300)),
        cbor2.dumps({44234: b"", 44241: b""}),
        "a string, not bytes",
    ],
)
def test_garbage(good: ct.BuiltToken, data: Any) -> None:
    with pytest.raises(MalformedToken):
        verify_cca_token(data, [good.platform_public_key])


def test_trailing_bytes(keys: dict[str, ec.EllipticCurvePrivateKey], good: ct.BuiltToken) -> None:
    with pytest.raises(MalformedToken, match=r"CCA token: 1 trailing byte"):
        verify_cca_token(good.token + b"\x00", [good.platform_public_key])
    # trailing bytes inside a signed payload are caught too
    built = build(keys, realm_extra_pairs=[])
    payload = ct.encode_map(built.realm_claims.items()) + b"\x00\x00"
    realm_cose = ct.cose_sign1(payload, built.rak)
    token = ct.tag(399, ct.encode_map([(44234, built.platform_cose), (44241, realm_cose)]))
    with pytest.raises(MalformedToken, match=r"realm token claims: 2 trailing byte"):
        verify_cca_token(token, [built.platform_public_key])


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"realm_extra_pairs": [(10, b"\x00" * 64)]}, "realm token claims: duplicate map key 10"),
        (
            {"realm_extra_pairs": [(ct.RawCBOR(b"\x19\xac\xcd"), b"\x04")]},
            "realm token claims: duplicate map key 44237",
        ),
        (
            {"platform_extra_pairs": [(2395, 0x3000)]},
            "platform token claims: duplicate map key 2395",
        ),
        (
            {"platform_protected_extra_pairs": [(1, -35)]},
            "platform token protected header: duplicate map key 1",
        ),
        (
            {"collection_extra_pairs": [(44234, b"\x00")]},
            "CCA token: duplicate map key 44234",
        ),
        (
            {"collection_tag": 907, "collection_extra_pairs": [(44241, [263, b"\x00"])]},
            "CCA token: duplicate map key 44241",
        ),
        ({"realm_extra_pairs": [("a", 1), ("a", 2)]}, "realm token claims: duplicate map key 'a'"),
    ],
)
def test_duplicate_map_keys(
    keys: dict[str, ec.EllipticCurvePrivateKey], knobs: dict[str, Any], message: str
) -> None:
    built = build(keys, **knobs)
    with pytest.raises(MalformedToken) as ei:
        verify(built)
    assert message in str(ei.value)
    assert "duplicate map key" in str(ei.value)


def test_duplicate_key_nested_in_software_component(
    keys: dict[str, ec.EllipticCurvePrivateKey],
) -> None:
    component = ct.RawCBOR(ct.encode_map([(1, "BL"), (2, b"\x01" * 32), (2, b"\x02" * 32)]))
    built = build(keys, platform_claims={2399: [component]})
    with pytest.raises(MalformedToken, match="platform token claims: duplicate map key 2"):
        verify(built)


def test_cbor_oddities_rejected(keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
    # value-sharing tag 28/29 (would alias values) inside claims
    shared = ct.RawCBOR(b"\xd8\x1c" + cbor2.dumps(b"\x01" * 32))
    with pytest.raises(MalformedToken, match="CBOR tag 28"):
        verify(build(keys, realm_claims={44238: shared}))
    # map keys must be ints or strings
    with pytest.raises(MalformedToken, match="must be an integer or a definite-length"):
        verify(build(keys, realm_extra_pairs=[(ct.RawCBOR(b"\xf9\x3c\x00"), 1)]))
    # absurd nesting
    deep = ct.RawCBOR(b"\x81" * 100 + b"\x00")
    with pytest.raises(MalformedToken, match="nesting deeper"):
        verify(build(keys, realm_extra_pairs=[(77777, deep)]))
    # invalid UTF-8 text and reserved initial byte
    with pytest.raises(MalformedToken, match="invalid CBOR"):
        verify(build(keys, realm_claims={44236: ct.RawCBOR(b"\x62\xc3\x28")}))
    with pytest.raises(MalformedToken, match="invalid CBOR initial byte 0x1c"):
        verify(build(keys, realm_claims={44236: ct.RawCBOR(b"\x1c")}))


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"collection_tag": 400}, "unknown collection tag 400"),
        ({"collection_keys": ("44234", "44241")}, "only integer keys 44234"),
        ({"collection_tag": 907, "cmw_content_format": 264}, "must be [263, bstr]"),
        ({"collection_extra_pairs": [(1, b"")]}, "unexpected collection key(s) [1]"),
        ({"collection_extra_pairs": [("__cmwc_t", "x")]}, "unexpected collection key"),
        ({"realm_unprotected": {2: [1]}}, "'crit' header (2) must be in the protected"),
        ({"realm_protected": {2: []}}, "'crit' header must be a non-empty array"),
        ({"platform_unprotected": {1: -35}}, "in both protected and unprotected"),
    ],
)
def test_structure_errors(
    keys: dict[str, ec.EllipticCurvePrivateKey], knobs: dict[str, Any], message: str
) -> None:
    with pytest.raises(MalformedToken) as ei:
        verify(build(keys, **knobs))
    assert message in str(ei.value)


def test_collection_and_cose_shapes(good: ct.BuiltToken) -> None:
    anchors = [good.platform_public_key]
    untagged = ct.encode_map([(44234, good.platform_cose), (44241, good.realm_cose)])
    with pytest.raises(MalformedToken, match="found untagged"):
        verify_cca_token(untagged, anchors)
    only_platform = ct.tag(399, ct.encode_map([(44234, good.platform_cose)]))
    with pytest.raises(MalformedToken, match=r"missing 44241 \(realm token\)"):
        verify_cca_token(only_platform, anchors)
    wrong_cose_tag = b"\xd1" + good.realm_cose[1:]  # tag 17 (COSE_Mac0) instead of 18
    token = ct.tag(399, ct.encode_map([(44234, good.platform_cose), (44241, wrong_cose_tag)]))
    with pytest.raises(MalformedToken, match="realm token: expected COSE_Sign1 \\(tag 18\\)"):
        verify_cca_token(token, anchors)
    three = cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b""]))
    token = ct.tag(399, ct.encode_map([(44234, three), (44241, good.realm_cose)]))
    with pytest.raises(MalformedToken, match="must be an array of 4 items"):
        verify_cca_token(token, anchors)
    detached = cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -35}), {}, None, b""]))
    token = ct.tag(399, ct.encode_map([(44234, good.platform_cose), (44241, detached)]))
    with pytest.raises(MalformedToken, match="detached COSE payload"):
        verify_cca_token(token, anchors)
    as_text = ct.tag(399, ct.encode_map([(44234, "x"), (44241, good.realm_cose)]))
    with pytest.raises(MalformedToken, match="must be a byte string holding COSE_Sign1"):
        verify_cca_token(as_text, anchors)


@pytest.mark.parametrize("claim", [10, 44235, 44236, 44237, 44238, 44239, 44240])
def test_missing_realm_claim(keys: dict[str, ec.EllipticCurvePrivateKey], claim: int) -> None:
    with pytest.raises(
        MalformedToken, match=f"realm token claims: missing mandatory claim {claim}"
    ):
        verify(build(keys, realm_claims={claim: ct.REMOVE}))


@pytest.mark.parametrize("claim", [10, 256, 2395, 2396, 2399])
def test_missing_platform_claim(keys: dict[str, ec.EllipticCurvePrivateKey], claim: int) -> None:
    with pytest.raises(
        MalformedToken, match=f"platform token claims: missing mandatory claim {claim}"
    ):
        verify(build(keys, platform_claims={claim: ct.REMOVE}))


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        (
            {"platform_claims": {2395: "secured"}},
            "claim 2395 (security lifecycle) must be an unsigned",
        ),
        ({"platform_claims": {2395: True}}, "must be an unsigned integer, got bool"),
        ({"platform_claims": {2395: -1}}, "must not be negative"),
        ({"realm_claims": {10: "nonce"}}, "claim 10 (challenge) must be a byte string"),
        ({"realm_claims": {44239: [b"\x00"] * 3}}, "must be an array of 4 byte strings"),
        ({"realm_claims": {44237: b""}}, "(public key) is empty"),
        (
            {"platform_claims": {2399: [{1: "BL"}]}},
            "software component #0: missing mandatory claim 2",
        ),
        ({"platform_claims": {2399: ["BL"]}}, "software component #0: must be a CBOR map"),
    ],
)
def test_wrong_claim_types(
    keys: dict[str, ec.EllipticCurvePrivateKey], knobs: dict[str, Any], message: str
) -> None:
    with pytest.raises(MalformedToken) as ei:
        verify(build(keys, **knobs))
    assert message in str(ei.value)


# --------------------------------------------------------------------------- binding, challenge


def test_binding_mismatch_with_valid_signatures(
    keys: dict[str, ec.EllipticCurvePrivateKey],
) -> None:
    built = build(keys, platform_claims={10: os.urandom(32)})
    with pytest.raises(
        BindingMismatch, match="platform challenge \\(claim 10\\) is not the sha-256"
    ):
        verify(built)
    # hashing under the wrong algorithm is a mismatch too (claim 44240 says sha-512)
    built = build(keys, bind=False, rak_hash_alg="sha-512")
    with pytest.raises(BindingMismatch, match="not the sha-512 hash"):
        verify(built)


def test_binding_covers_cose_key_bytes(keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
    rak = ct.generate_key("P-384")
    built = build(keys, rak=rak, rak_encoding="cose_key")
    digest = hashes.Hash(hashes.SHA256())
    digest.update(ct.cose_key_bytes(rak))
    assert verify(built).platform.challenge == digest.finalize()


def test_expected_challenge(good: ct.BuiltToken) -> None:
    assert verify(good, expected_challenge=good.challenge).realm.challenge == good.challenge
    with pytest.raises(ChallengeMismatch, match="does not equal the expected challenge"):
        verify(good, expected_challenge=b"\x00" * 64)


def test_all_errors_are_cca_errors() -> None:
    for cls in (
        MalformedToken,
        UnsupportedAlgorithm,
        SignatureInvalid,
        BindingMismatch,
        UntrustedPlatformKey,
        ChallengeMismatch,
        InvalidTrustAnchor,
    ):
        assert issubclass(cls, CCAError)


# --------------------------------------------------------------------------- trust anchors


def _jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    nums = key.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()

    return {"kty": "EC", "crv": crv, "x": b64(nums.x), "y": b64(nums.y)}


def _same(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePrivateKey) -> bool:
    return a.public_numbers() == b.public_key().public_numbers()


def test_parse_trust_anchor_formats(keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
    p256, p384, p521 = keys["P-256"], keys["P-384"], keys["P-521"]
    [k] = parse_trust_anchor(ct.public_pem(p384))
    assert _same(k, p384)
    both = parse_trust_anchor(ct.public_pem(p256) + b"\n" + ct.public_pem(p521))
    assert _same(both[0], p256) and _same(both[1], p521)
    der = p256.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert _same(parse_trust_anchor(der)[0], p256)
    [k] = parse_trust_anchor(json.dumps(_jwk(p521)).encode())
    assert _same(k, p521)
    jwks = parse_trust_anchor(json.dumps({"keys": [_jwk(p256), _jwk(p384)]}).encode())
    assert [_same(a, b) for a, b in zip(jwks, (p256, p384), strict=True)] == [True, True]
    veraison = [
        {"pkey": _jwk(p384), "implementation-id": "00" * 32, "instance-id": "01" + "00" * 32},
        {"pkey": _jwk(p256)},
    ]
    ta = parse_trust_anchor(json.dumps(veraison).encode())
    assert _same(ta[0], p384) and _same(ta[1], p256)


def test_parse_trust_anchor_certificate(keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
    key = keys["P-384"]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CPAK")])
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    [k] = parse_trust_anchor(cert.public_bytes(serialization.Encoding.PEM))
    assert _same(k, key)


def test_parse_trust_anchor_rejects(keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
    key = keys["P-256"]
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ed_pem = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    k1_pem = ct.public_pem(ec.generate_private_key(ec.SECP256K1()))
    jwk_with_d = {**_jwk(key), "d": "AAAA"}
    short = {**_jwk(key), "x": "AAAA"}
    cases: list[tuple[bytes, str]] = [
        (private_pem, "'PRIVATE KEY' is not a public key"),
        (ed_pem, "not an EC public key"),
        (k1_pem, "unsupported curve secp256k1"),
        (json.dumps(jwk_with_d).encode(), "contains a private key"),
        (json.dumps(short).encode(), "x/y must be 32 bytes"),
        (json.dumps({**_jwk(key), "kty": "RSA"}).encode(), "kty 'RSA' is not 'EC'"),
        (json.dumps({**_jwk(key), "crv": "P-192"}).encode(), "crv 'P-192'"),
        (json.dumps([]).encode(), "empty list"),
        (b"{not json", "invalid JSON"),
        (b"hello", "not PEM, DER, JWK"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA", "no complete block"),
    ]
    for data, message in cases:
        with pytest.raises(InvalidTrustAnchor) as ei:
            parse_trust_anchor(data)
        assert message in str(ei.value), (message, str(ei.value))
        assert isinstance(ei.value, ValueError)
