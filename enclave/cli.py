"""``sovra enclave serve|measure``. ``sovra/cli.py`` calls :func:`register`; each subcommand sets
``func`` (``args.func(args) -> int`` is the exit code)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from enclave.config import ConfigError, EnclaveConfig
from enclave.workloads import WorkloadUnavailable
from sovra.tls import TLSConfigError

STOP_GRACE_S = 10.0


def register(subparsers: Any) -> None:
    """Add the ``enclave`` command group to an argparse subparsers object."""
    group = subparsers.add_parser("enclave", help="run or measure a (SIMULATED TEE) enclave")
    commands = group.add_subparsers(dest="enclave_command", required=True)

    serve = commands.add_parser("serve", help="serve EnclaveService and register with the broker")
    serve.add_argument("--config", type=Path, required=True, help="enclave.toml")
    serve.set_defaults(func=run_serve)

    measure = commands.add_parser("measure", help="print the enclave measurement (SHA-384 hex)")
    measure.add_argument("--config", type=Path, required=True, help="enclave.toml")
    measure.add_argument("--json", action="store_true", help="print a JSON object")
    measure.set_defaults(func=run_measure)


def run_measure(args: argparse.Namespace) -> int:
    from attestation.sim import npu_measurement
    from enclave.measurement import measure, measured_files

    try:
        config = EnclaveConfig.from_toml(args.config)
        value = measure(config.workload)
    except (ConfigError, WorkloadUnavailable, OSError) as exc:
        return _fail(exc)
    if args.json:
        doc = {
            "measurement": value,
            "algorithm": "sha384",
            "simulated": config.tee.backend == "sim",
            "workload": config.workload.kind,
            "files": measured_files(),
            # The simulated NPUs' firmware measurement, for reference values' npu_measurements.
            "npus": config.tee.npus,
            "npu_firmware": config.tee.npu_firmware,
            "npu_measurement": npu_measurement(config.tee.npu_firmware),
        }
        print(json.dumps(doc, indent=2))
    else:
        print(value)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from enclave.server import serve

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    try:
        config = EnclaveConfig.from_toml(args.config)
        running = serve(config, notify_systemd=True)
    except (ConfigError, WorkloadUnavailable, TLSConfigError, OSError) as exc:
        return _fail(exc)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass
    # No deregistration: the broker evicts enclaves that miss heartbeats.
    running.stop(STOP_GRACE_S)
    return 0


def _fail(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, ConfigError) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sovra")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
