"""docs/performance.md and docs/bench-results.json, both rendered from one results dict, so the
markdown never says anything the JSON does not hold."""

from __future__ import annotations

import json
from pathlib import Path

from bench import increment, load, randomize, seed, startup
from bench.common import scrub, times
from bench.goals import (
    INCREMENT_OVER_DO_NOTHING,
    INCREMENT_OVER_SYNC,
    SEED_GROWTH_LIMIT_BYTES,
    STARTUP_LIMITS,
    evaluate,
)
from bench.memory import MB
from bench.options import SECTIONS
from bench.plots import INCREMENT, LOAD, RANDOMIZE_SCALE, SEED_RANDOMIZE

DATABASES = ("SQLite", "PostgreSQL")
NOTES_PATH = Path(__file__).resolve().parent / "NOTES.md"


def read_notes() -> str | None:
    """bench/NOTES.md, the hand-kept log of optimisation attempts, verbatim."""
    try:
        return NOTES_PATH.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


# APPSEC: scrubbed on the way out too: a password may sit in the command line or an error.
def write_json(results: dict, path: Path) -> None:
    path.write_text(scrub(json.dumps(results, indent=2)) + "\n", encoding="utf-8")


def write_markdown(results: dict, path: Path) -> None:
    path.write_text(scrub(render_markdown(results)), encoding="utf-8")


def rerender(out: Path) -> None:
    """The stored run's report again, after bench/NOTES.md or the goals' wording changed: the
    figures stay the run's (`python -m bench.report`; tests/test_docs_figures.py checks it)."""
    path = out / "bench-results.json"
    results = json.loads(path.read_text(encoding="utf-8"))
    results["notes"] = read_notes()
    results["goals"] = evaluate(results)
    write_json(results, path)
    write_markdown(results, out / "performance.md")


def render_markdown(results: dict) -> str:
    chosen = _chosen(results)
    benchmarks = {"seed": _seed, "randomize": _randomize, "scale": _scale, "load": _load, "memory": _memory,
                  "increment": _increment, "startup": _startup}
    sections = [
        _title(results),
        _headline(results),
        _goals(results),
        *(render(results) for name, render in benchmarks.items() if name in chosen),
        _machine(results),
        _method(results),
        _tried(results),
    ]
    return "\n\n".join(section.strip() for section in sections if section) + "\n"


def _chosen(results: dict) -> set[str]:
    """The benchmarks this run ran (--only)."""
    return set(results["parameters"].get("sections") or SECTIONS)


# -- sections -----------------------------------------------------------------------------------


def _title(results: dict) -> str:
    parameters, machine = results["parameters"], results.get("machine") or {}
    tiny = ("\n\n> **A `--tiny` run (the CI preset).** Its figures only show that the harness works; "
            "goals stated for 1M or 10M users are not judged.") if parameters["tiny"] else ""
    search = _nested(results, "scale", "PostgreSQL", "search") or {}
    searched = (f"; table sizes searched beyond the fixed ones: {search['probe_runs']} runs"
                if search.get("probes") else "")
    startup_runs = (f"; the CLI's start-up: {parameters['startup_runs']} runs"
                    if "startup" in _chosen(results) and parameters.get("startup_runs") else "")
    chosen = [name for name in SECTIONS if name in _chosen(results)]
    if len(chosen) < len(SECTIONS):
        tiny += (f"\n\n> **Only some benchmarks ran** (`--only {','.join(chosen)}`); the others, their "
                 "goals and headline figures are left out.")
    return f"""
# Performance

Written by `{results['command']}` on {machine.get('date', 'an unknown date')}, in
{results['runtime_seconds']:.0f} s, on the machine described [below](#machine) (commit
{machine.get('commit') or 'unknown'}). Raw figures, every individual run included:
[`bench-results.json`](bench-results.json). Every time is the median of {parameters['runs']} runs after
one warm-up (GET /: {parameters.get('load_runs', parameters['runs'])} wrk rounds{searched}{startup_runs}); every headline figure is a ratio against a baseline measured in the same run on the
same machine (see [Method](#method)).{tiny}
"""


def _headline(results: dict) -> str:
    rows = results["parameters"]["rows"]
    chosen = _chosen(results)
    lines = ["## Headline: ratios against same-run baselines", "",
             "| figure | SQLite | PostgreSQL |", "|---|---|---|"]
    if "seed" in chosen:
        lines.append(_row(f"seed {rows:,} users: chunked baseline time / maxtwo time",
                          [times(_field(results, "seed", db, "baseline_over_ours")) for db in DATABASES]))
    if "randomize" in chosen:
        lines += [
            _row(f"randomize {rows:,} users: naive UPDATE time / maxtwo time",
                 [times(_field(results, "randomize", db, "naive_over_ours")) for db in DATABASES]),
            _row(f"randomize {rows:,} users: maxtwo time / floor time (SQLite: constant points, no random(); "
                 "PostgreSQL: UNLOGGED table, no WAL)",
                 [times(_field(results, "randomize", db, "ours_over_floor")) for db in DATABASES]),
        ]
    if "load" in chosen:
        lines += _load_headline(results)
    if "increment" in chosen:
        lines += _increment_headline(results)
    if "startup" in chosen:
        lines += _startup_headline(results)
    return "\n".join(lines)


