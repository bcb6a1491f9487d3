"""Benchmark 1: seeding N users with maxtwo's core vs the chunked INSERT of public implementations.

Every run starts from an empty database (a new SQLite file, a new PostgreSQL schema) with
maxtwo's tables created untimed; only the insert is timed. maxtwo's time includes its commit
and, on PostgreSQL, the VACUUM (ANALYZE) it runs afterwards; the baseline's has no VACUUM.
"""

from __future__ import annotations

from bench.baselines import CHUNK_ROWS, insert_in_chunks
from bench.common import Stopwatch, ratio, run_in_rounds, say, timing_summary
from maxtwo_cli.core.schema import ensure_schema
from maxtwo_cli.core.seed import seed_users

OURS = "maxtwo"
BASELINE = f"chunked INSERT ({CHUNK_ROWS:,} rows per statement)"


def run(target, rows: int, runs: int) -> dict:
    def ours() -> float:
        with target.fresh_engine("seed_ours") as engine:
            ensure_schema(engine)
            with Stopwatch() as watch:
                seed_users(engine, rows)
        return watch.seconds

    def chunked() -> float:
        with target.fresh_engine("seed_chunked") as engine:
            ensure_schema(engine)
            with Stopwatch() as watch:
                insert_in_chunks(engine, rows)
        return watch.seconds

    rounds = run_in_rounds({OURS: ours, BASELINE: chunked}, runs)
    contenders = {name: timing_summary(result) for name, result in rounds.items()}
    speedup = ratio(contenders[BASELINE]["median"], contenders[OURS]["median"])
    say(f"  seed {rows:,} on {target.name}: maxtwo {contenders[OURS]['median']:.3f} s, "
        f"chunked baseline {contenders[BASELINE]['median']:.3f} s: {speedup:.2f}x faster")
    return {"rows": rows, "contenders": contenders, "baseline_over_ours": speedup}
