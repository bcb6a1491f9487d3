"""What every benchmark shares: runs in rounds after a warm-up, medians, ratios, and failures
that are reported instead of aborting the whole run."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import traceback
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Generic, Self, TypeVar

T = TypeVar("T")

# Passwords that must never reach the console, the report or the JSON (APPSEC).
_secrets: set[str] = set()


def say(message: str) -> None:
    """Progress on stdout, flushed at once so that a long run shows where it is."""
    print(message, flush=True)


def register_secret(secret: str | None) -> None:
    """Remember a password to scrub: as written, percent-encoded (URLs), JSON-escaped."""
    if secret:
        _secrets.update({secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret),
                         json.dumps(secret)[1:-1]})


def scrub(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text


class Stopwatch:
    """`with Stopwatch() as watch: ...` then `watch.seconds`: wall-clock, monotonic."""

    seconds: float = 0.0

    def __enter__(self) -> Self:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self._started


@dataclasses.dataclass(frozen=True)
class Rounds(Generic[T]):
    """One contender's results: the warm-up (reported, never counted) and the measured runs."""

    warmup: T
    runs: list[T]


def run_in_rounds(contenders: Mapping[str, Callable[[], T]], runs: int) -> dict[str, Rounds[T]]:
    """One warm-up per contender, then `runs` rounds in which every contender runs once, in the
    orders of round_order().

    NOTE: rounds, rather than all runs of one contender and then all of the next: absolute
    times on a shared machine drift over minutes, and interleaving spreads that drift evenly
    over the contenders a ratio compares.
    """
    warmups = {name: contender() for name, contender in contenders.items()}
    measured: dict[str, list[T]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_number in range(runs):
        for index in round_order(len(names), round_number):
            measured[names[index]].append(contenders[names[index]]())
    return {name: Rounds(warmups[name], measured[name]) for name in contenders}


def round_order(count: int, round_number: int) -> list[int]:
    """The order of `count` contenders in a round: rows of a Williams design (0, 1, n-1, 2, n-2,
    ..., each next row adding 1 modulo n; for an odd n, each row followed by itself reversed), in
    which every contender comes right after every other one equally often over n rounds (2n for
    an odd n; over fewer, nearly so).

    NOTE: a plain rotation (each round starting one contender further on) kept the cyclic order:
    every contender followed the same one in nearly every round, e.g. maxtwo's POST /increment
    runs right after the synchronous server's burst of commits and checkpoints (a review)."""
    first: list[int] = [0]
    low, high = 1, count - 1
    while len(first) < count:
        first.append(low)
        low += 1
        if len(first) < count:
            first.append(high)
            high -= 1
    if count % 2 == 0:
        return [(index + round_number) % count for index in first]
    row = [(index + round_number // 2) % count for index in first]
    return row[::-1] if round_number % 2 else row


def timing_summary(rounds: Rounds[float]) -> dict[str, Any]:
    """Seconds of every run and their median: the figure every table and ratio uses."""
    return {"warmup": rounds.warmup, "runs": rounds.runs, "median": statistics.median(rounds.runs)}


def times(value: float | None) -> str:
    """A ratio as progress lines and the report show it: "1.23x", or "n/a"."""
    return "n/a" if value is None else f"{value:.2f}x"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def attempt(label: str, job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one benchmark; on failure return {"error", "traceback"} so the others still run."""
    try:
        return job()
    except Exception as ex:  # noqa: BLE001 - one failing benchmark must not abort the others
        error = scrub(f"{type(ex).__name__}: {ex}".strip())
        say(f"  {label}: FAILED: {error.splitlines()[0] if error else type(ex).__name__}")
        return {"error": error, "traceback": scrub(traceback.format_exc())}
