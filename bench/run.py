"""The order of a benchmark run: databases up, the seven benchmarks (or those --only names), the
outputs, databases down.

Each benchmark on each database is attempted on its own: a failure is recorded in the results
(and the report) and the run goes on. Servers, subprocesses and temporary files are always
cleaned up, whatever fails.
"""

from __future__ import annotations

import contextlib
import shlex
import tempfile
import time
from pathlib import Path

from bench import goals, increment, load, memory, plots, randomize, report, scale, seed, startup
from bench.common import attempt, say, scrub
from bench.machine import describe_machine
from bench.options import SECTIONS, BenchOptions, parse_options
from bench.targets import SqliteTarget, open_postgres, postgres_only


def main(argv: list[str]) -> int:
    options = parse_options(argv)
    started = time.perf_counter()
    say("maxtwo benchmarks: " + ", ".join(f"{key}={value}" for key, value in options.as_dict().items()))
    results: dict = {"command": "python -m bench " + shlex.join(argv) if argv else "python -m bench",
                     "parameters": options.as_dict()}
    with tempfile.TemporaryDirectory(prefix="maxtwo-bench-") as work:
        work_dir = Path(work)
        with contextlib.ExitStack() as stack:
            targets, postgres_error = _open_targets(options, work_dir, stack)
            _run_benchmarks(targets, options, work_dir, results)
            # Described while the servers still run; PostgreSQL's error, if it never started.
            databases = {target.name: _describe(target) for target in targets}
            if postgres_error:
                databases["PostgreSQL"] = {"error": postgres_error}
            results["machine"] = describe_machine(databases)
    results["runtime_seconds"] = time.perf_counter() - started
    results["notes"] = report.read_notes()
    results["goals"] = goals.evaluate(results)
    _write_outputs(results, options.out)
    failures = _count_failures(results)
    say(f"done in {results['runtime_seconds']:.0f} s: {options.out / 'performance.md'}"
        + (f" ({failures} benchmark(s) failed; see the report)" if failures else ""))
    return 1 if failures else 0


def _open_targets(options: BenchOptions, work_dir: Path, stack: contextlib.ExitStack):
    """SQLite always; PostgreSQL unless its server cannot be had (then its benchmarks say why)."""
    sqlite_dir = work_dir / "sqlite"
    sqlite_dir.mkdir()
    targets: list = [SqliteTarget(sqlite_dir)]
    try:
        targets.append(stack.enter_context(open_postgres(options.postgres_url)))
    except Exception as ex:  # noqa: BLE001 - SQLite's benchmarks are still worth running
        error = scrub(f"{type(ex).__name__}: {ex}")
        say(f"PostgreSQL unavailable, its benchmarks are skipped: {error.splitlines()[0]}")
        return targets, error
    return targets, None


def _run_benchmarks(targets: list, options: BenchOptions, work_dir: Path, results: dict) -> None:
    missing_postgres = {"error": "PostgreSQL unavailable (see Machine)"}
    chosen = set(options.sections)
    if "seed" in chosen:
        say(f"1. seed {options.rows:,} users")
        results["seed"] = {target.name: attempt(
            f"seed on {target.name}", lambda target=target: seed.run(target, options.rows, options.runs))
            for target in targets}
    if "randomize" in chosen:
        say(f"2. randomize {options.rows:,} users")
        results["randomize"] = {target.name: attempt(
            f"randomize on {target.name}", lambda target=target: randomize.run(target, options.rows, options.runs))
            for target in targets}
    if "scale" in chosen:
        say(f"3. randomize at scale on PostgreSQL: {', '.join(f'{rows:,}' for rows in options.scale_rows)} users, "
            f"then the largest table randomized within {options.scale_budget:g} s")
        results["scale"] = {target.name: attempt(
            "scale", lambda target=target: scale.run(target, options.scale_rows, options.runs,
                                                     options.scale_budget))
            for target in postgres_only(targets)} or {"PostgreSQL": missing_postgres}
    if "load" in chosen:
        say(f"4. GET / under load ({', '.join(map(str, options.connections))} connections, "
            f"{options.load_seconds} s per run)")
        results["load"] = attempt("load", lambda: load.run(targets, options, work_dir))
    if "memory" in chosen:
        say(f"5. memory of maxtwo seed --count {options.rows:,}")
        results["memory"] = {target.name: attempt(
            f"memory on {target.name}", lambda target=target: memory.run_seed(target, options.rows, work_dir))
            for target in targets}
    if "increment" in chosen:
        say(f"6. POST /increment under load ({', '.join(map(str, options.increment_connections))} connections, "
            f"{options.increment_seconds} s per run)")
        results["increment"] = attempt("increment", lambda: increment.run(targets, options, work_dir))
    if "startup" in chosen:
        sqlite = next(target for target in targets if not target.is_postgres)
        say(f"7. start-up: whole maxtwo processes, {options.startup_runs} runs each "
            f"(SQLite, {options.rows:,} users)")
        results["startup"] = attempt("startup", lambda: startup.run(sqlite, options.rows, options.startup_runs,
                                                                    work_dir))
    if not postgres_only(targets):
        for section in ("seed", "randomize", "memory"):
            if section in results:
                results[section]["PostgreSQL"] = missing_postgres
        if isinstance(results.get("load"), dict) and "steady" in results["load"]:
            results["load"]["steady"]["PostgreSQL"] = results["load"]["span"]["PostgreSQL"] = missing_postgres
        if isinstance(results.get("increment"), dict) and "connections" in results["increment"]:
            results["increment"]["PostgreSQL"] = missing_postgres


def _describe(target) -> dict:
    try:
        return target.describe()
    except Exception as ex:  # noqa: BLE001 - a description must not cost the results
        return {"error": scrub(f"{type(ex).__name__}: {ex}")}


def _write_outputs(results: dict, out: Path) -> None:
    (out / "img").mkdir(parents=True, exist_ok=True)
    results["plots"] = {}
    for name, plot in ((plots.SEED_RANDOMIZE, plots.plot_seed_randomize),
                       (plots.RANDOMIZE_SCALE, plots.plot_randomize_scale), (plots.LOAD, plots.plot_load),
                       (plots.INCREMENT, plots.plot_increment)):
        outcome = attempt(f"plot {name}", lambda plot=plot, name=name: {
            "written": plot(results, out / "img" / name)})
        results["plots"][name] = ("written" if outcome.get("written") else
                                  f"failed: {outcome['error']}" if "error" in outcome else "no data")
    report.write_json(results, out / "bench-results.json")
    report.write_markdown(results, out / "performance.md")
    say(f"wrote {out / 'performance.md'}, {out / 'bench-results.json'} and {out / 'img'}/*.png")


def _count_failures(results: dict) -> int:
    def failed(node) -> int:
        if isinstance(node, dict):
            return 1 if "error" in node else sum(failed(child) for child in node.values())
        return 0

    return sum(failed(results.get(section)) for section in SECTIONS)
