"""Loading policy only from git commits signed by an allowed signer.

:func:`load_from_git` resolves a revision to a commit id, has ``git verify-commit`` check the
commit's SSH signature against the given allowed-signers file (``gpg.ssh.allowedSignersFile``;
see ``docs/policy.md``), reads the policy files of *that commit's tree* straight from the object
database (``git ls-tree`` + ``git cat-file``: the working copy, the index and ``.gitattributes``
filters play no part), validates them and runs the policy's own tests.  Any failure raises
:class:`PolicyRefused` with the reason.  The loaded policy's id is the commit id.

:class:`PolicySource` is what a running agent holds: the last good policy, and the last refusal
(time, commit, reason).  By default it also refuses to move to a commit that does not descend
from the one it runs (replaying an older, signed but more permissive policy is a rollback).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sovra.policy.engine import Policy
from sovra.policy.language import (
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_TOTAL_BYTES,
    POLICY_SUFFIXES,
    PolicyError,
    PolicyInvalid,
)
from sovra.policy.testing import run_tests

__all__ = [
    "CommitInfo",
    "PolicyRefused",
    "PolicySource",
    "Refusal",
    "SourceStatus",
    "load_from_git",
    "read_commit_files",
    "resolve_commit",
    "verify_commit",
]

log = logging.getLogger(__name__)

GIT_TIMEOUT_S = 60.0
_GOOD_SSH = re.compile(
    r'^Good "git" signature for (?P<signer>\S+) with (?P<algorithm>\S+) key (?P<key>\S+)\s*$',
    re.MULTILINE,
)
_COMMIT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")

Clock = Callable[[], datetime]


def _now() -> datetime:
    return datetime.now(UTC)


class PolicyRefused(PolicyError):
    """A policy revision was not accepted; ``reason`` says why."""

    def __init__(self, reason: str, commit: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.commit = commit


@dataclass(frozen=True, slots=True)
class CommitInfo:
    commit: str
    signer: str  # the principal from the allowed-signers file
    verified_at: datetime
    key_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "commit": self.commit,
            "signer": self.signer,
            "verified_at": self.verified_at.isoformat(),
            "key_fingerprint": self.key_fingerprint,
        }


def _git(
    repo: str | os.PathLike[str], *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    # A clean environment: no GIT_DIR & co. from the caller, no system config, C locale (the
    # output of verify-commit is parsed), never prompt.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(LC_ALL="C", LANG="C", GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1")
    command = ["git", "-C", os.fspath(repo), "-c", "gpg.ssh.program=ssh-keygen", *args]
    try:
        return subprocess.run(
            command, input=stdin, capture_output=True, timeout=GIT_TIMEOUT_S, env=env, check=False
        )
    except FileNotFoundError:
        raise PolicyRefused("git is not installed") from None
    except subprocess.TimeoutExpired:
        raise PolicyRefused(f"git {args[0]} timed out after {GIT_TIMEOUT_S:.0f} s") from None


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def resolve_commit(repo: str | os.PathLike[str], rev: str) -> str:
    """The full commit id ``rev`` names in ``repo``."""
    if not rev or rev.startswith("-"):
        raise PolicyRefused(f"invalid revision {_short(rev)}")
    if not Path(repo).is_dir():
        raise PolicyRefused(f"repository {_short(os.fspath(repo))} is not a directory")
    proc = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    commit = proc.stdout.decode("ascii", "replace").strip()
    if b"dubious ownership" in proc.stderr:
        raise PolicyRefused(
            "git refuses the repository: it is owned by another user (see git's safe.directory)"
        )
    if proc.returncode != 0 or not _COMMIT_ID.fullmatch(commit):
        raise PolicyRefused(f"revision {_short(rev)} does not name a commit in the repository")
    return commit


def verify_commit(
    repo: str | os.PathLike[str],
    commit: str,
    allowed_signers_file: str | os.PathLike[str],
    *,
    clock: Clock = _now,
) -> CommitInfo:
    """Check ``commit``'s SSH signature against the allowed signers; raise PolicyRefused if not."""
    signers = Path(allowed_signers_file)
    if not signers.is_file():
        raise PolicyRefused(f"allowed signers file {_short(os.fspath(signers))} does not exist")
    proc = _git(
        repo,
        "-c",
        f"gpg.ssh.allowedSignersFile={signers.resolve()}",
        "verify-commit",
        commit,
    )
    output = (proc.stderr + proc.stdout).decode("utf-8", "replace")
    good = _GOOD_SSH.search(output)
    short = commit[:12]
    if proc.returncode == 0 and good is not None:
        return CommitInfo(commit, good["signer"], clock(), good["key"])
    if "signature" not in output.lower():
        reason = f"commit {short} is not signed"
    elif "No principal matched" in output:
        reason = f"commit {short} is signed by a key that is not an allowed signer"
    elif "incorrect signature" in output or "Bad signature" in output:
        reason = f"the signature on commit {short} does not verify (altered commit?)"
    elif proc.returncode == 0:
        reason = f"commit {short} is not signed with an SSH key by an allowed signer"
    else:
        reason = f"the signature on commit {short} was not accepted"
    raise PolicyRefused(reason, commit)


