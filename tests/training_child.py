"""Run one training job in this process, as an edge agent would; optionally die by SIGKILL.

``--die-after N --phase received|persisted``: after the N-th upload acknowledgement (the first
one answers the opening "where are we" request), kill this process with SIGKILL either just
after the ack arrived (before the edge persisted it) or just after it was persisted. A
deterministic trigger: no sleeps, no timing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from edge_agent.config import EdgeConfig
from edge_agent.training.service import for_cli
from sovra.audit import AuditLog


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--phase", choices=("received", "persisted"), default="persisted")
    args = parser.parse_args()
    config = EdgeConfig.from_toml(args.config)
    acks = 0

    def on_ack(_job: str, _next_chunk: int, phase: str) -> None:
        nonlocal acks
        if phase == "received":
            acks += 1
        if args.die_after and acks >= args.die_after and phase == args.phase:
            os.kill(os.getpid(), signal.SIGKILL)

    with AuditLog(config.audit_path) as audit:
        service = for_cli(config, audit=audit, on_ack=on_ack)
        try:
            job = service.advance(args.job, wait=True)
        finally:
            service.close()
    print(job["state"], flush=True)
    return 0 if job["state"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
