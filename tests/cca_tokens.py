"""Build Arm CCA attestation tokens with locally generated keys, for tests and simulated attesters.

Everything is signed for real (ECDSA via ``cryptography``, CBOR via ``cbor2``); the knobs on
:func:`build_cca_token` let a test break exactly one thing:

* claim overrides applied *before* signing (``platform_claims`` / ``realm_claims``; use
  :data:`REMOVE` to drop a claim) - the token stays correctly signed;
* claim tampering applied *after* signing (``tamper_platform_claims`` / ``tamper_realm_claims``)
  and signature corruption (``corrupt_*_signature``) - the signature no longer matches;
* extra raw map entries (``*_extra_pairs``), which may repeat an existing key, for the claims
  maps, the protected headers and the outer collection - duplicates are signed, so the only
  defect is the duplicate itself. Wrap pre-encoded CBOR in :class:`RawCBOR`;
* COSE header overrides (``*_alg``, ``*_protected``, ``*_unprotected``, ``tag_cose``);
* collection shape (``collection_tag`` 399 / 907, ``cmw_content_format``) and RAK encoding
  (``rak_encoding`` ``"raw"`` point or ``"cose_key"``), RAK hash algorithm, and binding.

Example::

    built = build_cca_token(curve="P-384", collection_tag=907)
    verify_cca_token(built.token, [built.platform_public_key],
                     expected_challenge=built.challenge)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

__all__ = [
    "REMOVE",
    "BuiltToken",
    "RawCBOR",
    "build_cca_token",
    "cose_key_bytes",
    "cose_sign1",
    "default_platform_claims",
    "default_realm_claims",
    "encode_map",
    "generate_key",
    "public_pem",
    "raw_point",
    "tag",
]

CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
ALG_FOR_CURVE = {"secp256r1": -7, "secp384r1": -35, "secp521r1": -36}
COSE_CRV_FOR_CURVE = {"secp256r1": 1, "secp384r1": 2, "secp521r1": 3}
HASH_FOR_ALG: dict[int, type[hashes.HashAlgorithm]] = {
    -7: hashes.SHA256,
    -35: hashes.SHA384,
    -36: hashes.SHA512,
}
HASH_BY_NAME: dict[str, type[hashes.HashAlgorithm]] = {
    "sha-256": hashes.SHA256,
    "sha-384": hashes.SHA384,
    "sha-512": hashes.SHA512,
}


class _Remove:
    def __repr__(self) -> str:
        return "REMOVE"


REMOVE: Any = _Remove()
"""Use as a value in a claim/header override mapping to delete that key."""


@dataclass(frozen=True)
class RawCBOR:
    """Pre-encoded CBOR inserted verbatim (e.g. a non-minimally encoded key)."""

    data: bytes


def generate_key(curve: str = "P-384") -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVES[curve])


def raw_point(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def cose_key_bytes(
    key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey,
    *,
    extra: Mapping[int, Any] | None = None,
) -> bytes:
    """CBOR-encoded COSE_Key (kty EC2) for the public half of ``key``."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    size = (pub.curve.key_size + 7) // 8
    nums = pub.public_numbers()
    cose: dict[int, Any] = {
        1: 2,
        -1: COSE_CRV_FOR_CURVE[pub.curve.name],
        -2: nums.x.to_bytes(size, "big"),
        -3: nums.y.to_bytes(size, "big"),
    }
    _apply(cose, extra)
    return cbor2.dumps(cose)


def public_pem(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | info]) + n.to_bytes(size, "big")
    raise ValueError("argument too large")


def _raw_default(encoder: Any, value: object) -> None:
    if not isinstance(value, RawCBOR):
        raise cbor2.CBOREncodeError(f"cannot encode {type(value).__name__}")
    encoder.write(value.data)


def _enc(value: object) -> bytes:
    """cbor2 encoding, with :class:`RawCBOR` (at any depth) written verbatim."""
    return value.data if isinstance(value, RawCBOR) else cbor2.dumps(value, default=_raw_default)


def encode_map(pairs: Iterable[tuple[object, object]]) -> bytes:
    """Encode a CBOR map from (key, value) pairs in order; repeated keys are kept."""
    items = list(pairs)
    return _head(5, len(items)) + b"".join(_enc(k) + _enc(v) for k, v in items)


