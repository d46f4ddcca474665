"""Loading policy from signed git commits: accepted, refused (unsigned, wrong signer, altered,
invalid, failing tests, rollback), last good kept; and ``sovra policy verify-commit``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from sovra.policy import PolicyRefused, PolicySource, load_from_git
from sovra.policy import cli as policy_cli

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or shutil.which("ssh-keygen") is None,
    reason="needs git and ssh-keygen (git signs and verifies SSH signatures with it)",
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "policy"
FIXED = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def make_key(path: Path, comment: str) -> Path:
    """An ed25519 key pair in OpenSSH format (ssh-keygen if present, else cryptography)."""
    if shutil.which("ssh-keygen"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
        )
        return path
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.with_suffix(".pub").write_bytes(public + f" {comment}\n".encode())
    return path


class Repo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "Policy Admin",
            "GIT_AUTHOR_EMAIL": "admin@hospital.example",
            "GIT_COMMITTER_NAME": "Policy Admin",
            "GIT_COMMITTER_EMAIL": "admin@hospital.example",
        }
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str) -> str:
        proc = subprocess.run(
            ["git", "-C", str(self.root), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return proc.stdout.strip()

    def commit(self, message: str, key: Path | None) -> str:
        self.git("add", "-A")
        if key is None:
            self.git("commit", "-q", "--allow-empty", "-m", message)
        else:
            self.git(
                "-c", "gpg.format=ssh", "-c", f"user.signingkey={key}",
                "commit", "-q", "-S", "--allow-empty", "-m", message,
            )  # fmt: skip
        return self.git("rev-parse", "HEAD")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("keys")
    alice = make_key(base / "alice", "alice")
    mallory = make_key(base / "mallory", "mallory")
    signers = base / "allowed_signers"
    public = alice.with_suffix(".pub").read_text().split()
    signers.write_text(f'alice@hospital.example namespaces="git" {public[0]} {public[1]}\n')
    return {"alice": alice, "mallory": mallory, "signers": signers}


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    root = tmp_path / "policy-repo"
    shutil.copytree(EXAMPLE, root)
    return Repo(root)


def test_signed_commit_is_accepted(repo: Repo, keys: dict[str, Path]) -> None:
    commit = repo.commit("hospital policy v1", keys["alice"])
    policy, info = load_from_git(repo.root, "HEAD", keys["signers"], clock=lambda: FIXED)
    assert info.commit == commit and policy.id == commit
    assert info.signer == "alice@hospital.example"
    assert info.key_fingerprint.startswith("SHA256:")
    assert info.verified_at == FIXED
    assert len(policy.rules) == 10
    classification = policy.classify("病历号MRN-204518")
    assert (
        policy.decide("clinical-assistant", "inference", "smollm2-135m", classification).policy_id
        == commit
    )


def test_unsigned_commit_is_refused(repo: Repo, keys: dict[str, Path]) -> None:
    commit = repo.commit("unsigned", None)
    with pytest.raises(PolicyRefused, match="is not signed") as info:
        load_from_git(repo.root, "HEAD", keys["signers"])
    assert info.value.commit == commit


def test_wrong_signer_is_refused(repo: Repo, keys: dict[str, Path]) -> None:
    repo.commit("signed by someone else", keys["mallory"])
    with pytest.raises(PolicyRefused, match="not an allowed signer"):
        load_from_git(repo.root, "HEAD", keys["signers"])


def test_altered_commit_is_refused(repo: Repo, keys: dict[str, Path]) -> None:
    repo.commit("hospital policy v1", keys["alice"])
    raw = repo.git("cat-file", "commit", "HEAD").replace("hospital policy v1", "v1, altered")
    proc = subprocess.run(
        ["git", "-C", str(repo.root), "hash-object", "-t", "commit", "-w", "--stdin"],
        input=raw + "\n",
        env=repo.env,
        capture_output=True,
        text=True,
        check=True,
    )
    with pytest.raises(PolicyRefused, match="does not verify"):
        load_from_git(repo.root, proc.stdout.strip(), keys["signers"])


def test_bad_revision_and_repository(repo: Repo, keys: dict[str, Path], tmp_path: Path) -> None:
    repo.commit("v1", keys["alice"])
    with pytest.raises(PolicyRefused, match="does not name a commit"):
        load_from_git(repo.root, "no-such-branch", keys["signers"])
    with pytest.raises(PolicyRefused, match="invalid revision"):
        load_from_git(repo.root, "--output=/tmp/x", keys["signers"])
    with pytest.raises(PolicyRefused, match="allowed signers file"):
        load_from_git(repo.root, "HEAD", tmp_path / "missing")


def test_policy_comes_from_the_commit_not_the_working_copy(
    repo: Repo, keys: dict[str, Path]
) -> None:
    commit = repo.commit("v1", keys["alice"])
    (repo.root / "rules" / "99-uncommitted.yaml").write_text("rules: [{broken")
    (repo.root / "classes.yaml").write_text("classes: [everything-is-public]\n")
    policy, info = load_from_git(repo.root, "HEAD", keys["signers"])
    assert info.commit == commit and policy.classes[-1] == "restricted"


def test_policy_in_a_subdirectory(tmp_path: Path, keys: dict[str, Path]) -> None:
    root = tmp_path / "infra"
    shutil.copytree(EXAMPLE, root / "sovra" / "policy")
    (root / "README.yaml").write_text("not: [a policy\n")
    repo = Repo(root)
    repo.commit("monorepo", keys["alice"])
    policy, _ = load_from_git(root, "HEAD", keys["signers"], path="sovra/policy")
    assert len(policy.spec.tests) >= 10
    with pytest.raises(PolicyRefused, match="no policy files"):
        load_from_git(root, "HEAD", keys["signers"], path="docs")
    with pytest.raises(PolicyRefused, match="must be relative"):
        load_from_git(root, "HEAD", keys["signers"], path="../etc")


def test_invalid_policy_is_refused_with_location(repo: Repo, keys: dict[str, Path]) -> None:
    (repo.root / "rules" / "30-typo.yaml").write_text(
        "rules:\n  - id: typo\n    match: {max_class: secrett}\n    effect: deny\n"
    )
    repo.commit("typo", keys["alice"])
    with pytest.raises(PolicyRefused, match=r"invalid .*rules/30-typo.yaml:3"):
        load_from_git(repo.root, "HEAD", keys["signers"])


def _loosen_training(repo: Repo) -> None:
    """A signed change that breaks the policy's own tests: identified data for training."""
    guards = repo.root / "rules" / "00-guards.yaml"
    guards.write_text(guards.read_text().replace("purposes: [training]", "purposes: [nothing]"))
    applications = repo.root / "applications.yaml"
    applications.write_text(
        applications.read_text().replace("  - training\n", "  - training\n  - nothing\n")
    )


