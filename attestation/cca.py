"""Arm CCA attestation token verifier (the token format Huawei virtCCA confidential VMs emit).

A CCA token is a CBOR-tagged collection of two COSE_Sign1 tokens:

* **Collection** - tag 399 ``{44234: bstr platform, 44241: bstr realm}``, or tag 907 (CMW
  collection) ``{44234: [263, bstr], 44241: [263, bstr]}``. Only the integer keys 44234 and
  44241 are accepted (text keys such as ``"44234"`` are rejected); in a 907 collection the
  optional CMW ``"__cmwc_t"`` entry (text or byte string) is tolerated and ignored. Any other
  key, a missing key, or a CMW entry that is not exactly ``[263, bstr]`` is malformed.
* **COSE_Sign1** - optionally tag 18; ``alg`` must be in the protected header and be ES256,
  ES384 or ES512; ``crit`` may only list alg/crit/content-type/kid; a label may not appear in
  both header buckets; detached payloads are rejected.
* **Realm token** is signed by the RAK carried in realm claim 44237 (raw uncompressed point or
  CBOR-encoded COSE_Key EC2 map, both as a byte string). **Platform token** is signed by a
  trust anchor (CPAK). Platform challenge (claim 10) must equal the hash of the realm claim
  44237 bytes under the algorithm named in realm claim 44240.

Checks run in this order and each failure has its own exception (see
:mod:`attestation.cca_errors`): strict CBOR and structure (:class:`MalformedToken`), COSE headers
(:class:`UnsupportedAlgorithm`), claims (:class:`MalformedToken`), RAK curve vs alg
(:class:`UnsupportedAlgorithm`), platform signature (:class:`UntrustedPlatformKey`), realm
signature (:class:`SignatureInvalid`), binding (:class:`BindingMismatch`), expected challenge
(:class:`ChallengeMismatch`).

Platform key policy: anchors whose curve does not match the platform ``alg`` are skipped. If no
anchor verifies the platform signature - no anchors, none on the right curve, or none whose
signature checks - :class:`UntrustedPlatformKey` is raised. A token signed by an unknown key
and a trusted-key token altered after signing cannot be told apart, so both land there; the
class subclasses :class:`SignatureInvalid`. A platform signature of the wrong length for its alg
raises plain :class:`SignatureInvalid`. Unknown claims are ignored (forward compatibility).
"""

from __future__ import annotations

import base64
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation._cca_cose import (
    CURVE_NAMES,
    CoseSign1,
    parse_cose_sign1,
    parse_realm_public_key,
    strict_loads,
)
from attestation.cca_errors import (
    BindingMismatch,
    CCAError,
    ChallengeMismatch,
    InvalidTrustAnchor,
    MalformedToken,
    SignatureInvalid,
    UnsupportedAlgorithm,
    UntrustedPlatformKey,
)

__all__ = [
    "COLLECTION_TAG_CMW",
    "COLLECTION_TAG_LEGACY",
    "BindingMismatch",
    "CCAError",
    "CCAToken",
    "ChallengeMismatch",
    "InvalidTrustAnchor",
    "MalformedToken",
    "PlatformClaims",
    "RealmClaims",
    "SignatureInvalid",
    "SoftwareComponent",
    "UnsupportedAlgorithm",
    "UntrustedPlatformKey",
    "parse_trust_anchor",
    "verify_cca_token",
]

COLLECTION_TAG_LEGACY = 399
COLLECTION_TAG_CMW = 907
CMW_CONTENT_FORMAT_EAT_CWT = 263
KEY_PLATFORM_TOKEN = 44234
KEY_REALM_TOKEN = 44241

# Claim keys
CLAIM_CHALLENGE = 10
CLAIM_PROFILE = 265
REALM_PERSONALIZATION = 44235
REALM_HASH_ALG = 44236
REALM_PUBLIC_KEY = 44237
REALM_INITIAL_MEASUREMENT = 44238
REALM_EXTENSIBLE_MEASUREMENTS = 44239
REALM_PUBLIC_KEY_HASH_ALG = 44240
PLAT_INSTANCE_ID = 256
PLAT_LIFECYCLE = 2395
PLAT_IMPLEMENTATION_ID = 2396
PLAT_SW_COMPONENTS = 2399
PLAT_VERIFICATION_SERVICE = 2400
PLAT_CONFIG = 2401
PLAT_HASH_ALG = 2402

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha-256": hashes.SHA256,
    "sha-384": hashes.SHA384,
    "sha-512": hashes.SHA512,
}


