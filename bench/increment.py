"""Benchmark 6: POST /increment under wrk, group commit against the do-nothing app and the
synchronous approach.

For each database and connection count (50 and 400: the peers measured at 400), four servers
on the same waitress settings take turns under `wrk -t2 -cC -dDs --latency -s increment.lua`
(bench/increment.lua: a JSON body per request, one of 10,000 keys and a value in -1000..1000,
drawn from a generator seeded per wrk thread):

- `maxtwo serve` as deployed: the batcher puts concurrent increments into one transaction
  (group commit) and answers 202 once it has committed;
- the do-nothing app (bench/hello.py): 202 at once, no database (the peers' "simple" baseline),
  twice: on maxtwo's own transport, its POSTs through the lane as maxtwo's are (the goal's
  baseline), and on stock waitress with the same settings;
- the synchronous approach (bench/sync_increment.py): the same daemon, but each POST /increment
  runs `core.counters.increment()` in its request thread, a transaction of its own.

and once more with every request on the same key ("hot", `-- hot`), for maxtwo and the
synchronous approach. NOTE: the do-nothing app never reads the key, so its one run per round
(on each transport) is the baseline of both maxtwo runs of that round: a hot-key run of it would
measure the same work again and add a sixth of the section's time.

One warm-up each, then rounds. Ratios: the median over the rounds of maxtwo / do-nothing (each
transport) and of maxtwo / synchronous req/s, each round's runs minutes apart at most. Beside them: errors
(non-2xx/3xx and socket errors, warm-ups included), the server's CPU time per request (the
database server's own not included), maxtwo's peak RSS under this load, and the machine's fsync
latency, which sets what a commit costs and so how much group commit saves.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import Rounds, attempt, ratio, run_in_rounds, say, times
from bench.load import answered_ratios, median_or_none, summarize_runs
from bench.memory import PeakRssSampler
from bench.options import BenchOptions
from bench.processes import hello_world, maxtwo_serve, running, synchronous_increment_serve
from bench.wrk import INSTALL_HINT, run_wrk, wrk_path

OURS = "maxtwo serve"
DO_NOTHING = "do-nothing app, maxtwo's transport"
DO_NOTHING_STOCK = "do-nothing app, stock waitress"
SYNC = "synchronous (a transaction per request)"
OURS_HOT = f"{OURS}, hot key"
SYNC_HOT = f"{SYNC}, hot key"
CONTENDERS = (OURS, OURS_HOT, DO_NOTHING, DO_NOTHING_STOCK, SYNC, SYNC_HOT)

SCRIPT = Path(__file__).resolve().with_suffix(".lua")
KEYS = 10_000
HOT_KEY = "hot-key"  # as in the script
# Users only matter to GET /: a few, so start-up is quick and a randomization costs nothing.
SEED_COUNT = 1_000
INTERVAL = 60.0  # as deployed
PATH = "increment"

FSYNC_WRITES = 200
FSYNC_BLOCK = 4096


def run(targets: list, options: BenchOptions, work_dir: Path) -> dict:
    if wrk_path() is None:
        say(f"  wrk not found: {INSTALL_HINT}; skipping the POST /increment benchmark")
        return {"skipped": f"wrk is not installed ({INSTALL_HINT})"}
    results: dict = {"keys": KEYS, "seed_count": SEED_COUNT, "interval": INTERVAL,
                     "seconds": options.increment_seconds, "connections": list(options.increment_connections),
                     "open_files_limit": ensure_open_files(4 * max(options.increment_connections) + 256)}
    results["fsync"] = attempt("fsync latency", lambda: measure_fsync(work_dir))
    if "error" not in results["fsync"]:
        fsync = results["fsync"]
        say(f"  fsync of {FSYNC_BLOCK} B appended, {FSYNC_WRITES} times in {fsync['directory']} "
            f"({fsync['filesystem']}): median {fsync['median_ms']:.3f} ms, p99 {fsync['p99_ms']:.3f} ms")
    with contextlib.ExitStack() as stack:
        hellos = {DO_NOTHING: stack.enter_context(running(hello_world(work_dir / "hello-increment.log"))),
                  DO_NOTHING_STOCK: stack.enter_context(running(
                      hello_world(work_dir / "hello-stock-increment.log", stock=True)))}
        hello_rss = stack.enter_context(PeakRssSampler(hellos[DO_NOTHING].pid))
        stock_rss = stack.enter_context(PeakRssSampler(hellos[DO_NOTHING_STOCK].pid))
        for target in targets:
            results[target.name] = attempt(f"POST /increment on {target.name}",
                                           lambda target=target: _measure(target, hellos, options, work_dir))
        results["do_nothing_peak_rss_bytes"] = hello_rss.peak_bytes
        results["stock_do_nothing_peak_rss_bytes"] = stock_rss.peak_bytes
    return results


def _measure(target, hellos: dict, options: BenchOptions, work_dir: Path) -> dict:
    seconds = options.increment_seconds
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        ours_url = stack.enter_context(target.fresh_database("increment"))
        sync_url = stack.enter_context(target.fresh_database("increment_sync"))
        ours = stack.enter_context(running(maxtwo_serve(
            ours_url, seed_count=SEED_COUNT, interval=INTERVAL,
            log_path=work_dir / f"serve-increment-{target.name}.log")))
        sync = stack.enter_context(running(synchronous_increment_serve(
            sync_url, seed_count=SEED_COUNT, interval=INTERVAL,
            log_path=work_dir / f"sync-increment-{target.name}.log")))
        ours_rss = stack.enter_context(PeakRssSampler(ours.pid))
        sync_rss = stack.enter_context(PeakRssSampler(sync.pid))

        def load(server, connections: int, hot: bool):
            return lambda: run_wrk(server.url + PATH, connections, seconds, server.pid, script=SCRIPT,
                                   script_args=["hot"] if hot else [str(KEYS)])

        by_connections = {}
        for connections in options.increment_connections:
            rounds = run_in_rounds({
                OURS: load(ours, connections, hot=False),
                OURS_HOT: load(ours, connections, hot=True),
                **{name: load(hello, connections, hot=False) for name, hello in hellos.items()},
                SYNC: load(sync, connections, hot=False),
                SYNC_HOT: load(sync, connections, hot=True),
            }, options.load_runs)
            summary = {name: summarize_runs(result) for name, result in rounds.items()}
            summary.update(paired_ratios(rounds))
            by_connections[str(connections)] = summary
            say(f"  POST /increment on {target.name}, {connections} connections: {_rate(summary, OURS)} req/s "
                f"(hot key {_rate(summary, OURS_HOT)}) vs do-nothing {_rate(summary, DO_NOTHING)} "
                f"(stock waitress {_rate(summary, DO_NOTHING_STOCK)}), "
                f"synchronous {_rate(summary, SYNC)} (hot {_rate(summary, SYNC_HOT)}); "
                f"ours / do-nothing {times(summary['ours_over_do_nothing'])} (hot {times(summary['hot_ours_over_do_nothing'])}; "
                f"stock waitress {times(summary['ours_over_stock_do_nothing'])}), "
                f"ours / synchronous {times(summary['ours_over_sync'])} (hot {times(summary['hot_ours_over_sync'])}); "
                f"CPU per request {_us(summary[OURS]['cpu_us_per_request'])} vs do-nothing "
                f"{_us(summary[DO_NOTHING]['cpu_us_per_request'])}, synchronous {_us(summary[SYNC]['cpu_us_per_request'])}; "
                f"p99 {summary[OURS]['p99_ms']:.1f} ms; errors {_all_errors(summary, OURS)} "
                f"(hot {_all_errors(summary, OURS_HOT)})")
        hot_totals = {OURS: _hot_key_total(ours), SYNC: _hot_key_total(sync)}
    return {"by_connections": by_connections, "hot_key_totals": hot_totals,
            "serve_peak_rss_bytes": ours_rss.peak_bytes, "sync_peak_rss_bytes": sync_rss.peak_bytes,
            "errors": sum(_all_errors(summary, name) for summary in by_connections.values()
                          for name in (OURS, OURS_HOT)),
            # 1-, 5- and 15-minute load averages (2 cores): how shared the machine was.
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())}}


def paired_ratios(rounds: dict[str, Rounds[dict]]) -> dict:
    """Round by round, maxtwo against the do-nothing app (on each transport) and against the
    synchronous approach, random keys and hot key; the headlines are the medians of those ratios,
    each of requests answered 2xx/3xx (a fast 503 is no throughput)."""
    figures: dict = {}
    for name, ours, other in (("ours_over_do_nothing", OURS, DO_NOTHING),
                              ("hot_ours_over_do_nothing", OURS_HOT, DO_NOTHING),
                              ("ours_over_stock_do_nothing", OURS, DO_NOTHING_STOCK),
                              ("hot_ours_over_stock_do_nothing", OURS_HOT, DO_NOTHING_STOCK),
                              ("ours_over_sync", OURS, SYNC),
                              ("hot_ours_over_sync", OURS_HOT, SYNC_HOT),
                              # About the most ours_over_sync can be: an app that does no work.
                              ("do_nothing_over_sync", DO_NOTHING, SYNC)):
        values = answered_ratios(rounds[ours].runs, rounds[other].runs)
        figures[name] = median_or_none(values)
        figures[f"{name}_by_round"] = values
    # The do-nothing app's server CPU per request / maxtwo's: steadier than req/s on a shared
    # machine, and on a CPU-bound one what req/s follows (PostgreSQL's own CPU aside).
    for name, baseline in (("do_nothing", DO_NOTHING), ("stock_do_nothing", DO_NOTHING_STOCK)):
        cpu = [ratio(b.get("cpu_us_per_request"), a.get("cpu_us_per_request"))
               for a, b in zip(rounds[OURS].runs, rounds[baseline].runs, strict=True)]
        figures[f"{name}_cpu_over_ours"] = median_or_none(cpu)
        figures[f"{name}_cpu_over_ours_by_round"] = [value for value in cpu if value is not None]
    return figures


def _hot_key_total(server) -> int | None:
    """The hot key's committed total, through the server's API (None: never incremented): a
    sign that the hot-key runs wrote; the values sent are random, so no sum can be checked."""
    try:
        with urllib.request.urlopen(f"{server.url}counters/{HOT_KEY}", timeout=10) as response:
            return json.load(response)["value"]
    except urllib.error.HTTPError as ex:
        if ex.code == 404:
            return None
        raise


def measure_fsync(directory: Path, writes: int = FSYNC_WRITES, block: int = FSYNC_BLOCK) -> dict:
    """The latency of appending `block` bytes to a file and fsync()ing it, `writes` times: what
    one durable commit costs the disk that holds the databases, at least."""
    path = directory / "fsync-probe"
    data = os.urandom(block)
    latencies = []
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(writes):
            started = time.perf_counter()
            os.write(descriptor, data)
            os.fsync(descriptor)
            latencies.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(descriptor)
        path.unlink(missing_ok=True)
    ordered = sorted(latencies)
    return {"directory": str(directory), "filesystem": _filesystem(directory), "writes": writes,
            "block_bytes": block, "median_ms": statistics.median(ordered),
            "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
            "max_ms": ordered[-1], "mean_ms": statistics.fmean(ordered)}


def ensure_open_files(needed: int) -> dict:
    """Raise this process's soft limit on open files to `needed` if it is lower (wrk and the
    servers inherit it: 400 connections are 400 descriptors at each end)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise RuntimeError(f"the open files limit is {hard} (hard); {needed} are needed: raise it (ulimit -Hn)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        say(f"  raised the open files limit from {soft} to {needed}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft": soft, "hard": hard}


def _filesystem(directory: Path) -> str:
    """The type and device of the file system holding `directory` (from /proc/mounts)."""
    best, found = "", "unknown"
    resolved = str(directory.resolve())
    try:
        for line in Path("/proc/mounts").read_text(encoding="utf-8").splitlines():
            device, mount_point, kind = line.split()[:3]
            inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, found = mount_point, f"{kind} on {device}, mounted at {mount_point}"
    except OSError:
        pass
    return found


def _all_errors(summary: dict, name: str) -> int:
    return summary[name]["errors"] + summary[name]["warmup_errors"]


def _rate(summary: dict, name: str) -> str:
    return f"{summary[name]['requests_per_second']:,.0f}"


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} us"
