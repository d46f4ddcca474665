"""``sovra broker ...`` commands. ``sovra/cli.py`` calls :func:`register` and then ``args.func``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Final

from sqlalchemy.exc import SQLAlchemyError

from attestation.errors import ReferenceValuesInvalid
from cloud_broker.config import BrokerConfig, ConfigError
from cloud_broker.server import ServeError, serve
from sovra.systemd import notify
from sovra.tls import TLSConfigError

log = logging.getLogger(__name__)

STOP_GRACE_S: Final = 10.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``broker`` command group (``broker serve --config FILE``)."""
    broker = subparsers.add_parser("broker", help="cloud broker: enclave registry and relay")
    commands = broker.add_subparsers(dest="broker_command", metavar="COMMAND", required=True)
    serve_cmd = commands.add_parser("serve", help="run the broker until SIGTERM/SIGINT")
    serve_cmd.add_argument(
        "--config", type=Path, required=True, metavar="FILE", help="broker TOML config"
    )
    serve_cmd.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Run the broker in the foreground; exit code 0 on a clean stop, 2 for a bad config."""
    _default_logging()
    try:
        config = BrokerConfig.from_toml(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        broker = serve(config)
    except (ServeError, TLSConfigError, ReferenceValuesInvalid, SQLAlchemyError, OSError) as exc:
        # Safe to print: the engine hides bound parameters from SQL error messages.
        print(f"error: broker did not start: {exc}", file=sys.stderr)
        return 1
    stop = _stop_on_signals()
    _notify("READY=1")
    log.info("broker ready address=%s", broker.address)
    while not stop.wait(1.0):  # a bounded wait keeps the main thread responsive to signals
        pass
    _notify("STOPPING=1")
    broker.stop(STOP_GRACE_S)
    return 0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


def _notify(message: str) -> None:
    if os.environ.get("NOTIFY_SOCKET"):
        notify(message)  # returns False if systemd is not listening; the broker runs regardless


def _default_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