def read_commit_files(
    repo: str | os.PathLike[str], commit: str, path: str = "."
) -> dict[str, bytes]:
    """The policy files (``*.yaml``/``*.yml``, not hidden) under ``path`` in ``commit``'s tree."""
    sub = PurePosixPath(path)
    if sub.is_absolute() or ".." in sub.parts:
        raise PolicyRefused(f"policy path {_short(path)} must be relative, inside the repository")
    prefix = "" if str(sub) == "." else f"{sub}/"
    args = ["ls-tree", "-r", "-z", "-l", "--full-tree", commit]
    if prefix:
        args += ["--", prefix]
    proc = _git(repo, *args)
    if proc.returncode != 0:
        raise PolicyRefused(f"cannot list the tree of commit {commit[:12]}", commit)
    wanted: list[tuple[str, str, int]] = []
    for entry in proc.stdout.split(b"\0"):
        if not entry:
            continue
        meta, _, raw_name = entry.partition(b"\t")
        mode, kind, oid, size_text = meta.decode("ascii").split()
        name = raw_name.decode("utf-8", "surrogateescape")
        if not name.startswith(prefix):
            continue
        rel = name[len(prefix) :]
        if any(part.startswith(".") for part in rel.split("/")) or not rel.endswith(
            POLICY_SUFFIXES
        ):
            continue
        if kind != "blob":
            continue
        if mode == "120000":
            raise PolicyRefused(f"policy file {_short(rel)} is a symbolic link", commit)
        if int(size_text) > MAX_FILE_BYTES:
            raise PolicyRefused(f"policy file {_short(rel)} exceeds {MAX_FILE_BYTES} bytes", commit)
        wanted.append((rel, oid, int(size_text)))
    if not wanted:
        where = "the repository root" if not prefix else _short(prefix)
        raise PolicyRefused(f"commit {commit[:12]} has no policy files under {where}", commit)
    if len(wanted) > MAX_FILES or sum(s for _, _, s in wanted) > MAX_TOTAL_BYTES:
        raise PolicyRefused(
            f"commit {commit[:12]} holds too many or too large policy files", commit
        )
    batch = _git(
        repo, "cat-file", "--batch", stdin="".join(f"{o}\n" for _, o, _ in wanted).encode()
    )
    if batch.returncode != 0:
        raise PolicyRefused(f"cannot read the policy files of commit {commit[:12]}", commit)
    files: dict[str, bytes] = {}
    data, offset = batch.stdout, 0
    for rel, oid, size in wanted:
        header_end = data.index(b"\n", offset)
        header = data[offset:header_end].decode("ascii").split()
        if header[:3] != [oid, "blob", str(size)]:
            raise PolicyRefused(
                f"unexpected object for {_short(rel)} in commit {commit[:12]}", commit
            )
        start = header_end + 1
        files[rel] = data[start : start + size]
        offset = start + size + 1
    return files


