"""systemd service notification (sd_notify(3)) without libsystemd.

The protocol: send one datagram of newline-separated ``KEY=VALUE`` assignments to the
``AF_UNIX``/``SOCK_DGRAM`` socket named by ``$NOTIFY_SOCKET``. A name starting with ``@`` is in
the Linux abstract namespace (the ``@`` stands for a leading NUL byte).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd.

    Returns False when ``$NOTIFY_SOCKET`` is unset or empty (not started by systemd with
    ``Type=notify``), names an unsupported socket (only AF_UNIX paths and abstract names), or
    the send fails; a service must keep running whether or not systemd listens.
    """
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    if target.startswith("@"):
        address = "\0" + target[1:]
    elif target.startswith("/"):
        address = target
    else:
        log.warning("NOTIFY_SOCKET is not an AF_UNIX path or abstract name; not notifying")
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", target, exc.strerror or exc)
        return False
    return True
