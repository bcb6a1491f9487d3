"""systemd's watchdog, fed only while the daemon demonstrably works.

WATCHDOG=1 goes out every quarter of WatchdogSec= while the serving loop has turned recently and no
batch, nor any lane at one batch, has run longer than the database timeouts allow. A hung
serving loop (nothing answered any more), a batch stuck past every timeout (every write of its
kind waits behind it) or a lane stuck at a batch (its route answered no more) stops the pings,
and systemd's WatchdogSec= and Restart= bring the daemon back. A long randomization does not
stop them: it runs in a thread of its own and holds up neither.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from daemon import systemd

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(
        self,
        *,
        interval: float | None,
        loop_stale_after: float,
        batch_running_for: Callable[[], float],
        batch_limit: float,
        lane_busy_for: Callable[[], float] = lambda: 0.0,
        notify: Callable[[str], object] = systemd.notify,
    ) -> None:
        """`interval`: seconds between pings (systemd.watchdog_interval(); None: no watchdog).
        `loop_stale_after`: the serving loop counts as hung once it has not turned this long.
        `batch_running_for()`: seconds the running batch has taken (0: none runs);
        `batch_limit`: the longest a healthy batch can take, and a lane at one batch
        (`lane_busy_for()`: seconds the lane longest at its batch has been; 0: none is)."""
        self._interval = interval
        self._loop_stale_after = loop_stale_after
        self._batch_running_for = batch_running_for
        self._batch_limit = batch_limit
        self._lane_busy_for = lane_busy_for
        self._notify = notify
        self._last_turn = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._complained = False

    def loop_turned(self) -> None:
        """Called by the serving loop at every turn. A plain assignment: costs next to nothing."""
        self._last_turn = time.monotonic()

    def problem(self) -> str | None:
        """Why the daemon does not work right now, or None if it does."""
        idle = time.monotonic() - self._last_turn
        if idle > self._loop_stale_after:
            return f"the serving loop has not turned for {idle:.1f} s"
        running = self._batch_running_for()
        if running > self._batch_limit:
            return f"a database batch has run for {running:.1f} s, past every timeout"
        busy = self._lane_busy_for()
        if busy > self._batch_limit:
            return f"a lane has been at one batch for {busy:.1f} s, past every timeout"
        return None

    def start(self) -> None:
        if self._interval is None:
            return
        self._last_turn = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="maxtwo-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            problem = self.problem()
            if problem is None:
                self._complained = False
                self._notify("WATCHDOG=1")
            elif not self._complained:
                self._complained = True
                log.error("not pinging systemd's watchdog: %s", problem)
