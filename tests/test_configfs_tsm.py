"""configfs-tsm evidence collection against a temporary tree laid out as the kernel lays it out.

A real kernel fills a new ``report/<name>`` directory with attribute files on mkdir, bumps
``generation`` on every write and produces ``outblob`` from ``inblob``. :class:`FakeKernel`
plays that part through the filesystem hooks of :class:`TsmClient`; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from attestation import configfs_tsm
from attestation.configfs_tsm import (
    TsmClient,
    TsmError,
    TsmRace,
    TsmReport,
    TsmUnavailable,
    collect,
)
from attestation.errors import AttestationError

REPORT_DATA = bytes(range(64))
ATTRIBUTES = ("inblob", "outblob", "auxblob", "provider", "generation", "privlevel",
              "privlevel_floor")  # fmt: skip


def make_root(tmp_path: Path) -> Path:
    root = tmp_path / "tsm"
    (root / "report").mkdir(parents=True)
    return root


class FakeKernel(TsmClient):
    """The kernel side of configfs-tsm, in a temp dir. ``races[i]`` makes attempt ``i`` race
    with another writer: ``"after-write"`` (an extra write right after our inblob) or
    ``"during-read"`` (an extra write while we read outblob)."""

    def __init__(
        self, root: Path, provider: str = "arm_cca_guest", races: list[str] | None = None
    ) -> None:
        super().__init__(root)
        self.provider = provider
        self.races = list(races or [])
        self.entries: list[Path] = []
        self.writes: dict[str, bytes] = {}

    def _bump(self, entry: Path) -> None:
        gen = entry / "generation"
        gen.write_text(f"{int(gen.read_text()) + 1}\n")

    def _mkdir(self, path: Path) -> None:
        super()._mkdir(path)
        for name in ATTRIBUTES:
            (path / name).write_bytes(b"")
        (path / "generation").write_text("0\n")
        (path / "provider").write_text(f"{self.provider}\n")
        (path / "privlevel_floor").write_text("0\n")
        self.entries.append(path)

    def _write_file(self, path: Path, data: bytes) -> None:
        super()._write_file(path, data)
        self.writes[path.name] = data
        entry = path.parent
        self._bump(entry)
        if path.name == "inblob":
            # the "TEE" signs the report data; a stand-in token derived from inblob
            (entry / "outblob").write_bytes(b"TOKEN:" + hashlib.sha256(data).digest())
        race = self.races[len(self.entries) - 1] if len(self.entries) <= len(self.races) else ""
        if race == "after-write" and path.name == "inblob":
            self._bump(entry)  # someone else wrote an option right after our inblob

    def _read_file(self, path: Path) -> bytes:
        data = super()._read_file(path)
        race = self.races[len(self.entries) - 1] if len(self.entries) <= len(self.races) else ""
        if race == "during-read" and path.name == "outblob":
            self._bump(path.parent)  # someone else wrote inblob while we read outblob
        return data

    def _rmdir(self, path: Path) -> None:
        shutil.rmtree(path)  # configfs drops attribute files itself; a plain dir cannot


def test_collect_reads_outblob_provider_generation(tmp_path: Path) -> None:
    kernel = FakeKernel(make_root(tmp_path))
    report = kernel.collect(REPORT_DATA)
    assert report == TsmReport(
        provider="arm_cca_guest",
        outblob=b"TOKEN:" + hashlib.sha256(REPORT_DATA).digest(),
        generation=1,
    )
    assert report.evidence_format == "arm-cca-token"
    assert kernel.writes == {"inblob": REPORT_DATA}
    assert len(kernel.entries) == 1 and not kernel.entries[0].exists()  # rmdir'ed
    assert list((kernel.root / "report").iterdir()) == []


def test_privlevel_is_written_and_counted(tmp_path: Path) -> None:
    kernel = FakeKernel(make_root(tmp_path), provider="sev_guest")
    report = kernel.collect(REPORT_DATA, privlevel=2)
    assert kernel.writes["privlevel"] == b"2\n"
    assert report.generation == 2 and report.evidence_format == "amd-sev-snp-report"


@pytest.mark.parametrize("race", ["after-write", "during-read"])
def test_race_is_retried_with_a_fresh_directory(tmp_path: Path, race: str) -> None:
    kernel = FakeKernel(make_root(tmp_path), races=[race])
    report = kernel.collect(REPORT_DATA)
    assert report.outblob.startswith(b"TOKEN:")
    assert len(kernel.entries) == 2  # first attempt raced, second did not
    assert list((kernel.root / "report").iterdir()) == []


@pytest.mark.parametrize(
    ("race", "match"),
    [("after-write", "over our 1 write"), ("during-read", "while reading outblob")],
)
def test_persistent_race_raises(tmp_path: Path, race: str, match: str) -> None:
    kernel = FakeKernel(make_root(tmp_path), races=[race] * 3)
    with pytest.raises(TsmRace, match=rf"{match}.*another writer raced us.*after 3 attempts"):
        kernel.collect(REPORT_DATA, attempts=3)
    assert list((kernel.root / "report").iterdir()) == []  # cleaned up every time


def test_absent_interface(tmp_path: Path) -> None:
    with pytest.raises(TsmUnavailable, match=r"configfs-tsm not available at .*CONFIG_TSM_REPORTS"):
        collect(REPORT_DATA, root=tmp_path / "no-such-tsm")
    (tmp_path / "tsm").mkdir()  # configfs mounted, but no report directory
    with pytest.raises(TsmUnavailable, match="configfs mounted"):
        collect(REPORT_DATA, root=tmp_path / "tsm")


@pytest.mark.parametrize("data", [b"", b"\x00" * 32, b"\x00" * 65])
def test_wrong_inblob_length(tmp_path: Path, data: bytes) -> None:
    kernel = FakeKernel(make_root(tmp_path))
    with pytest.raises(TsmError, match=f"exactly 64 bytes, got {len(data)}"):
        kernel.collect(data)
    assert kernel.entries == []  # refused before touching the interface


@pytest.mark.parametrize("level", [-1, 4, True])
def test_bad_privlevel(tmp_path: Path, level: int) -> None:
    with pytest.raises(TsmError, match=r"privlevel must be an integer 0\.\.3"):
        FakeKernel(make_root(tmp_path)).collect(REPORT_DATA, privlevel=level)


def test_empty_outblob_is_an_error(tmp_path: Path) -> None:
    class Silent(FakeKernel):
        def _write_file(self, path: Path, data: bytes) -> None:
            super()._write_file(path, data)
            (path.parent / "outblob").write_bytes(b"")

    with pytest.raises(TsmError, match="empty outblob from arm_cca_guest"):
        Silent(make_root(tmp_path)).collect(REPORT_DATA)


def test_provider_failure_is_reported(tmp_path: Path) -> None:
    class Broken(FakeKernel):
        def _read_file(self, path: Path) -> bytes:
            if path.name == "outblob":
                raise OSError(6, "No such device or address")
            return super()._read_file(path)

    kernel = Broken(make_root(tmp_path))
    with pytest.raises(TsmError, match=r"cannot read configfs-tsm outblob.*not running in a conf"):
        kernel.collect(REPORT_DATA)
    assert list((kernel.root / "report").iterdir()) == []


def test_plain_client_against_unwritable_report_dir(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    # a plain client on a plain directory: mkdir works, but no kernel fills the attributes
    with pytest.raises(TsmError, match="cannot read configfs-tsm generation"):
        TsmClient(root).collect(REPORT_DATA)
    assert list((root / "report").iterdir()) == []


def test_errors_are_attestation_errors() -> None:
    assert issubclass(TsmUnavailable, TsmError) and issubclass(TsmRace, TsmError)
    assert issubclass(TsmError, AttestationError)
    assert str(configfs_tsm.DEFAULT_ROOT) == "/sys/kernel/config/tsm"