def test_failing_policy_tests_refused_and_last_good_kept(repo: Repo, keys: dict[str, Path]) -> None:
    times = iter([datetime(2025, 1, 1, h, tzinfo=UTC) for h in range(24)])
    source = PolicySource(repo.root, keys["signers"], clock=lambda: next(times))
    with pytest.raises(PolicyRefused, match="no policy loaded yet"):
        source.current()
    good = repo.commit("v1", keys["alice"])
    assert source.reload() is True
    assert source.reload() is False  # same commit: nothing to do
    _loosen_training(repo)
    bad = repo.commit("loosen training", keys["alice"])
    assert source.reload() is False
    status = source.status()
    assert source.current().id == good and status.policy_id == good
    assert status.commit is not None and status.commit.signer == "alice@hospital.example"
    assert status.last_refusal is not None
    assert status.last_refusal.commit == bad
    assert "policy tests failed" in status.last_refusal.reason
    assert "raw identifiers are never used for training" in status.last_refusal.reason
    json.dumps(status.to_dict())
    # an unsigned fix is refused too; a signed fix is taken
    repo.git("revert", "--no-edit", "HEAD")
    unsigned_fix = repo.git("rev-parse", "HEAD")
    assert source.reload() is False
    assert source.status().last_refusal.commit == unsigned_fix  # type: ignore[union-attr]
    fixed = repo.commit("fix, signed", keys["alice"])
    assert source.reload() is True and source.current().id == fixed


def test_rollback_to_an_older_signed_commit_is_refused(repo: Repo, keys: dict[str, Path]) -> None:
    first = repo.commit("v1", keys["alice"])
    (repo.root / "tests" / "extra.yaml").write_text(
        "tests:\n  - name: extra\n    app: billing-bot\n    purpose: inference\n"
        "    model: smollm2-135m\n    text: hi\n    expect: {effect: allow}\n"
    )
    second = repo.commit("v2", keys["alice"])
    source = PolicySource(repo.root, keys["signers"])
    assert source.reload() and source.current().id == second
    repo.git("reset", "-q", "--hard", first)
    assert source.reload() is False
    refusal = source.status().last_refusal
    assert refusal is not None and "rollback refused" in refusal.reason
    assert source.current().id == second
    permissive = PolicySource(repo.root, keys["signers"], allow_rollback=True)
    assert permissive.reload() and permissive.current().id == first


# --- CLI: verify-commit -----------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sovra")
    policy_cli.register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_verify_commit(
    repo: Repo, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    commit = repo.commit("v1", keys["alice"])
    signers = str(keys["signers"])
    assert run_cli(["policy", "verify-commit", str(repo.root), "--allowed-signers", signers]) == 0
    assert f"ok: commit {commit} signed by alice@hospital.example" in capsys.readouterr().out
    argv = ["policy", "verify-commit", str(repo.root), commit, "--allowed-signers", signers]
    assert run_cli([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (
        doc["ok"] is True and doc["commit"] == commit and doc["signer"] == "alice@hospital.example"
    )
    unsigned = repo.commit("unsigned", None)
    assert run_cli([*argv[:3], unsigned, *argv[4:], "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc == {
        "ok": False,
        "commit": unsigned,
        "reason": f"commit {unsigned[:12]} is not signed",
    }
    assert run_cli(["policy", "verify-commit", str(repo.root), "--allowed-signers", "/nope"]) == 2
    assert "no such allowed-signers file" in capsys.readouterr().err
