"""sd_notify, in a few lines of stdlib: READY=1, WATCHDOG=1, STOPPING=1.

A no-op when NOTIFY_SOCKET is unset (not under systemd, or Type= is not notify).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one sd_notify message; return whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as ex:
        # NOTE: a lost notification must never take the service down with it.
        log.warning("sd_notify %s failed: %s", message.split("=")[0], ex)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings that systemd expects (half its timeout), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        timeout = int(usec)
    except ValueError:
        return None
    # NOTE: 0 or less is no timeout (libsystemd's sd_watchdog_enabled() refuses it too), not a
    # ping loop that never waits.
    return timeout / 1_000_000 / 2 if timeout > 0 else None
