"""The scheduler's timing rules, with a short interval and jobs that stand in for the database
(the real randomization is covered end to end in test_daemon_e2e.py)."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from daemon.metrics import Metrics
from daemon.scheduler import RandomizeScheduler, next_boundary
from maxtwo_cli.core.errors import DatabaseUnavailableError
from maxtwo_cli.core.randomize import RandomizeResult

INTERVAL = 0.5


def result(seconds: float = 0.01) -> RandomizeResult:
    return RandomizeResult(rows=1, seconds=seconds, epoch=1, randomized_at=dt.datetime.now(dt.UTC))


class Recorder:
    def __init__(self, behaviour=None) -> None:
        self.calls: list[tuple[float, dt.datetime]] = []
        self.lock = threading.Lock()
        self.behaviour = behaviour

    def __call__(self, due_at: dt.datetime):
        with self.lock:
            self.calls.append((time.time(), due_at))
            number = len(self.calls)
        if self.behaviour is not None:
            return self.behaviour(number)
        return result()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None)


def run_for(job, seconds: float, metrics: Metrics | None = None) -> Metrics:
    metrics = metrics or Metrics()
    scheduler = RandomizeScheduler(job, INTERVAL, metrics)
    scheduler.start()
    time.sleep(seconds)
    assert scheduler.stop(5)
    return metrics


def test_next_boundary():
    assert next_boundary(119.9, 60) == 120
    assert next_boundary(120.0, 60) == 180
    assert next_boundary(0.2, 0.5) == 0.5


def test_runs_are_aligned_to_wall_clock_boundaries_without_drift():
    job = Recorder(lambda n: (time.sleep(0.2), result(0.2))[1])  # each run takes 40% of the interval
    run_for(job, 3.2)
    assert 5 <= len(job.calls) <= 7
    for started, due_at in job.calls:
        assert due_at.timestamp() % INTERVAL == pytest.approx(0, abs=1e-6)
        assert 0 <= started - due_at.timestamp() < 0.15  # on time, not pushed by the last run
    slots = [due_at.timestamp() for _, due_at in job.calls]
    assert all(b - a == pytest.approx(INTERVAL) for a, b in zip(slots, slots[1:]))


def test_a_run_still_going_makes_the_next_skip():
    job = Recorder(lambda n: (time.sleep(1.2) if n == 1 else None, result())[1])
    metrics = run_for(job, 3.4)
    skipped = sample(metrics, "maxtwo_randomize_skipped_total", reason="overlap")
    assert skipped >= 2  # the slow first run covered two later slots
    starts = [started for started, _ in job.calls]
    assert starts[1] - starts[0] >= 1.2  # never two at once


def test_a_failing_run_is_counted_and_the_loop_goes_on():
    def behaviour(number):
        if number <= 2:
            raise DatabaseUnavailableError("database down")
        if number == 3:
            raise RuntimeError("a bug")
        return result()

    job = Recorder(behaviour)
    metrics = run_for(job, 2.9)
    assert sample(metrics, "maxtwo_randomize_failures_total") == 3
    assert len(job.calls) >= 5
    assert sample(metrics, "maxtwo_randomize_last_success_timestamp_seconds") > 0


def test_a_run_done_elsewhere_is_counted_as_skipped():
    metrics = run_for(Recorder(lambda n: None), 1.2)
    assert sample(metrics, "maxtwo_randomize_skipped_total", reason="elsewhere") >= 2
    assert sample(metrics, "maxtwo_randomize_duration_seconds_count") == 0


def test_stop_waits_for_a_running_randomization():
    finished = threading.Event()

    def slow(number):
        time.sleep(0.8)
        finished.set()
        return result(0.8)

    scheduler = RandomizeScheduler(Recorder(slow), INTERVAL, Metrics())
    scheduler.start()
    time.sleep(INTERVAL + 0.2)  # the first run has started
    assert scheduler.stop(5)
    assert finished.is_set()
