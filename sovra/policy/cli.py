"""``sovra policy``: validate, test and explain policies, and check signed policy commits.

Exit codes: 0 ok; 1 the policy is invalid, its tests fail, or the commit is refused; 2 usage
(bad arguments, unreadable input).  ``--json`` prints one JSON document on stdout instead of
text.  ``explain`` prints entity types and counts, never the values it found; it exits 0 for
any decision (the decision is its output).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sovra.policy.engine import InputTooLarge, Policy
from sovra.policy.gitsource import PolicyRefused, load_from_git
from sovra.policy.language import Effect, PolicyInvalid
from sovra.policy.pseudonymise import Pseudonymiser
from sovra.policy.testing import run_tests

__all__ = ["EXIT_INVALID", "EXIT_OK", "EXIT_USAGE", "main", "register"]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def register(subparsers: Any) -> None:
    """Add the ``policy`` command group to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "policy", help="policy: validate, test, explain, verify signed commits"
    )
    sub = parser.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")

    validate = sub.add_parser("validate", help="check a policy directory")
    validate.add_argument("dir", help="policy directory")
    _json_flag(validate)
    validate.set_defaults(func=cmd_validate)

    test = sub.add_parser("test", help="run the tests a policy directory ships with")
    test.add_argument("dir", help="policy directory")
    _json_flag(test)
    test.set_defaults(func=cmd_test)

    explain = sub.add_parser("explain", help="show the decision for one request")
    explain.add_argument("dir", help="policy directory")
    explain.add_argument("--app", required=True)
    explain.add_argument("--purpose", required=True)
    explain.add_argument("--model", required=True)
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the request text")
    source.add_argument("--file", help="file holding the request text (UTF-8; '-' for stdin)")
    explain.add_argument(
        "--label", action="append", default=[], help="a declared data class (repeatable)"
    )
    _json_flag(explain)
    explain.set_defaults(func=cmd_explain)

    verify = sub.add_parser(
        "verify-commit", help="load a policy from a signed git commit (verify, validate, test)"
    )
    verify.add_argument("repo", help="git repository")
    verify.add_argument("rev", nargs="?", default="HEAD", help="revision (default HEAD)")
    verify.add_argument(
        "--allowed-signers", required=True, help="ssh allowed-signers file (git's format)"
    )
    verify.add_argument("--path", default=".", help="policy directory inside the repository")
    _json_flag(verify)
    verify.set_defaults(func=cmd_verify_commit)

    status = sub.add_parser(
        "status", help="the edge's active policy and last refusal (exit 1 if none is active)"
    )
    status.add_argument("--config", type=Path, required=True, help="edge TOML config file")
    _json_flag(status)
    status.set_defaults(func=cmd_status)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def _usage(args: argparse.Namespace, message: str) -> int:
    if getattr(args, "json", False):
        _print_json({"ok": False, "error": message})
    else:
        sys.stderr.write(f"sovra policy: error: {message}\n")
    return EXIT_USAGE


def _load(args: argparse.Namespace) -> Policy | int:
    if not Path(args.dir).is_dir():
        return _usage(args, f"{args.dir}: not a directory")
    try:
        return Policy.load(args.dir)
    except PolicyInvalid as exc:
        if args.json:
            _print_json({"ok": False, "problems": [p.to_dict() for p in exc.problems]})
        else:
            for problem in exc.problems:
                sys.stdout.write(f"{problem}\n")
            sys.stdout.write(f"invalid: {len(exc.problems)} problem(s)\n")
        return EXIT_INVALID


def cmd_validate(args: argparse.Namespace) -> int:
    policy = _load(args)
    if isinstance(policy, int):
        return policy
    spec = policy.spec
    counts = {
        "files": len(spec.files),
        "classes": len(spec.classes),
        "detectors": len(spec.detectors),
        "applications": len(spec.applications),
        "destinations": len(spec.destinations),
        "rules": len(spec.rules),
        "tests": len(spec.tests),
    }
    if args.json:
        _print_json({"ok": True, "policy": policy.id, "problems": [], **counts})
    else:
        summary = ", ".join(f"{n} {k}" for k, n in counts.items())
        sys.stdout.write(f"ok: {policy.id}: {summary}\n")
    return EXIT_OK