def _load_headline(results: dict) -> list[str]:
    lines = []
    steady = _load_part(results, "steady")
    for key, baseline in (("hello", "hello-world on maxtwo's transport"), ("stock_hello", "hello-world on stock waitress")):
        for connections in results["parameters"]["connections"]:
            lines.append(_row(f"GET /, {connections} connections: maxtwo req/s / {baseline} req/s (median of rounds)", [
                times(_nested(steady.get(db), "by_connections", str(connections), f"ours_over_{key}")) for db in DATABASES]))
    for connections in results["parameters"]["connections"]:
        lines.append(_row(f"GET /, {connections} connections: CPU per request of hello-world on maxtwo's transport / "
                          "maxtwo's", [times(_nested(steady.get(db), "by_connections", str(connections), "hello_cpu_over_ours"))
                                       for db in DATABASES]))
    span = _load_part(results, "span")
    lines.append(_row("GET /: p99 inside / outside randomizations (median window p99)",
                      [times(_nested(span.get(db), "inside_over_outside")) for db in DATABASES]))
    return lines


def _increment_headline(results: dict) -> list[str]:
    section = results.get("increment") or {}
    lines = []
    for connections in results["parameters"].get("increment_connections") or []:
        for key, what in (("ours_over_do_nothing", "random keys"), ("hot_ours_over_do_nothing", "hot key"),
                          ("ours_over_stock_do_nothing", "random keys")):
            baseline = "on stock waitress" if "stock" in key else "on maxtwo's transport"
            lines.append(_row(f"POST /increment, {what}, {connections} connections: maxtwo req/s / do-nothing "
                              f"{baseline} req/s (median of rounds)",
                              [times(_nested(section.get(db), "by_connections", str(connections), key))
                               for db in DATABASES]))
    for connections in results["parameters"].get("increment_connections") or []:
        lines.append(_row(f"POST /increment, random keys, {connections} connections: maxtwo req/s / "
                          "synchronous req/s (a transaction per request)",
                          [times(_nested(section.get(db), "by_connections", str(connections), "ours_over_sync"))
                           for db in DATABASES]))
    fsync = section.get("fsync") if isinstance(section, dict) else None
    if isinstance(fsync, dict) and "error" not in fsync:
        lines.append(_row("fsync of a 4 KiB append on the databases' disk (median / p99)",
                          [f"{fsync['median_ms']:.3f} / {fsync['p99_ms']:.3f} ms"] * 2))
    return lines


def _startup_headline(results: dict) -> list[str]:
    section = _ok(results.get("startup"))
    over_typer = (section or {}).get("over_typer") or {}
    # NOTE: --version and --help touch no database: one figure for both columns, as fsync's below.
    return [
        *(_row(f"`{name}`: whole-process time / `{startup.TYPER}`", [times(over_typer.get(name))] * 2)
          for name in (startup.VERSION, startup.HELP)),
        _row(f"`{startup.QUERY}`: whole-process time / `{startup.TYPER}`", [times(over_typer.get(startup.QUERY)), "n/a"]),
    ]


def _goals(results: dict) -> str:
    lines = ["## Goals", "", ("From issues 4, 16, 17 and 18; *met* is computed from the figures of this run. "
              "Where a goal compares with a baseline, it names it."), "",
             "| goal | measured | met |", "|---|---|---|"]
    lines += [_row(goal["goal"], [goal["measured"], goal["met"]]) for goal in results.get("goals", [])]
    return "\n".join(lines)


def _seed(results: dict) -> str:
    rows = results["parameters"]["rows"]
    lines = [f"## 1. Seed {rows:,} users", "",
             (f"maxtwo's `seed_users` (one transaction; on SQLite rows generated inside the database, on "
              f"PostgreSQL only the ids sent by COPY, the `VACUUM (ANALYZE)` that follows included) "
              f"against {seed.BASELINE}: rows built in Python "
              "chunk by chunk, one transaction, into the same table."), "",
             "| database | maxtwo | rows/s | chunked baseline | rows/s | baseline / maxtwo |",
             "|---|---|---|---|---|---|"]
    failures = []
    for database in DATABASES:
        result = (results.get("seed") or {}).get(database)
        if _failed(result):
            failures.append(_failure(database, result))
            continue
        ours, baseline = result["contenders"][seed.OURS], result["contenders"][seed.BASELINE]
        lines.append(_row(database, [_s(ours["median"]), _rate(rows, ours["median"]), _s(baseline["median"]),
                                     _rate(rows, baseline["median"]), times(result["baseline_over_ours"])]))
    lines += ["", *failures, _runs_note(results, "seed", [seed.OURS, seed.BASELINE])]
    lines += ["", f"![seed and randomize, maxtwo vs baselines](img/{SEED_RANDOMIZE})"] if _plotted(results, SEED_RANDOMIZE) else []
    return "\n".join(lines)