@dataclass(frozen=True)
class SoftwareComponent:
    measurement_type: str | None
    measurement_value: bytes
    version: str | None
    signer_id: bytes | None
    hash_algorithm: str | None


@dataclass(frozen=True)
class RealmClaims:
    challenge: bytes
    personalization_value: bytes
    initial_measurement: bytes
    extensible_measurements: tuple[bytes, ...]
    hash_algorithm: str
    public_key: bytes
    public_key_hash_algorithm: str
    profile: str | None


@dataclass(frozen=True)
class PlatformClaims:
    challenge: bytes
    implementation_id: bytes
    instance_id: bytes
    profile: str | None
    security_lifecycle: int
    software_components: tuple[SoftwareComponent, ...]
    verification_service: str | None
    hash_algorithm: str | None
    config: bytes | None


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    return value


@dataclass(frozen=True)
class CCAToken:
    platform: PlatformClaims
    realm: RealmClaims
    collection_tag: int  # 399 or 907

    def to_json_dict(self) -> dict[str, object]:
        """Plain JSON-serialisable dict; byte strings become lowercase hex."""
        return {
            "collection_tag": self.collection_tag,
            "platform": _jsonable(self.platform),
            "realm": _jsonable(self.realm),
        }


# --------------------------------------------------------------------------- claims


