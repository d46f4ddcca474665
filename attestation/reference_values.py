"""Reference values: what the relying party (edge or broker) accepts. YAML or JSON file.

```yaml
version: 1
simulation: allow            # allow | forbid  (forbid is the default: real hardware only)
tee_types: [sim-ascend-cvm]
measurements: [<hex sha-384>, ...]
max_evidence_age_s: 1800     # evidence older than this is stale
trust_anchors:
  sim_vendor_roots: [sim-vendor-root.pem]   # paths relative to this file
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from attestation.errors import ReferenceValuesInvalid

_KEYS = {
    "version",
    "simulation",
    "tee_types",
    "measurements",
    "max_evidence_age_s",
    "trust_anchors",
}


@dataclass(frozen=True)
class ReferenceValues:
    allow_simulation: bool
    tee_types: frozenset[str]
    measurements: frozenset[str]
    max_evidence_age_s: int
    sim_vendor_roots: tuple[x509.Certificate, ...]
    source: str = "<memory>"

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
        measurements = doc.get("measurements", [])
        if not isinstance(measurements, list) or not all(
            isinstance(m, str) and _is_hex(m) for m in measurements
        ):
            raise bad("measurements must be a list of hex strings")
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
        return cls(
            allow_simulation=simulation == "allow",
            tee_types=frozenset(tee_types),
            measurements=frozenset(m.lower() for m in measurements),
            max_evidence_age_s=age,
            sim_vendor_roots=roots,
            source=source,
        )


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
