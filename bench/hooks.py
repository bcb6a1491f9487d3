"""What each of the transport's speed hooks (daemon/transport.py) is worth, paired.

    python -m bench.hooks [--rounds 5] [--seconds 6] [--connections 50,200] [--rows 100000]

For each database, `maxtwo serve` runs as deployed and with one hook turned off at a time
(bench/serve_variant.py), all on one database, side by side; wrk loads them in turn, round
after round (no randomization meanwhile: the interval is an hour). Printed per variant: the
median req/s and server CPU time per request over the rounds, and the ratio of the full
transport to the variant: the median of the rounds' ratios, of requests answered 2xx/3xx. A
hook stays if it is worth at least 15 % in req/s (bench/NOTES.md); the accept backlog, which
only the connections opened at a run's start meet, is judged by max latency at 400 connections
instead (bench/NOTES.md), which this prints too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import run_in_rounds, say, times
from bench.load import paired_ratios
from bench.processes import HOST, SERVE_THREADS, ServerProcess, free_port, running
from bench.targets import SqliteTarget, open_postgres, process_environment
from bench.wrk import errors_of, run_wrk

VARIANTS = {
    "all hooks": [],
    "no lane": ["--no-lane"],
    "no change poller": ["--no-change-poller"],
    "no quiet channel": ["--no-quiet-channel"],
    "no one pull": ["--no-one-pull"],
    "no accept backlog": ["--no-accept-backlog"],
}


def variant(url: str, flags: list[str], seed_count: int, log_path: Path) -> ServerProcess:
    port = free_port()
    args = [sys.executable, "-m", "bench.serve_variant", "--host", HOST, "--port", str(port),
            "--threads", str(SERVE_THREADS), "--seed-count", str(seed_count), *flags]
    return ServerProcess(" ".join(flags) or "maxtwo serve", args, process_environment(url), port, "/healthz", log_path)


def measure(target, options: argparse.Namespace, work_dir: Path) -> dict:
    results: dict = {}
    with target.fresh_database("hooks") as url, contextlib.ExitStack() as stack:
        # The first one seeds; the others find the users there.
        servers = {}
        for name, flags in VARIANTS.items():
            log_path = work_dir / f"{target.name}-{name.replace(' ', '-')}.log"
            servers[name] = stack.enter_context(running(variant(url, flags, options.rows, log_path), 600))
        for connections in options.connections:
            contenders = {name: lambda server=server, c=connections: run_wrk(server.url, c, options.seconds, server.pid)
                          for name, server in servers.items()}
            rounds = run_in_rounds(contenders, options.rounds)
            summary = {}
            for name, measured in rounds.items():
                runs = measured.runs
                summary[name] = {
                    "requests_per_second": statistics.median(run["requests_per_second"] for run in runs),
                    "cpu_us_per_request": statistics.median(run["cpu_us_per_request"] for run in runs),
                    "p99_ms": statistics.median(run["p99_ms"] for run in runs),
                    # The first requests of a run, on connections all opened at once, are the
                    # slowest: max latency shows what accepting them costs.
                    "max_ms": statistics.median(run["max_ms"] for run in runs),
                    "errors": sum(errors_of(run) for run in runs),
                    "runs": [{key: run[key] for key in ("requests_per_second", "cpu_us_per_request", "p99_ms", "max_ms")}
                             for run in runs],
                }
            for name, figures in summary.items():
                # NOTE: round by round (a review: a ratio of medians, error answers counted).
                paired = paired_ratios(rounds["all hooks"].runs, rounds[name].runs, "this")
                figures["full_vs_this_req_s"] = paired["ours_over_this"]
                figures["this_vs_full_cpu"] = paired["this_cpu_over_ours"]
                say(f"  {target.name}, {connections} connections, {name}: "
                    f"{figures['requests_per_second']:,.0f} req/s, {figures['cpu_us_per_request']:.0f} us CPU/request, "
                    f"p99 {figures['p99_ms']:.1f} ms, max {figures['max_ms']:.1f} ms, errors {figures['errors']}; "
                    f"all hooks / this: "
                    f"{times(figures['full_vs_this_req_s'])} req/s, this / all hooks: {times(figures['this_vs_full_cpu'])} CPU")
            results[str(connections)] = summary
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", default="50,200")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--postgres-url", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    options = parser.parse_args(argv)
    options.connections = [int(part) for part in options.connections.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="maxtwo-hooks-") as directory:
        work_dir = Path(directory)
        results["SQLite"] = measure(SqliteTarget(work_dir), options, work_dir)
        with open_postgres(options.postgres_url) as postgres:
            results["PostgreSQL"] = measure(postgres, options, work_dir)
    if options.out is not None:
        options.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
