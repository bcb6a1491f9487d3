"""The issue's goals, judged from the measured results (never typed by hand).

Goals stated for 1M rows (or 10M) are only judged when the run used that size: a 20k-row CI
run shows the figure but says "not judged". Goals that do not depend on the size (GET / against
the hello-world app, POST /increment against the do-nothing app, both on maxtwo's own transport,
and against the synchronous approach,
errors, serve's memory, durability) are judged on every run. Goals of benchmarks left out by
--only are left out too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from bench import increment, load, randomize, seed, startup
from bench.memory import MB
from bench.options import GOAL_ROWS, GOAL_SCALE_ROWS, SECTIONS
from bench.wrk import errors_of

# The connection counts the issues name: other counts a run measured are shown, not judged.
GET_CONNECTIONS = (50, 200)
INCREMENT_CONNECTIONS = (50, 400)
# The CLI's start-up goals are medians of this many whole processes (issue 18).
STARTUP_RUNS = 10

SERVE_RSS_LIMIT_BYTES = 120 * MB
# Holding 1M rows in Python as (id, points, inserted_at, updated_at) tuples takes over 100 MB
# (an 88-byte tuple and a 28-byte int per row); 16 MB leaves room for driver buffers only.
SEED_GROWTH_LIMIT_BYTES = 16 * MB
# GET / (issue 18): maxtwo's req/s against the hello-world app's on the same transport (the
# stock-waitress baseline is reported, not judged), median of the rounds' ratios.
GET_OVER_HELLO = 0.8
# GET / p99 in the 1 s windows that overlap a randomization / in those that overlap none (issue 18).
SPAN_BOUNDS = {"SQLite": 3.0, "PostgreSQL": 1.5}
# POST /increment (the goals): maxtwo's req/s against the do-nothing app's (on maxtwo's
# transport) and the synchronous approach's, medians of the rounds' ratios.
INCREMENT_OVER_DO_NOTHING = 0.8
INCREMENT_OVER_SYNC = 3.0


@dataclasses.dataclass(frozen=True)
class Figure:
    """How a measured number is shown: `digits` decimals of value / `scale`, then `suffix`.

    judge() adds decimals until the figure shown passes or fails its goal as the value does:
    0.7996x is no 0.800x, nor 1.0004 s a 1.000 s that missed 1.0 s, nor 120.04 MB 120.0 MB
    (a review: only the ratios were so shown)."""

    suffix: str
    digits: int
    scale: float = 1.0
    sign: str = ""

    def __call__(self, value: float, digits: int | None = None) -> str:
        return f"{value / self.scale:{self.sign}.{self.digits if digits is None else digits}f}{self.suffix}"

    def shown(self, value: float, digits: int) -> float:
        """The value as the figure of `digits` decimals reads."""
        return round(value / self.scale, digits) * self.scale


SECONDS = Figure(" s", 3)
# Three decimals: at two, 0.798x would show as 0.80x beside a goal of 0.8x that it missed.
TIMES = Figure("x", 3)
MEGABYTES = Figure(" MB", 1, MB)
MEGABYTES_GROWTH = Figure(" MB", 1, MB, "+")
# The CLI's start-up (issue 18): whole-process medians in SECONDS, and for `randomize --timing`
# its wall time minus the time it reports.
STARTUP_LIMITS = {
    startup.VERSION: 0.15,
    startup.HELP: 0.15,
    startup.QUERY: 0.30,
    startup.RANDOMIZE_OVERHEAD: 0.2,
}


def evaluate(results: dict) -> list[dict]:
    rows = results["parameters"]["rows"]
    at_goal_size = rows == GOAL_ROWS
    size_note = f"run used {rows:,} rows; the goal is for {GOAL_ROWS:,}"
    goals: list[dict] = []
    # The benchmark the goals judged next belong to (set before each group below).
    section = ""

    def judge(goal: str, value: Any, show: Callable[[Any], str], passes: Callable[[Any], bool],
              judged: bool = True, why_not: str = "", aside: str = "") -> None:
        if value is None:
            goals.append({"goal": goal, "measured": "no data", "met": "no data (benchmark failed or skipped)",
                          "section": section})
            return
        met = ("yes" if passes(value) else "no") if judged else f"not judged ({why_not})"
        shown = show(value)
        if isinstance(show, Figure):
            digits = show.digits
            while passes(show.shown(value, digits)) != passes(value) and digits < 9:
                digits += 1
            shown = show(value, digits)
        goals.append({"goal": goal, "measured": f"{shown} ({aside})" if aside else shown, "met": met,
                      "section": section})

    section = "randomize"
    pg_randomize = _ok(results, "randomize", "PostgreSQL")
    sqlite_randomize = _ok(results, "randomize", "SQLite")
    judge("PostgreSQL randomize 1M <= 1.0 s", _median(pg_randomize, randomize.OURS), SECONDS,
          lambda value: value <= 1.0, at_goal_size, size_note)
    # NOTE: "randomize >= 4x faster than the naive update" is retired: it measured the host (the
    # no-WAL floor itself is only 4.9x the naive update here). The ratio is still reported.
    judge("PostgreSQL randomize within 1.6x of the unlogged floor", _get(pg_randomize, "ours_over_floor"),
          TIMES, lambda value: value <= 1.6, at_goal_size, size_note)
    judge("PostgreSQL randomize still durable (fsync, synchronous_commit, full_page_writes on; users logged)",
          _durability(results, pg_randomize), _show_durability, lambda value: all(value.values()))
    judge("SQLite randomize 1M <= 0.5 s", _median(sqlite_randomize, randomize.OURS), SECONDS,
          lambda value: value <= 0.5, at_goal_size, size_note)

    section = "seed"
    for database, limit in (("PostgreSQL", 1.5), ("SQLite", 1.0)):
        seeding = _ok(results, "seed", database)
        judge(f"{database} seed 1M <= {limit} s", _median(seeding, seed.OURS), SECONDS,
              lambda value, limit=limit: value <= limit, at_goal_size, size_note)
        judge(f"{database} seed >= 3x faster than the chunked baseline", _get(seeding, "baseline_over_ours"),
              TIMES, lambda value: value >= 3, at_goal_size, size_note)

    section = "load"
    steady = _get(results, "load", "steady") or {}
    span = _get(results, "load", "span") or {}
    span_mixed = _get(results, "load", "span_mixed") or {}
    measured_counts = results["parameters"]["connections"]
    for database in ("SQLite", "PostgreSQL"):
        by_connections = _get(_ok_in(steady, database), "by_connections") or {}
        for connections, judged, why_not in _connection_counts(GET_CONNECTIONS, measured_counts):
            judge(f"GET / on {database} >= {GET_OVER_HELLO}x the req/s of the hello-world app on maxtwo's "
                  f"transport at {connections} connections",
                  _get(by_connections, str(connections), "ours_over_hello"), TIMES,
                  lambda value: value >= GET_OVER_HELLO, judged, why_not)
        judge(f"GET / on {database}: zero errors (non-2xx/3xx and socket errors, every load run, warm-ups and "
              f"the mixed run's POST /increment included)",
              _load_errors([_ok_in(part, database) for part in (steady, span, span_mixed)]),
              lambda value: f"{value:,}", lambda value: value == 0)
    for database, bound in SPAN_BOUNDS.items():
        windows = min((_get(_ok_in(span, database), where, "windows") or 0) for where in ("inside", "outside"))
        enough = windows >= load.SPAN_MIN_WINDOWS_EACH
        judge(f"{database} GET / p99 during a randomization <= {bound:g}x p99 outside one",
              _get(_ok_in(span, database), "inside_over_outside"), TIMES,
              lambda value, bound=bound: value <= bound, at_goal_size and enough,
              size_note if not at_goal_size else
              f"{windows} window(s) on one side; the ratio needs {load.SPAN_MIN_WINDOWS_EACH} on each")

    section = "scale"
    scaling = _ok(results, "scale", "PostgreSQL")
    measured = (_get(scaling, "points") or []) + (_get(scaling, "search", "probes") or [])
    ten_million = next((point for point in measured if point["rows"] == GOAL_SCALE_ROWS
                        and point["randomize"]["median"] is not None), None)
    if ten_million is not None or scaling is None:
        judge("10M-row randomize on PostgreSQL <= 12 s", _get(ten_million, "randomize", "median"), SECONDS,
              lambda value: value <= 12)
    else:
        sizes = ", ".join(f"{point['rows']:,}" for point in scaling["points"])
        extrapolated = scaling.get("extrapolated_seconds_for_10m")
        goals.append({"goal": "10M-row randomize on PostgreSQL <= 12 s",
                      "measured": "not measured" if extrapolated is None
                      else f"{extrapolated:.2f} s (extrapolated from the fit)",
                      "met": f"not judged (10M rows not measured, only {sizes})", "section": section})

    for database in ("SQLite", "PostgreSQL"):
        section = "load"
        peaks = [_get(_ok_in(part, database), "serve_peak_rss_bytes") for part in (steady, span, span_mixed)]
        # Every run's peak, or no verdict: a sampler that never read the process says 0.
        judge(f"maxtwo serve peak RSS under load on {database} <= 120 MB", max(peaks) if all(peaks) else None,
              MEGABYTES, lambda value: value <= SERVE_RSS_LIMIT_BYTES)
        section = "memory"
        memory = _ok(results, "memory", database)
        judge(f"maxtwo seed on {database} holds no rows in Python memory "
              f"(peak RSS growth vs --count 0 <= {SEED_GROWTH_LIMIT_BYTES // MB} MB)",
              _get(memory, "growth_bytes"), MEGABYTES_GROWTH,
              lambda value: value <= SEED_GROWTH_LIMIT_BYTES, at_goal_size, size_note)

    section = "increment"
    counting = results.get("increment") or {}
    measured_counts = results["parameters"].get("increment_connections") or []
    for database in ("SQLite", "PostgreSQL"):
        measured = _ok_in(counting, database)
        by_connections = _get(measured, "by_connections") or {}
        counts = _connection_counts(INCREMENT_CONNECTIONS, measured_counts)
        for connections, judged, why_not in counts:
            for key, keys in (("ours_over_do_nothing", "random keys"), ("hot_ours_over_do_nothing", "hot key")):
                judge(f"POST /increment on {database}, {keys}, {connections} connections: "
                      f">= {INCREMENT_OVER_DO_NOTHING}x the do-nothing app's req/s on maxtwo's transport",
                      _get(by_connections, str(connections), key), TIMES,
                      lambda value: value >= INCREMENT_OVER_DO_NOTHING, judged, why_not)
        for connections, judged, why_not in counts:
            # About the most a server on this transport reaches: the do-nothing app against the
            # same synchronous server, in the same rounds (where a commit is cheap, the goal can
            # lie at or beyond it).
            do_nothing = _get(by_connections, str(connections), "do_nothing_over_sync")
            judge(f"POST /increment on {database}, random keys, {connections} connections: "
                  f">= {INCREMENT_OVER_SYNC:g}x the synchronous approach's req/s",
                  _get(by_connections, str(connections), "ours_over_sync"), TIMES,
                  lambda value: value >= INCREMENT_OVER_SYNC, judged, why_not,
                  aside=f"the do-nothing app: {do_nothing:.2f}x" if do_nothing is not None else "")
        judge(f"POST /increment on {database}: zero errors (non-2xx/3xx and socket errors, every run of "
              f"{increment.OURS}, warm-ups included)", _get(measured, "errors"), lambda value: f"{value:,}",
              lambda value: value == 0)
        judge(f"maxtwo serve peak RSS under POST /increment load on {database} <= 120 MB",
              _get(measured, "serve_peak_rss_bytes") or None, MEGABYTES,
              lambda value: value <= SERVE_RSS_LIMIT_BYTES)

    section = "startup"
    starting = _ok_in(results, "startup")
    runs = results["parameters"].get("startup_runs")
    enough_runs = runs is not None and runs >= STARTUP_RUNS
    runs_note = f"median of {runs} runs; the goal is a median of {STARTUP_RUNS}"
    for name, limit in STARTUP_LIMITS.items():
        if name == startup.RANDOMIZE_OVERHEAD:
            goal, value = f"{name} <= {limit:g} s (median)", _get(starting, "randomize_overhead", "median")
        else:
            on_sqlite = " on SQLite" if name == startup.QUERY else ""
            goal, value = f"{name}{on_sqlite} <= {limit:g} s (whole process, median)", _median(starting, name)
        judge(goal, value, SECONDS, lambda value, limit=limit: value <= limit, enough_runs, runs_note)

    chosen = set(results["parameters"].get("sections") or SECTIONS)
    return [goal for goal in goals if goal["section"] in chosen]


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _ok_in(section: dict, database: str) -> dict | None:
    """A database's result within a section, or None if that benchmark failed."""
    result = section.get(database) if isinstance(section, dict) else None
    return None if not isinstance(result, dict) or "error" in result else result