class _Claims:
    """Typed access to a decoded claims map, raising MalformedToken that names the claim."""

    def __init__(self, raw: Any, what: str, names: Mapping[int, str]) -> None:
        if not isinstance(raw, Mapping):
            raise MalformedToken(f"{what}: must be a CBOR map of claims")
        self.raw = raw
        self.what = what
        self.names = names

    def _label(self, key: int) -> str:
        name = self.names.get(key)
        return f"{key} ({name})" if name else str(key)

    def _get(self, key: int, types: tuple[type, ...], type_desc: str, required: bool) -> Any:
        if key not in self.raw:
            if required:
                raise MalformedToken(f"{self.what}: missing mandatory claim {self._label(key)}")
            return None
        value = self.raw[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise MalformedToken(
                f"{self.what}: claim {self._label(key)} must be {type_desc}, "
                f"got {type(value).__name__}"
            )
        return value

    def bstr(self, key: int, required: bool = True) -> Any:
        return self._get(key, (bytes,), "a byte string", required)

    def tstr(self, key: int, required: bool = True) -> Any:
        return self._get(key, (str,), "a text string", required)

    def uint(self, key: int, required: bool = True) -> Any:
        value = self._get(key, (int,), "an unsigned integer", required)
        if value is not None and value < 0:
            raise MalformedToken(f"{self.what}: claim {self._label(key)} must not be negative")
        return value

    def array(self, key: int, required: bool = True) -> Any:
        return self._get(key, (list, tuple), "an array", required)


_REALM_NAMES = {
    CLAIM_CHALLENGE: "challenge",
    CLAIM_PROFILE: "profile",
    REALM_PERSONALIZATION: "personalization value",
    REALM_HASH_ALG: "hash algorithm id",
    REALM_PUBLIC_KEY: "public key",
    REALM_INITIAL_MEASUREMENT: "initial measurement",
    REALM_EXTENSIBLE_MEASUREMENTS: "extensible measurements",
    REALM_PUBLIC_KEY_HASH_ALG: "public key hash algorithm",
}
_PLATFORM_NAMES = {
    CLAIM_CHALLENGE: "challenge",
    CLAIM_PROFILE: "profile",
    PLAT_INSTANCE_ID: "instance id",
    PLAT_LIFECYCLE: "security lifecycle",
    PLAT_IMPLEMENTATION_ID: "implementation id",
    PLAT_SW_COMPONENTS: "software components",
    PLAT_VERIFICATION_SERVICE: "verification service",
    PLAT_CONFIG: "config",
    PLAT_HASH_ALG: "hash algorithm id",
}
_SWC_NAMES = {
    1: "measurement type",
    2: "measurement value",
    4: "version",
    5: "signer id",
    6: "hash algorithm",
}


def _realm_claims(payload: bytes) -> RealmClaims:
    what = "realm token claims"
    c = _Claims(strict_loads(payload, what), what, _REALM_NAMES)
    challenge = c.bstr(CLAIM_CHALLENGE)
    personalization = c.bstr(REALM_PERSONALIZATION)
    initial = c.bstr(REALM_INITIAL_MEASUREMENT)
    rems = c.array(REALM_EXTENSIBLE_MEASUREMENTS)
    if len(rems) != 4 or not all(isinstance(m, bytes) for m in rems):
        raise MalformedToken(
            f"{what}: claim {REALM_EXTENSIBLE_MEASUREMENTS} (extensible measurements) must be "
            f"an array of 4 byte strings"
        )
    hash_alg = c.tstr(REALM_HASH_ALG)
    public_key = c.bstr(REALM_PUBLIC_KEY)
    if not public_key:
        raise MalformedToken(f"{what}: claim {REALM_PUBLIC_KEY} (public key) is empty")
    pk_hash_alg = c.tstr(REALM_PUBLIC_KEY_HASH_ALG)
    profile = c.tstr(CLAIM_PROFILE, required=False)
    return RealmClaims(
        challenge=challenge,
        personalization_value=personalization,
        initial_measurement=initial,
        extensible_measurements=tuple(rems),
        hash_algorithm=hash_alg,
        public_key=public_key,
        public_key_hash_algorithm=pk_hash_alg,
        profile=profile,
    )


def _software_component(raw: Any, index: int) -> SoftwareComponent:
    what = f"platform token claims: software component #{index}"
    c = _Claims(raw, what, _SWC_NAMES)
    return SoftwareComponent(
        measurement_type=c.tstr(1, required=False),
        measurement_value=c.bstr(2),
        version=c.tstr(4, required=False),
        signer_id=c.bstr(5, required=False),
        hash_algorithm=c.tstr(6, required=False),
    )


def _platform_claims(payload: bytes) -> PlatformClaims:
    what = "platform token claims"
    c = _Claims(strict_loads(payload, what), what, _PLATFORM_NAMES)
    challenge = c.bstr(CLAIM_CHALLENGE)
    implementation_id = c.bstr(PLAT_IMPLEMENTATION_ID)
    instance_id = c.bstr(PLAT_INSTANCE_ID)
    lifecycle = c.uint(PLAT_LIFECYCLE)
    components = c.array(PLAT_SW_COMPONENTS)
    return PlatformClaims(
        challenge=challenge,
        implementation_id=implementation_id,
        instance_id=instance_id,
        profile=c.tstr(CLAIM_PROFILE, required=False),
        security_lifecycle=lifecycle,
        software_components=tuple(_software_component(m, i) for i, m in enumerate(components)),
        verification_service=c.tstr(PLAT_VERIFICATION_SERVICE, required=False),
        hash_algorithm=c.tstr(PLAT_HASH_ALG, required=False),
        config=c.bstr(PLAT_CONFIG, required=False),
    )


# --------------------------------------------------------------------------- collection


def _unwrap_collection(token: object) -> tuple[int, bytes, bytes]:
    outer = strict_loads(token, "CCA token")
    if not isinstance(outer, cbor2.CBORTag):
        raise MalformedToken(
            "CCA token: expected a CBOR tag 399 or 907 collection, found untagged "
            f"{type(outer).__name__}"
        )
    tag = outer.tag
    if tag not in (COLLECTION_TAG_LEGACY, COLLECTION_TAG_CMW):
        raise MalformedToken(f"CCA token: unknown collection tag {tag}; expected 399 or 907")
    body = outer.value
    if not isinstance(body, Mapping):
        raise MalformedToken(f"CCA token: tag {tag} collection must be a map")
    entries = dict(body)
    if tag == COLLECTION_TAG_CMW and "__cmwc_t" in entries:
        if not isinstance(entries["__cmwc_t"], str | bytes):
            raise MalformedToken("CCA token: CMW '__cmwc_t' must be a text or byte string")
        del entries["__cmwc_t"]
    expected = {KEY_PLATFORM_TOKEN, KEY_REALM_TOKEN}
    extra = [k for k in entries if k not in expected or isinstance(k, bool)]
    if extra:
        raise MalformedToken(
            f"CCA token: unexpected collection key(s) {extra!r}; only integer keys 44234 "
            "(platform) and 44241 (realm) are accepted"
        )
    missing = sorted(expected - set(entries))
    if missing:
        names = {KEY_PLATFORM_TOKEN: "platform", KEY_REALM_TOKEN: "realm"}
        raise MalformedToken(
            "CCA token: collection is missing "
            + ", ".join(f"{k} ({names[k]} token)" for k in missing)
        )

    def member(key: int, which: str) -> bytes:
        value = entries[key]
        if tag == COLLECTION_TAG_CMW:
            if (
                not isinstance(value, list | tuple)
                or len(value) != 2
                or value[0] != CMW_CONTENT_FORMAT_EAT_CWT
                or isinstance(value[0], bool)
            ):
                raise MalformedToken(
                    f"CCA token: tag 907 {which} entry (key {key}) must be [263, bstr]"
                )
            value = value[1]
        if not isinstance(value, bytes):
            raise MalformedToken(
                f"CCA token: {which} entry (key {key}) must be a byte string holding COSE_Sign1"
            )
        return value

    return tag, member(KEY_PLATFORM_TOKEN, "platform"), member(KEY_REALM_TOKEN, "realm")


# --------------------------------------------------------------------------- verification


def _verify_platform(cose: CoseSign1, trust_anchors: Sequence[ec.EllipticCurvePublicKey]) -> None:
    cose.check_signature_length()
    if not trust_anchors:
        raise UntrustedPlatformKey("platform token: no trust anchors were supplied")
    candidates = [
        k
        for k in trust_anchors
        if isinstance(k, ec.EllipticCurvePublicKey) and isinstance(k.curve, cose.alg.curve)
    ]
    if not candidates:
        raise UntrustedPlatformKey(
            f"platform token is signed with {cose.alg.name} ({cose.alg.curve_name}) but none of "
            f"the {len(trust_anchors)} trust anchor(s) is a {cose.alg.curve_name} key"
        )
    if any(cose.verifies_with(k) for k in candidates):
        return
    raise UntrustedPlatformKey(
        f"platform token signature does not verify with any of the {len(candidates)} "
        f"{cose.alg.curve_name} trust anchor(s): signed by an untrusted key, or the platform "
        "token was altered"
    )


def verify_cca_token(
    token: bytes,
    trust_anchors: Sequence[ec.EllipticCurvePublicKey],
    *,
    expected_challenge: bytes | None = None,
) -> CCAToken:
    """Verify a CCA attestation token and return its claims; raise a :class:`CCAError`."""
    if expected_challenge is not None and not isinstance(
        expected_challenge, bytes | bytearray | memoryview
    ):
        raise TypeError("expected_challenge must be bytes or None")
    tag, platform_bytes, realm_bytes = _unwrap_collection(token)
    platform_cose = parse_cose_sign1(platform_bytes, "platform")
    realm_cose = parse_cose_sign1(realm_bytes, "realm")
    platform = _platform_claims(platform_cose.payload)
    realm = _realm_claims(realm_cose.payload)

    rak = parse_realm_public_key(realm.public_key, realm_cose.alg)
    realm_cose.check_key_curve(rak, "the realm public key (claim 44237)")

    _verify_platform(platform_cose, trust_anchors)

    realm_cose.check_signature_length()
    if not realm_cose.verifies_with(rak):
        raise SignatureInvalid(
            "realm token signature does not verify with the realm public key (claim 44237)"
        )

    hash_cls = _HASHES.get(realm.public_key_hash_algorithm)
    if hash_cls is None:
        raise UnsupportedAlgorithm(
            f"realm claim 44240 (public key hash algorithm) {realm.public_key_hash_algorithm!r} "
            f"is not one of {sorted(_HASHES)}"
        )
    digest = hashes.Hash(hash_cls())
    digest.update(realm.public_key)
    rak_hash = digest.finalize()
    if not hmac.compare_digest(rak_hash, platform.challenge):
        raise BindingMismatch(
            "platform challenge (claim 10) is not the "
            f"{realm.public_key_hash_algorithm} hash of the realm public key (claim 44237): "
            f"expected {rak_hash.hex()}, token has {platform.challenge.hex()}"
        )

    if expected_challenge is not None and not hmac.compare_digest(
        bytes(expected_challenge), realm.challenge
    ):
        raise ChallengeMismatch(
            f"realm challenge (claim 10) {realm.challenge.hex()} does not equal the expected "
            f"challenge {bytes(expected_challenge).hex()}"
        )
    return CCAToken(platform=platform, realm=realm, collection_tag=tag)


def parse_cca_token_unverified(token: bytes) -> CCAToken:
    """Decode a CCA token's claims WITHOUT checking any signature or binding.

    Only for an attester reading the token its own kernel just produced (to learn its own realm
    initial measurement); a relying party must use :func:`verify_cca_token`. Raises
    :class:`CCAError` for a malformed token.
    """
    tag, platform_bytes, realm_bytes = _unwrap_collection(token)
    platform = _platform_claims(parse_cose_sign1(platform_bytes, "platform").payload)
    realm = _realm_claims(parse_cose_sign1(realm_bytes, "realm").payload)
    return CCAToken(platform=platform, realm=realm, collection_tag=tag)


# --------------------------------------------------------------------------- trust anchors

_JWK_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s.*?-----END \1-----", re.DOTALL)


def _check_ec(key: object, where: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidTrustAnchor(f"{where}: not an EC public key ({type(key).__name__})")
    if key.curve.name not in CURVE_NAMES:
        raise InvalidTrustAnchor(f"{where}: unsupported curve {key.curve.name}")
    return key


def _b64url(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidTrustAnchor(f"{where}: must be a base64url string")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        raise InvalidTrustAnchor(f"{where}: invalid base64url") from None


def _jwk(obj: object, where: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(obj, dict):
        raise InvalidTrustAnchor(f"{where}: JWK must be a JSON object")
    if obj.get("kty") != "EC":
        raise InvalidTrustAnchor(f"{where}: JWK kty {obj.get('kty')!r} is not 'EC'")
    crv = obj.get("crv")
    if crv not in _JWK_CURVES:
        raise InvalidTrustAnchor(f"{where}: JWK crv {crv!r} is not P-256/P-384/P-521")
    if "d" in obj:
        raise InvalidTrustAnchor(f"{where}: JWK contains a private key ('d'); give the public key")
    curve, size = _JWK_CURVES[crv]
    x, y = _b64url(obj.get("x"), f"{where}.x"), _b64url(obj.get("y"), f"{where}.y")
    if len(x) != size or len(y) != size:
        raise InvalidTrustAnchor(f"{where}: JWK x/y must be {size} bytes for {crv}")
    try:
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
        )
        return numbers.public_key()
    except ValueError:
        raise InvalidTrustAnchor(f"{where}: JWK is not a valid point on {crv}") from None


def _json_anchor(obj: object, where: str) -> list[ec.EllipticCurvePublicKey]:
    if isinstance(obj, list):
        if not obj:
            raise InvalidTrustAnchor(f"{where}: empty list")
        keys: list[ec.EllipticCurvePublicKey] = []
        for i, item in enumerate(obj):
            keys.extend(_json_anchor(item, f"{where}[{i}]"))
        return keys
    if isinstance(obj, dict):
        if "keys" in obj:
            return _json_anchor(obj["keys"], f"{where}.keys")
        if "pkey" in obj:  # Veraison trust-anchor entry
            return [_jwk(obj["pkey"], f"{where}.pkey")]
        return [_jwk(obj, where)]
    raise InvalidTrustAnchor(f"{where}: expected a JWK, JWK Set or list of {{'pkey': JWK}}")


def parse_trust_anchor(data: bytes) -> list[ec.EllipticCurvePublicKey]:
    """Parse platform trust anchors (EC P-256/P-384/P-521 public keys).

    Accepts: one or more PEM blocks (``PUBLIC KEY`` or ``CERTIFICATE``), DER
    SubjectPublicKeyInfo, a JWK (kty EC), a JWK Set ``{"keys": [...]}``, or the Veraison
    list ``[{"pkey": JWK, ...}, ...]``. Raises :class:`InvalidTrustAnchor` on anything else,
    including private keys.
    """
    if isinstance(data, str):
        data = data.encode()
    data = bytes(data)
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        keys: list[ec.EllipticCurvePublicKey] = []
        for n, match in enumerate(_PEM_BLOCK.finditer(text)):
            kind, block, where = match.group(1), match.group(0), f"PEM block #{n}"
            try:
                if kind == b"PUBLIC KEY":
                    key: object = serialization.load_pem_public_key(block)
                elif kind == b"CERTIFICATE":
                    key = x509.load_pem_x509_certificate(block).public_key()
                else:
                    raise InvalidTrustAnchor(
                        f"{where}: {kind.decode()!r} is not a public key or certificate"
                    )
            except ValueError as exc:
                if isinstance(exc, InvalidTrustAnchor):
                    raise
                raise InvalidTrustAnchor(f"{where}: cannot parse: {exc}") from None
            keys.append(_check_ec(key, where))
        if not keys:
            raise InvalidTrustAnchor("trust anchor: PEM data holds no complete block")
        return keys
    if text[:1] in (b"{", b"["):
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise InvalidTrustAnchor(f"trust anchor: invalid JSON: {exc}") from None
        return _json_anchor(obj, "trust anchor")
    if data[:1] == b"\x30":
        try:
            key = serialization.load_der_public_key(data)
        except ValueError as exc:
            raise InvalidTrustAnchor(f"trust anchor: cannot parse DER public key: {exc}") from None
        return [_check_ec(key, "trust anchor")]
    raise InvalidTrustAnchor("trust anchor: not PEM, DER, JWK, JWK Set or a Veraison TA list")
