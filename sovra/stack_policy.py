"""The local stack's policies (``sovra up`` / ``sovra demo``).

* The edge's: ``examples/policy`` copied to ``DIR/policy``, made a git repository and committed
  with a signature by a freshly generated SSH key (``DIR/policy-signing-key``) that the
  allowed-signers file ``DIR/allowed_signers`` names, so the default stack loads policy the way
  a deployment does: only signed, validated, tested commits. Without ``git`` or ``ssh-keygen``
  the edge loads the directory instead (unsigned), and the stack says so.
* The broker's: ``DIR/broker-policy.yaml`` keeps the demo tenant in CN (cn-north-1), with
  quotas generous enough for benchmarks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

EXAMPLE_POLICY: Final = Path(__file__).resolve().parents[1] / "examples" / "policy"
EXAMPLE_MODEL: Final = "smollm2-135m"
SIGNER: Final = "sovra-stack@localhost"
_GIT_TIMEOUT_S: Final = 60


@dataclass(frozen=True)
class StackPolicy:
    source: str  # "git", "dir", or "" (none: the edge config's allow-list decides)
    path: Path
    allowed_signers: Path | None = None
    commit: str | None = None
    warning: str = ""

    def edge_table(self) -> dict[str, Any] | None:
        """The edge config's ``[policy]`` table, or None for the config allow-list."""
        if not self.source:
            return None
        table: dict[str, Any] = {"source": self.source, "path": str(self.path), "poll_s": 60}
        if self.source == "git":
            table.update(rev="HEAD", allowed_signers=str(self.allowed_signers))
        return table


def prepare(state: Path, model: str) -> StackPolicy:
    """The edge policy for a stack in ``state``, serving ``model`` (idempotent: an existing
    repository is reused, not re-signed)."""
    repo = state / "policy"
    if not EXAMPLE_POLICY.is_dir():
        return StackPolicy(
            "",
            repo,
            warning=f"{EXAMPLE_POLICY} is not available (installed without the source tree): "
            "the edge decides by its config allow-list",
        )
    if not repo.exists():
        shutil.copytree(EXAMPLE_POLICY, repo)
        if model != EXAMPLE_MODEL:
            _rename_model(repo, model)
    git, keygen = shutil.which("git"), shutil.which("ssh-keygen")
    if git is None or keygen is None:
        missing = "git" if git is None else "ssh-keygen"
        return StackPolicy(
            "dir",
            repo,
            warning=f"{missing} is not installed: the edge loads the policy directory unsigned "
            '(source = "dir") instead of signed git commits',
        )
    try:
        key = state / "policy-signing-key"
        if not key.exists():
            _run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", SIGNER, "-f", str(key)])
        kind, blob = key.with_suffix(".pub").read_text().split()[:2]
        signers = state / "allowed_signers"
        signers.write_text(f'{SIGNER} namespaces="git" {kind} {blob}\n')
        if not (repo / ".git").exists():
            _git(repo, "init", "-q")
        if _git(repo, "status", "--porcelain"):
            _git(repo, "add", "-A")
            _git(
                repo, "-c", "gpg.format=ssh", "-c", f"user.signingkey={key}",
                "commit", "-q", "-S", "-m", "Hospital policy for the local Sovra stack",
            )  # fmt: skip
        commit = _git(repo, "rev-parse", "HEAD")
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return StackPolicy(
            "dir",
            repo,
            warning=f"could not sign the policy repository ({type(exc).__name__}): the edge "
            'loads the policy directory unsigned (source = "dir")',
        )
    return StackPolicy("git", repo, signers, commit)


def write_broker_policy(path: Path, tenant: str, region: str) -> None:
    doc = {
        "version": 1,
        "tenants": {
            tenant: {
                "id": f"{tenant}-cn-residency",
                "jurisdictions": ["CN"],
                "regions": [region],
                "quotas": {"requests_per_min": 60_000, "tokens_per_day": 10_000_000},
            }
        },
    }
    path.write_text(
        "# Broker-side sovereignty rules for the local stack (docs/policy.md).\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )


def _rename_model(repo: Path, model: str) -> None:
    """The example policy names smollm2-135m; a stack serving another model renames it
    everywhere (rules, destinations and the policy's own tests stay consistent)."""
    for path in sorted(repo.rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace(EXAMPLE_MODEL, model), encoding="utf-8")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="Sovra stack",
        GIT_AUTHOR_EMAIL=SIGNER,
        GIT_COMMITTER_NAME="Sovra stack",
        GIT_COMMITTER_EMAIL=SIGNER,
        LC_ALL="C",
    )
    return env


def _run(command: list[str]) -> str:
    proc = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=_GIT_TIMEOUT_S, env=_env()
    )
    return proc.stdout.strip()


def _git(repo: Path, *args: str) -> str:
    return _run(["git", "-C", str(repo), *args])
