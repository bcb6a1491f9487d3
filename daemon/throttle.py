"""Log lines that a client can cause, let through at most once every few seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class LogThrottle:
    """At most one line every `seconds`, which tells how many were held back since the last.

    NOTE: a line per request was 1,400 lines a second from 4 clients during an outage: past
    journald's rate limit (10,000 lines in 30 s by default), which then drops the lines that
    tell the outage (the scheduler's, the health check's)."""

    def __init__(self, seconds: float, what: tuple[str, str], clock: Callable[[], float] = time.monotonic) -> None:
        """`what`: the lines' subject, singular and plural ("503 for the database", "503s ...")."""
        self.seconds = seconds
        self._what = what
        self._clock = clock
        self._lock = threading.Lock()
        self._let_through_at: float | None = None
        self._held_back = 0
        self._last_held_back_at = 0.0

    def admit(self) -> str | None:
        """None: hold this line back. Else what to add to it: "" or, if lines were held back,
        how many, and how long ago the last of them was when that is a while (it may be an
        earlier outage's: the line would read as if they had come just before it)."""
        with self._lock:
            now = self._clock()
            if self._let_through_at is not None and now - self._let_through_at < self.seconds:
                self._held_back += 1
                self._last_held_back_at = now
                return None
            held_back, self._held_back, self._let_through_at = self._held_back, 0, now
        if not held_back:
            return ""
        ago = now - self._last_held_back_at
        when = f", the last of them {ago:.0f} s ago" if ago >= self.seconds else ""
        return f" ({held_back} more {self._what[held_back > 1]} since the last such line{when})"
