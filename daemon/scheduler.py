"""The minutely randomizer: a `schedule` loop in one thread beside waitress.

- Runs are aligned to multiples of the interval since the Unix epoch (60 s: every minute on the
  minute, UTC), each computed from the clock (time.time(), seconds since the epoch, which know no
  time zone), never from the previous run, so nothing drifts and a daylight saving change in the
  local zone neither pauses the runs for an hour nor bunches them up.
- Each run happens in a worker thread, so the loop stays on time; a run still going when the
  next one is due (OVERLAP_GRACE_SECONDS after it), or one that randomized and ended in that
  grace, makes that one skip (logged and counted).
- A failing run is logged and counted and the loop goes on. A run that the database could
  not do (down, busy) is tried again within its slot, after RETRY_FIRST_SECONDS and then twice
  as long each time, while in the first half of the slot; later, the next slot's run does it.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable

import schedule

from daemon.metrics import Metrics
from maxtwo_cli.core.errors import DatabaseUnavailableError, MaxtwoError, RandomizationInProgressError
from maxtwo_cli.core.randomize import RandomizeResult

log = logging.getLogger(__name__)

# The job: given the wall-clock time it was due, randomize (or decide another process already
# did, returning None).
Job = Callable[[dt.datetime], RandomizeResult | None]


# The longest the loop sleeps before it reads the clock again. NOTE: a sleep counts monotonic
# time, which a step of the wall clock (NTP, an operator) does not move, nor does a suspended
# machine: a loop that slept until the next boundary ran late by the whole step.
LONGEST_NAP = 1.0

# A slot's run that failed for the database's sake is tried again after this long (or an eighth
# of the interval, if less), then after twice as long each time, while in the first half of the
# slot: a database that was down for a few seconds at the boundary left the points as they were
# for the whole interval (a day at --interval 86400). Never in the second half, so that the
# points never change twice within half an interval.
RETRY_FIRST_SECONDS = 5.0

# How long a boundary waits for the run before it to end (or a quarter of the interval, if
# less), before it counts as an overlap: a run ending meanwhile without having randomized (a
# start's make-up run, begun just before the boundary, standing back for a slot already run)
# makes no overlap.
OVERLAP_GRACE_SECONDS = 1.0


def next_boundary(now: float, interval: float) -> float:
    """The first multiple of `interval` seconds since the Unix epoch strictly after `now`."""
    return (math.floor(now / interval) + 1) * interval


def latest_boundary(now: float, interval: float) -> float:
    """The last multiple of `interval` seconds since the Unix epoch at or before `now`."""
    return math.floor(now / interval) * interval


def utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC)


class RandomizeScheduler:
    def __init__(
        self,
        job: Job,
        interval: float,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        wait: Callable[[float], object] | None = None,
        catch_up: bool = False,
    ) -> None:
        """`clock`: seconds since the Unix epoch. `wait(seconds)`: sleep up to that long, or less
        once stop() is called (default: _nap); tests pass a fake pair.
        `catch_up`: the slot the start falls in is run at once (the job stands back if a run
        for it is recorded), then every boundary; otherwise from the next boundary on."""
        self._job = job
        self._interval = interval
        self._metrics = metrics
        self._clock = clock
        self._stop = threading.Event()
        # Ends the loop's nap: set at a stop request, and when a retry is planned (its time may
        # come before the nap's end).
        self._wake = threading.Event()
        self._wait = wait if wait is not None else self._nap
        self._loop_thread: threading.Thread | None = None
        self._run_thread: threading.Thread | None = None
        # NOTE: `schedule` computes its due times in naive local time (datetime.now()), which
        # repeats or skips an hour when daylight saving time changes: it holds the job and runs
        # it (run_all), but the loop decides when, from the clock. What it computes itself
        # (job.next_run, idle_seconds) is never read.
        self._scheduler = schedule.Scheduler()
        self._scheduler.every(interval).seconds.do(self._on_due)
        # After an error of the loop itself: an interval's wait, but a minute at most, so that
        # one that persists logs a traceback a minute, not one a nap.
        self._retry_seconds = min(max(interval, LONGEST_NAP), 60.0)
        self._due = 0.0  # the next boundary, in seconds since the epoch
        self._catch_up = catch_up
        self._slot = 0.0  # the boundary being run, for _on_due
        # A failed run to try again: (when, its slot), set by the run's thread (_plan_retry), and
        # the last wait before a retry of that slot.
        self._retry: tuple[float, float] | None = None
        # Whether the last run randomized (set by its thread before it ends; read under
        # _decision, after a join that may have timed out).
        self._randomized = False
        # NOTE: a failing run sets its `over` event and chooses its line (who retries) in one
        # step under this lock; _on_due reads `over` and records a skip in one step under it.
        # So the line always matches the boundary's decision (judged on the wall clock, it named
        # the slot after a boundary whose run still followed: a clock stepped, a loop woken late).
        self._decision = threading.Lock()
        self._run_over = threading.Event()  # the latest run's end
        self._run_over.set()  # (no run yet)
        self._overlap_skipped: float | None = None  # the last boundary skipped as an overlap
        self._retried_slot, self._retry_wait = 0.0, 0.0

    def start(self) -> None:
        now = self._clock()
        self._due = next_boundary(now, self._interval)
        if self._catch_up:
            # NOTE: a slot that passed while no daemon ran (an upgrade across it, an outage) was
            # never made up: at --interval 86400, a daemon down across 00:00 UTC left the points
            # as they were for a whole day. The job finds a slot already run and stands back.
            self._due -= self._interval
            log.info("randomizing every %g s: the slot of %s now, unless it has run, then from %s",
                     self._interval, utc(self._due).isoformat(), utc(self._due + self._interval).isoformat())
        else:
            log.info("randomizing every %g s, next at %s", self._interval, utc(self._due).isoformat())
        self._loop_thread = threading.Thread(target=self._loop, name="maxtwo-scheduler", daemon=True)
        self._loop_thread.start()

    def stopping(self) -> bool:
        """Whether a stop was requested (request_stop)."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Start no run from now on (one already running goes on); stop() waits for the end."""
        self._stop.set()
        self._wake.set()

    def _nap(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()  # (the loop looks at what woke it, the stop and the retry, itself)

    def stop(self, timeout: float) -> bool:
        """Stop the loop and wait up to `timeout` s for it and a running randomization to end.

        Returns False if either is still running; the process may exit anyway, because a
        transaction that never commits is rolled back by the database.
        """
        deadline = time.monotonic() + timeout
        self.request_stop()
        # The loop first: once it has ended, no new run can start behind our back.
        if self._loop_thread is not None:
            self._loop_thread.join(max(0.0, deadline - time.monotonic()))
        if self._run_thread is not None:
            self._run_thread.join(max(0.0, deadline - time.monotonic()))
        running = self._run_thread is not None and self._run_thread.is_alive()
        if running:
            log.warning("a randomization is still running at shutdown; the database will roll it back")
        looping = self._loop_thread is not None and self._loop_thread.is_alive()
        if looping:
            log.warning("the scheduler loop did not stop within %g s", timeout)
        return not (running or looping)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # NOTE: the loop must outlive any error, or no run ever starts again
                self._metrics.randomize_failures.inc()
                log.exception("the randomization scheduler failed; it tries again in %g s", self._retry_seconds)
                self._wait(self._retry_seconds)

    def _step(self) -> None:
        """Sleep towards the next boundary, or run the slot that is due."""
        now = self._clock()
        if now < self._due - self._interval:
            # The system clock was set back: aim at the next boundary from where it is now,
            # rather than wait for the one aimed at before.
            self._due = next_boundary(now, self._interval)
        retry = self._retry
        if retry is not None and not retry[1] <= now < retry[1] + self._interval / 2:
            # Past the first half of its slot (a loop woken late, a clock stepped forward) or
            # before it (set back): no retry. (Late, it ran after the next boundary, whose own
            # run was then skipped as an overlap, or both ran back to back.)
            self._retry = None
            log.warning("the retry of the randomization due at %s is dropped: it came past the first half of "
                        "its slot; the next slot's run, at %s, retries", utc(retry[1]).isoformat(),
                        utc(next_boundary(now, self._interval)).isoformat())
            retry = None
        if retry is not None and now >= retry[0]:
            self._retry = None
            if self._run_thread is not None:
                self._run_thread.join(LONGEST_NAP)  # the failed run, ending
            self._slot = retry[1]
            self._scheduler.run_all()
            return
        if now < self._due:
            wake = self._due if retry is None else min(self._due, retry[0])
            self._wait(min(wake - now, LONGEST_NAP))
            return
        # The latest boundary reached: a loop woken late (a suspended machine, a clock stepped
        # forward) runs once, for the slot it is in, rather than once for each one missed.
        slot = max(self._due, latest_boundary(now, self._interval))
        missed = round((slot - self._due) / self._interval)
        if missed:
            log.warning(
                "%d randomization(s) due from %s missed: the scheduler woke up late",
                missed,
                utc(self._due).isoformat(),
            )
        # The boundary after this slot, set first: a slow pass repeats no slot, a loop that is
        # late again is handled as above, and a pass that fails is not retried at once.
        self._due = next_boundary(slot, self._interval)
        self._slot = slot
        self._scheduler.run_all()

    def _on_due(self) -> None:
        if self._stop.is_set():
            return
        due_at = utc(self._slot)
        if self._run_thread is not None and self._run_thread.is_alive():
            # NOTE: skipped at once, the slot after a make-up run that stood back (a restart a few
            # ms before a boundary, the slot done before it; the run opens a connection first)
            # had no run on any daemon: the points stayed for two intervals (an audit).
            self._run_thread.join(self._overlap_grace())
            if self._stop.is_set():
                return
            with self._decision:
                running = not self._run_over.is_set()  # read once: the message must match the decision
                if running or self._randomized:
                    self._overlap_skipped = self._slot
            if running or self._randomized:
                self._metrics.randomize_skipped.labels(reason="overlap").inc()
                log.warning("randomization due at %s skipped: the previous one %s", due_at,
                            "is still running" if running else "ran past this boundary")
                return
        over = threading.Event()
        run_thread = threading.Thread(
            target=self._run, args=(self._slot, due_at, over), name="maxtwo-randomize", daemon=True
        )
        try:
            run_thread.start()
        except RuntimeError as ex:  # no thread to be had (TasksMax, memory): the next slot retries
            self._metrics.randomize_failures.inc()
            log.error("randomization due at %s failed: cannot start its thread: %s", due_at, ex)
            return
        self._run_thread, self._run_over = run_thread, over  # only a started thread: stop() joins it

    def _run(self, slot: float, due_at: dt.datetime, over: threading.Event) -> None:
        try:
            self._run_job(slot, due_at, over)
        finally:
            over.set()

    def _run_job(self, slot: float, due_at: dt.datetime, over: threading.Event) -> None:
        self._randomized = False
        try:
            result = self._job(due_at)
        except RandomizationInProgressError as ex:
            if ex.stopping:
                log.info("randomization due at %s: not waited for further: this daemon stops", due_at)
                return
            # Not failed: the job waited for that run up to the half of the slot.
            self._metrics.randomize_skipped.labels(reason="elsewhere").inc()
            log.info("randomization due at %s: left to another process's run, still going at the half of the slot",
                     due_at)
            return
        except MaxtwoError as ex:
            self._metrics.randomize_failures.inc()
            wait = self._plan_retry(slot) if isinstance(ex, DatabaseUnavailableError) else None
            if wait is None:
                with self._decision:
                    over.set()  # from here on, the boundary waiting for this run runs its own
                    retries = self._next_slot_retries(slot)
            else:
                retries = f"retrying in {wait:g} s"
            log.error("randomization due at %s failed: %s; %s", due_at, ex, retries)
            return
        except Exception:  # NOTE: a scheduled job never kills its loop
            self._metrics.randomize_failures.inc()
            log.exception("randomization due at %s failed unexpectedly", due_at)
            return
        if result is None:
            self._metrics.randomize_skipped.labels(reason="elsewhere").inc()
            log.info("randomization due at %s: done already (by another daemon, or before a restart), or another "
                     "daemon's run for the slot before ended after this boundary", due_at)
            return
        self._randomized = True
        self._metrics.randomize_duration.observe(result.seconds)
        # By this process's clock, as Prometheus's time() and alerts read it: randomized_at is
        # the database's clock on PostgreSQL, which may be set otherwise.
        self._metrics.randomize_last_success.set(self._clock())
        self._metrics.saw_epoch(result.epoch)
        # (A run elsewhere that rolled back, its daemon stopped mid-run: this slot taken over.)
        waited = f", after {result.waited:.1f} s waiting for another process's run, which rolled back" if result.waited else ""
        log.info("randomized %d users in %.3f s (epoch %d)%s", result.rows, result.seconds, result.epoch, waited)
        if result.seconds > self._interval / 2:
            log.warning(
                "randomization took %.1f s, more than half the %g s interval",
                result.seconds,
                self._interval,
            )

    def _plan_retry(self, slot: float) -> float | None:
        """Arrange for the slot's run to be tried again (RETRY_FIRST_SECONDS), if there is time
        in the first half of the slot: the wait, or None."""
        if self._retried_slot == slot:
            wait = self._retry_wait * 2
        else:
            wait = min(RETRY_FIRST_SECONDS, self._interval / 8)
        at = self._clock() + wait
        if at >= slot + self._interval / 2:
            return None
        self._retried_slot, self._retry_wait = slot, wait
        self._retry = (at, slot)
        self._wake.set()  # the loop's nap may end after `at`
        return wait

    def _overlap_grace(self) -> float:
        return min(OVERLAP_GRACE_SECONDS, self._interval / 4)

    def _next_slot_retries(self, slot: float) -> str:
        """Who retries a run of `slot` that failed now; called under self._decision."""
        now = self._clock()
        latest = latest_boundary(now, self._interval)
        if latest > slot and self._overlap_skipped != latest:
            # Failed past its slot's end, its boundary not skipped: the boundary's run, which
            # waits for this one (_on_due), follows at once.
            return f"the run due at {utc(latest).isoformat()}, which waited for this one, retries"
        # (The next boundary from now: a run that outlasted its slot made the next one skip.)
        return f"the next slot's run, at {utc(next_boundary(now, self._interval)).isoformat()}, retries"
