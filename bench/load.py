"""Benchmark 4: GET / under load with wrk.

- Steady load: for each connection count, `maxtwo serve` (seeded with N users, randomizing every
  60 s) and two hello-world apps (bench/hello.py) take turns under `wrk -t2 -cC -dDs --latency`:
  one warm-up each, then rounds. The baselines: the hello-world app on maxtwo's own transport
  (a GET / travels maxtwo's path minus its work: the goal's), and on stock waitress with the same
  settings (what the transport's hooks add on top). Ratios: the median over the rounds of ours /
  baseline req/s; beside them the server's CPU time per request, which drifts far less.
- Across randomizations: `maxtwo serve --interval S` under back-to-back 1 s wrk windows at 50
  connections until at least two randomizations have run, 2.5 intervals have passed and two
  windows or more fell both inside and outside randomizations. The randomizations' start and
  end come from the daemon's log; a window is "inside" if it overlapped one and "outside" if it
  overlapped none. Ratio: median window p99 inside / outside. Twice: GET / alone, and GET / with
  POST /increment, half the requests each (bench/mixed.lua: both services at once, which on
  SQLite once made every randomization stall both).

Both runs sample the server's peak RSS (benchmark 5).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from pathlib import Path

from bench.common import Rounds, attempt, ratio, run_in_rounds, say
from bench.memory import PeakRssSampler
from bench.options import BenchOptions
from bench.processes import hello_world, maxtwo_serve, running
from bench.serve_log import overlaps, randomizations
from bench.wrk import INSTALL_HINT, answered_per_second, errors_of, run_wrk, wrk_path

OURS = "maxtwo serve"
HELLO = "hello-world app, maxtwo's transport"
HELLO_STOCK = "hello-world app, stock waitress"
# The key each baseline's ratios go under in the results (ours_over_<key>, <key>_cpu_over_ours).
BASELINE_KEYS = {HELLO: "hello", HELLO_STOCK: "stock_hello"}
STEADY_INTERVAL = 60.0
SPAN_CONNECTIONS = 50
SPAN_WINDOW_SECONDS = 1  # wrk's shortest run
SPAN_MIN_INTERVALS = 2.5
SPAN_MIN_RANDOMIZATIONS = 2
SPAN_MIN_WINDOWS_EACH = 2  # inside and outside: a p99 of one window alone says little
MIXED_SCRIPT = Path(__file__).resolve().with_name("mixed.lua")


def run(targets: list, options: BenchOptions, work_dir: Path) -> dict:
    if wrk_path() is None:
        say(f"  wrk not found: {INSTALL_HINT}; skipping the load benchmark")
        return {"skipped": f"wrk is not installed ({INSTALL_HINT})"}
    # Seeding N users happens before `serve` answers: allow for it.
    ready_timeout = 120 + options.rows / 10_000
    results: dict = {"steady": {}, "span": {}, "span_mixed": {}}
    with contextlib.ExitStack() as stack:
        hellos = {HELLO: stack.enter_context(running(hello_world(work_dir / "hello.log"))),
                  HELLO_STOCK: stack.enter_context(running(hello_world(work_dir / "hello-stock.log", stock=True)))}
        hello_rss = stack.enter_context(PeakRssSampler(hellos[HELLO].pid))
        stock_rss = stack.enter_context(PeakRssSampler(hellos[HELLO_STOCK].pid))
        for target in targets:
            results["steady"][target.name] = attempt(
                f"load on {target.name}",
                lambda target=target: _steady(target, hellos, options, work_dir, ready_timeout))
        results["hello_peak_rss_bytes"] = hello_rss.peak_bytes
        results["stock_hello_peak_rss_bytes"] = stock_rss.peak_bytes
    for target in targets:
        results["span"][target.name] = attempt(
            f"load across randomizations on {target.name}",
            lambda target=target: _span(target, options, work_dir, ready_timeout))
        results["span_mixed"][target.name] = attempt(
            f"GET / and POST /increment across randomizations on {target.name}",
            lambda target=target: _span(target, options, work_dir, ready_timeout, script=MIXED_SCRIPT))
    return results


def _steady(target, hellos: dict, options: BenchOptions, work_dir: Path, ready_timeout: float) -> dict:
    log_path = work_dir / f"serve-steady-{target.name}.log"
    serve = maxtwo_serve_for(options.rows, STEADY_INTERVAL, log_path)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(target.fresh_database("load"))
        server = stack.enter_context(running(serve(url), ready_timeout))
        rss = stack.enter_context(PeakRssSampler(server.pid))
        by_connections = {}
        for connections in options.connections:
            rounds = run_in_rounds({
                OURS: lambda c=connections: run_wrk(server.url, c, options.load_seconds, server.pid),
                **{name: lambda c=connections, hello=hello: run_wrk(hello.url, c, options.load_seconds, hello.pid)
                   for name, hello in hellos.items()},
            }, options.load_runs)
            summary = {name: summarize_runs(result) for name, result in rounds.items()}
            for name, key in BASELINE_KEYS.items():
                summary.update(paired_ratios(rounds[OURS].runs, rounds[name].runs, key))
            by_connections[str(connections)] = summary
            say(f"  GET / on {target.name}, {connections} connections: "
                f"{summary[OURS]['requests_per_second']:,.0f} req/s, CPU per request "
                f"{_fmt(summary[OURS]['cpu_us_per_request'])} us, p99 {summary[OURS]['p99_ms']:.1f} ms, "
                f"errors {summary[OURS]['errors']}; vs "
                + "; vs ".join(_against(summary, name, key) for name, key in BASELINE_KEYS.items()))
    spans = randomizations(log_path)
    for summary in by_connections.values():
        for run in [summary[OURS]["warmup"], *summary[OURS]["runs"]]:
            run["overlapped_randomization"] = overlaps(run, spans)
    return {"rows": options.rows, "interval": STEADY_INTERVAL, "by_connections": by_connections,
            "randomizations": spans, "serve_peak_rss_bytes": rss.peak_bytes}


def _span(target, options: BenchOptions, work_dir: Path, ready_timeout: float, script: Path | None = None) -> dict:
    """The span run: GET / alone, or the requests `script` makes (wrk -s)."""
    interval = options.span_interval
    name = "span" if script is None else f"span_{script.stem}"
    log_path = work_dir / f"serve-{name}-{target.name}.log"
    serve = maxtwo_serve_for(options.rows, interval, log_path)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(target.fresh_database(name))
        server = stack.enter_context(running(serve(url), ready_timeout))
        rss = stack.enter_context(PeakRssSampler(server.pid))
        warmup = run_wrk(server.url, SPAN_CONNECTIONS, SPAN_WINDOW_SECONDS, script=script)
        windows: list[dict] = []
        started = time.time()
        give_up = started + 8 * interval + 60
        while time.time() < give_up:
            windows.append(run_wrk(server.url, SPAN_CONNECTIONS, SPAN_WINDOW_SECONDS, script=script))
            seen = [span for span in randomizations(log_path) if span["end"] > started]
            places = [_classify(window, seen, interval) for window in windows]
            if (time.time() - started >= SPAN_MIN_INTERVALS * interval
                    and len(seen) >= SPAN_MIN_RANDOMIZATIONS
                    and min(places.count("inside"), places.count("outside")) >= SPAN_MIN_WINDOWS_EACH):
                break
    spans = [span for span in randomizations(log_path) if span["end"] > warmup["started_at"]]
    for window in windows:
        window["where"] = _classify(window, spans, interval)
    inside = [window["p99_ms"] for window in windows if window["where"] == "inside"]
    outside = [window["p99_ms"] for window in windows if window["where"] == "outside"]
    result = {
        "rows": options.rows, "interval": interval, "connections": SPAN_CONNECTIONS,
        "window_seconds": SPAN_WINDOW_SECONDS, "warmup": warmup, "windows": windows,
        "randomizations": spans, "serve_peak_rss_bytes": rss.peak_bytes,
        "seconds": windows[-1]["ended_at"] - started if windows else 0.0,
        "inside": _p99_summary(inside), "outside": _p99_summary(outside),
        "errors": sum(errors_of(window) for window in windows),
    }
    result["inside_over_outside"] = ratio(result["inside"]["median_p99_ms"], result["outside"]["median_p99_ms"])
    if len(spans) < SPAN_MIN_RANDOMIZATIONS:
        raise RuntimeError(f"only {len(spans)} randomization(s) during {result['seconds']:.0f} s of load "
                           f"at --interval {interval:g}; see {log_path}")
    what = "GET /" if script is None else "GET / and POST /increment"
    say(f"  {what} across {len(spans)} randomizations on {target.name}: p99 inside "
        f"{_fmt(result['inside']['median_p99_ms'])} ms ({len(inside)} windows), outside "
        f"{_fmt(result['outside']['median_p99_ms'])} ms ({len(outside)} windows)")
    return result


def maxtwo_serve_for(rows: int, interval: float, log_path: Path):
    """A factory: the URL is only known once the fresh database exists."""
    return lambda url: maxtwo_serve(url, seed_count=rows, interval=interval, log_path=log_path)


def _classify(window: dict, spans: list[dict], interval: float) -> str:
    """"inside" a randomization, "outside", or "unknown": the window holds a due time (the
    daemon randomizes at multiples of the interval) whose randomization never reached the log,
    e.g. one still running when the load stopped."""
    if overlaps(window, spans):
        return "inside"
    first_due = math.ceil(window["started_at"] / interval) * interval
    if first_due <= window["ended_at"]:
        return "unknown"
    return "outside"


def paired_ratios(ours: list[dict], baseline: list[dict], key: str) -> dict:
    """maxtwo against a baseline, round by round: each round's runs came minutes closer together
    than the runs of other rounds, so their ratio carries less of the machine's drift than a
    ratio of medians would. The headline is the median of those ratios, each of requests
    answered 2xx/3xx (error answers are no throughput). Keys: ours_over_<key>,
    <key>_cpu_over_ours, and each with _by_round."""
    by_round = answered_ratios(ours, baseline)
    cpu_ratios = (ratio(b.get("cpu_us_per_request"), a.get("cpu_us_per_request"))
                  for a, b in zip(ours, baseline, strict=True))
    cpu_by_round = [value for value in cpu_ratios if value is not None]
    return {
        f"ours_over_{key}": median_or_none(by_round),
        f"ours_over_{key}_by_round": by_round,
        # The baseline's CPU per request / ours: 1.0 would mean maxtwo's own work costs nothing.
        f"{key}_cpu_over_ours": median_or_none(cpu_by_round),
        f"{key}_cpu_over_ours_by_round": cpu_by_round,
    }


def answered_ratios(ours: list[dict], baseline: list[dict]) -> list[float]:
    """Round by round, ours / the baseline's requests answered 2xx/3xx per second. A round whose
    baseline answered nothing has no ratio: left out (its errors are counted)."""
    ratios = (ratio(answered_per_second(a), answered_per_second(b)) for a, b in zip(ours, baseline, strict=True))
    return [value for value in ratios if value is not None]


def _against(summary: dict, name: str, key: str) -> str:
    return (f"{name} {summary[name]['requests_per_second']:,.0f} req/s, "
            f"{_fmt(summary[name]['cpu_us_per_request'])} us: {summary[f'ours_over_{key}']:.2f}x (rounds "
            + ", ".join(f"{value:.2f}" for value in summary[f"ours_over_{key}_by_round"]) + ")")


def summarize_runs(rounds: Rounds[dict]) -> dict:
    """Medians of the measured runs' figures; the worst max latency; errors added up."""
    runs = rounds.runs
    socket_errors = {kind: sum(run["socket_errors"][kind] for run in runs) for kind in runs[0]["socket_errors"]}
    return {
        "warmup": rounds.warmup,
        "runs": runs,
        "requests_per_second": statistics.median(run["requests_per_second"] for run in runs),
        "cpu_us_per_request": median_or_none(run.get("cpu_us_per_request") for run in runs),
        "p50_ms": statistics.median(run["p50_ms"] for run in runs),
        "p99_ms": statistics.median(run["p99_ms"] for run in runs),
        "max_ms": max(run["max_ms"] for run in runs),
        "non_2xx_3xx": sum(run["non_2xx_3xx"] for run in runs),
        "socket_errors": socket_errors,
        "errors": sum(errors_of(run) for run in runs),
        "warmup_errors": errors_of(rounds.warmup),
    }


def median_or_none(values) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _p99_summary(p99s: list[float]) -> dict:
    return {"windows": len(p99s), "median_p99_ms": statistics.median(p99s) if p99s else None,
            "worst_p99_ms": max(p99s) if p99s else None}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