def cmd_test(args: argparse.Namespace) -> int:
    policy = _load(args)
    if isinstance(policy, int):
        return policy
    report = run_tests(policy)
    if args.json:
        _print_json(report.to_dict())
    else:
        for result in report.results:
            if result.passed:
                sys.stdout.write(f"PASS {result.name}\n")
            else:
                sys.stdout.write(f"FAIL {result.name} ({result.source})\n")
                for failure in result.failures:
                    sys.stdout.write(f"     {failure}\n")
        sys.stdout.write(report.summary() + "\n")
    return EXIT_OK if report.ok else EXIT_INVALID


def _read_text(args: argparse.Namespace, limit: int) -> str | int:
    if args.text is not None:
        return str(args.text)
    try:
        if args.file == "-":
            data = sys.stdin.buffer.read(limit * 4 + 1)
        else:
            with open(args.file, "rb") as handle:
                data = handle.read(limit * 4 + 1)
    except OSError as exc:
        return _usage(args, f"cannot read {args.file}: {exc.strerror}")
    if len(data) > limit * 4:
        return _usage(args, f"{args.file}: larger than the classification limit")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _usage(args, f"{args.file}: not UTF-8 text (invalid byte at offset {exc.start})")


def cmd_explain(args: argparse.Namespace) -> int:
    policy = _load(args)
    if isinstance(policy, int):
        return policy
    text = _read_text(args, policy.max_text_chars)
    if isinstance(text, int):
        return text
    try:
        classification = policy.classify(text, labels=args.label)
    except InputTooLarge as exc:
        return _usage(args, str(exc))
    except ValueError as exc:
        return _usage(args, str(exc))
    explanation = policy.explain(args.app, args.purpose, args.model, classification)
    decision = explanation.decision
    pseudonymised: str | None = None
    if decision.effect is Effect.PSEUDONYMISE:
        pseudonymised = policy.outbound_text(text, classification, decision, Pseudonymiser())
    if args.json:
        _print_json(explanation.to_dict() | {"pseudonymised_text": pseudonymised})
        return EXIT_OK
    entities = ", ".join(f"{t}={n}" for t, n in sorted(decision.entity_counts.items()))
    lines = [
        f"effect:      {decision.effect.value}",
        f"rule:        {decision.rule_id or '(none)'}",
        f"policy:      {decision.policy_id}",
        f"reason:      {decision.reason}",
        f"classes:     {', '.join(decision.classes) or '(none)'}",
        f"entities:    {entities or '(none)'}",
        f"matched:     {', '.join(decision.matched_rules) or '(none)'}",
    ]
    if decision.destination is not None:
        d, o = decision.destination, decision.obligations
        lines += [
            f"destination: {d.name} (regions {', '.join(d.regions) or '-'})",
            f"obligations: jurisdictions {', '.join(o.allowed_jurisdictions)}; "
            f"TEE {', '.join(o.accepted_tee_types) or 'any'}; "
            f"attestation >= {o.min_attestation}; retention {o.retention}"
            + (f"; pseudonymise {', '.join(o.pseudonymise_classes)}" if pseudonymised else ""),
        ]
    for rule_id, result in explanation.rules:
        if not result:
            lines.append(f"  not {rule_id}: {getattr(result, 'reason', '')}")
    if pseudonymised is not None:
        lines += ["pseudonymised text:", pseudonymised]
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def cmd_verify_commit(args: argparse.Namespace) -> int:
    if not Path(args.repo).is_dir():
        return _usage(args, f"{args.repo}: not a directory")
    if not Path(args.allowed_signers).is_file():
        return _usage(args, f"{args.allowed_signers}: no such allowed-signers file")
    try:
        policy, info = load_from_git(args.repo, args.rev, args.allowed_signers, path=args.path)
    except PolicyRefused as exc:
        if args.json:
            _print_json({"ok": False, "commit": exc.commit, "reason": exc.reason})
        else:
            sys.stdout.write(f"refused: {exc.reason}\n")
        return EXIT_INVALID
    tests = len(policy.spec.tests)
    if args.json:
        _print_json({"ok": True, "policy": policy.id, "tests": tests, **info.to_dict()})
    else:
        sys.stdout.write(
            f"ok: commit {info.commit} signed by {info.signer} ({info.key_fingerprint}); "
            f"policy valid, {tests} test(s) passed\n"
        )
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    # The edge writes the status; reading its config is the edge's business (imported lazily,
    # like every runtime the ``sovra`` command uses).
    from edge_agent.policy_cli import run_status

    return run_status(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m sovra.policy.cli policy ...``)."""
    parser = argparse.ArgumentParser(prog="sovra")
    register(parser.add_subparsers(dest="group", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
