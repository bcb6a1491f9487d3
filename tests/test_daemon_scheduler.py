"""The scheduler's timing rules, with jobs that stand in for the database (the real
randomization is covered end to end in test_daemon_e2e.py).

Most tests run on a fake clock (seconds since the epoch that move only when the scheduler waits)
in a zone with daylight saving time, across its changes; `schedule`'s own idea of now follows
the same fake clock, so a scheduler that let `schedule`'s naive local times decide would see the
local clock jump as it would in production.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
import os
import threading
import time
import types
from collections.abc import Callable, Iterator

import pytest
import schedule

from daemon import scheduler as scheduler_module
from daemon.metrics import Metrics
from daemon.scheduler import RandomizeScheduler, next_boundary
from maxtwo_cli.core.errors import DatabaseUnavailableError, RandomizationInProgressError, SchemaMismatchError
from maxtwo_cli.core.randomize import RandomizeResult

TIMEOUT = 10.0  # for anything that should happen at once; only a broken scheduler waits it out

# Europe/Berlin: 2026-10-25 03:00 CEST becomes 02:00 CET at 01:00 UTC (the local hour repeats);
# 2026-03-29 02:00 CET becomes 03:00 CEST at 01:00 UTC (the local hour is skipped).
FALL_BACK = dt.datetime(2026, 10, 25, 1, 0, tzinfo=dt.UTC).timestamp()
SPRING_FORWARD = dt.datetime(2026, 3, 29, 1, 0, tzinfo=dt.UTC).timestamp()


def result(seconds: float = 0.01) -> RandomizeResult:
    return RandomizeResult(rows=1, seconds=seconds, epoch=1, randomized_at=dt.datetime.now(dt.UTC))


def utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC)


def boundaries(start: float, end: float, interval: float) -> list[float]:
    """The multiples of `interval` in (start, end]."""
    found = []
    at = next_boundary(start, interval)
    while at <= end:
        found.append(at)
        at += interval
    return found


def join_runs() -> None:
    # NOTE: the fake clock stands still while a run's thread finishes (in production the run has
    # the rest of the interval); the scheduler names that thread.
    for thread in threading.enumerate():
        if thread.name == "maxtwo-randomize" and thread is not threading.current_thread():
            thread.join(TIMEOUT)


class FakeClock:
    """time() and wait() for the scheduler: each wait moves the clock on by exactly what was
    asked for (plus any `oversleep` set), after `settle(now)` has let the runs started so far
    have their effect. From `end` on the clock stops and waits return at once, until the test
    stops the scheduler."""

    # A scheduler that asks for waits of 0 over and over (runs bunched up) would never move the
    # clock; after this many waits the clock jumps to the end and the test fails on its runs.
    MAX_WAITS = 2_000

    def __init__(self, start: float, end: float, settle: Callable[[float], None] | None = None) -> None:
        self.now = start
        self.end = end
        self.settle = settle or (lambda now: None)
        self.oversleep = 0.0
        self.waits = 0
        self.at_end = threading.Event()

    def time(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        if self.now >= self.end:
            self.at_end.set()
            time.sleep(0.01)
            return False
        self.settle(self.now)
        self.waits += 1
        if self.waits > self.MAX_WAITS:
            self.now = self.end
            return False
        self.now = min(self.now + seconds + self.oversleep, self.end)
        self.oversleep = 0.0
        return False


class Recorder:
    """The job: records the (fake) time it started and the due time it was given."""

    def __init__(self, clock: Callable[[], float], behaviour=None) -> None:
        self.clock = clock
        self.calls: list[tuple[float, dt.datetime]] = []
        self.lock = threading.Condition()
        self.behaviour = behaviour

    def __call__(self, due_at: dt.datetime):
        with self.lock:
            self.calls.append((self.clock(), due_at))
            number = len(self.calls)
            self.lock.notify_all()
        if self.behaviour is not None:
            return self.behaviour(number)
        return result()

    def wait_for(self, count: int) -> None:
        with self.lock:
            self.lock.wait_for(lambda: len(self.calls) >= count, TIMEOUT)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels or None)


@pytest.fixture
def berlin() -> Iterator[None]:
    """The process in Europe/Berlin for the test, back to the host's zone afterwards."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    try:
        # Without the zone's data the test would silently run in UTC and prove nothing.
        assert time.localtime(FALL_BACK - 1).tm_isdst == 1 and time.localtime(FALL_BACK).tm_isdst == 0
        assert time.localtime(SPRING_FORWARD - 1).tm_isdst == 0
        assert time.localtime(SPRING_FORWARD).tm_isdst == 1
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def schedule_follows(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """`schedule`'s now (naive local time, datetime.now()) read from the fake clock."""

    class ClockDatetime(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime.fromtimestamp(clock.time(), tz)

    fake = types.SimpleNamespace(datetime=ClockDatetime, timedelta=dt.timedelta, time=dt.time)
    monkeypatch.setattr(schedule, "datetime", fake)


def run_on(clock: FakeClock, job, interval: float, monkeypatch, metrics: Metrics | None = None, *,
           catch_up: bool = False) -> Metrics:
    """Run a scheduler on `clock` until the clock reaches its end, then stop it."""
    schedule_follows(clock, monkeypatch)
    metrics = metrics or Metrics()
    scheduler = RandomizeScheduler(job, interval, metrics, clock=clock.time, wait=clock.wait, catch_up=catch_up)
    scheduler.start()
    try:
        assert clock.at_end.wait(TIMEOUT * 6), "the fake clock never reached the end of the window"
    finally:
        assert scheduler.stop(TIMEOUT)
    return metrics


def test_next_boundary():
    assert next_boundary(119.9, 60) == 120
    assert next_boundary(120.0, 60) == 180
    assert next_boundary(0.2, 0.5) == 0.5


@pytest.mark.parametrize(
    ("start", "end", "interval"),
    [
        (FALL_BACK - 180, FALL_BACK + 210, 60),  # 00:57:00 to 01:03:30 UTC
        (FALL_BACK - 60, FALL_BACK + 90, 10),
        (SPRING_FORWARD - 180, SPRING_FORWARD + 210, 60),
        (SPRING_FORWARD - 60, SPRING_FORWARD + 90, 10),
    ],
    ids=["fall-back-60s", "fall-back-10s", "spring-forward-60s", "spring-forward-10s"],
)
def test_runs_happen_at_each_utc_boundary_across_a_dst_change(berlin, monkeypatch, start, end, interval):
    expected = boundaries(start, end, interval)
    recorder: Recorder

    def settle(now: float) -> None:
        recorder.wait_for(len(boundaries(start, now, interval)))
        join_runs()

    clock = FakeClock(start, end, settle)
    recorder = Recorder(clock.time)
    metrics = run_on(clock, recorder, interval, monkeypatch)

    # One run per boundary, none skipped, none doubled, each exactly on time, each told its
    # boundary as an aware UTC time.
    assert [due_at for _, due_at in recorder.calls] == [utc(at) for at in expected]
    assert [started for started, _ in recorder.calls] == expected
    assert all(due_at.utcoffset() == dt.timedelta(0) for _, due_at in recorder.calls)
    assert not sample(metrics, "maxtwo_randomize_skipped_total", reason="overlap")


def test_start_logs_the_next_run_in_utc(berlin, monkeypatch, caplog):
    clock = FakeClock(FALL_BACK - 61.5, FALL_BACK - 61.5)  # 02:58:58.5 CEST
    schedule_follows(clock, monkeypatch)
    scheduler = RandomizeScheduler(Recorder(clock.time), 60, Metrics(), clock=clock.time, wait=clock.wait)
    with caplog.at_level(logging.INFO, logger="daemon.scheduler"):
        scheduler.start()
        assert scheduler.stop(TIMEOUT)
    assert "randomizing every 60 s, next at 2026-10-25T00:59:00+00:00" in caplog.messages


def test_catching_up_runs_the_slot_the_start_falls_in_at_once_then_every_boundary(monkeypatch, caplog):
    """A slot that passed while no daemon ran was never made up: at an interval of a day, a
    daemon down across 00:00 UTC left the points as they were for a whole day."""
    start = 1_790_000_000 + 3600 * 9.5  # 23:43:20 UTC: 16 min 40 s before the next day's slot
    day = 86_400
    clock = FakeClock(start, start + day + 60)
    schedule_follows(clock, monkeypatch)
    recorder = Recorder(clock.time)
    scheduler = RandomizeScheduler(recorder, day, Metrics(), clock=clock.time, wait=clock.wait, catch_up=True)
    with caplog.at_level(logging.INFO, logger="daemon.scheduler"):
        scheduler.start()
        try:
            assert clock.at_end.wait(TIMEOUT * 6)
        finally:
            assert scheduler.stop(TIMEOUT)
    midnight = next_boundary(start, day) - day
    assert [due_at for _, due_at in recorder.calls] == [utc(midnight), utc(midnight + day)]
    assert [started for started, _ in recorder.calls] == [start, midnight + day]
    assert (f"randomizing every 86400 s: the slot of {utc(midnight).isoformat()} now, unless it has run, then from "
            f"{utc(midnight + day).isoformat()}") in caplog.messages
    assert not any("missed" in message for message in caplog.messages)  # nothing to warn of: it runs


def test_stop_ends_the_loop_promptly():
    # A real clock and the default wait: the next run is up to an hour away, and stop() must not
    # wait for it (stop returns False if the loop is still going after its timeout).
    scheduler = RandomizeScheduler(Recorder(time.time), 3600, Metrics())
    scheduler.start()
    assert scheduler.stop(TIMEOUT)


def test_runs_on_the_real_clock_are_on_boundaries():
    interval = 0.5
    recorder = Recorder(time.time)
    scheduler = RandomizeScheduler(recorder, interval, Metrics())
    scheduler.start()
    try:
        recorder.wait_for(3)
    finally:
        assert scheduler.stop(TIMEOUT)
    assert len(recorder.calls) >= 3
    slots = [due_at.timestamp() for _, due_at in recorder.calls]
    assert all(slot % interval == pytest.approx(0, abs=1e-6) for slot in slots)
    assert all(started >= due_at.timestamp() for started, due_at in recorder.calls)  # never early
    # Consecutive boundaries (a loaded machine may run late, then it skips rather than repeats).
    assert all(b > a for a, b in itertools.pairwise(slots))


def test_a_loop_woken_late_runs_once_for_the_current_slot(berlin, monkeypatch, caplog):
    interval = 10
    start = FALL_BACK - 15
    end = FALL_BACK + 75
    recorder: Recorder

    def settle(now: float) -> None:
        recorder.wait_for(1 if now >= FALL_BACK - 10 else 0)
        join_runs()

    clock = FakeClock(start, end, settle)

    def behaviour(number: int) -> RandomizeResult:
        if number == 1:
            clock.oversleep = 3.5 * interval  # as if the machine were suspended for a while
        return result()

    recorder = Recorder(clock.time, behaviour)
    with caplog.at_level(logging.WARNING, logger="daemon.scheduler"):
        run_on(clock, recorder, interval, monkeypatch)
    # The first run at FALL_BACK-10; the loop's next nap (a second) then ends at FALL_BACK+26:
    # one run for the slot it is in (FALL_BACK+20), the two before it missed, then on time again.
    slots = [due_at.timestamp() - FALL_BACK for _, due_at in recorder.calls]
    assert slots == [-10, 20, 30, 40, 50, 60, 70]
    assert any("2 randomization(s) due from 2026-10-25T01:00:00+00:00 missed" in message for message in caplog.messages)


def test_a_clock_stepped_forward_during_a_wait_delays_no_run(monkeypatch):
    """A sleep counts monotonic time, which a step of the wall clock does not move: a loop that
    slept until the next boundary ran late by the whole step (40 s here)."""
    interval = 60
    start = 1_800_000_000 - 5  # 5 s before a boundary
    end = start + 5 + 3 * interval
    recorder: Recorder

    def settle(now: float) -> None:
        recorder.wait_for(len(boundaries(start, now, interval)))
        join_runs()

    clock = FakeClock(start, end, settle)

    def behaviour(number: int) -> RandomizeResult:
        if number == 1:
            clock.oversleep = 40  # the wall clock stepped forward during the next sleep
        return result()

    recorder = Recorder(clock.time, behaviour)
    run_on(clock, recorder, interval, monkeypatch)
    # Each run at its boundary, by the (stepped) wall clock.
    assert [(ran - 1_800_000_000, due_at.timestamp() - 1_800_000_000) for ran, due_at in recorder.calls] == [
        (0, 0), (60, 60), (120, 120), (180, 180)]


def on_a_clock_that_fails_once(clock: FakeClock, failing_reading: int, job, interval: float, metrics: Metrics,
                               monkeypatch) -> RandomizeScheduler:
    """A scheduler whose clock raises at its `failing_reading`-th reading (an error of the loop's own)."""
    readings = 0

    def flaky_time() -> float:
        nonlocal readings
        readings += 1
        if readings == failing_reading:
            raise OSError("the clock failed once")
        return clock.time()

    schedule_follows(clock, monkeypatch)
    return RandomizeScheduler(job, interval, metrics, clock=flaky_time, wait=clock.wait)


def test_the_loop_outlives_an_error_of_its_own(monkeypatch, caplog):
    """An error escaping the loop (its clock, `schedule`) ended every randomization for good,
    with /healthz still 200."""
    interval = 10
    start = 1_800_000_000 - 5
    clock = FakeClock(start, start + 5 + 3 * interval)
    recorder, metrics = Recorder(clock.time), Metrics()
    scheduler = on_a_clock_that_fails_once(clock, 3, recorder, interval, metrics, monkeypatch)
    with caplog.at_level(logging.ERROR, logger="daemon.scheduler"):
        scheduler.start()
        try:
            assert clock.at_end.wait(TIMEOUT * 6), "the fake clock never reached the end of the window"
        finally:
            assert scheduler.stop(TIMEOUT)
    join_runs()
    assert len(recorder.calls) == 4, recorder.calls
    assert sample(metrics, "maxtwo_randomize_failures_total") == 1
    assert any("the randomization scheduler failed" in message for message in caplog.messages)


def test_a_run_still_going_makes_the_next_skip(monkeypatch, caplog):
    interval = 10
    start = 995.0
    first = 1000.0
    release = threading.Event()
    recorder: Recorder

    def settle(now: float) -> None:
        if now >= first:
            recorder.wait_for(1)
        if now >= first + 3 * interval:
            release.set()
            join_runs()

    def behaviour(number: int) -> RandomizeResult:
        if number == 1:
            release.wait(TIMEOUT)
        return result()

    clock = FakeClock(start, first + 6 * interval, settle)
    recorder = Recorder(clock.time, behaviour)
    monkeypatch.setattr(scheduler_module, "OVERLAP_GRACE_SECONDS", 0.05)  # waited for at each boundary
    with caplog.at_level(logging.WARNING, logger="daemon.scheduler"):
        metrics = run_on(clock, recorder, interval, monkeypatch)
    # The first run covered the next three boundaries; then on time again.
    assert sample(metrics, "maxtwo_randomize_skipped_total", reason="overlap") == 3
    assert caplog.text.count("skipped: the previous one is still running") == 3
    assert [due_at.timestamp() for _, due_at in recorder.calls] == [1000, 1040, 1050, 1060]


SLOT = 1_800_000_000.0


def make_up_just_before_a_boundary(monkeypatch, caplog, make_up_ends, *, settle: bool = True) -> tuple[Recorder, Metrics]:
    """A daemon started 5 ms before the boundary after SLOT: its make-up run for SLOT calls
    `make_up_ends(clock)` once the boundary has come (within the grace); the runs after it
    randomize. `settle`: the clock waits for the make-up run to end before the boundary's turn
    (without, the boundary meets the run alive)."""
    clock = FakeClock(SLOT + 59.995, SLOT + 61, lambda now: join_runs() if settle and now >= SLOT + 60 else None)

    def behaviour(number: int) -> RandomizeResult | None:
        if number == 1:
            deadline = time.monotonic() + TIMEOUT
            while clock.time() < SLOT + 60 and time.monotonic() < deadline:
                time.sleep(0.001)
            return make_up_ends(clock)
        return result()

    recorder = Recorder(clock.time, behaviour)
    with caplog.at_level(logging.INFO, logger="daemon.scheduler"):
        metrics = run_on(clock, recorder, 60, monkeypatch, catch_up=True)
    return recorder, metrics


@pytest.mark.parametrize("randomized", [False, True], ids=["stood-back", "randomized"])
def test_a_make_up_run_ending_just_after_the_boundary_skips_it_only_if_it_randomized(
        monkeypatch, caplog, randomized):
    """A daemon restarted a few ms before a boundary makes up the slot it starts in; the slot
    done already, that run stands back, but only once it has a connection: still going at the
    boundary, it made that slot skip as an overlap, and no daemon ran it (an audit). A make-up
    run that did randomize still makes the boundary's skip: the points just changed."""

    def make_up_ends(_clock: FakeClock) -> RandomizeResult | None:
        time.sleep(0.05)
        return result() if randomized else None

    recorder, metrics = make_up_just_before_a_boundary(monkeypatch, caplog, make_up_ends)
    due = [due_at.timestamp() for _, due_at in recorder.calls]
    assert due == ([SLOT] if randomized else [SLOT, SLOT + 60])
    assert sample(metrics, "maxtwo_randomize_skipped_total", reason="overlap") == (1 if randomized else 0)
    assert ("skipped: the previous one ran past this boundary" in caplog.text) is randomized


def test_at_a_60_s_interval_a_boundary_waits_a_second_for_the_run_before_it_not_longer(monkeypatch, caplog):
    """At the default interval a boundary waits OVERLAP_GRACE_SECONDS (1 s; a quarter of the
    interval only if less) for the run before it to end, no longer: a run still going then makes
    the boundary skip as an overlap, even one that stands back a moment later."""

    def make_up_ends(_clock: FakeClock) -> RandomizeResult | None:
        # Ends once the boundary has skipped (a second of real time), or after several seconds.
        deadline = time.monotonic() + 8.0
        while "skipped: the previous one is still running" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        return None

    recorder, metrics = make_up_just_before_a_boundary(monkeypatch, caplog, make_up_ends)
    assert [due_at.timestamp() for _, due_at in recorder.calls] == [SLOT]
    assert sample(metrics, "maxtwo_randomize_skipped_total", reason="overlap") == 1


def test_a_make_up_run_failing_just_after_the_boundary_names_the_run_that_follows_it(monkeypatch, caplog):
    """It ends within the grace: the boundary's run, which waited for it, follows at once (the
    log said the slot after it retries)."""

    def make_up_ends(_clock: FakeClock) -> RandomizeResult:
        raise DatabaseUnavailableError("database down")

    recorder, _ = make_up_just_before_a_boundary(monkeypatch, caplog, make_up_ends)
    assert [due_at.timestamp() for _, due_at in recorder.calls] == [SLOT, SLOT + 60]
    [failure] = [message for message in caplog.messages if "failed" in message]
    assert failure.endswith(f"the run due at {utc(SLOT + 60).isoformat()}, which waited for this one, retries"), failure


def test_a_run_failing_past_the_grace_on_the_clock_names_the_boundary_run_that_still_follows(monkeypatch, caplog):
    """The clock past the boundary's grace when the run fails (a clock stepped, a loop woken
    late), yet the boundary has not decided: its run follows, and the line names it. (Judged
    by the clock, the line named the slot after it.)"""

    def make_up_ends(clock: FakeClock) -> RandomizeResult:
        clock.now = SLOT + 61.5
        raise DatabaseUnavailableError("database down")

    recorder, _ = make_up_just_before_a_boundary(monkeypatch, caplog, make_up_ends)
    assert [due_at.timestamp() for _, due_at in recorder.calls] == [SLOT, SLOT + 60]
    [failure] = [message for message in caplog.messages if "failed" in message]
    assert failure.endswith(f"the run due at {utc(SLOT + 60).isoformat()}, which waited for this one, retries"), failure


def test_a_run_that_failed_within_the_grace_lets_the_boundary_run_however_long_its_thread_lasts(
        monkeypatch, caplog):
    """Once the failed run has chosen the line that names the boundary's run, that run follows,
    even if the failed run's thread outlasts the grace (here its log line takes 1.5 s to write:
    a journal that blocks). Judged by the thread's life, the boundary skipped after the line
    said it would retry."""

    class SlowToWrite(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "failed" in record.getMessage():
                time.sleep(1.5)

    def make_up_ends(_clock: FakeClock) -> RandomizeResult:
        raise SchemaMismatchError("the database holds tables maxtwo did not create")

    slow = SlowToWrite()
    logging.getLogger("daemon.scheduler").addHandler(slow)
    try:
        recorder, _ = make_up_just_before_a_boundary(monkeypatch, caplog, make_up_ends, settle=False)
    finally:
        logging.getLogger("daemon.scheduler").removeHandler(slow)
    assert [due_at.timestamp() for _, due_at in recorder.calls] == [SLOT, SLOT + 60]
    [failure] = [message for message in caplog.messages if "failed" in message]
    assert failure.endswith(f"the run due at {utc(SLOT + 60).isoformat()}, which waited for this one, retries"), failure
    assert "skipped" not in caplog.text


def test_a_run_failing_after_the_boundary_it_made_skip_names_the_slot_after_it(monkeypatch, caplog):
    """Still going past the grace, the run made the boundary skip as an overlap: its failure's
    line names the next slot's run, not that boundary's, which never came."""
    clock = FakeClock(SLOT + 59.995, SLOT + 61, lambda now: join_runs() if now >= SLOT + 60 else None)

    def behaviour(number: int) -> RandomizeResult:
        deadline = time.monotonic() + TIMEOUT
        while "skipped: the previous one is still running" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        clock.now = SLOT + 61.5  # the grace (a second) has passed on the clock too
        raise SchemaMismatchError("the database holds tables maxtwo did not create")

    recorder = Recorder(clock.time, behaviour)
    with caplog.at_level(logging.INFO, logger="daemon.scheduler"):
        run_on(clock, recorder, 60, monkeypatch, catch_up=True)
    assert [due_at.timestamp() for _, due_at in recorder.calls] == [SLOT]
    [failure] = [message for message in caplog.messages if "failed" in message]
    assert failure.endswith(f"the next slot's run, at {utc(SLOT + 120).isoformat()}, retries"), failure


def test_at_a_short_interval_a_boundary_waits_a_quarter_of_it_for_the_run_before(monkeypatch, caplog):
    """At --interval 2 the grace is half a second, a quarter of the interval: a boundary that
    waited out OVERLAP_GRACE_SECONDS for the run before would block the loop up to the next
    boundary (at --interval 1, all of it). The grace is made long here, so that only the
    quarter can end the wait before the run before it does (after TIMEOUT)."""
    monkeypatch.setattr(scheduler_module, "OVERLAP_GRACE_SECONDS", 60.0)
    clock = FakeClock(SLOT + 1.995, SLOT + 3, lambda now: join_runs() if now >= SLOT + 2 else None)

    def behaviour(number: int) -> RandomizeResult | None:
        if number > 1:
            return result()
        deadline = time.monotonic() + TIMEOUT
        while "skipped: the previous one is still running" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        return None  # the make-up run stands back

    recorder = Recorder(clock.time, behaviour)
    with caplog.at_level(logging.INFO, logger="daemon.scheduler"):
        metrics = run_on(clock, recorder, 2, monkeypatch, catch_up=True)
    assert [due_at.timestamp() for _, due_at in recorder.calls] == [SLOT]
    assert sample(metrics, "maxtwo_randomize_skipped_total", reason="overlap") == 1


def test_a_failing_run_is_counted_and_the_loop_goes_on(monkeypatch):
    def behaviour(number):
        if number <= 2:
            raise DatabaseUnavailableError("database down")
        if number == 3:
            raise RuntimeError("a bug")
        return result()

    recorder, metrics = slots_of_10_s(behaviour, monkeypatch, slots=6)
    assert sample(metrics, "maxtwo_randomize_failures_total") == 3
    # The database's failures are tried again within the slot (after 1.25 s, an eighth of the
    # interval, then 2.5 s), the bug's is not.
    assert [(started, due_at.timestamp()) for started, due_at in recorder.calls] == [
        (1010, 1010), (1011.25, 1010), (1013.75, 1010), (1020, 1020), (1030, 1030), (1040, 1040),
        (1050, 1050), (1060, 1060),
    ]
    # When the last run succeeded by the daemon's clock (here the fake one), not by the
    # database's (randomized_at: on PostgreSQL the server's clock).
    assert 1000 < sample(metrics, "maxtwo_randomize_last_success_timestamp_seconds") <= 1060


def run_two_slots_of_60_s(behaviour, monkeypatch, caplog, on_clock=lambda clock: None) -> tuple[Recorder, Metrics]:
    """From 1000 to 1100 at a 60 s interval (boundaries 1020 and 1080), the log at INFO;
    on_clock(clock): the fake clock, once made (for a behaviour that moves it)."""
    recorder: Recorder

    def settle(now: float) -> None:
        recorder.wait_for(1 if now >= 1020 else 0)
        join_runs()

    clock = FakeClock(1000.0, 1100.0, settle)
    on_clock(clock)
    recorder = Recorder(clock.time, behaviour)
    with caplog.at_level(logging.INFO, logger="daemon.scheduler"):
        return recorder, run_on(clock, recorder, 60, monkeypatch)


def test_a_run_the_database_failed_is_retried_in_the_first_half_of_its_slot_only(monkeypatch, caplog):
    """A database down for a few seconds at the boundary left the points as they were for the
    whole interval (a day at --interval 86400); retried, but never in the second half of the
    slot, so that the points never change twice within half an interval."""
    def behaviour(number):
        raise DatabaseUnavailableError("database down")

    recorder, metrics = run_two_slots_of_60_s(behaviour, monkeypatch, caplog)
    # 5 s, then twice as long each time: 1020 + 5 + 10 + 20 would be past 1050.
    assert [(started, due_at.timestamp()) for started, due_at in recorder.calls] == [
        (1020, 1020), (1025, 1020), (1035, 1020), (1080, 1080), (1085, 1080), (1095, 1080),
    ]
    assert sample(metrics, "maxtwo_randomize_failures_total") == 6
    failures = [message for message in caplog.messages if "failed" in message]
    assert [message.rpartition("; ")[2] for message in failures[:3]] == [
        "retrying in 5 s", "retrying in 10 s", "the next slot's run, at 1970-01-01T00:18:00+00:00, retries",
    ]


def test_a_retry_whose_time_passed_with_the_first_half_of_its_slot_is_dropped(monkeypatch, caplog):
    """A loop woken late (a suspended machine) ran the retry of the slot before after the next
    boundary: that slot's run skipped as an overlap, or both ran back to back (a review)."""
    clocks: list[FakeClock] = []

    def behaviour(number):
        if number == 1:
            clocks[0].oversleep = 65  # the loop's next wait ends 65 s late
            raise DatabaseUnavailableError("database down")
        return result()

    recorder, metrics = run_two_slots_of_60_s(behaviour, monkeypatch, caplog, on_clock=clocks.append)
    assert [(started, due_at.timestamp()) for started, due_at in recorder.calls] == [(1020, 1020), (1086, 1080)]
    assert not sample(metrics, "maxtwo_randomize_skipped_total", reason="overlap")
    # Said, not dropped silently: the failure's line had said "retrying in 5 s" (a third review).
    assert "the retry of the randomization due at 1970-01-01T00:17:00+00:00 is dropped" in caplog.text


def test_a_retry_is_not_held_up_by_the_loop_s_nap():
    """On the real clock: the loop naps up to a second, and a retry planned during the nap ran
    only after it, at --interval 1 at the next boundary (a review). Planned, it ends the nap."""
    interval = 2.0
    calls: list[tuple[float, dt.datetime]] = []

    def job(due_at: dt.datetime):
        calls.append((time.time(), due_at))
        if len(calls) == 1:
            time.sleep(0.05)
            raise DatabaseUnavailableError("database down")
        return result()

    scheduler = RandomizeScheduler(job, interval, Metrics())
    scheduler.start()
    try:
        deadline = time.monotonic() + 3 * interval + TIMEOUT
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        assert scheduler.stop(TIMEOUT)
    (failed_at, due), (retried_at, retried_due) = calls[:2]
    assert retried_due == due
    # Planned 0.25 s (an eighth of the interval) after the failure; at the latest in the first
    # half of the slot, or it would not run at all.
    assert failed_at + 0.05 + 0.25 <= retried_at + 0.01 and retried_at < due.timestamp() + interval / 2


def test_a_run_that_failed_for_another_reason_is_not_retried(monkeypatch, caplog):
    def behaviour(number):
        raise SchemaMismatchError("the database holds tables maxtwo did not create")

    clock = FakeClock(1000.0, 1030.0, lambda now: join_runs())
    recorder = Recorder(clock.time, behaviour)
    with caplog.at_level(logging.ERROR, logger="daemon.scheduler"):
        metrics = run_on(clock, recorder, 10, monkeypatch)
    assert [started for started, _ in recorder.calls] == [1010, 1020, 1030]
    assert sample(metrics, "maxtwo_randomize_failures_total") == 3
    # Failed within its own slot (here at once): the line names the next slot's run, not the
    # run it is itself as "the run ... which waited for this one".
    failure = next(message for message in caplog.messages if "failed" in message)
    assert failure.endswith(f"the next slot's run, at {utc(1020).isoformat()}, retries"), failure


def test_a_run_whose_thread_cannot_start_is_counted_and_the_loop_goes_on(monkeypatch):
    real_start = threading.Thread.start
    refused: list[str] = []

    def start(thread):
        if thread.name == "maxtwo-randomize" and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")  # TasksMax, RLIMIT_NPROC, memory
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    clock = FakeClock(1000.0, 1030.0, lambda now: join_runs())
    recorder = Recorder(clock.time)
    metrics = run_on(clock, recorder, 10, monkeypatch)  # and stop() ends cleanly
    assert refused and sample(metrics, "maxtwo_randomize_failures_total") == 1
    assert [due_at.timestamp() for _, due_at in recorder.calls] == [1020, 1030]  # 1010 refused


def test_a_slot_left_to_another_process_s_run_is_counted_as_skipped_not_failed(monkeypatch, caplog):
    """The job waited for that run up to the half of the slot (core/randomize.py): no retry."""
    def behaviour(number):
        raise RandomizationInProgressError("another process's randomization still holds the lock")

    recorder, metrics = run_two_slots_of_60_s(behaviour, monkeypatch, caplog)
    assert [(started, due_at.timestamp()) for started, due_at in recorder.calls] == [(1020, 1020), (1080, 1080)]
    assert sample(metrics, "maxtwo_randomize_failures_total") == 0
    assert sample(metrics, "maxtwo_randomize_skipped_total", reason="elsewhere") == 2
    assert "left to another process's run, still going at the half of the slot" in caplog.text


def test_a_wait_ended_by_a_stop_is_neither_skipped_nor_failed(monkeypatch, caplog):
    """It said the other run was still going at the half of the slot (a review): unknown."""
    def behaviour(number):
        raise RandomizationInProgressError("this process stops", stopping=True)

    recorder, metrics = run_two_slots_of_60_s(behaviour, monkeypatch, caplog)
    assert len(recorder.calls) == 2  # (no retry)
    assert sample(metrics, "maxtwo_randomize_skipped_total", reason="elsewhere") == 0
    assert sample(metrics, "maxtwo_randomize_failures_total") == 0
    assert "not waited for further: this daemon stops" in caplog.text and "left to another" not in caplog.text


def slots_of_10_s(behaviour, monkeypatch, slots: int = 3, metrics: Metrics | None = None) -> tuple[Recorder, Metrics]:
    """The job (Recorder(behaviour)) run by a scheduler through `slots` boundaries of 10 s."""
    start, interval = 1000.0, 10
    end = start + slots * interval
    recorder: Recorder

    def settle(now: float) -> None:
        recorder.wait_for(len(boundaries(start, now, interval)))
        join_runs()

    clock = FakeClock(start, end, settle)
    recorder = Recorder(clock.time, behaviour)
    return recorder, run_on(clock, recorder, interval, monkeypatch, metrics)


def test_a_run_done_elsewhere_is_counted_as_skipped(monkeypatch):
    _, metrics = slots_of_10_s(lambda number: None, monkeypatch)
    assert sample(metrics, "maxtwo_randomize_skipped_total", reason="elsewhere") == 3
    assert sample(metrics, "maxtwo_randomize_duration_seconds_count") == 0


def test_each_run_sets_the_epoch_gauge(monkeypatch):
    recorder, metrics = slots_of_10_s(lambda number: dataclasses.replace(result(), epoch=41 + number), monkeypatch)
    assert len(recorder.calls) == 3
    assert sample(metrics, "maxtwo_epoch") == 44
    assert sample(metrics, "maxtwo_randomize_duration_seconds_count") == 3


def test_a_run_does_not_set_the_epoch_gauge_back_below_what_a_query_saw(monkeypatch):
    """Its epoch committed before another daemon's, which a query saw first."""
    metrics = Metrics()
    metrics.saw_epoch(50)
    slots_of_10_s(lambda number: dataclasses.replace(result(), epoch=41 + number), monkeypatch, metrics=metrics)
    assert sample(metrics, "maxtwo_epoch") == 50


def test_after_an_error_of_its_own_the_loop_tries_again_within_a_minute_whatever_the_interval(monkeypatch):
    """An hour's wait after such an error (the interval's) would run an hourly slot that much late."""
    interval = 3600
    start = 1_800_000_000 - 30  # 30 s before a boundary
    clock = FakeClock(start, start + 30 + interval)
    recorder = Recorder(clock.time)
    scheduler = on_a_clock_that_fails_once(clock, 2, recorder, interval, Metrics(), monkeypatch)
    scheduler.start()
    try:
        recorder.wait_for(1)
    finally:
        assert scheduler.stop(TIMEOUT)
    join_runs()
    [(ran, due_at)] = recorder.calls[:1]
    assert due_at.timestamp() == 1_800_000_000
    assert ran - 1_800_000_000 <= 60  # the minute's wait from 30 s before the boundary: 30 s late


def start_one_run(job) -> tuple[RandomizeScheduler, threading.Event]:
    """A scheduler whose fake clock reaches one boundary and stands still; `started` once the run has."""
    started = threading.Event()

    def run(due_at: dt.datetime):
        started.set()
        return job()

    clock = FakeClock(999.0, 1000.0)
    scheduler = RandomizeScheduler(run, 10, Metrics(), clock=clock.time, wait=clock.wait)
    scheduler.start()
    assert started.wait(TIMEOUT)
    return scheduler, started


def test_stop_waits_for_a_running_randomization():
    finished = threading.Event()

    def slow():
        time.sleep(0.3)
        finished.set()
        return result(0.3)

    scheduler, _ = start_one_run(slow)
    assert scheduler.stop(TIMEOUT)
    assert finished.is_set()


def test_stop_gives_up_on_a_randomization_that_outlasts_its_timeout():
    release = threading.Event()
    scheduler, _ = start_one_run(lambda: (release.wait(TIMEOUT), result())[1])
    try:
        assert scheduler.stop(0.05) is False
    finally:
        release.set()
        join_runs()


def test_a_clock_set_back_an_hour_re_aims_at_the_next_boundary_from_where_it_is(monkeypatch):
    """A wall clock set back (an operator, a bad NTP source) by more than an interval: the loop
    aimed at a boundary an hour away by the clock as it now reads, and no run came for an hour."""
    interval = 60
    boundary = 1_800_000_000
    recorder: Recorder

    def settle(now: float) -> None:
        join_runs()
        if len(recorder.calls) >= 4:
            clock.end = now  # enough seen: the clock stops here

    clock = FakeClock(boundary - 5, boundary + 86_400, settle)

    def behaviour(number: int) -> RandomizeResult:
        if number == 1:
            clock.oversleep = -3600  # the clock is set back an hour during the next wait
        return result()

    recorder = Recorder(clock.time, behaviour)
    run_on(clock, recorder, interval, monkeypatch)
    assert [(ran - boundary, due_at.timestamp() - boundary) for ran, due_at in recorder.calls] == [
        (0, 0), (-3540, -3540), (-3480, -3480), (-3420, -3420)]


def test_a_retry_pending_when_the_clock_is_set_back_before_its_slot_is_dropped(monkeypatch, caplog):
    """Its slot comes again by the clock: the boundary's own run does it, and the retry, kept,
    ran that slot a second time 5 s later."""
    interval = 60
    boundary = 1_800_000_000
    recorder: Recorder

    def settle(now: float) -> None:
        join_runs()

    clock = FakeClock(boundary - 5, boundary + interval, settle)

    def behaviour(number: int) -> RandomizeResult:
        if number == 1:
            clock.oversleep = -90  # during the next wait: back into the slot before
            raise DatabaseUnavailableError("database down")
        return result()

    recorder = Recorder(clock.time, behaviour)
    with caplog.at_level(logging.WARNING, logger="daemon.scheduler"):
        run_on(clock, recorder, interval, monkeypatch)
    assert [(ran - boundary, due_at.timestamp() - boundary) for ran, due_at in recorder.calls] == [
        (0, 0), (-60, -60), (0, 0), (60, 60)]
    assert caplog.text.count("is dropped") == 1


def test_a_retry_whose_loop_wakes_in_the_second_half_of_its_slot_is_dropped(monkeypatch, caplog):
    """Woken late but before the next boundary (here at 1056 for the slot of 1020, 60 s): still
    no retry in the second half of the slot, where the points would change twice within half
    an interval."""
    clocks: list[FakeClock] = []

    def behaviour(number):
        if number == 1:
            clocks[0].oversleep = 35  # the loop's next wait ends at 1056
            raise DatabaseUnavailableError("database down")
        return result()

    recorder, _ = run_two_slots_of_60_s(behaviour, monkeypatch, caplog, on_clock=clocks.append)
    assert [(started, due_at.timestamp()) for started, due_at in recorder.calls] == [(1020, 1020), (1080, 1080)]
    assert caplog.text.count("the retry of the randomization due at 1970-01-01T00:17:00+00:00 is dropped") == 1


def test_a_retry_that_would_come_at_the_very_half_of_its_slot_is_not_planned(monkeypatch, caplog):
    """The second half of a slot begins at its half: at 70 s, the third failure (at +15) would be
    retried 20 s later, at +35, the half of the slot."""
    slot = 70 * 15  # 1050
    clock = FakeClock(slot - 1, slot + 70, lambda now: join_runs())

    def behaviour(number):
        if number <= 3:
            raise DatabaseUnavailableError("database down")
        return result()

    recorder = Recorder(clock.time, behaviour)
    with caplog.at_level(logging.INFO, logger="daemon.scheduler"):
        run_on(clock, recorder, 70, monkeypatch)
    assert [(started - slot, due_at.timestamp() - slot) for started, due_at in recorder.calls] == [
        (0, 0), (5, 0), (15, 0), (70, 70)]
    failures = [message.rpartition("; ")[2] for message in caplog.messages if "failed" in message]
    assert failures == ["retrying in 5 s", "retrying in 10 s",
                        "the next slot's run, at 1970-01-01T00:18:40+00:00, retries"]


def test_a_retry_whose_loop_wakes_at_the_very_half_of_its_slot_is_dropped(monkeypatch, caplog):
    clocks: list[FakeClock] = []

    def behaviour(number):
        if number == 1:
            clocks[0].oversleep = 29  # the loop's next wait (a second) ends at 1050, the half
            raise DatabaseUnavailableError("database down")
        return result()

    recorder, _ = run_two_slots_of_60_s(behaviour, monkeypatch, caplog, on_clock=clocks.append)
    assert [(started, due_at.timestamp()) for started, due_at in recorder.calls] == [(1020, 1020), (1080, 1080)]
    assert "is dropped" in caplog.text


def test_stop_ends_the_loop_s_nap(monkeypatch):
    """A stop request wakes the loop: it does not sleep out its nap (a second, here made an
    hour, so that a stop that waited for it would time out)."""
    monkeypatch.setattr(scheduler_module, "LONGEST_NAP", 3600.0)
    napping = threading.Event()
    scheduler = RandomizeScheduler(Recorder(time.time), 3600, Metrics(), clock=lambda: (napping.set(), time.time())[1])
    scheduler.start()
    assert napping.wait(TIMEOUT)
    time.sleep(0.05)  # into the nap
    assert scheduler.stop(TIMEOUT)


def test_a_planned_retry_does_not_leave_the_loop_spinning():
    """A retry's plan ends the loop's nap; the nap after it must sleep again (the loop read the
    clock in a busy loop, a core at 100 %, until the next stop)."""
    interval = 2.0
    readings = 0
    calls: list[float] = []

    def clock() -> float:
        nonlocal readings
        readings += 1
        return time.time()

    def job(due_at: dt.datetime):
        calls.append(time.time())
        if len(calls) == 1:
            raise DatabaseUnavailableError("database down")
        return result()

    scheduler = RandomizeScheduler(job, interval, Metrics(), clock=clock)
    scheduler.start()
    try:
        deadline = time.monotonic() + 3 * interval + TIMEOUT
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) >= 2
        before = readings
        time.sleep(0.5)
        # A nap (a second at most) per reading, or fewer when a boundary or a retry comes.
        assert readings - before < 20
    finally:
        assert scheduler.stop(TIMEOUT)


def test_stop_says_so_when_the_loop_did_not_end_in_time():
    release = threading.Event()
    napping = threading.Event()

    def stuck_wait(seconds: float) -> None:  # a nap that a stop request does not end
        napping.set()
        release.wait(TIMEOUT)

    scheduler = RandomizeScheduler(Recorder(time.time), 3600, Metrics(), wait=stuck_wait)
    scheduler.start()
    assert napping.wait(TIMEOUT)
    try:
        assert scheduler.stop(0.05) is False
    finally:
        release.set()
        assert scheduler.stop(TIMEOUT)


@pytest.mark.parametrize(("interval", "expected"), [(3600, 60.0), (10, 10.0), (0.25, 1.0)])
def test_after_an_error_of_its_own_the_loop_waits_an_interval_a_nap_at_least_a_minute_at_most(
        monkeypatch, interval, expected):
    """Not at once: an error that persists (a clock that fails every time) made the loop log a
    traceback as fast as it could write them; nor less than a nap at a short interval."""
    start = 1_800_000_000 - 0.5
    clock = FakeClock(start, start)  # the clock stands still: waits return at once
    asked: list[float] = []
    fake_wait = clock.wait

    def wait(seconds: float) -> bool:
        asked.append(seconds)
        return fake_wait(seconds)

    clock.wait = wait  # type: ignore[method-assign]
    scheduler = on_a_clock_that_fails_once(clock, 2, Recorder(clock.time), interval, Metrics(), monkeypatch)
    scheduler.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not asked and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        assert scheduler.stop(TIMEOUT)
    assert asked[0] == expected  # reading 2, the loop's first, failed


def test_a_stop_requested_as_a_run_falls_due_starts_no_run(monkeypatch):
    """The stop comes between the loop's look at it and the run's start (SIGTERM at the
    boundary): no run is started behind stop()'s back."""
    clock = FakeClock(999.0, 1000.0)
    schedule_follows(clock, monkeypatch)
    schedulers: list[RandomizeScheduler] = []

    def stopping_at_the_boundary() -> float:
        now = clock.time()
        if now >= 1000 and schedulers:
            schedulers[0].request_stop()
        return now

    recorder = Recorder(clock.time)
    scheduler = RandomizeScheduler(recorder, 10, Metrics(), clock=stopping_at_the_boundary, wait=clock.wait)
    schedulers.append(scheduler)
    scheduler.start()
    assert scheduler.stop(TIMEOUT)
    join_runs()
    assert recorder.calls == []


@pytest.mark.parametrize(("seconds", "warned"), [(6.0, True), (4.0, False)])
def test_a_run_longer_than_half_the_interval_is_warned_of(monkeypatch, caplog, seconds, warned):
    with caplog.at_level(logging.WARNING, logger="daemon.scheduler"):
        slots_of_10_s(lambda number: result(seconds), monkeypatch)
    assert ("more than half the 10 s interval" in caplog.text) is warned


def test_a_retry_waits_for_the_failed_run_s_thread_to_end(monkeypatch):
    """The failed run's thread may still be going when its retry falls due (its log line
    written to a slow sink): the retry waits for it rather than skip as an overlap."""
    logged = threading.Event()

    class SlowSink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retrying in" in record.getMessage():
                logged.set()
                time.sleep(0.3)

    # The clock moves on once the retry is planned, without waiting for the thread to end.
    clock = FakeClock(1000.0, 1020.0, lambda now: logged.wait(TIMEOUT) if now >= 1010 else None)
    schedule_follows(clock, monkeypatch)
    sink = SlowSink(logging.ERROR)
    logging.getLogger("daemon.scheduler").addHandler(sink)

    def behaviour(number: int) -> RandomizeResult:
        if number == 1:
            raise DatabaseUnavailableError("database down")
        return result()

    recorder, metrics = Recorder(clock.time, behaviour), Metrics()
    try:
        scheduler = RandomizeScheduler(recorder, 10, metrics, clock=clock.time, wait=clock.wait)
        scheduler.start()
        try:
            assert clock.at_end.wait(TIMEOUT)
        finally:
            assert scheduler.stop(TIMEOUT)
    finally:
        logging.getLogger("daemon.scheduler").removeHandler(sink)
    assert [(started, due_at.timestamp()) for started, due_at in recorder.calls] == [
        (1010, 1010), (1011.25, 1010), (1020, 1020)]
    assert not sample(metrics, "maxtwo_randomize_skipped_total", reason="overlap")


def test_a_stop_requested_while_a_boundary_waits_for_the_run_before_starts_no_run(monkeypatch):
    """SIGTERM while the boundary waits out its grace for the run before (which then ends,
    standing back): no run is started behind stop()'s back."""
    slot = 1_800_000_000.0
    clock = FakeClock(slot + 59.995, slot + 61)
    schedulers: list[RandomizeScheduler] = []
    stop_requested = threading.Event()

    def behaviour(number: int) -> RandomizeResult | None:
        if number == 1:  # the make-up run, still going at the boundary
            deadline = time.monotonic() + TIMEOUT
            while clock.time() < slot + 60 and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.05)  # the loop waits for it now
            schedulers[0].request_stop()
            stop_requested.set()
            return None
        return result()

    recorder = Recorder(clock.time, behaviour)
    schedule_follows(clock, monkeypatch)
    scheduler = RandomizeScheduler(recorder, 60, Metrics(), clock=clock.time, wait=clock.wait, catch_up=True)
    schedulers.append(scheduler)
    scheduler.start()
    try:
        assert stop_requested.wait(TIMEOUT)
    finally:
        assert scheduler.stop(TIMEOUT)
    join_runs()
    assert [due_at.timestamp() for _, due_at in recorder.calls] == [slot]


def test_a_run_that_stood_back_after_one_that_randomized_ending_in_the_grace_makes_no_skip(monkeypatch):
    """Whether the run before randomized is that run's own: one that randomized a slot earlier
    must not make a boundary skip after a run that stood back."""
    first = 1_800_000_000.0
    second, third = first + 60, first + 120

    def settle(now: float) -> None:
        if not second <= now < third:  # the second run ends only once the clock reaches the third
            join_runs()

    clock = FakeClock(first - 1, third + 1, settle)

    def behaviour(number: int) -> RandomizeResult | None:
        if number == 2:  # stands back, and ends just after the next boundary, within the grace
            deadline = time.monotonic() + TIMEOUT
            while clock.time() < third and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.05)
            return None
        return result()

    recorder = Recorder(clock.time, behaviour)
    metrics = run_on(clock, recorder, 60, monkeypatch)
    assert [due_at.timestamp() for _, due_at in recorder.calls] == [first, second, third]
    assert not sample(metrics, "maxtwo_randomize_skipped_total", reason="overlap")
