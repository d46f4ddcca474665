"""Collect attestation evidence through the Linux configfs-tsm report interface.

Since Linux 6.7 a confidential guest asks its TEE for a signed report in a vendor-neutral way
(``Documentation/ABI/testing/configfs-tsm``)::

    mkdir /sys/kernel/config/tsm/report/<name>       # the kernel fills the directory
    write 64 bytes   -> <name>/inblob                # report data (nonce / key binding)
    write "<0..3>"   -> <name>/privlevel             # optional (SEV-SNP VMPL)
    read             <- <name>/outblob               # the evidence: CCA token, TDX quote, ...
    read             <- <name>/provider              # arm_cca_guest, tdx_guest, sev_guest, ...
    read             <- <name>/generation            # bumped by every write
    rmdir /sys/kernel/config/tsm/report/<name>

``generation`` is how the kernel lets a reader notice a racing writer: every write to ``inblob``
or an option increments it. :func:`collect` uses a directory of its own per request and checks
that the generation after its writes is exactly the one it expects and is unchanged after
``outblob`` was read; otherwise another writer interfered and the outblob may answer *their*
inblob. It then retries with a fresh directory, and raises :class:`TsmRace` when every attempt
raced.

Nothing here is simulated: on a machine without a TEE the interface is absent and
:class:`TsmUnavailable` says so. Tests drive :class:`TsmClient` against a temporary directory
laid out as the kernel lays it out, with a subclass playing the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from attestation.errors import AttestationError

DEFAULT_ROOT: Final = Path("/sys/kernel/config/tsm")
INBLOB_SIZE: Final = 64
PRIVLEVEL_MAX: Final = 3
DEFAULT_ATTEMPTS: Final = 3

#: configfs-tsm provider -> the evidence format its outblob holds.
PROVIDER_FORMATS: Final = {
    "arm_cca_guest": "arm-cca-token",
    "tdx_guest": "intel-tdx-quote",
    "sev_guest": "amd-sev-snp-report",
}


class TsmError(AttestationError):
    """Evidence could not be collected through configfs-tsm."""


class TsmUnavailable(TsmError):
    """The configfs-tsm report interface does not exist on this machine."""


class TsmRace(TsmError):
    """Another writer changed the report request between our write and our read."""


@dataclass(frozen=True)
class TsmReport:
    provider: str
    outblob: bytes
    generation: int

    @property
    def evidence_format(self) -> str | None:
        """The evidence format of ``outblob`` for known providers, else ``None``."""
        return PROVIDER_FORMATS.get(self.provider)


class TsmClient:
    """One configfs-tsm root. The ``_mkdir`` / ``_rmdir`` / ``_write`` / ``_read`` hooks are the
    only filesystem access, so a test can play the kernel by overriding them."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def available(self) -> bool:
        return self.report_dir.is_dir()

    def collect(
        self,
        report_data: bytes,
        *,
        privlevel: int | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> TsmReport:
        if not isinstance(report_data, bytes | bytearray) or len(report_data) != INBLOB_SIZE:
            got = len(report_data) if isinstance(report_data, bytes | bytearray) else "non-bytes"
            raise TsmError(f"configfs-tsm inblob must be exactly {INBLOB_SIZE} bytes, got {got}")
        if privlevel is not None and (
            not isinstance(privlevel, int)
            or isinstance(privlevel, bool)
            or not 0 <= privlevel <= PRIVLEVEL_MAX
        ):
            raise TsmError(f"configfs-tsm privlevel must be an integer 0..{PRIVLEVEL_MAX}")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if not self.available():
            raise TsmUnavailable(
                f"configfs-tsm not available at {self.report_dir}; is the kernel built with "
                "CONFIG_TSM_REPORTS and configfs mounted (mount -t configfs none "
                "/sys/kernel/config)?"
            )
        last = ""
        for _ in range(attempts):
            try:
                return self._collect_once(bytes(report_data), privlevel)
            except TsmRace as exc:
                last = str(exc)
        raise TsmRace(f"{last} (gave up after {attempts} attempts)")

    # ------------------------------------------------------------------ one request

    def _collect_once(self, report_data: bytes, privlevel: int | None) -> TsmReport:
        entry = self.report_dir / f"sovra-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            self._mkdir(entry)
        except OSError as exc:
            raise TsmError(_os_reason(f"cannot create report request {entry}", exc)) from None
        try:
            before = self._generation(entry)
            writes = 1
            self._write(entry / "inblob", report_data, "inblob")
            if privlevel is not None:
                self._write(entry / "privlevel", f"{privlevel}\n".encode(), "privlevel")
                writes += 1
            written = self._generation(entry)
            if written != before + writes:
                raise TsmRace(
                    f"configfs-tsm generation of {entry.name} went from {before} to {written} "
                    f"over our {writes} write(s): another writer raced us"
                )
            outblob = self._read(entry / "outblob", "outblob")
            provider = self._read(entry / "provider", "provider").decode("ascii", "replace")
            after = self._generation(entry)
            if after != written:
                raise TsmRace(
                    f"configfs-tsm generation of {entry.name} changed from {written} to {after} "
                    "while reading outblob: another writer raced us"
                )
            if not outblob:
                raise TsmError(f"configfs-tsm returned an empty outblob from {provider.strip()}")
            return TsmReport(provider=provider.strip(), outblob=outblob, generation=after)
        finally:
            with contextlib.suppress(OSError):
                self._rmdir(entry)

    def _generation(self, entry: Path) -> int:
        text = self._read(entry / "generation", "generation").decode("ascii", "replace").strip()
        try:
            return int(text, 10)
        except ValueError:
            raise TsmError(f"configfs-tsm generation {text!r} is not a number") from None

    def _write(self, path: Path, data: bytes, what: str) -> None:
        try:
            self._write_file(path, data)
        except OSError as exc:
            raise TsmError(_os_reason(f"cannot write configfs-tsm {what}", exc)) from None

    def _read(self, path: Path, what: str) -> bytes:
        try:
            return self._read_file(path)
        except OSError as exc:
            raise TsmError(_os_reason(f"cannot read configfs-tsm {what}", exc)) from None

    # ------------------------------------------------------------------ filesystem hooks

    def _mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def _rmdir(self, path: Path) -> None:
        os.rmdir(path)  # configfs removes the attribute files with the directory

    def _write_file(self, path: Path, data: bytes) -> None:
        # configfs attributes exist already: no O_CREAT, one write() for the whole blob.
        fd = os.open(path, os.O_WRONLY)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, "short write")
        finally:
            os.close(fd)

    def _read_file(self, path: Path) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()


def _os_reason(what: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        reason += " (configfs-tsm needs root or CAP_SYS_ADMIN)"
    elif exc.errno == errno.ENXIO:
        reason += " (no TSM provider is registered: not running in a confidential guest?)"
    return f"{what}: {reason}"


def collect(
    report_data: bytes,
    *,
    root: Path = DEFAULT_ROOT,
    privlevel: int | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
) -> TsmReport:
    """Ask the TEE for a report binding ``report_data`` (exactly 64 bytes).

    Raises :class:`TsmUnavailable` when the interface is absent, :class:`TsmRace` when every
    attempt was raced by another writer, and :class:`TsmError` for anything else (wrong inblob
    length, permission denied, provider failure).
    """
    return TsmClient(root).collect(report_data, privlevel=privlevel, attempts=attempts)
