"""The edge's audit chain from the command line: ``sovra audit verify|tail|export`` (and the same
functions under ``sovra edge audit``).

Exit codes: 0 ok; 1 the chain is broken (``verify``, ``export``); 2 usage (bad arguments, a bad
config, no audit log). Output is metadata only: audit records never hold prompts or values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_agent.config import ConfigError, EdgeConfig

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_USAGE = 2


def register(subparsers: Any) -> None:
    """Add the top-level ``audit`` command group (``sovra audit ...``)."""
    audit = subparsers.add_parser("audit", help="verify, tail and export the edge's audit chain")
    add_commands(audit)


def add_commands(audit: argparse.ArgumentParser) -> None:
    """``verify``, ``tail`` and ``export`` under ``audit`` (shared by ``sovra edge audit``)."""
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    verify = sub.add_parser("verify", help="verify the hash chain; exit 1 if broken")
    _config_arg(verify)
    verify.set_defaults(func=run_verify)
    tail = sub.add_parser("tail", help="print the last entries as JSON lines")
    _config_arg(tail)
    tail.add_argument("-n", type=int, default=20, help="number of entries (default 20)")
    tail.set_defaults(func=run_tail)
    export = sub.add_parser(
        "export", help="write every entry as JSON lines (verbatim); exit 1 if the chain is broken"
    )
    _config_arg(export)
    export.add_argument("--format", choices=("jsonl",), default="jsonl", help="jsonl (default)")
    export.add_argument("--output", "-o", type=Path, help="file to write (default: stdout)")
    export.set_defaults(func=run_export)


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="edge TOML config file")


def _audit_path(args: argparse.Namespace) -> Path | None:
    try:
        config = EdgeConfig.from_toml(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if not config.audit_path.exists():
        print(f"error: no audit log at {config.audit_path}", file=sys.stderr)
        return None
    return config.audit_path


def run_verify(args: argparse.Namespace) -> int:
    from sovra.audit import AuditLog

    path = _audit_path(args)
    if path is None:
        return EXIT_USAGE
    with AuditLog(path) as audit:
        report = audit.verify()
    if report.ok:
        print(f"ok: {report.entries} entries, chain intact")
        return EXIT_OK
    print(f"BROKEN at entry {report.first_bad_seq}: {report.reason}", file=sys.stderr)
    return EXIT_BROKEN


def run_tail(args: argparse.Namespace) -> int:
    from sovra.audit import AuditLog

    if args.n < 1:
        print("error: -n must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    path = _audit_path(args)
    if path is None:
        return EXIT_USAGE
    with AuditLog(path) as audit:
        for entry in audit.tail(args.n):
            print(json.dumps(entry.to_json_dict(), sort_keys=True, ensure_ascii=False))
    return EXIT_OK


def run_export(args: argparse.Namespace) -> int:
    from sovra.audit import AuditLog

    path = _audit_path(args)
    if path is None:
        return EXIT_USAGE
    with AuditLog(path) as audit:
        if args.output is None:
            count = audit.export_jsonl(sys.stdout)
            sys.stdout.flush()
        else:
            try:
                with args.output.open("w", encoding="utf-8") as out:
                    count = audit.export_jsonl(out)
            except OSError as exc:
                print(f"error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
                return EXIT_USAGE
        report = audit.verify()
    if not report.ok:
        print(
            f"exported {count} entries, but the chain is BROKEN at entry "
            f"{report.first_bad_seq}: {report.reason}",
            file=sys.stderr,
        )
        return EXIT_BROKEN
    print(f"exported {count} entries, chain intact", file=sys.stderr)
    return EXIT_OK