def _randomize(results: dict) -> str:
    rows = results["parameters"]["rows"]
    lines = [f"## 2. Randomize {rows:,} users", "",
             ("maxtwo's `randomize_points` (one transaction: the state row, then one UPDATE of every user; "
              "fillfactor 50 on PostgreSQL) against the best published approach, "
              "`UPDATE users SET points = floor(random()*101), updated_at = now()` on a default table "
              "(SQLite: `abs(random()) % 101` and ISO-8601 text timestamps, SQLAlchemy's default storage), "
              "and against a floor, maxtwo's update with one cost taken away: on PostgreSQL its WAL (the update on "
              "an UNLOGGED copy of maxtwo's table), on SQLite (no unlogged tables) random() (maxtwo's durable update "
              "on a copy of its table with every user's points set to a constant). *naive / maxtwo* is "
              "information, not a goal: on PostgreSQL it is bounded by naive / floor, which depends on the host; "
              "*maxtwo / floor* is the goal."), "",
             "| database | maxtwo | rows/s | naive | floor | naive / maxtwo | maxtwo / floor |",
             "|---|---|---|---|---|---|---|"]
    failures = []
    for database in DATABASES:
        result = (results.get("randomize") or {}).get(database)
        if _failed(result):
            failures.append(_failure(database, result))
            continue
        contenders = result["contenders"]
        ours = contenders[randomize.OURS]["median"]
        floor = contenders.get(result.get("floor"), {}).get("median")
        lines.append(_row(database, [_s(ours), _rate(rows, ours), _s(contenders[randomize.NAIVE]["median"]),
                                     _s(floor), times(result["naive_over_ours"]), times(result.get("ours_over_floor"))]))
    lines += ["", *failures, _runs_note(results, "randomize", [randomize.OURS, randomize.NAIVE, *randomize.FLOORS])]
    return "\n".join(lines)


def _scale(results: dict) -> str:
    runs = results["parameters"]["runs"]
    lines = ["## 3. Randomize at scale (PostgreSQL)", "",
             (f"Each size: a fresh schema seeded by the core (seed time: one run), then {runs} timed "
              "randomizations after a warm-up."), ""]
    result = (results.get("scale") or {}).get("PostgreSQL")
    if _failed(result):
        return "\n".join([*lines, _failure("PostgreSQL", result)])
    budget = result["interval_seconds"]
    lines += ["| users | seed (one run) | randomize (median) | rows/s | runs |", "|---|---|---|---|---|"]
    lines += [_scale_row(point) for point in result["points"]]
    lines.append("")
    if "fit" in result:
        fit = result["fit"]
        lines.append(f"- Linear fit over the fixed sizes' medians: {fit['seconds_per_million_rows']:.3f} s per million users "
                     f"{'+' if fit['intercept_seconds'] >= 0 else '-'} {abs(fit['intercept_seconds']):.3f} s.")
    predictions = []
    if "extrapolated_rows_within_interval" in result:
        predictions.append(f"about {result['extrapolated_rows_within_interval']:,} users fit in {budget:g} s")
    if "extrapolated_seconds_for_10m" in result:
        predictions.append(f"10M users take about {result['extrapolated_seconds_for_10m']:.2f} s")
    if predictions:
        lines.append(f"- **Extrapolated** from that fit, not measured: {' and '.join(predictions)}. An "
                     "extrapolation assumes the table and its WAL stay within memory and I/O bandwidth; the "
                     "search below measures how large a table fits.")
    lines += ["", *_scale_search(result, budget)]
    if _plotted(results, RANDOMIZE_SCALE):
        lines += ["", f"![randomize seconds vs users on PostgreSQL](img/{RANDOMIZE_SCALE})"]
    return "\n".join(lines)


def _scale_row(point: dict) -> str:
    timing = point["randomize"]
    if timing["median"] is None:
        return _row(f"{point['rows']:,}", [_s(point["seed_seconds"]), f"over: warm-up {_s(timing['warmup'])}",
                                           "n/a", "none (the warm-up was over the limit)"])
    return _row(f"{point['rows']:,}", [_s(point["seed_seconds"]), _s(timing["median"]),
                                       f"{point['rows_per_second']:,.0f}", _list_s(timing["runs"])])


def _scale_search(result: dict, budget: float) -> list[str]:
    """The measured answer to "how large a table still fits in the interval"."""
    search = result.get("search") or {}
    probes = search.get("probes") or []
    lines = [f"### The largest table randomized within {budget:g} s", ""]
    if "max_probes" in search:
        lines += [("Measured, not extrapolated: sizes beyond the fixed ones, each seeded and timed like them "
                   f"(a warm-up, then {search['probe_runs']} timed runs; none when the warm-up alone took over "
                   f"{search['give_up_after_budgets']:g} times the {budget:g} s). The first is where the fit "
                   "puts the limit; each next is where the last measurement puts it if time grows in "
                   f"proportion to rows, moved {search['margin']:g}x past it towards the side not measured "
                   "yet. Every size is rounded down to two significant digits and kept between the largest "
                   f"size that fit and the smallest that did not, and at most {search['growth']:g}x the size "
                   "it starts from. The search stops once those two are within a factor of "
                   f"{search['resolution']:g}, or after {search['max_probes']} sizes."), ""]
    if probes:
        lines += ["| users | seed (one run) | randomize (median) | rows/s | runs |", "|---|---|---|---|---|"]
        lines += [_scale_row(point) for point in probes]
        lines.append("")
    elif "error" not in search:
        lines += [("No size was searched: the fixed sizes already bracket the limit closely enough, or "
                   "none of them fit."), ""]
    if "error" in search:
        failed = search["error"]
        first_line = failed["error"].splitlines()[0] if failed["error"] else "no message"
        lines += [f"The search stopped when {failed['rows']:,} users failed: {first_line}", ""]
    largest = result.get("largest_measured_within_interval")
    smallest_over = result.get("smallest_measured_over_interval")
    measured = {point["rows"]: point["randomize"] for point in result["points"] + probes}
    if largest is None:
        lines.append(f"- None of the measured sizes was randomized within {budget:g} s.")
    else:
        lines.append(f"- Largest measured table randomized within {budget:g} s: **{largest:,} users** "
                     f"(median {_s(measured[largest]['median'])}).")
    if smallest_over is not None:
        over = measured[smallest_over]
        took = (f"median {_s(over['median'])}" if over["median"] is not None
                else f"warm-up {_s(over['warmup'])}")
        lines.append(f"- Smallest measured table over {budget:g} s: {smallest_over:,} users ({took}).")
    elif largest is not None and probes:
        lines.append(f"- Every measured size fit: the search stopped after {len(probes)} sizes, before one "
                     "did not.")
    return lines


