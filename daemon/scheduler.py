"""The minutely randomizer: a `schedule` loop in one thread beside waitress.

- Runs are aligned to wall-clock multiples of the interval (60 s: every minute on the minute),
  each computed from the clock, never from the previous run, so nothing drifts.
- Each run happens in a worker thread, so the loop keeps pinging the systemd watchdog; a run
  still going when the next one is due makes that one skip (logged and counted).
- A failing run is logged and counted and the loop goes on; the next interval retries.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable

import schedule

from daemon import systemd
from daemon.metrics import Metrics
from maxtwo_cli.core.errors import MaxtwoError
from maxtwo_cli.core.randomize import RandomizeResult

log = logging.getLogger(__name__)

# The job: given the wall-clock time it was due, randomize (or decide another process already
# did, returning None).
Job = Callable[[dt.datetime], RandomizeResult | None]


def next_boundary(now: float, interval: float) -> float:
    """The first multiple of `interval` seconds since the Unix epoch strictly after `now`."""
    return (math.floor(now / interval) + 1) * interval


class RandomizeScheduler:
    def __init__(self, job: Job, interval: float, metrics: Metrics) -> None:
        self._job = job
        self._interval = interval
        self._metrics = metrics
        self._stop = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._run_thread: threading.Thread | None = None
        self._scheduler = schedule.Scheduler()
        self._watchdog = systemd.watchdog_interval()

    def start(self) -> None:
        # NOTE: `schedule` only knows "every N seconds after the last run", which drifts by the
        # run's duration; its job is re-aimed at the next wall-clock boundary after every run.
        self._due_job = self._scheduler.every(self._interval).seconds.do(self._on_due)
        self._aim(time.time())
        self._loop_thread = threading.Thread(target=self._loop, name="maxtwo-scheduler", daemon=True)
        self._loop_thread.start()
        log.info("randomizing every %g s, next at %s", self._interval, self._due_job.next_run)

    def stop(self, timeout: float) -> bool:
        """Stop the loop and wait up to `timeout` s for a running randomization to end.

        Returns False if it is still running; the process may exit anyway, because a
        transaction that never commits is rolled back by the database.
        """
        deadline = time.monotonic() + timeout
        self._stop.set()
        # The loop first: once it has ended, no new run can start behind our back.
        if self._loop_thread is not None:
            self._loop_thread.join(max(0.0, deadline - time.monotonic()))
        if self._run_thread is not None:
            self._run_thread.join(max(0.0, deadline - time.monotonic()))
        running = self._run_thread is not None and self._run_thread.is_alive()
        if running:
            log.warning("a randomization is still running at shutdown; the database will roll it back")
        return not running

    def _aim(self, now: float) -> None:
        # `schedule` works in naive local time.
        self._due_job.next_run = dt.datetime.fromtimestamp(next_boundary(now, self._interval))

    def _loop(self) -> None:
        while not self._stop.is_set():
            before = self._due_job.next_run
            self._scheduler.run_pending()
            if self._due_job.next_run != before:
                # It ran, and `schedule` set "now + interval"; re-aim at the next boundary after
                # the slot it ran for (a late loop skips no slot, a slow one repeats none).
                self._aim(max(time.time(), before.timestamp()))
            if self._watchdog is not None:
                systemd.notify("WATCHDOG=1")
            idle = self._scheduler.idle_seconds
            wait = 1.0 if idle is None else max(0.0, idle)
            if self._watchdog is not None:
                wait = min(wait, self._watchdog)
            self._stop.wait(wait)

    def _on_due(self) -> None:
        if self._stop.is_set():
            return
        due_at = self._due_job.next_run.astimezone(dt.UTC)
        if self._run_thread is not None and self._run_thread.is_alive():
            self._metrics.randomize_skipped.labels(reason="overlap").inc()
            log.warning("randomization due at %s skipped: the previous one is still running", due_at)
            return
        self._run_thread = threading.Thread(
            target=self._run, args=(due_at,), name="maxtwo-randomize", daemon=True
        )
        self._run_thread.start()

    def _run(self, due_at: dt.datetime) -> None:
        try:
            result = self._job(due_at)
        except MaxtwoError as ex:
            self._metrics.randomize_failures.inc()
            log.error("randomization due at %s failed: %s", due_at, ex)
            return
        except Exception:  # noqa: BLE001 - a scheduled job never kills its loop
            self._metrics.randomize_failures.inc()
            log.exception("randomization due at %s failed unexpectedly", due_at)
            return
        if result is None:
            self._metrics.randomize_skipped.labels(reason="elsewhere").inc()
            log.info("randomization due at %s: done by another process", due_at)
            return
        self._metrics.randomize_duration.observe(result.seconds)
        self._metrics.randomize_last_success.set(result.randomized_at.timestamp())
        self._metrics.epoch.set(result.epoch)
        log.info(
            "randomized %d users in %.3f s (epoch %d)", result.rows, result.seconds, result.epoch
        )
        if result.seconds > self._interval / 2:
            log.warning(
                "randomization took %.1f s, more than half the %g s interval",
                result.seconds,
                self._interval,
            )
