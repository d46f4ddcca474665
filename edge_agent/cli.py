"""``sovra edge ...`` subcommands: serve, api-key, audit verify|tail.

``register(subparsers)`` adds the ``edge`` group to the top-level ``sovra`` parser; each leaf
sets ``func(args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from edge_agent.config import ConfigError, EdgeConfig


def register(subparsers: Any) -> None:
    edge = subparsers.add_parser("edge", help="on-premises edge agent")
    sub = edge.add_subparsers(dest="edge_command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API (foreground)")
    _config_arg(serve)
    serve.set_defaults(func=_serve)

    api_key = sub.add_parser("api-key", help="generate an app API key and its config hash")
    api_key.add_argument("--app", default="my-app", help="app name for the printed snippet")
    api_key.set_defaults(func=_api_key)

    audit = sub.add_parser("audit", help="inspect the audit chain")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="verify the hash chain; exit 1 if broken")
    _config_arg(verify)
    verify.set_defaults(func=_audit_verify)
    tail = audit_sub.add_parser("tail", help="print the last entries as JSON lines")
    _config_arg(tail)
    tail.add_argument("-n", type=int, default=20, help="number of entries (default 20)")
    tail.set_defaults(func=_audit_tail)


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="edge TOML config file")


def _load(path: Path) -> EdgeConfig | None:
    try:
        return EdgeConfig.from_toml(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    from edge_agent.runtime import EdgeStartError
    from edge_agent.server import run

    config = _load(args.config)
    if config is None:
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
    try:
        return run(config)
    except EdgeStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _api_key(args: argparse.Namespace) -> int:
    from edge_agent.api_keys import generate_api_key

    key, digest = generate_api_key()
    print(f"API key (give it to the app; it is not stored anywhere): {key}")
    print(f'\n[[apps]]\nname = "{args.app}"\nkey_sha256 = "{digest}"\nmodels = []')
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from sovra.audit import AuditLog

    config = _load(args.config)
    if config is None:
        return 2
    if not config.audit_path.exists():
        print(f"error: no audit log at {config.audit_path}", file=sys.stderr)
        return 2
    with AuditLog(config.audit_path) as audit:
        report = audit.verify()
    if report.ok:
        print(f"ok: {report.entries} entries, chain intact")
        return 0
    print(f"BROKEN at entry {report.first_bad_seq}: {report.reason}", file=sys.stderr)
    return 1


def _audit_tail(args: argparse.Namespace) -> int:
    from sovra.audit import AuditLog

    config = _load(args.config)
    if config is None:
        return 2
    if not config.audit_path.exists():
        print(f"error: no audit log at {config.audit_path}", file=sys.stderr)
        return 2
    with AuditLog(config.audit_path) as audit:
        for entry in audit.tail(args.n):
            print(json.dumps(entry.to_json_dict(), sort_keys=True))
    return 0