def tag(number: int, encoded_content: bytes) -> bytes:
    return _head(6, number) + encoded_content


def _apply(target: dict[Any, Any], overrides: Mapping[Any, Any] | None) -> None:
    for k, v in (overrides or {}).items():
        if v is REMOVE:
            target.pop(k, None)
        else:
            target[k] = v


def _sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes, alg: int) -> bytes:
    default = ALG_FOR_CURVE.get(key.curve.name, -35)
    hash_cls = HASH_FOR_ALG.get(alg, HASH_FOR_ALG[default])
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hash_cls())))
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def cose_sign1(
    payload: bytes,
    key: ec.EllipticCurvePrivateKey,
    *,
    alg: Any = None,
    protected: Mapping[Any, Any] | None = None,
    protected_extra_pairs: Sequence[tuple[object, object]] = (),
    protected_bytes: bytes | None = None,
    unprotected: Mapping[Any, Any] | None = None,
    tagged: bool = True,
    payload_after_signing: bytes | None = None,
    corrupt_signature: bool = False,
) -> bytes:
    """COSE_Sign1 over ``payload``. ``alg`` defaults to the one matching the key's curve."""
    alg_value = ALG_FOR_CURVE[key.curve.name] if alg is None else alg
    if protected_bytes is None:
        headers: dict[Any, Any] = {1: alg_value}
        _apply(headers, protected)
        protected_bytes = encode_map([*headers.items(), *protected_extra_pairs])
    to_be_signed = cbor2.dumps(["Signature1", protected_bytes, b"", payload])
    signature = _sign_raw(key, to_be_signed, alg_value if isinstance(alg_value, int) else 0)
    if corrupt_signature:
        signature = bytes([signature[0] ^ 0x01]) + signature[1:]
    body = (
        _head(4, 4)
        + cbor2.dumps(protected_bytes)
        + encode_map((unprotected or {}).items())
        + cbor2.dumps(payload if payload_after_signing is None else payload_after_signing)
        + cbor2.dumps(signature)
    )
    return tag(18, body) if tagged else body


def default_platform_claims(challenge: bytes) -> dict[int, Any]:
    sw = [
        {1: name, 2: bytes([i]) * 32, 4: f"1.{i}", 5: bytes([0xA0 + i]) * 32, 6: "sha-256"}
        for i, name in enumerate(("BL", "M1", "RMM"), start=1)
    ]
    return {
        265: "tag:arm.com,2023:cca_platform#1.0.0",
        10: challenge,
        2396: bytes(range(32)),
        256: b"\x01" + bytes(range(32, 64)),
        2401: b"\xcf" * 4,
        2395: 0x3000,
        2402: "sha-256",
        2399: sw,
        2400: "https://verifier.example/cca",
    }


def default_realm_claims(challenge: bytes, rak_bytes: bytes, rak_hash_alg: str) -> dict[int, Any]:
    return {
        265: "tag:arm.com,2023:realm#1.0.0",
        10: challenge,
        44235: b"\x50" * 64,
        44236: "sha-256",
        44237: rak_bytes,
        44238: b"\x11" * 32,
        44239: [bytes([0x20 + i]) * 32 for i in range(4)],
        44240: rak_hash_alg,
    }


@dataclass(frozen=True)
class BuiltToken:
    token: bytes
    platform_key: ec.EllipticCurvePrivateKey
    rak: ec.EllipticCurvePrivateKey
    platform_claims: dict[int, Any]
    realm_claims: dict[int, Any]
    platform_cose: bytes
    realm_cose: bytes
    collection_tag: int

    @property
    def platform_public_key(self) -> ec.EllipticCurvePublicKey:
        return self.platform_key.public_key()

    @property
    def challenge(self) -> bytes:
        value = self.realm_claims.get(10)
        return value if isinstance(value, bytes) else b""