def load_from_git(
    repo: str | os.PathLike[str],
    rev: str,
    allowed_signers_file: str | os.PathLike[str],
    *,
    path: str = ".",
    run_policy_tests: bool = True,
    require_tests: bool = False,
    clock: Clock = _now,
) -> tuple[Policy, CommitInfo]:
    """The policy at ``rev``, if its commit is signed by an allowed signer, valid and tested."""
    commit = resolve_commit(repo, rev)
    info = verify_commit(repo, commit, allowed_signers_file, clock=clock)
    files = read_commit_files(repo, commit, path)
    short = commit[:12]
    try:
        policy = Policy.from_files(files, policy_id=commit)
    except PolicyInvalid as exc:
        shown = "; ".join(str(p) for p in exc.problems[:3])
        more = "" if len(exc.problems) <= 3 else f"; and {len(exc.problems) - 3} more"
        raise PolicyRefused(
            f"policy at commit {short} is invalid ({len(exc.problems)} problems): {shown}{more}",
            commit,
        ) from None
    if require_tests and not policy.spec.tests:
        raise PolicyRefused(f"policy at commit {short} has no tests", commit)
    if run_policy_tests:
        report = run_tests(policy)
        if not report.ok:
            raise PolicyRefused(f"policy at commit {short}: {report.summary()}", commit)
    return policy, info


# --- a reloadable source ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    at: datetime
    commit: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "commit": self.commit, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class SourceStatus:
    policy_id: str | None
    commit: CommitInfo | None
    loaded_at: datetime | None
    last_refusal: Refusal | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy_id,
            "commit": self.commit.to_dict() if self.commit else None,
            "loaded_at": self.loaded_at.isoformat() if self.loaded_at else None,
            "last_refusal": self.last_refusal.to_dict() if self.last_refusal else None,
        }


class PolicySource:
    """The active policy from a git repository; :meth:`reload` moves it forward when it can.

    A refused revision never replaces the active policy: it is recorded as the last refusal.
    """

    def __init__(
        self,
        repo: str | os.PathLike[str],
        allowed_signers_file: str | os.PathLike[str],
        *,
        rev: str = "HEAD",
        path: str = ".",
        allow_rollback: bool = False,
        require_tests: bool = False,
        clock: Clock = _now,
    ) -> None:
        self.repo = repo
        self.allowed_signers_file = allowed_signers_file
        self.rev = rev
        self.path = path
        self.allow_rollback = allow_rollback
        self.require_tests = require_tests
        self._clock = clock
        self._lock = threading.Lock()
        self._policy: Policy | None = None
        self._commit: CommitInfo | None = None
        self._loaded_at: datetime | None = None
        self._refusal: Refusal | None = None

    @property
    def policy(self) -> Policy | None:
        """The last good policy (None until one loaded)."""
        return self._policy

    def current(self) -> Policy:
        policy = self._policy
        if policy is None:
            reason = self._refusal.reason if self._refusal else "no policy loaded yet"
            raise PolicyRefused(f"no good policy: {reason}")
        return policy

    def reload(self) -> bool:
        """Try the revision's current commit; True when it became the active policy."""
        with self._lock:
            commit: str | None = None
            try:
                commit = resolve_commit(self.repo, self.rev)
                if self._commit is not None and commit == self._commit.commit:
                    return False
                if self._commit is not None and not self.allow_rollback:
                    self._check_descends(self._commit.commit, commit)
                policy, info = load_from_git(
                    self.repo,
                    commit,
                    self.allowed_signers_file,
                    path=self.path,
                    require_tests=self.require_tests,
                    clock=self._clock,
                )
            except PolicyRefused as exc:
                self._refusal = Refusal(self._clock(), exc.commit or commit, exc.reason)
                log.warning("policy refused (commit %s): %s", exc.commit or commit, exc.reason)
                return False
            self._policy, self._commit, self._loaded_at = policy, info, self._clock()
            log.info("policy %s active (signed by %s)", info.commit, info.signer)
            return True

    def _check_descends(self, old: str, new: str) -> None:
        proc = _git(self.repo, "merge-base", "--is-ancestor", old, new)
        if proc.returncode == 1:
            raise PolicyRefused(
                f"commit {new[:12]} does not descend from the active policy commit {old[:12]} "
                "(rollback refused)",
                new,
            )
        if proc.returncode != 0:
            raise PolicyRefused(f"cannot relate commit {new[:12]} to {old[:12]}", new)

    def status(self) -> SourceStatus:
        with self._lock:
            return SourceStatus(
                policy_id=self._policy.id if self._policy else None,
                commit=self._commit,
                loaded_at=self._loaded_at,
                last_refusal=self._refusal,
            )
