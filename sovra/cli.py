"""The ``sovra`` command. Runtime command groups are imported only when their group is used, so
the runtimes stay independent of each other and of this module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

# group name -> (module that provides ``register(subparsers)``, help)
_COMMAND_GROUPS = {
    "edge": ("edge_agent.cli", "on-prem edge agent"),
    "broker": ("cloud_broker.cli", "cloud broker"),
    "enclave": ("enclave.cli", "enclave runtime (inside the TEE)"),
    "attest": ("attestation.cli", "verify attestation evidence"),
    "policy": ("sovra.policy.cli", "validate, test and explain data-sovereignty policy"),
    "audit": ("edge_agent.audit_cli", "verify, tail and export the edge's audit chain"),
}


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovra", description="Sovra: confidential hybrid-cloud AI (edge, broker, enclave)"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    from sovra import pki, stack

    pki_parser = sub.add_parser("pki", help="development PKI")
    pki_sub = pki_parser.add_subparsers(dest="pki_command", required=True)
    init = pki_sub.add_parser("init", help="create a dev CA and component certificates")
    pki.add_init_arguments(init)
    init.set_defaults(func=pki.run_init)

    stack.register(sub)

    # Only the group named on the command line is imported: runtimes stay independent, and
    # start-up does not pay for modules the command does not use.
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in _COMMAND_GROUPS.items():
        if name == wanted:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(args_list)
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.parse_args([*args_list, "--help"])
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
