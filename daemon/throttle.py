"""Log lines that a client can cause, let through at most once every few seconds."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class LogThrottle:
    """At most one line every `seconds`, and the count of those held back in between.

    NOTE: a line per request was 1,400 lines a second from 4 clients during an outage: past
    journald's rate limit (10,000 lines in 30 s by default), which then drops the lines that
    tell the outage (the scheduler's, the health check's)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._let_through_at = -math.inf
        self._held_back = 0

    def admit(self) -> int | None:
        """None: hold this line back. Else log it, with the number held back since the last."""
        with self._lock:
            now = self._clock()
            if now - self._let_through_at < self.seconds:
                self._held_back += 1
                return None
            held_back, self._held_back, self._let_through_at = self._held_back, 0, now
            return held_back
