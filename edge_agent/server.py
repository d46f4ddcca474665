"""Running the edge: uvicorn in a background thread (:func:`serve`, for tests and ``sovra up``)
or in the foreground (:func:`run`, for the CLI and systemd: SIGTERM stops it cleanly).

systemd ``Type=notify``: ``READY=1`` is sent once the socket listens, ``STOPPING=1`` when
shutdown begins. SIGHUP (``systemctl reload``) reloads the policy in a background thread,
between ``RELOADING=1`` and ``READY=1``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from edge_agent.app import create_app
from edge_agent.config import EdgeConfig
from edge_agent.runtime import EdgeRuntime, EdgeStartError
from sovra import systemd

log = logging.getLogger("sovra.edge")


class _Server(uvicorn.Server):
    """uvicorn.Server that tells us (and systemd) when it listens and when it stops."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.startup_done = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
            if self.started:
                systemd.notify("READY=1")
        finally:
            self.startup_done.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        systemd.notify("STOPPING=1")
        await super().shutdown(sockets)

    @property
    def port(self) -> int:
        port: int = self.servers[0].sockets[0].getsockname()[1]
        return port


def _build(config: EdgeConfig) -> tuple[EdgeRuntime, _Server]:
    runtime = EdgeRuntime(config)
    uv_config = uvicorn.Config(
        create_app(runtime),
        host=config.listen_host,
        port=config.listen_port,
        log_config=None,  # the process owner configures logging
        access_log=False,  # the app logs one line per request itself
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=10,
        http="auto",  # httptools (a dependency) when importable: cheaper per request than h11
        loop="asyncio",  # the loop grpc.aio (the broker client) is run and tested on
    )
    return runtime, _Server(uv_config)


@dataclass
class RunningEdge:
    """An edge serving in a background thread."""

    url: str
    port: int
    runtime: EdgeRuntime
    _server: _Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def stop(self, timeout: float = 15.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def __enter__(self) -> RunningEdge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(config: EdgeConfig) -> RunningEdge:
    """Start the edge in a thread; return once it listens (EdgeStartError if it cannot)."""
    runtime, server = _build(config)
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(server.serve())
        except BaseException as exc:  # SystemExit from uvicorn on bind errors, too
            failure.append(exc)
        finally:
            server.startup_done.set()
            runtime.close()

    thread = threading.Thread(target=target, name="sovra-edge", daemon=True)
    thread.start()
    server.startup_done.wait()
    if not server.started:
        thread.join()
        reason = type(failure[0]).__name__ if failure else "see the log"
        raise EdgeStartError(
            f"edge did not start listening on {config.listen_host}:{config.listen_port} ({reason})"
        )
    port = server.port
    url = f"http://{_url_host(config.listen_host)}:{port}"
    return RunningEdge(url, port, runtime, server, thread)


def run(config: EdgeConfig) -> int:
    """Serve in the foreground until SIGTERM/SIGINT; return a process exit code."""
    runtime, server = _build(config)
    # uvicorn handles SIGTERM/SIGINT while serving and re-raises them once it has stopped, so
    # the process would die "killed by SIGTERM" (status 143). The signal already did its work:
    # answer the re-raise with a no-op and exit 0.
    previous = _install_signal_handlers(lambda *_: None)
    hangup = install_reload_handler(runtime)
    try:
        server.run()
    finally:
        if hangup is not None:
            signal.signal(signal.SIGHUP, hangup.previous or signal.SIG_DFL)
        _install_signal_handlers(previous)
        runtime.close()
    return 0 if server.started else 1


class ReloadOnHangup:
    """The SIGHUP handler: reload the policy in a background thread (git may take a while,
    and a signal handler must not block the event loop). ``done`` is set after each reload."""

    def __init__(self, runtime: EdgeRuntime, previous: Any = signal.SIG_DFL) -> None:
        self.runtime = runtime
        self.previous = previous
        self.done = threading.Event()

    def __call__(self, _signum: int, _frame: Any) -> None:
        threading.Thread(target=self._reload, name="sovra-policy-reload", daemon=True).start()

    def _reload(self) -> None:
        try:
            result = self.runtime.reload_from_signal()
            log.info("policy reload on SIGHUP: %s", result)
        except Exception as exc:  # never let a reload kill the process
            log.error("policy reload on SIGHUP failed (%s)", type(exc).__name__)
        finally:
            self.done.set()


def install_reload_handler(runtime: EdgeRuntime) -> ReloadOnHangup | None:
    """Reload the policy on SIGHUP (main thread only; returns None elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    handler = ReloadOnHangup(runtime, signal.getsignal(signal.SIGHUP))
    signal.signal(signal.SIGHUP, handler)
    return handler


def _install_signal_handlers(handler: Any) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None
    if isinstance(handler, dict):
        for sig, previous in handler.items():
            signal.signal(sig, previous)
        return None
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
