"""``sovra edge ...`` subcommands: serve, api-key, enclaves, audit verify|tail.

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

from edge_agent import audit_cli
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

    enclaves = sub.add_parser(
        "enclaves",
        help="fetch the broker's enclave directory and verify every key with this edge's "
        "reference values",
    )
    _config_arg(enclaves)
    enclaves.add_argument("--json", action="store_true", help="print one JSON object")
    enclaves.set_defaults(func=_enclaves)

    audit = sub.add_parser("audit", help="inspect the audit chain (also: sovra audit ...)")
    audit_cli.add_commands(audit)  # one implementation for `sovra edge audit` and `sovra audit`

    from edge_agent.training import cli as training_cli

    training_cli.register(sub)  # dataset, train, jobs (docs/training.md)


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


def _enclaves(args: argparse.Namespace) -> int:
    """What this edge would trust right now, judged locally; nothing is written or audited."""
    import asyncio

    from attestation.errors import ReferenceValuesInvalid
    from attestation.reference_values import ReferenceValues
    from edge_agent.broker_client import BrokerCallError, BrokerClient
    from edge_agent.trusted_set import TrustedEnclaveSet
    from sovra.tls import TLSConfigError

    config = _load(args.config)
    if config is None:
        return 2
    try:
        rv = ReferenceValues.load(config.reference_values)
        config.tls.load()
    except (ReferenceValuesInvalid, TLSConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    async def fetch() -> tuple[tuple[Any, ...], str]:
        client = BrokerClient(
            config.broker, config.tls, refresh_s=0, request_timeout_s=config.request_ttl_s
        )
        await client.open()
        try:
            listing = await client.list_enclaves(force=True)
        finally:
            await client.close()
        return listing.descriptors, listing.ear_verifier_key

    try:
        descriptors, ear_key = asyncio.run(fetch())
    except BrokerCallError as exc:
        print(f"error: cannot list enclaves at {config.broker}: {exc}", file=sys.stderr)
        return 1
    trusted = TrustedEnclaveSet(rv)
    trusted.sync(descriptors, broker_ear_key=ear_key)
    rows = trusted.snapshot(details=True)
    if args.json:
        doc = {"broker": config.broker, "reference_values": rv.source, "enclaves": rows}
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(f"broker {config.broker}; judged with {rv.source}")
    if not rows:
        print("(the broker lists no enclave keys)")
    for row in rows:
        print(_enclave_line(row))
    return 0


def _enclave_line(row: dict[str, Any]) -> str:
    from datetime import UTC, datetime

    head = f"{row['enclave_id']} epoch {row['epoch']}: {row['status']}"
    if row["status"] == "refused":
        return f"{head} ({row['reason']}): {row['detail']}"
    expires = datetime.fromtimestamp(row["expires_at_ms"] / 1000, UTC).isoformat(timespec="seconds")
    return (
        f"{head}{' SIMULATED' if row['simulated'] else ''} region={row['region'] or '-'} "
        f"tee={row['tee_type']} expires={expires} broker_ear={row['broker_ear']}"
    )


_audit_verify = audit_cli.run_verify
_audit_tail = audit_cli.run_tail
