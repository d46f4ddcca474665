"""Internals of the CCA verifier: strict CBOR decoding and COSE_Sign1 (ECDSA) handling.

Strict decoding is a two-step process:

1. :func:`check_well_formed` walks the raw bytes once (no values are built) and rejects
   anything that is not exactly one well-formed CBOR data item: truncation, trailing bytes,
   reserved/invalid initial bytes, stray "break" codes, nesting deeper than
   :data:`MAX_DEPTH`, the cbor2 value-sharing / string-reference tags (25, 28, 29, 256, which
   would make the decoded value differ from the bytes as written), map keys that are not an
   integer or a definite-length text/byte string, and duplicate map keys. Keys are compared by
   (major type, value), so ``10`` encoded as ``0x0a`` and as ``0x18 0x0a`` are duplicates.
2. Only then is the item decoded with :func:`cbor2.loads` (with ``allow_duplicate_keys=False``
   too when the installed cbor2 supports it).

Parsing CBOR itself is left to cbor2 and all cryptography to ``cryptography``; the walk only
reads CBOR heads to find item boundaries.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attestation.cca_errors import MalformedToken, SignatureInvalid, UnsupportedAlgorithm

MAX_DEPTH = 32
# cbor2 gives these tags semantics that rewrite later values (string references, shared
# values, possibly cyclic): the decoded object would not be what the bytes say.
_DENIED_TAGS = frozenset({25, 28, 29, 256})
_BREAK = 0xFF

_LOADS_KW: dict[str, Any] = {}
try:
    if "allow_duplicate_keys" in inspect.signature(cbor2.loads).parameters:
        _LOADS_KW["allow_duplicate_keys"] = False
except (TypeError, ValueError):  # pragma: no cover - signature unavailable on some builds
    pass


# --------------------------------------------------------------------------- strict CBOR


def _truncated(what: str, pos: int) -> MalformedToken:
    return MalformedToken(f"{what}: truncated CBOR (data ends inside the item at offset {pos})")


def _head(data: bytes, pos: int, what: str) -> tuple[int, int, int | None, int]:
    """Read a CBOR head at ``pos``: (major type, additional info, argument or None, next pos)."""
    if pos >= len(data):
        raise _truncated(what, pos)
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        return major, info, info, pos
    if info <= 27:
        size = 1 << (info - 24)
        if pos + size > len(data):
            raise _truncated(what, pos)
        return major, info, int.from_bytes(data[pos : pos + size], "big"), pos + size
    if info == 31:
        return major, info, None, pos
    raise MalformedToken(f"{what}: invalid CBOR initial byte 0x{initial:02x} at offset {pos - 1}")


def _key_identity(data: bytes, pos: int, what: str) -> tuple[tuple[str, object], int]:
    major, _info, arg, end = _head(data, pos, what)
    if arg is not None:
        if major == 0:
            return ("int", arg), end
        if major == 1:
            return ("int", -1 - arg), end
        if major in (2, 3):
            if end + arg > len(data):
                raise _truncated(what, end)
            raw = data[end : end + arg]
            if major == 3:
                try:
                    return ("text", raw.decode("utf-8")), end + arg
                except UnicodeDecodeError:
                    raise MalformedToken(
                        f"{what}: map key at offset {pos} is not valid UTF-8"
                    ) from None
            return ("bytes", raw), end + arg
    raise MalformedToken(
        f"{what}: map key at offset {pos} must be an integer or a definite-length text/byte string"
    )


def _walk(data: bytes, pos: int, depth: int, what: str) -> int:
    """Validate one data item starting at ``pos``; return the offset just after it."""
    if depth > MAX_DEPTH:
        raise MalformedToken(f"{what}: CBOR nesting deeper than {MAX_DEPTH} at offset {pos}")
    start = pos
    major, info, arg, pos = _head(data, pos, what)
    if major in (0, 1):
        if arg is None:
            raise MalformedToken(f"{what}: invalid CBOR integer encoding at offset {start}")
        return pos
    if major in (2, 3):
        if arg is not None:
            if pos + arg > len(data):
                raise _truncated(what, start)
            return pos + arg
        while True:  # indefinite-length string: definite chunks of the same major type
            if pos >= len(data):
                raise _truncated(what, start)
            if data[pos] == _BREAK:
                return pos + 1
            chunk_major, _i, chunk_len, chunk_pos = _head(data, pos, what)
            if chunk_major != major or chunk_len is None:
                raise MalformedToken(f"{what}: invalid indefinite-length string chunk at {pos}")
            if chunk_pos + chunk_len > len(data):
                raise _truncated(what, start)
            pos = chunk_pos + chunk_len
    if major == 4:
        if arg is None:
            while True:
                if pos >= len(data):
                    raise _truncated(what, start)
                if data[pos] == _BREAK:
                    return pos + 1
                pos = _walk(data, pos, depth + 1, what)
        if arg > len(data) - pos:  # every element needs at least one byte
            raise _truncated(what, start)
        for _ in range(arg):
            pos = _walk(data, pos, depth + 1, what)
        return pos
    if major == 5:
        if arg is not None and 2 * arg > len(data) - pos:
            raise _truncated(what, start)
        seen: set[tuple[str, object]] = set()
        count = 0
        while arg is None or count < arg:
            if pos >= len(data):
                raise _truncated(what, start)
            if arg is None and data[pos] == _BREAK:
                return pos + 1
            key, value_pos = _key_identity(data, pos, what)
            if key in seen:
                raise MalformedToken(
                    f"{what}: duplicate map key {key[1]!r} at offset {pos} (map at {start})"
                )
            seen.add(key)
            pos = _walk(data, value_pos, depth + 1, what)
            count += 1
        return pos
    if major == 6:
        if arg is None:
            raise MalformedToken(f"{what}: invalid CBOR tag encoding at offset {start}")
        if arg in _DENIED_TAGS:
            raise MalformedToken(f"{what}: CBOR tag {arg} (value sharing) not allowed at {start}")
        return _walk(data, pos, depth + 1, what)
    # major 7: simple values and floats
    if info == 31:
        raise MalformedToken(f"{what}: unexpected CBOR break code at offset {start}")
    if info == 24 and arg is not None and arg < 32:
        raise MalformedToken(f"{what}: invalid two-byte simple value at offset {start}")
    return pos


def check_well_formed(data: bytes, what: str) -> None:
    """Raise :class:`MalformedToken` unless ``data`` is exactly one strict CBOR item."""
    if not data:
        raise MalformedToken(f"{what}: empty input, expected CBOR")
    end = _walk(data, 0, 0, what)
    if end != len(data):
        raise MalformedToken(
            f"{what}: {len(data) - end} trailing byte(s) after the CBOR item (at offset {end})"
        )


def strict_loads(data: object, what: str) -> Any:
    """Decode exactly one CBOR item, rejecting everything :func:`check_well_formed` rejects."""
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise MalformedToken(f"{what}: expected bytes, got {type(data).__name__}")
    check_well_formed(data, what)
    try:
        return cbor2.loads(data, **_LOADS_KW)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise MalformedToken(f"{what}: invalid CBOR: {exc}") from None


# --------------------------------------------------------------------------- COSE


@dataclass(frozen=True)
class CoseAlg:
    cose_id: int
    name: str
    curve: type[ec.EllipticCurve]
    curve_name: str
    coord_size: int

    def hash(self) -> hashes.HashAlgorithm:
        return _ALG_HASH[self.cose_id]()


ALGORITHMS: dict[int, CoseAlg] = {
    -7: CoseAlg(-7, "ES256", ec.SECP256R1, "P-256", 32),
    -35: CoseAlg(-35, "ES384", ec.SECP384R1, "P-384", 48),
    -36: CoseAlg(-36, "ES512", ec.SECP521R1, "P-521", 66),
}
_ALG_HASH: dict[int, type[hashes.HashAlgorithm]] = {
    -7: hashes.SHA256,
    -35: hashes.SHA384,
    -36: hashes.SHA512,
}
# COSE_Key crv values (RFC 9053) -> (curve, coordinate size)
COSE_CURVES: dict[int, tuple[ec.EllipticCurve, str, int]] = {
    1: (ec.SECP256R1(), "P-256", 32),
    2: (ec.SECP384R1(), "P-384", 48),
    3: (ec.SECP521R1(), "P-521", 66),
}
CURVE_NAMES: dict[str, str] = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

HDR_ALG, HDR_CRIT, HDR_CONTENT_TYPE, HDR_KID = 1, 2, 3, 4
# Header labels this verifier understands, so they may be listed in 'crit'.
_UNDERSTOOD_HEADERS = frozenset({HDR_ALG, HDR_CRIT, HDR_CONTENT_TYPE, HDR_KID})


def curve_name(key: ec.EllipticCurvePublicKey) -> str:
    return CURVE_NAMES.get(key.curve.name, key.curve.name)


@dataclass(frozen=True)
class CoseSign1:
    which: str  # "platform" or "realm"
    protected_bytes: bytes
    payload: bytes
    signature: bytes
    alg: CoseAlg

    @property
    def to_be_signed(self) -> bytes:
        """RFC 9052 Sig_structure for COSE_Sign1 with empty external AAD."""
        return cbor2.dumps(["Signature1", self.protected_bytes, b"", self.payload])

    def check_key_curve(self, key: ec.EllipticCurvePublicKey, key_desc: str) -> None:
        if not isinstance(key.curve, self.alg.curve):
            raise UnsupportedAlgorithm(
                f"{self.which} token uses {self.alg.name}, which requires a "
                f"{self.alg.curve_name} key, but {key_desc} is {curve_name(key)}"
            )

    def check_signature_length(self) -> None:
        expected = 2 * self.alg.coord_size
        if len(self.signature) != expected:
            raise SignatureInvalid(
                f"{self.which} token signature is {len(self.signature)} bytes; "
                f"{self.alg.name} needs {expected} (raw r||s)"
            )

    def verifies_with(self, key: ec.EllipticCurvePublicKey) -> bool:
        """True if the signature verifies with ``key`` (curve must already match the alg)."""
        size = self.alg.coord_size
        r = int.from_bytes(self.signature[:size], "big")
        s = int.from_bytes(self.signature[size:], "big")
        if r == 0 or s == 0:
            return False
        try:
            key.verify(encode_dss_signature(r, s), self.to_be_signed, ec.ECDSA(self.alg.hash()))
        except InvalidSignature:
            return False
        return True


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_cose_sign1(data: bytes, which: str) -> CoseSign1:
    """Decode and structurally check a COSE_Sign1 carrying an ECDSA-signed claims payload."""
    what = f"{which} token"
    obj = strict_loads(data, f"{what} (COSE_Sign1)")
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != 18:
            raise MalformedToken(f"{what}: expected COSE_Sign1 (tag 18), found CBOR tag {obj.tag}")
        obj = obj.value
    if not isinstance(obj, list | tuple) or len(obj) != 4:
        raise MalformedToken(
            f"{what}: COSE_Sign1 must be an array of 4 items "
            "[protected, unprotected, payload, signature]"
        )
    protected_bytes, unprotected, payload, signature = obj
    if not isinstance(protected_bytes, bytes):
        raise MalformedToken(f"{what}: COSE protected header must be a byte string")
    if not isinstance(unprotected, Mapping):
        raise MalformedToken(f"{what}: COSE unprotected header must be a map")
    if payload is None:
        raise MalformedToken(f"{what}: detached COSE payload is not supported")
    if not isinstance(payload, bytes):
        raise MalformedToken(f"{what}: COSE payload must be a byte string")
    if not isinstance(signature, bytes):
        raise MalformedToken(f"{what}: COSE signature must be a byte string")

    protected: Any = {}
    if protected_bytes:
        protected = strict_loads(protected_bytes, f"{what} protected header")
        if not isinstance(protected, Mapping):
            raise MalformedToken(f"{what}: COSE protected header must encode a map")
    both = set(protected) & set(unprotected)
    if both:
        raise MalformedToken(
            f"{what}: header label(s) {sorted(both, key=repr)} in both protected and "
            "unprotected headers"
        )
    if HDR_CRIT in unprotected:
        raise MalformedToken(f"{what}: 'crit' header (2) must be in the protected header")
    if HDR_CRIT in protected:
        crit = protected[HDR_CRIT]
        if (
            not isinstance(crit, list | tuple)
            or not crit
            or not all(_is_int(x) or isinstance(x, str) for x in crit)
        ):
            raise MalformedToken(f"{what}: 'crit' header must be a non-empty array of labels")
        unknown = [x for x in crit if x not in _UNDERSTOOD_HEADERS]
        if unknown:
            raise UnsupportedAlgorithm(
                f"{what}: unknown critical header parameter(s) {unknown!r} listed in 'crit'"
            )
        missing = [x for x in crit if x not in protected]
        if missing:
            raise MalformedToken(
                f"{what}: critical header(s) {missing!r} are not in the protected header"
            )

    if HDR_ALG not in protected:
        if HDR_ALG in unprotected:
            raise UnsupportedAlgorithm(f"{what}: 'alg' must be in the protected header")
        raise UnsupportedAlgorithm(f"{what}: protected header has no 'alg' (label 1)")
    alg_id = protected[HDR_ALG]
    alg = ALGORITHMS.get(alg_id) if _is_int(alg_id) else None
    if alg is None:
        raise UnsupportedAlgorithm(
            f"{what}: unsupported COSE alg {alg_id!r}; expected ES256 (-7), ES384 (-35) "
            "or ES512 (-36)"
        )
    return CoseSign1(which, protected_bytes, payload, signature, alg)


def parse_realm_public_key(raw: bytes, expected_alg: CoseAlg) -> ec.EllipticCurvePublicKey:
    """Parse claim 44237: raw SEC1 uncompressed point, or a CBOR-encoded COSE_Key (EC2)."""
    what = "realm claim 44237 (realm public key)"
    if raw[:1] == b"\x04":
        curves = {65: ec.SECP256R1(), 97: ec.SECP384R1(), 133: ec.SECP521R1()}
        curve = curves.get(len(raw))
        if curve is None:
            raise MalformedToken(
                f"{what}: uncompressed EC point of {len(raw)} bytes is not P-256/P-384/P-521"
            )
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, raw)
        except ValueError:
            raise MalformedToken(f"{what}: not a valid point on {curve.name}") from None
    key = strict_loads(raw, f"{what} as COSE_Key")
    if not isinstance(key, Mapping):
        raise MalformedToken(f"{what}: neither an uncompressed EC point nor a COSE_Key map")
    if -4 in key:
        raise MalformedToken(f"{what}: COSE_Key contains a private key (d)")
    if key.get(1) != 2:
        raise UnsupportedAlgorithm(f"{what}: COSE_Key kty {key.get(1)!r} is not EC2 (2)")
    crv = key.get(-1)
    if not _is_int(crv) or crv not in COSE_CURVES:
        raise UnsupportedAlgorithm(f"{what}: COSE_Key crv {crv!r} is not P-256/P-384/P-521")
    curve, name, size = COSE_CURVES[crv]
    x, y = key.get(-2), key.get(-3)
    if not isinstance(x, bytes) or not isinstance(y, bytes):
        raise MalformedToken(f"{what}: COSE_Key needs byte-string x (-2) and y (-3)")
    if len(x) != size or len(y) != size:
        raise MalformedToken(f"{what}: COSE_Key x/y must be {size} bytes for {name}")
    if 3 in key and key[3] != expected_alg.cose_id:
        raise UnsupportedAlgorithm(
            f"{what}: COSE_Key alg {key[3]!r} does not match the realm token alg "
            f"{expected_alg.name}"
        )
    try:
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
        )
        return numbers.public_key()
    except ValueError:
        raise MalformedToken(f"{what}: COSE_Key is not a valid point on {name}") from None
