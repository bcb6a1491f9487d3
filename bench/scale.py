"""Benchmark 3: randomizing growing tables on PostgreSQL, and how large a table still fits in
the 60 s interval (measured, and extrapolated from a linear fit)."""

from __future__ import annotations

import statistics

from bench.baselines import vacuum_analyze
from bench.common import Stopwatch, run_in_rounds, say, timing_summary
from bench.options import GOAL_SCALE_ROWS
from maxtwo_cli.core.randomize import randomize_points
from maxtwo_cli.core.schema import ensure_schema
from maxtwo_cli.core.seed import seed_users

INTERVAL_SECONDS = 60.0


def run(target, sizes: tuple[int, ...], runs: int) -> dict:
    points = []
    for rows in sorted(sizes):
        with target.fresh_engine(f"scale_{rows}") as engine:
            ensure_schema(engine)
            with Stopwatch() as seeding:
                seed_users(engine, rows)
            vacuum_analyze(engine)

            def randomize() -> float:
                with Stopwatch() as watch:
                    randomize_points(engine)
                return watch.seconds

            timing = timing_summary(run_in_rounds({"randomize": randomize}, runs)["randomize"])
        points.append({"rows": rows, "seed_seconds": seeding.seconds, "randomize": timing,
                       "rows_per_second": rows / timing["median"]})
        say(f"  scale {rows:,} on {target.name}: randomize {timing['median']:.3f} s "
            f"({rows / timing['median']:,.0f} rows/s)")
    return {"points": points, **fit(points)}


def fit(points: list[dict]) -> dict:
    """seconds = slope * rows + intercept over the medians, and what it predicts."""
    within = [point["rows"] for point in points if point["randomize"]["median"] <= INTERVAL_SECONDS]
    summary: dict = {"interval_seconds": INTERVAL_SECONDS,
                     "largest_measured_within_interval": max(within) if within else None}
    if len({point["rows"] for point in points}) < 2:
        return summary  # one size: no line to fit
    slope, intercept = statistics.linear_regression(
        [point["rows"] for point in points], [point["randomize"]["median"] for point in points])
    summary["fit"] = {"seconds_per_million_rows": slope * 1e6, "intercept_seconds": intercept}
    if slope > 0:
        summary["extrapolated_rows_within_interval"] = int((INTERVAL_SECONDS - intercept) / slope)
    if GOAL_SCALE_ROWS not in {point["rows"] for point in points}:
        summary["extrapolated_seconds_for_10m"] = slope * GOAL_SCALE_ROWS + intercept
    return summary