def build_cca_token(
    *,
    curve: str = "P-384",
    platform_key: ec.EllipticCurvePrivateKey | None = None,
    rak: ec.EllipticCurvePrivateKey | None = None,
    challenge: bytes | None = None,
    collection_tag: int = 399,
    cmw_content_format: Any = 263,
    rak_encoding: Literal["raw", "cose_key"] = "raw",
    rak_public_bytes: bytes | None = None,
    rak_hash_alg: str = "sha-256",
    bind: bool = True,
    platform_alg: Any = None,
    realm_alg: Any = None,
    platform_claims: Mapping[int, Any] | None = None,
    realm_claims: Mapping[int, Any] | None = None,
    platform_extra_pairs: Sequence[tuple[object, object]] = (),
    realm_extra_pairs: Sequence[tuple[object, object]] = (),
    tamper_platform_claims: Mapping[int, Any] | None = None,
    tamper_realm_claims: Mapping[int, Any] | None = None,
    corrupt_platform_signature: bool = False,
    corrupt_realm_signature: bool = False,
    platform_protected: Mapping[Any, Any] | None = None,
    realm_protected: Mapping[Any, Any] | None = None,
    platform_protected_extra_pairs: Sequence[tuple[object, object]] = (),
    realm_protected_extra_pairs: Sequence[tuple[object, object]] = (),
    platform_unprotected: Mapping[Any, Any] | None = None,
    realm_unprotected: Mapping[Any, Any] | None = None,
    tag_cose: bool = True,
    collection_extra_pairs: Sequence[tuple[object, object]] = (),
    collection_keys: tuple[object, object] = (44234, 44241),
) -> BuiltToken:
    """Build a signed CCA token; every keyword is a knob (see the module docstring).

    ``curve`` picks the curve for keys not given. With ``bind`` the platform challenge is the
    ``rak_hash_alg`` hash of the realm public-key claim bytes (override claim 10 to break it).
    """
    platform_key = platform_key or generate_key(curve)
    rak = rak or generate_key(curve)
    challenge = os.urandom(64) if challenge is None else challenge
    if rak_public_bytes is None:
        rak_public_bytes = raw_point(rak) if rak_encoding == "raw" else cose_key_bytes(rak)

    realm = default_realm_claims(challenge, rak_public_bytes, rak_hash_alg)
    _apply(realm, realm_claims)
    rak_claim = realm.get(44237)
    binding = b"\x00" * 32
    if bind and isinstance(rak_claim, bytes):
        h = hashes.Hash(HASH_BY_NAME.get(rak_hash_alg, hashes.SHA256)())
        h.update(rak_claim)
        binding = h.finalize()
    platform = default_platform_claims(binding)
    _apply(platform, platform_claims)

    def payloads(
        claims: dict[int, Any], extra: Sequence[tuple[object, object]], tamper: Mapping | None
    ) -> tuple[bytes, bytes | None]:
        signed = encode_map([*claims.items(), *extra])
        if tamper is None:
            return signed, None
        altered = dict(claims)
        _apply(altered, tamper)
        return signed, encode_map([*altered.items(), *extra])

    p_signed, p_sent = payloads(platform, platform_extra_pairs, tamper_platform_claims)
    r_signed, r_sent = payloads(realm, realm_extra_pairs, tamper_realm_claims)
    platform_cose = cose_sign1(
        p_signed,
        platform_key,
        alg=platform_alg,
        protected=platform_protected,
        protected_extra_pairs=platform_protected_extra_pairs,
        unprotected=platform_unprotected,
        tagged=tag_cose,
        payload_after_signing=p_sent,
        corrupt_signature=corrupt_platform_signature,
    )
    realm_cose = cose_sign1(
        r_signed,
        rak,
        alg=realm_alg,
        protected=realm_protected,
        protected_extra_pairs=realm_protected_extra_pairs,
        unprotected=realm_unprotected,
        tagged=tag_cose,
        payload_after_signing=r_sent,
        corrupt_signature=corrupt_realm_signature,
    )

    def entry(cose: bytes) -> object:
        if collection_tag == 907:
            return [cmw_content_format, cose]
        return cose

    collection = encode_map(
        [
            (collection_keys[0], entry(platform_cose)),
            (collection_keys[1], entry(realm_cose)),
            *collection_extra_pairs,
        ]
    )
    return BuiltToken(
        token=tag(collection_tag, collection),
        platform_key=platform_key,
        rak=rak,
        platform_claims=platform,
        realm_claims=realm,
        platform_cose=platform_cose,
        realm_cose=realm_cose,
        collection_tag=collection_tag,
    )
