"""``sovra policy status --config EDGE.toml [--json]``: the edge's active policy and the last
refusal, read from the status file the edge writes on every (re)load attempt.

Exit codes: 0 a policy is active; 1 none is (or the edge has not written a status yet);
2 usage (bad config).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edge_agent.config import ConfigError, EdgeConfig
from edge_agent.policy import STATUS_FILE, ConfigPolicy, read_status

EXIT_OK = 0
EXIT_NONE = 1
EXIT_USAGE = 2


def run_status(args: argparse.Namespace) -> int:
    try:
        config = EdgeConfig.from_toml(args.config)
    except ConfigError as exc:
        print(f"sovra policy: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config.policy is None:
        doc: dict[str, Any] = {
            **ConfigPolicy(config.apps).status(),
            "note": "no [policy] section: the edge config's [[apps]] allow-list decides",
        }
    else:
        path = config.state_dir / STATUS_FILE
        found = read_status(path)
        if found is None:
            doc = {
                "source": config.policy.source,
                "active": None,
                "last_refusal": None,
                "note": f"no status at {path}: the edge has not loaded a policy yet",
            }
        else:
            doc = found
    active = doc.get("active")
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(doc, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
    else:
        _print_text(doc)
    return EXIT_OK if isinstance(active, dict) and active.get("policy_id") else EXIT_NONE


def _print_text(doc: dict[str, Any]) -> None:
    active = doc.get("active") or {}
    rev = f", rev {doc['rev']}" if doc.get("rev") else ""
    print(f"source:       {doc.get('source')}{rev}")
    print(f"active:       {active.get('policy_id') or 'NONE'}")
    if active.get("signer"):
        print(f"signer:       {active['signer']} ({active.get('key_fingerprint') or '-'})")
    if active.get("loaded_at"):
        print(f"loaded at:    {active['loaded_at']}")
    attempt = doc.get("last_attempt")
    if attempt:
        when, trigger, result = attempt.get("at"), attempt.get("trigger"), attempt.get("result")
        print(f"last attempt: {when} ({trigger}): {result}")
    refusal = doc.get("last_refusal")
    if refusal:
        commit = refusal.get("commit") or "-"
        print(f"last refusal: {refusal.get('at')} commit {commit}: {refusal.get('reason')}")
    else:
        print("last refusal: none")
    if doc.get("note"):
        print(f"note:         {doc['note']}")
