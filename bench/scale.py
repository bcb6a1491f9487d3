"""Benchmark 3: randomizing growing tables on PostgreSQL, and how large a table still fits in
the 60 s interval: measured by a search beyond the fixed sizes, and extrapolated from a linear
fit over them."""

from __future__ import annotations

import statistics

from bench.baselines import vacuum_analyze
from bench.common import Rounds, Stopwatch, attempt, say, timing_summary
from bench.options import GOAL_SCALE_ROWS
from maxtwo_cli.core.randomize import randomize_points
from maxtwo_cli.core.schema import ensure_schema
from maxtwo_cli.core.seed import seed_users

INTERVAL_SECONDS = 60.0
# The search for the largest table randomized within the budget (bench/NOTES.md). NOTE: each
# size is placed where the last measurement puts the limit if time grows in proportion to rows
# (the first: where the fit puts it), then moved by MARGIN past it, towards the side not measured
# yet, so that the next measurement is likely to close the bracket instead of landing on the
# limit itself, where noise decides. A size stays strictly between the largest size that fit and
# the smallest that did not, and at most GROWTH times the size it starts from: a fit over small
# tables can promise far more rows than the disk holds. The search stops after MAX_PROBES sizes
# (each costs minutes near a 60 s budget), or once the bracket is narrower than RESOLUTION.
MAX_PROBES = 3
MARGIN = 1.1
RESOLUTION = 1.25
GROWTH = 8
# NOTE: a searched size whose warm-up already takes this many budgets is over without its timed
# runs, which would take minutes to confirm what the warm-up showed.
GIVE_UP_AFTER_BUDGETS = 1.25
# NOTE: the issue's minimum rather than the fixed sizes' 5: a searched size is near the budget,
# so each of its runs takes up to a minute.
PROBE_RUNS = 3


def run(target, sizes: tuple[int, ...], runs: int, budget: float = INTERVAL_SECONDS) -> dict:
    points = [_measure(target, rows, runs) for rows in sorted(sizes)]
    summary = {"points": points, **fit(points, budget)}
    search = search_limit(target, points, runs, budget, summary.get("extrapolated_rows_within_interval"))
    return {**summary, "search": search, **_measured_limit(points + search["probes"], budget)}


def _measure(target, rows: int, runs: int, give_up_after: float | None = None) -> dict:
    """One size: a fresh schema seeded by the core (one run), a warm-up, then `runs` timed runs,
    unless the warm-up alone took more than `give_up_after` seconds."""
    with target.fresh_engine(f"scale_{rows}") as engine:
        ensure_schema(engine)
        with Stopwatch() as seeding:
            seed_users(engine, rows)
        vacuum_analyze(engine)

        def randomize() -> float:
            with Stopwatch() as watch:
                randomize_points(engine)
            return watch.seconds

        warmup = randomize()
        if give_up_after is not None and warmup > give_up_after:
            timing = {"warmup": warmup, "runs": [], "median": None}
        else:
            timing = timing_summary(Rounds(warmup, [randomize() for _ in range(runs)]))
    point = {"rows": rows, "seed_seconds": seeding.seconds, "randomize": timing,
             "rows_per_second": rows / timing["median"] if timing["median"] else None}
    if timing["median"] is None:
        say(f"  scale {rows:,} on {target.name}: warm-up {warmup:.3f} s, over {give_up_after:g} s: "
            "no timed runs")
    else:
        say(f"  scale {rows:,} on {target.name}: randomize {timing['median']:.3f} s "
            f"({point['rows_per_second']:,.0f} rows/s)")
    return point


def search_limit(target, points: list[dict], runs: int, budget: float, estimate: int | None) -> dict:
    """Measure, not extrapolate, the largest table randomized within `budget` seconds: sizes
    beyond the fixed ones, each measured like them, starting from the fit's `estimate`."""
    fits, over = _split(points, budget)
    probes: list[dict] = []
    search = {"budget_seconds": budget, "estimate": estimate, "max_probes": MAX_PROBES,
              "probe_runs": min(runs, PROBE_RUNS), "margin": MARGIN, "resolution": RESOLUTION,
              "growth": GROWTH, "give_up_after_budgets": GIVE_UP_AFTER_BUDGETS, "probes": probes}
    if not fits:
        return search  # nothing fits: nothing to search up from
    low, high = max(fits), min(over) if over else None
    rows = _next_size(low, high, estimate or low * MARGIN * MARGIN, low)
    while rows is not None and len(probes) < MAX_PROBES:
        # NOTE: a size that fails (a disk too small for it) ends the search, not the benchmark:
        # the fixed sizes and the sizes measured so far stay in the results.
        probe = attempt(f"scale {rows:,} on {target.name}", lambda rows=rows: _measure(
            target, rows, search["probe_runs"], give_up_after=budget * GIVE_UP_AFTER_BUDGETS))
        if "error" in probe:
            search["error"] = {"rows": rows, **probe}
            break
        probes.append(probe)
        timing = probe["randomize"]
        seconds = timing["median"] if timing["median"] is not None else timing["warmup"]
        if _fits(probe, budget):
            low, limit = rows, rows * budget / seconds * MARGIN
        else:
            high, limit = rows, rows * budget / seconds / MARGIN
        rows = _next_size(low, high, limit, rows)
    return search


def _next_size(low: int, high: int | None, wanted: float, start: int) -> int | None:
    """`wanted` in two significant digits, at most GROWTH times `start` and strictly between the
    largest size that fit and the smallest that did not; None once those two are within
    RESOLUTION, or when no such size is left."""
    if high is not None and high <= low * RESOLUTION:
        return None
    rows = _round_rows(int(min(wanted, start * GROWTH)))
    if rows <= low or (high is not None and rows >= high):
        rows = _round_rows(int((low * high) ** 0.5)) if high is not None else _round_rows(low * 2)
    if rows <= low or (high is not None and rows >= high):
        return None  # two significant digits cannot split the gap any further
    return rows


def _split(points: list[dict], budget: float) -> tuple[list[int], list[int]]:
    fits = [point["rows"] for point in points if _fits(point, budget)]
    return fits, [point["rows"] for point in points if not _fits(point, budget)]


def _fits(point: dict, budget: float) -> bool:
    median = point["randomize"]["median"]
    return median is not None and median <= budget


def _round_rows(rows: int) -> int:
    """Two significant digits (45,000,000 rather than 45,312,500): sizes a reader can compare."""
    step = 10 ** max(len(str(rows)) - 2, 0)
    return rows // step * step


def _measured_limit(measured: list[dict], budget: float) -> dict:
    fits, over = _split(measured, budget)
    return {"largest_measured_within_interval": max(fits) if fits else None,
            "smallest_measured_over_interval": min(over) if over else None}


def fit(points: list[dict], budget: float = INTERVAL_SECONDS) -> dict:
    """seconds = slope * rows + intercept over the fixed sizes' medians, and what it predicts."""
    summary: dict = {"interval_seconds": budget}
    if len({point["rows"] for point in points}) < 2:
        return summary  # one size: no line to fit
    slope, intercept = statistics.linear_regression(
        [point["rows"] for point in points], [point["randomize"]["median"] for point in points])
    summary["fit"] = {"seconds_per_million_rows": slope * 1e6, "intercept_seconds": intercept}
    if slope > 0:
        summary["extrapolated_rows_within_interval"] = int((budget - intercept) / slope)
    if GOAL_SCALE_ROWS not in {point["rows"] for point in points}:
        summary["extrapolated_seconds_for_10m"] = slope * GOAL_SCALE_ROWS + intercept
    return summary