def _load(results: dict) -> str:
    parameters = results["parameters"]
    lines = ["## 4. GET / under load", ""]
    section = results.get("load") or {}
    if "skipped" in section:
        return "\n".join([*lines, f"**Skipped:** {section['skipped']}."])
    if _failed(section):
        return "\n".join([*lines, _failure("load", section)])
    lines += [(f"`wrk -t2 -cC -d{parameters['load_seconds']}s --latency` against `maxtwo serve` "
               f"(`--threads {parameters.get('threads', 8)} --interval 60`, {parameters['rows']:,} users) and against two "
               "baselines, all three taking turns. Both baselines are the hello-world app of bench/hello.py (a constant "
               f"body, no database): **{load.HELLO}** is served by the transport `maxtwo serve` answers on, built by "
               "the daemon's own code (the busy-poll fix, the strict parser, the change poller with its one pull per batch, "
               "the backlog accepted per turn, and the lane, which "
               "takes its GET / as it takes maxtwo's), so a request there travels maxtwo's path minus maxtwo's own "
               f"work: the goal's baseline. **{load.HELLO_STOCK}** is waitress as shipped with the same settings "
               "(threads, connection limit, backlog, channel timeout, poll) and none of maxtwo's hooks: what the "
               "transport's hooks are worth shows in the gap between the two. Figures are medians of the runs; max "
               "latency is the worst run's; errors add up every "
               "measured run (non-2xx/3xx responses plus socket connect/read/write/timeout errors). *ratios* are "
               "medians of the rounds' ratios of maxtwo's req/s to each baseline's, of answers 2xx/3xx only (each round's runs follow each "
               "other, so the machine's drift between rounds cancels), the rounds' own in brackets. *CPU per request*: user + system time "
               "of the server process during the run over the requests answered (PostgreSQL's own work not "
               "included); it varies far less than req/s on a shared machine."), "",
              "| database | connections | server | req/s | CPU per request | p50 | p99 | max | non-2xx/3xx | socket errors | ratios |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for database in DATABASES:
        result = (section.get("steady") or {}).get(database)
        if _failed(result):
            notes.append(_failure(database, result))
            continue
        for connections, summary in result["by_connections"].items():
            for name in (load.OURS, load.HELLO, load.HELLO_STOCK):
                figures = summary[name]
                sockets = figures["socket_errors"]
                lines.append(_row(database, [
                    connections, name, f"{figures['requests_per_second']:,.0f}", _us(figures.get("cpu_us_per_request")),
                    _ms(figures["p50_ms"]),
                    _ms(figures["p99_ms"]), _ms(figures["max_ms"]), f"{figures['non_2xx_3xx']:,}",
                    f"{sum(sockets.values()):,} (" + ", ".join(f"{k} {v}" for k, v in sockets.items()) + ")",
                    _paired(summary) if name == load.OURS else ""]))
        overlapped = sum(run.get("overlapped_randomization", False) for summary in result["by_connections"].values()
                         for run in summary[load.OURS]["runs"])
        if overlapped:
            notes.append(f"- {database}: {overlapped} measured run(s) of maxtwo overlapped a scheduled "
                            "randomization (they count, as they would in production; the median damps them).")
    lines += ["", *notes]
    if _plotted(results, LOAD):
        lines += ["", f"![GET / req/s, maxtwo vs hello-world on maxtwo's transport and on stock waitress](img/{LOAD})"]
    lines += ["", "### Latency across randomizations", "",
              (f"`maxtwo serve --interval {parameters['span_interval']:g}` under back-to-back 1 s wrk windows at "
               f"{load.SPAN_CONNECTIONS} connections (after one warm-up window), until at least "
               f"{load.SPAN_MIN_RANDOMIZATIONS} randomizations ran, {load.SPAN_MIN_INTERVALS} intervals passed and "
               f"at least {load.SPAN_MIN_WINDOWS_EACH} windows fell inside and outside randomizations each. "
               "Each randomization's start and end come from the daemon's log line "
               "(\"randomized N users in X s\", stamped at commit). A window is *inside* if it overlapped one, "
               "*outside* if it overlapped none; a window holding a due time whose randomization never reached "
               "the log is left out. A 1 s window only partly covered by a short randomization dilutes its p99, "
               "and the requests still in flight when a window ends (at most one per connection, the slowest "
               "likelier) are in none: wrk stops without waiting for them."), "",
              *_span_table(section.get("span") or {})]
    if "span_mixed" in section:  # results from before the mixed run have none
        while lines[-1] == "":
            lines.pop()
        lines += ["", ("The same with `GET /` and `POST /increment`, half the requests each (bench/mixed.lua: "
                       "the two services under load at once; the p99 is of both routes together):"), "",
                  *_span_table(section["span_mixed"])]
    return "\n".join(lines)


def _span_table(span: dict) -> list[str]:
    """The span run's table, each database a row, then the failures."""
    lines = ["| database | randomizations (s each) | windows inside | windows outside | p99 inside (median / worst) | p99 outside (median / worst) | inside / outside | errors |",
             "|---|---|---|---|---|---|---|---|"]
    failures = []
    for database in DATABASES:
        result = span.get(database)
        if _failed(result):
            failures.append(_failure(database, result))
            continue
        inside, outside = result["inside"], result["outside"]
        durations = ", ".join(f"{randomization['seconds']:.3f}" for randomization in result["randomizations"])
        lines.append(_row(database, [
            f"{len(result['randomizations'])} ({durations})", str(inside["windows"]), str(outside["windows"]),
            f"{_ms(inside['median_p99_ms'])} / {_ms(inside['worst_p99_ms'])}",
            f"{_ms(outside['median_p99_ms'])} / {_ms(outside['worst_p99_ms'])}",
            times(result["inside_over_outside"]), f"{result['errors']:,}"]))
    return [*lines, "", *failures]


def _memory(results: dict) -> str:
    rows = results["parameters"]["rows"]
    lines = ["## 5. Memory", "",
             "Peak RSS of each process, sampled every 50 ms with psutil.", "",
             "| process | SQLite | PostgreSQL |", "|---|---|---|"]
    steady, span = _load_part(results, "steady"), _load_part(results, "span")
    lines.append(_row("`maxtwo serve` under steady load (wrk runs above)",
                      [_mb(_nested(steady.get(db), "serve_peak_rss_bytes")) for db in DATABASES]))
    lines.append(_row("`maxtwo serve` under load across randomizations",
                      [_mb(_nested(span.get(db), "serve_peak_rss_bytes")) for db in DATABASES]))
    for key, name in (("hello_peak_rss_bytes", load.HELLO), ("stock_hello_peak_rss_bytes", load.HELLO_STOCK)):
        hello = _mb((results.get("load") or {}).get(key))
        lines.append(_row(f"{name} under the same load (the baseline for both)", [hello, hello]))
    memory = results.get("memory") or {}
    lines.append(_row(f"`maxtwo seed --count {rows}`",
                      [_mb(_nested(_ok(memory.get(db)), "seed", "peak_rss_bytes")) for db in DATABASES]))
    lines.append(_row("`maxtwo seed --count 0` (same imports and connection, no rows)",
                      [_mb(_nested(_ok(memory.get(db)), "seed_zero_rows", "peak_rss_bytes")) for db in DATABASES]))
    lines.append(_row(f"growth for {rows:,} rows (goal: <= {SEED_GROWTH_LIMIT_BYTES // MB} MB at 1M)",
                      [_mb(_nested(_ok(memory.get(db)), "growth_bytes"), signed=True) for db in DATABASES]))
    notes = [_failure(db, memory.get(db)) for db in DATABASES if _failed(memory.get(db))]
    load_section = results.get("load") or {}
    if "skipped" in load_section or "error" in load_section:
        notes.append("- `maxtwo serve` and the hello-world app are measured during benchmark 4, which "
                     + ("was skipped." if "skipped" in load_section else "failed."))
    return "\n".join([*lines, "", *notes])


def _increment(results: dict) -> str:
    parameters = results["parameters"]
    lines = ["## 6. POST /increment under load", ""]
    section = results.get("increment") or {}
    if "skipped" in section:
        return "\n".join([*lines, f"**Skipped:** {section['skipped']}."])
    if _failed(section):
        return "\n".join([*lines, _failure("increment", section)])
    lines += [
        (f"`wrk -t2 -cC -d{section['seconds']}s --latency -s bench/increment.lua`: each request a JSON body "
         f"`{{\"key\": \"key-N\", \"value\": V}}`, N uniform in 1..{section['keys']:,}, V uniform in "
         "-1000..1000, from a generator seeded per wrk thread; the *hot key* runs send every request to one key "
         f"(`-- hot`). Four servers on the same waitress settings ({parameters.get('threads', 8)} threads) take "
         f"turns, one warm-up each, then {parameters.get('load_runs', parameters['runs'])} rounds:"),
        "",
        (f"- **{increment.OURS}** as deployed (`--seed-count {section['seed_count']:,} --interval "
         f"{section['interval']:g}`): the batcher puts the increments waiting at the same moment into one "
         "transaction (group commit) and answers each 202 once it has committed;"),
        ("- the **do-nothing app** (bench/hello.py): reads the body and answers 202, no parsing, no "
         "database: the peers' \"simple\" baseline, twice: the "
         f"**{increment.DO_NOTHING}** (its POSTs through the lane as maxtwo's are: the goal's baseline) and the "
         f"**{increment.DO_NOTHING_STOCK}** (waitress as shipped, same settings, none of maxtwo's hooks). It "
         "never reads the key, so its one run per round is the baseline of both maxtwo runs of the round;"),
        ("- the **synchronous approach** (bench/sync_increment.py): the same daemon, with POST /increment "
         "running `core.counters.increment()` in its request thread, one transaction (the same validation and "
         "upsert) per request."),
        "",
        ("*ours / do-nothing* and *ours / synchronous* are medians of the rounds' ratios of req/s answered "
         "2xx/3xx, the rounds' own in brackets. Errors add up every run, warm-ups included (non-2xx/3xx responses plus socket errors; "
         "wrk's 2 s timeout counts slower requests as timeouts). *CPU per request* is the server process's "
         "(PostgreSQL's own work not included). The database server and wrk share the machine's 2 cores with "
         "the server under test."),
    ]
    fsync = section.get("fsync") or {}
    if "error" in fsync:
        lines += ["", _failure("fsync latency", fsync)]
    elif fsync:
        lines += ["", (f"**fsync latency** of this machine: appending {fsync['block_bytes']:,} bytes to a file and "
                   f"`fsync()`ing it, {fsync['writes']} times in {fsync['directory']} ({fsync['filesystem']}, "
                   f"where the databases live): median **{fsync['median_ms']:.3f} ms**, p99 {fsync['p99_ms']:.3f} ms, "
                   f"max {fsync['max_ms']:.3f} ms. Every durable commit pays at least one; group commit pays one "
                   "per batch instead of one per request, so its advantage over the synchronous approach grows "
                   "with this figure (a fraction of a millisecond on these virtual disks, milliseconds on many "
                   "real ones). The do-nothing app's own ratio to the synchronous server (its row's *ratios*) is "
                   "about the most a server on this transport reaches (within the rounds' spread: maxtwo's own "
                   "rounds have come out above it): where it is near or below the goal's 3x, the goal measures "
                   "this host's commit cost more than the server.")]
    lines += ["", "| database | connections | server | req/s | CPU per request | p50 | p99 | max | errors | ratios |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for database in DATABASES:
        result = section.get(database)
        if _failed(result):
            notes.append(_failure(database, result))
            continue
        for connections, summary in result["by_connections"].items():
            for name in increment.CONTENDERS:
                figures = summary[name]
                lines.append(_row(database, [
                    connections, name, f"{figures['requests_per_second']:,.0f}",
                    _us(figures.get("cpu_us_per_request")), _ms(figures["p50_ms"]), _ms(figures["p99_ms"]),
                    _ms(figures["max_ms"]), _errors(figures), _increment_ratios(summary, name)]))
        totals = result.get("hot_key_totals") or {}
        loads = result.get("load_average") or {}
        if loads:
            notes.append(f"- {database}: load average (1, 5, 15 min) before "
                         f"{', '.join(f'{value:.2f}' for value in loads['before'])}, after "
                         f"{', '.join(f'{value:.2f}' for value in loads['after'])}; do-nothing CPU per request / "
                         "maxtwo's (on maxtwo's transport): " + ", ".join(f"{connections} connections {times(summary.get('do_nothing_cpu_over_ours'))}"
                                                  for connections, summary in result["by_connections"].items()) + ".")
        notes.append(f"- {database}: peak RSS of {increment.OURS} under this load "
                     f"{_mb(result.get('serve_peak_rss_bytes'))} (goal <= 120 MB), of the synchronous server "
                     f"{_mb(result.get('sync_peak_rss_bytes'))}; the hot key's total afterwards "
                     + ", ".join(f"{name}: {value}" for name, value in totals.items()) + ".")
    notes.append(f"- Peak RSS over the whole section of the {increment.DO_NOTHING} "
                 f"{_mb(section.get('do_nothing_peak_rss_bytes'))}, of the {increment.DO_NOTHING_STOCK} "
                 f"{_mb(section.get('stock_do_nothing_peak_rss_bytes'))}. Open files limit: "
                 f"{(section.get('open_files_limit') or {}).get('soft')}.")
    lines += ["", *notes,
              "", (f"Goals: maxtwo >= {INCREMENT_OVER_DO_NOTHING}x the req/s of the {increment.DO_NOTHING} at every connection "
               f"count on both databases, hot key included; >= {INCREMENT_OVER_SYNC:g}x the synchronous approach "
               "(random keys); zero errors; peak RSS <= 120 MB (see [Goals](#goals)).")]
    if _plotted(results, INCREMENT):
        lines += ["", f"![POST /increment req/s, maxtwo vs the do-nothing app and the synchronous approach](img/{INCREMENT})"]
    return "\n".join(lines)


def _increment_ratios(summary: dict, name: str) -> str:
    keys = {increment.OURS: (("ours_over_do_nothing", "/ do-nothing"), ("ours_over_stock_do_nothing", "/ do-nothing, stock"),
                             ("ours_over_sync", "/ synchronous")),
            increment.OURS_HOT: (("hot_ours_over_do_nothing", "/ do-nothing"),
                                 ("hot_ours_over_stock_do_nothing", "/ do-nothing, stock"),
                                 ("hot_ours_over_sync", "/ synchronous, hot")),
            increment.DO_NOTHING: (("do_nothing_over_sync", "/ synchronous"),)}.get(name, ())
    return "; ".join(f"{label} {times(summary.get(key))} ({', '.join(f'{value:.2f}' for value in summary.get(key + '_by_round') or [])})"
                     for key, label in keys)


def _errors(figures: dict) -> str:
    total = figures["errors"] + figures["warmup_errors"]
    if not total:
        return "0"
    sockets = ", ".join(f"{kind} {count}" for kind, count in figures["socket_errors"].items() if count)
    return (f"{total:,} (non-2xx/3xx {figures['non_2xx_3xx']:,}" + (f"; {sockets}" if sockets else "")
            + (f"; warm-up {figures['warmup_errors']:,}" if figures["warmup_errors"] else "") + ")")


# Said only for runs that record it (bench.startup.bytecode_cached): those before did not cache.
_BYTECODE_CACHED = (" maxtwo's own modules run from bytecode cached by the warm-up, as a user's do: the "
                    "processes' environment is without `PYTHONDONTWRITEBYTECODE`, which this project's "
                    "machines set (with it an editable install compiles them at every start).")


def _startup(results: dict) -> str:
    lines = ["## 7. Start-up: the CLI as a whole process", ""]
    result = results.get("startup")
    if _failed(result):
        return "\n".join([*lines, _failure("start-up", result)])
    lines += [(f"Each command as a user or a script runs it: a new process, from spawning it to its exit "
               f"(`subprocess.run`, `time.perf_counter`), {result['runs']} runs after one warm-up, every "
               f"contender in turn. `{startup.QUERY}` and `{startup.RANDOMIZE}` run on a SQLite file seeded "
               f"with {result['rows']:,} users (URL from `MAXTWO_DATABASE_URL`). The baselines come from the "
               f"same run: the interpreter alone (`{startup.PYTHON}`) and the CLI framework alone "
               f"(`{startup.TYPER}`).{_BYTECODE_CACHED if result.get('bytecode_cached') else ''}"), "",
              "| command | median | runs | / `python -c pass` | / `import typer` | goal |",
              "|---|---|---|---|---|---|"]
    for name in (*startup.BASELINES, *startup.COMMANDS):
        summary = result["contenders"][name]
        limit = STARTUP_LIMITS.get(name)
        lines.append(_row(f"`{name}`", [_s(summary["median"]), _list_s(summary["runs"]),
                                        times(result["over_python"].get(name)), times(result["over_typer"].get(name)),
                                        f"<= {limit:g} s" if limit else ""]))
    overhead, reported = result["randomize_overhead"], result["randomize_reported"]
    name = startup.RANDOMIZE_OVERHEAD
    lines.append(_row(name, [_s(overhead["median"]), _list_s(overhead["runs"]),
                             times(result["over_python"].get(name)), times(result["over_typer"].get(name)),
                             f"<= {STARTUP_LIMITS[name]:g} s"]))
    lines += ["", (f"- The time `{startup.RANDOMIZE}` reports (the randomization of {result['rows']:,} users, "
                   f"commit included): median {_s(reported['median'])} ({_list_s(reported['runs'])})."),
              ("- What each command imports is checked by tests/test_cli_startup.py; where the time goes "
               "(`python -X importtime`) is in [What was tried](#what-was-tried).")]
    return "\n".join(lines)


def _machine(results: dict) -> str:
    machine = results.get("machine") or {}
    databases = machine.get("databases") or {}
    memory = machine.get("memory_bytes")
    rows = [
        ("date", machine.get("date")), ("CPU", machine.get("cpu")), ("cores", machine.get("cores")),
        ("memory", f"{memory / 1024**3:.1f} GiB" if memory else None), ("OS", machine.get("os")),
        ("Python", machine.get("python")), ("maxtwo", f"{machine.get('maxtwo')} (commit {machine.get('commit')})"),
        ("libraries", ", ".join(f"{k} {v}" for k, v in (machine.get("libraries") or {}).items())),
        ("wrk", machine.get("wrk") or "not installed"),
    ]
    for name in DATABASES:
        described = databases.get(name) or {}
        if "error" in described:
            rows.append((name, f"unavailable: {described['error']}"))
            continue
        origin = {"throwaway": ", a throwaway local server started by the harness",
                  "given": ", the server given with --postgres-url"}.get(described.get("origin"), "")
        settings = ", ".join(f"`{k}={v}`" for k, v in (described.get("settings") or {}).items())
        rows.append((name, f"{described.get('version')}{origin}; {settings}"))
    lines = ["## Machine", "", "| | |", "|---|---|"] + [_row(key, [str(value)]) for key, value in rows]
    return "\n".join(lines)


def _method(results: dict) -> str:
    parameters = results["parameters"]
    return f"""
## Method

- **Command**: `{results['command']}`; parameters: {parameters['rows']:,} users, scale sizes
  {', '.join(f'{size:,}' for size in parameters['scale_rows'])} and a search for the largest table randomized
  within {parameters.get('scale_budget', 60):g} s, {parameters['load_seconds']} s per wrk run,
  {parameters['runs']} runs after 1 warm-up ({parameters.get('load_runs', parameters['runs'])} wrk rounds for GET /),
  connections {', '.join(map(str, parameters['connections']))}.
- **Runs**: each contender runs once as a warm-up (recorded, never counted), then the contenders take
  turns for {parameters['runs']} rounds, so that drift on a shared machine touches all of them alike.
  Tables show the median; every ratio of req/s is the median of the rounds' ratios; the JSON keeps
  every run.
- **Databases**: SQLite is a file in a temporary directory (WAL, `synchronous=FULL`, as maxtwo opens it);
  PostgreSQL is a local server with fsync on (settings under [Machine](#machine)). Every benchmark gets
  a fresh database: a new file, or a new schema selected with `?options=-csearch_path%3D<schema>`,
  dropped afterwards. All engines are built by maxtwo's own `create_engine`. Every PostgreSQL table is
  `VACUUM (ANALYZE)`d after seeding, before timing.
- **Seed**: each run creates maxtwo's tables (untimed), then times `seed_users` or the chunked baseline
  (10,000 rows per parameterised multi-row INSERT on PostgreSQL, executemany on SQLite, whose limit of
  32,766 bound variables is below 40,000), each in one transaction, commit included.
- **Randomize**: each contender's table is seeded once; the runs update it again and again, as the
  daemon does every minute. maxtwo's time is `randomize_points` end to end (state row, UPDATE, commit).
- **Load**: wrk runs on the same 2 cores as the server, so both compete for CPU; the hello-world apps pay
  the same price, which is why only the ratios are headlines. wrk's default 2 s timeout counts slower
  requests as socket timeouts.
- **POST /increment**: {parameters.get('increment_seconds', 'n/a')} s per wrk run at
  {', '.join(map(str, parameters.get('increment_connections') or []))} connections, every server on a
  fresh database (maxtwo and the synchronous approach each on its own); the fsync probe runs in the
  harness's work directory, on the file system that holds the SQLite files and the throwaway
  PostgreSQL's data directory.
- **Memory**: psutil samples each process's RSS every 50 ms; serve is sampled
  from its first answered request to the end of its load runs (after its start-up seed).
- **Start-up**: {parameters.get('startup_runs', 'n/a')} whole `maxtwo` processes per command after a warm-up,
  taking turns with `python -c pass` and `python -c "import typer"`; environment without `MAXTWO_*`
  variables but the database URL.
- **Goals** stated for 1M (or 10M) users are judged only when the run used that size.
"""


def _tried(results: dict) -> str:
    notes = results.get("notes")
    if notes is None:
        return ("## What was tried\n\nNothing recorded yet: keep optimisation attempts in `bench/NOTES.md` "
                "(what changed, the figures before and after, the commit); the harness copies it here.")
    return "## What was tried\n\nCopied verbatim from `bench/NOTES.md`.\n\n" + notes


# -- helpers ------------------------------------------------------------------------------------


def _row(first: str, cells: list[str]) -> str:
    return "| " + " | ".join([first, *cells]).replace("\n", " ") + " |"


def _failed(result: dict | None) -> bool:
    return not isinstance(result, dict) or "error" in result


def _ok(result: dict | None) -> dict | None:
    return None if _failed(result) else result


def _failure(label: str, result: dict | None) -> str:
    error = (result or {}).get("error", "no result") if isinstance(result, dict) else "no result"
    first = error.splitlines()[0] if error else "no result"
    return f"- **{label}: failed**: `{first}` (traceback in bench-results.json)"


def _field(results: dict, section: str, database: str, key: str):
    return _nested((results.get(section) or {}).get(database), key)


def _nested(data, *path):
    for key in path:
        if not isinstance(data, dict) or "error" in data or key not in data:
            return None
        data = data[key]
    return data


def _load_part(results: dict, part: str) -> dict:
    section = results.get("load") or {}
    return section.get(part) or {} if isinstance(section, dict) else {}


def _plotted(results: dict, name: str) -> bool:
    return (results.get("plots") or {}).get(name) == "written"


def _runs_note(results: dict, section: str, contenders: list[str]) -> str:
    notes = []
    for database in DATABASES:
        result = (results.get(section) or {}).get(database)
        if _failed(result):
            continue
        runs = "; ".join(f"{name} {_list_s(result['contenders'][name]['runs'])}"
                         for name in contenders if name in result["contenders"])
        notes.append(f"- {database} runs: {runs}.")
    return "\n".join(notes)


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.2f} s"


def _list_s(values: list[float]) -> str:
    return ", ".join(f"{value:.3f}" for value in values) + " s"


def _rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}" if seconds else "n/a"


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} us"


def _paired(summary: dict) -> str:
    """Against each baseline: the median of the rounds' ratios, and the rounds' own."""
    cells = []
    for key, label in (("hello", "/ same transport"), ("stock_hello", "/ stock waitress")):
        rounds = summary.get(f"ours_over_{key}_by_round") or []
        cells.append(f"{label} {times(summary.get(f'ours_over_{key}'))}"
                     + (f" ({', '.join(f'{value:.2f}' for value in rounds)})" if rounds else ""))
    return "; ".join(cells)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def _mb(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value / MB:+.1f} MB" if signed else f"{value / MB:.1f} MB"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Render performance.md and the goals again from a stored run's bench-results.json "
        "and bench/NOTES.md, without running anything (after editing the notes).")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs",
                        help="the directory holding bench-results.json (default: the repository's docs/)")
    rerender(parser.parse_args().out)
