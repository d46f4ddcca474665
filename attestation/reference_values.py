"""Reference values: what the relying party (edge or broker) accepts. YAML or JSON file.

```yaml
version: 1
simulation: allow            # allow | forbid  (forbid is the default: real hardware only)
tee_types: [sim-ascend-cvm]
measurements: [<hex sha-384>, ...]
max_evidence_age_s: 1800     # evidence older than this is stale
trust_anchors:
  sim_vendor_roots: [sim-vendor-root.pem]   # paths relative to this file
# optional, all below
revoked_measurements: [<hex>, ...]          # refused even when listed under measurements
revoked_device_certs: [<hex serial or SHA-256 fingerprint>, ...]   # sim device certificates
min_npu_firmware: "7.1.0"                   # every NPU report's firmware must be at least this
npu_measurements: [<hex sha-384>, ...]      # accepted NPU firmware measurements (sim evidence)
cca:                                        # present = Arm CCA (virtCCA) tokens are accepted
  platform_keys: [cca-platform.pub.pem]     # PEM public keys/certificates, JWK or JWK Set files
  realm_initial_measurements: [<hex>, ...]  # accepted RIMs (claim 44238)
  realm_personalization_values: [<hex>]     # optional: accepted RPVs (claim 44235)
  platform_implementation_ids: [<hex>]      # optional: accepted implementation ids (claim 2396)
  accepted_lifecycle: ["0x3000-0x30ff"]     # ints or "lo-hi" ranges; default: secured states
  revoked_realm_measurements: [<hex>, ...]
```

Everything after ``trust_anchors`` was added later and is optional; files without it load as
before (but without ``npu_measurements`` no NPU is accepted, so simulated ``sovra-sim-tee/2``
evidence, which always reports its NPUs, is refused). See ``docs/attestation.md``.

:class:`ReferenceValuesFile` re-reads the file when its content changes, so a relying party that
checks it periodically applies a revocation within one check interval.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.cca import InvalidTrustAnchor, parse_trust_anchor
from attestation.errors import ReferenceValuesInvalid

_log = logging.getLogger(__name__)

_KEYS = {
    "version",
    "simulation",
    "tee_types",
    "measurements",
    "max_evidence_age_s",
    "trust_anchors",
    "revoked_measurements",
    "revoked_device_certs",
    "min_npu_firmware",
    "npu_measurements",
    "cca",
}
_CCA_KEYS = {
    "platform_keys",
    "realm_initial_measurements",
    "realm_personalization_values",
    "platform_implementation_ids",
    "accepted_lifecycle",
    "revoked_realm_measurements",
}

#: PSA / CCA security lifecycle "secured" states (the low byte is implementation defined).
SECURED_LIFECYCLE: Final = (0x3000, 0x30FF)
_MAX_SERIAL_HEX: Final = 40  # RFC 5280: serial numbers are at most 20 octets
_FINGERPRINT_HEX: Final = 64  # SHA-256
_FIRMWARE_VERSION = re.compile(r"^\d{1,9}(?:\.\d{1,9}){0,3}$")
_RANGE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+)\s*(?:-\s*(0[xX][0-9a-fA-F]+|\d+)\s*)?$")


@dataclass(frozen=True)
class CcaReferenceValues:
    """What Arm CCA (virtCCA) tokens must show. ``None`` for an optional list = not checked."""

    platform_keys: tuple[ec.EllipticCurvePublicKey, ...]
    realm_initial_measurements: frozenset[str]
    realm_personalization_values: frozenset[str] | None = None
    platform_implementation_ids: frozenset[str] | None = None
    accepted_lifecycle: tuple[tuple[int, int], ...] = (SECURED_LIFECYCLE,)
    revoked_realm_measurements: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ReferenceValues:
    allow_simulation: bool
    tee_types: frozenset[str]
    measurements: frozenset[str]
    max_evidence_age_s: int
    sim_vendor_roots: tuple[x509.Certificate, ...]
    source: str = "<memory>"
    # Added later; all optional with defaults so existing constructors keep working.
    revoked_measurements: frozenset[str] = frozenset()
    revoked_device_certs: frozenset[str] = frozenset()  # normalised lowercase hex
    min_npu_firmware: str | None = None
    cca: CcaReferenceValues | None = None
    npu_measurements: frozenset[str] = frozenset()  # empty: no NPU is accepted

    @classmethod
    def load(cls, path: Path) -> ReferenceValues:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ReferenceValuesInvalid(f"{path}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ReferenceValuesInvalid(f"{path}: not valid YAML/JSON ({exc})") from None
        return cls.from_document(doc, base=path.parent, source=str(path))

    @classmethod
    def from_document(cls, doc: Any, *, base: Path, source: str) -> ReferenceValues:
        def bad(msg: str) -> ReferenceValuesInvalid:
            return ReferenceValuesInvalid(f"{source}: {msg}")

        if not isinstance(doc, dict):
            raise bad("top level must be a mapping")
        unknown = set(doc) - _KEYS
        if unknown:
            raise bad(f"unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        if doc.get("version") != 1:
            raise bad("version must be 1")
        simulation = doc.get("simulation", "forbid")
        if simulation not in ("allow", "forbid"):
            raise bad("simulation must be 'allow' or 'forbid'")
        measurements = _hex_list(doc, "measurements", bad)
        tee_types = doc.get("tee_types", [])
        if not isinstance(tee_types, list) or not all(isinstance(t, str) for t in tee_types):
            raise bad("tee_types must be a list of strings")
        age = doc.get("max_evidence_age_s", 1800)
        if not isinstance(age, int) or isinstance(age, bool) or age <= 0:
            raise bad("max_evidence_age_s must be a positive integer")
        anchors = doc.get("trust_anchors", {}) or {}
        if not isinstance(anchors, dict) or set(anchors) - {"sim_vendor_roots"}:
            raise bad("trust_anchors may hold only sim_vendor_roots (a list of PEM paths)")
        roots = tuple(_load_cert(base / p, bad) for p in anchors.get("sim_vendor_roots", []))
        min_fw = doc.get("min_npu_firmware")
        if min_fw is not None and (not isinstance(min_fw, str) or not min_fw.strip()):
            raise bad("min_npu_firmware must be a non-empty string such as '7.1.0'")
        if min_fw is not None and parse_firmware_version(min_fw) is None:
            raise bad(
                f"min_npu_firmware {min_fw!r} is not a version of 1 to 4 dot-separated numbers "
                "such as '7.1.0'"
            )
        return cls(
            allow_simulation=simulation == "allow",
            tee_types=frozenset(tee_types),
            measurements=measurements,
            max_evidence_age_s=age,
            sim_vendor_roots=roots,
            source=source,
            revoked_measurements=_hex_list(doc, "revoked_measurements", bad),
            revoked_device_certs=_cert_ids(doc.get("revoked_device_certs", []), bad),
            min_npu_firmware=min_fw,
            cca=_cca_section(doc["cca"], base, bad) if "cca" in doc else None,
            npu_measurements=_hex_list(doc, "npu_measurements", bad),
        )


def parse_firmware_version(text: str) -> tuple[int, ...] | None:
    """``"7.1.0"`` -> ``(7, 1, 0)``; ``None`` unless 1 to 4 dot-separated decimal numbers."""
    if not isinstance(text, str) or not _FIRMWARE_VERSION.match(text.strip()):
        return None
    return tuple(int(part) for part in text.strip().split("."))


def firmware_at_least(version: str, minimum: str) -> bool | None:
    """``version >= minimum`` comparing numerically (``7.10 > 7.9``, ``7.1 == 7.1.0``);
    ``None`` if either is not a version :func:`parse_firmware_version` accepts."""
    have, need = parse_firmware_version(version), parse_firmware_version(minimum)
    if have is None or need is None:
        return None
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


class ReferenceValuesFile:
    """A reference values file kept current: :meth:`refresh` re-reads it and, when the content
    changed, parses and applies it; :attr:`generation` counts the versions applied.

    A file that becomes unreadable or invalid does not replace the values in effect: the last
    good values stay, the error is logged on every refresh and kept in :attr:`error`, so a
    broken edit is loud but never silently widens or empties what is accepted. Files the main
    file names (trust anchors, platform keys) are read when the main file changes.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        data = self._read()
        self._values = self._parse(data)
        self._digest = hashlib.sha256(data).digest()
        self.generation = 1
        self.error: str | None = None
        self._lock = threading.Lock()

    @property
    def values(self) -> ReferenceValues:
        return self._values

    def refresh(self) -> bool:
        """Re-read the file; True when changed values were applied by this call."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> bool:
        try:
            data = self._read()
            digest = hashlib.sha256(data).digest()
            if digest == self._digest:
                self.error = None
                return False
            values = self._parse(data)
        except ReferenceValuesInvalid as exc:
            self.error = str(exc)
            _log.error("reference values not reloaded, the last good values stay: %s", exc)
            return False
        self._values, self._digest, self.error = values, digest, None
        self.generation += 1
        _log.info("reference values reloaded from %s (generation %d)", self.path, self.generation)
        return True

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise ReferenceValuesInvalid(f"{self.path}: cannot read ({exc.strerror})") from None

    def _parse(self, data: bytes) -> ReferenceValues:
        try:
            doc = yaml.safe_load(data.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ReferenceValuesInvalid(f"{self.path}: not valid YAML/JSON ({exc})") from None
        return ReferenceValues.from_document(doc, base=self.path.parent, source=str(self.path))


def is_revoked_certificate(revoked: frozenset[str], serial: int, fingerprint: bytes) -> str:
    """Why a certificate is revoked (``"serial …"`` / ``"SHA-256 fingerprint …"``), else ``""``.

    ``revoked`` holds normalised entries: 64 hex digits are SHA-256 fingerprints, shorter ones
    serial numbers (compared as integers, so leading zeros do not matter).
    """
    fp = fingerprint.hex()
    for entry in revoked:
        if len(entry) == _FINGERPRINT_HEX and entry == fp:
            return f"SHA-256 fingerprint {fp[:16]}..."
        if len(entry) <= _MAX_SERIAL_HEX and int(entry, 16) == serial:
            return f"serial {serial:x}"
    return ""


def parse_lifecycle_ranges(
    value: Any, bad: Callable[[str], Exception]
) -> tuple[tuple[int, int], ...]:
    """``[0x3000, "0x3000-0x30ff", "12288"]`` -> inclusive ranges; raises ``bad(...)``."""
    if not isinstance(value, list) or not value:
        raise bad("cca.accepted_lifecycle must be a non-empty list of integers or 'lo-hi' ranges")
    ranges: list[tuple[int, int]] = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str) and (m := _RANGE.match(item)):
            lo = int(m.group(1), 0)
            hi = int(m.group(2), 0) if m.group(2) else lo
        else:
            raise bad(f"cca.accepted_lifecycle entry {item!r} is not an integer or 'lo-hi' range")
        if not 0 <= lo <= hi <= 0xFFFF:
            raise bad(f"cca.accepted_lifecycle entry {item!r} is not a range within 0..0xffff")
        ranges.append((lo, hi))
    return tuple(ranges)


def _cca_section(
    section: Any, base: Path, bad: Callable[[str], ReferenceValuesInvalid]
) -> CcaReferenceValues:
    if not isinstance(section, dict):
        raise bad("cca must be a mapping (omit the key to refuse CCA evidence)")
    unknown = set(section) - _CCA_KEYS
    if unknown:
        raise bad(f"unknown keys cca.{sorted(unknown)}; allowed: {sorted(_CCA_KEYS)}")
    paths = section.get("platform_keys", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise bad("cca.platform_keys must be a list of file paths (PEM, JWK or JWK Set)")
    keys: list[ec.EllipticCurvePublicKey] = []
    for rel in paths:
        path = base / rel
        try:
            keys.extend(parse_trust_anchor(path.read_bytes()))
        except OSError as exc:
            raise bad(f"cca platform key {path}: cannot read ({exc.strerror})") from None
        except InvalidTrustAnchor as exc:
            raise bad(f"cca platform key {path}: {exc}") from None

    def optional(key: str) -> frozenset[str] | None:
        return _hex_list(section, key, bad, prefix="cca.") if key in section else None

    lifecycle = section.get("accepted_lifecycle")
    return CcaReferenceValues(
        platform_keys=tuple(keys),
        realm_initial_measurements=_hex_list(
            section, "realm_initial_measurements", bad, prefix="cca."
        ),
        realm_personalization_values=optional("realm_personalization_values"),
        platform_implementation_ids=optional("platform_implementation_ids"),
        accepted_lifecycle=(
            (SECURED_LIFECYCLE,) if lifecycle is None else parse_lifecycle_ranges(lifecycle, bad)
        ),
        revoked_realm_measurements=_hex_list(
            section, "revoked_realm_measurements", bad, prefix="cca."
        ),
    )


def _hex_list(
    doc: dict[str, Any], key: str, bad: Callable[[str], ReferenceValuesInvalid], prefix: str = ""
) -> frozenset[str]:
    values = doc.get(key, [])
    if not isinstance(values, list) or not all(isinstance(m, str) and _is_hex(m) for m in values):
        raise bad(f"{prefix}{key} must be a list of hex strings")
    return frozenset(m.lower() for m in values)


def _cert_ids(values: Any, bad: Callable[[str], ReferenceValuesInvalid]) -> frozenset[str]:
    if not isinstance(values, list):
        raise bad(
            "revoked_device_certs must be a list of hex serial numbers or SHA-256 fingerprints"
        )
    out = set()
    for value in values:
        text = value.replace(":", "").strip().lower() if isinstance(value, str) else ""
        text = text.removeprefix("0x")
        if (
            not text
            or any(c not in "0123456789abcdef" for c in text)
            or not (len(text) <= _MAX_SERIAL_HEX or len(text) == _FINGERPRINT_HEX)
        ):
            raise bad(
                f"revoked_device_certs entry {value!r} is neither a hex serial number (up to 40 "
                "hex digits) nor a SHA-256 fingerprint (64 hex digits)"
            )
        out.add(text)
    return frozenset(out)


def _is_hex(value: str) -> bool:
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return len(value) > 0


def _load_cert(path: Path, bad: Any) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise bad(f"trust anchor {path}: cannot read ({exc.strerror})") from None
    except ValueError:
        raise bad(f"trust anchor {path}: not a PEM certificate") from None
