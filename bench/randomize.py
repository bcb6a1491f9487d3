"""Benchmark 2: randomizing N users with maxtwo's core vs the naive UPDATE on a default table,
and vs a floor: on PostgreSQL the same update on an UNLOGGED copy of maxtwo's table (no WAL), on
SQLite the same update of every user on a copy of maxtwo's table with a constant for points (no
random(); the state row left out).

Each contender gets its own database, seeded once (untimed) and VACUUM ANALYZEd on PostgreSQL;
the runs then update the same table again and again, as the daemon does every minute.
"""

from __future__ import annotations

import contextlib

from bench.baselines import (
    constant_update,
    create_default_table,
    create_unlogged_copy,
    is_logged,
    naive_update,
    vacuum_analyze,
)
from bench.common import Stopwatch, ratio, run_in_rounds, say, timing_summary
from maxtwo_cli.core.randomize import randomize_points
from maxtwo_cli.core.schema import ensure_schema
from maxtwo_cli.core.seed import seed_users

OURS = "maxtwo"
NAIVE = "naive UPDATE, default table"
UNLOGGED = "maxtwo on an UNLOGGED table (floor)"
CONSTANT = "maxtwo's update with constant points (floor)"
FLOORS = (UNLOGGED, CONSTANT)
FLOOR_LABEL = "floor (SQLite: constant points; PostgreSQL: UNLOGGED table)"


def run(target, rows: int, runs: int) -> dict:
    with contextlib.ExitStack() as stack:
        ours_engine = stack.enter_context(target.fresh_engine("randomize_ours"))
        ensure_schema(ours_engine)
        seed_users(ours_engine, rows)
        naive_engine = stack.enter_context(target.fresh_engine("randomize_naive"))
        create_default_table(naive_engine, rows)
        contenders = {
            OURS: lambda: _timed(lambda: randomize_points(ours_engine)),
            NAIVE: lambda: _timed(lambda: naive_update(naive_engine)),
        }
        logged = None
        if target.is_postgres:
            vacuum_analyze(ours_engine)
            unlogged_engine = stack.enter_context(target.fresh_engine("randomize_unlogged"))
            create_unlogged_copy(unlogged_engine, rows)
            floor = UNLOGGED
            contenders[floor] = lambda: _timed(lambda: randomize_points(unlogged_engine))
            logged = is_logged(ours_engine)
        else:
            constant_engine = stack.enter_context(target.fresh_engine("randomize_constant"))
            ensure_schema(constant_engine)
            seed_users(constant_engine, rows)
            floor = CONSTANT
            contenders[floor] = lambda: _timed(lambda: constant_update(constant_engine))
        rounds = run_in_rounds(contenders, runs)

    summaries = {name: timing_summary(result) for name, result in rounds.items()}
    ours = summaries[OURS]["median"]
    result = {
        "rows": rows,
        "contenders": summaries,
        "naive_over_ours": ratio(summaries[NAIVE]["median"], ours),
        "floor": floor,
        "ours_over_floor": ratio(ours, summaries[floor]["median"]),
        "ours_table_logged": logged,
    }
    to_floor = f"{result['ours_over_floor']:.2f}x" if result["ours_over_floor"] is not None else "n/a"
    say(f"  randomize {rows:,} on {target.name}: maxtwo {ours:.3f} s, naive "
        f"{summaries[NAIVE]['median']:.3f} s ({result['naive_over_ours']:.2f}x faster), "
        f"{to_floor} the floor ({floor})")
    return result


def _timed(job) -> float:
    with Stopwatch() as watch:
        job()
    return watch.seconds