def _ok(results: dict, section: str, database: str) -> dict | None:
    return _ok_in(results.get(section) or {}, database)


def _median(result: dict | None, contender: str) -> float | None:
    return _get(result, "contenders", contender, "median")


def _connection_counts(goal_counts: tuple[int, ...], measured: list[int]) -> list[tuple[int, bool, str]]:
    """(connections, judged, why not): the issue's counts, measured or not (then "no data"),
    and any other count the run measured, shown but not judged."""
    others = sorted(set(measured) - set(goal_counts))
    why_not = "the goal is at " + " and ".join(map(str, goal_counts)) + " connections"
    return [(count, True, "") for count in goal_counts] + [(count, False, why_not) for count in others]


def _load_errors(parts: list[dict | None]) -> int | None:
    """maxtwo's errors in every load run: steady (warm-ups included), across randomizations and
    the mixed run (each window and its warm-up); None unless all three ran."""
    steady, span, span_mixed = parts
    if steady is None or span is None or span_mixed is None:
        return None
    total = sum(summary[load.OURS]["errors"] + summary[load.OURS]["warmup_errors"]
                for summary in steady["by_connections"].values())
    return total + sum(part["errors"] + errors_of(part["warmup"]) for part in (span, span_mixed))


def _durability(results: dict, pg_randomize: dict | None) -> dict | None:
    settings = _get(results, "machine", "databases", "PostgreSQL", "settings")
    if settings is None or pg_randomize is None:
        return None
    return {**{name: settings.get(name) == "on" for name in ("fsync", "synchronous_commit", "full_page_writes")},
            "users table logged": bool(pg_randomize.get("ours_table_logged"))}


def _show_durability(value: dict) -> str:
    return ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in value.items())
