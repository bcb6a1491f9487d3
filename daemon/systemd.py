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
    """Seconds between WATCHDOG=1 pings (a quarter of systemd's timeout), or None.

    NOTE: not the half that sd_watchdog_enabled(3) suggests: the daemon skips a ping while it
    finds a problem, and at half the timeout one check that caught a passing problem (a 10 s
    stall of the serving loop) left the next ping just past systemd's deadline: a restart (a
    review). At a quarter, a problem must last through three checks in a row, 30 s or more of
    WatchdogSec=60, and the last ping a whole quarter before the deadline."""
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
    return timeout / 1_000_000 / 4 if timeout > 0 else None
