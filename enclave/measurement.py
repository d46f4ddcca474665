"""The enclave measurement: SHA-384 over the code that handles plaintext and the workload identity.

What is measured: every ``enclave/**/*.py`` file, ``sovra/envelope.py``, ``sovra/suites.py`` and
``sovra/training.py`` (sorted by path relative to the source root, each as length-prefixed path
and contents), then the workload identity (llama: SHA-384 of the model file; upstream: URL and
upstream model). Paths and lengths are framed so that no two different file sets hash alike.
The result is deterministic: the same checkout and model give the same hex string on every
machine.

In a real TEE the platform measures the image; this software measurement is what the simulated
TEE reports and what reference values pin.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Final

import enclave
from enclave.config import WorkloadSection
from enclave.workloads.llama import resolve_model_path

_DOMAIN: Final = b"sovra-enclave-measurement/1\x00"
_SHARED_FILES: Final = ("sovra/envelope.py", "sovra/suites.py", "sovra/training.py")
_CHUNK: Final = 1 << 20


def source_root() -> Path:
    """The directory holding the ``enclave`` and ``sovra`` packages."""
    return Path(enclave.__file__).resolve().parent.parent


def measured_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the measured source files, sorted."""
    root = root or source_root()
    own = [p.relative_to(root).as_posix() for p in (root / "enclave").rglob("*.py")]
    return sorted([*own, *_SHARED_FILES])


def workload_identity(workload: WorkloadSection) -> bytes:
    """What names the model behind the code: file digest (llama) or endpoint (upstream)."""
    if workload.kind == "llama":
        digest = file_sha384(resolve_model_path(workload.model_path))
        parts = [b"llama", digest.encode()]
    else:
        parts = [
            b"openai-upstream",
            workload.upstream_url.encode(),
            workload.upstream_model.encode(),
        ]
    parts += [m.encode() for m in workload.models]
    return b"".join(_framed(p) for p in parts)


def measure(workload: WorkloadSection, root: Path | None = None) -> str:
    """Lowercase hex SHA-384 of the measured code and ``workload``'s identity."""
    root = root or source_root()
    h = hashlib.sha384(_DOMAIN)
    for rel in measured_files(root):
        h.update(_framed(rel.encode()))
        h.update(_framed((root / rel).read_bytes()))
    h.update(_framed(workload_identity(workload)))
    return h.hexdigest()


def file_sha384(path: Path) -> str:
    h = hashlib.sha384()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _framed(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data
