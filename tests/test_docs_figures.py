"""The measured figures in the docs are those of the stored run (docs/bench-results.json).

A full benchmark run rewrites docs/performance.md and the stored results itself; README's
"Measured numbers", docs/deployment.md and the units' comments are written by hand, and once
kept the figures of the run before without any test noticing. These tests recompute each
figure quoted by hand from the stored results, formatted as the docs quote it: README's table
cell by cell, the prose by the sentence that quotes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.common import scrub
from bench.goals import evaluate
from bench.memory import MB
from bench.options import SECTIONS
from bench.report import read_notes, render_markdown

ROOT = Path(__file__).resolve().parents[1]
STORED = json.loads((ROOT / "docs" / "bench-results.json").read_text(encoding="utf-8"))
RERENDER = "re-render it: python -m bench.report"
DATABASES = ("SQLite", "PostgreSQL")


@pytest.fixture(autouse=True)
def a_full_run_is_stored() -> None:
    """The docs quote a full run: a partial or tiny one written over it fails here, clearly."""
    parameters = STORED["parameters"]
    assert list(parameters["sections"]) == list(SECTIONS) and not parameters["tiny"], (
        "docs/bench-results.json holds a partial or --tiny run; the docs quote a full one "
        "(git checkout docs/ restores it, or run python -m bench)")
    failed = [section for section in SECTIONS if {"error", "skipped"} & set(STORED[section])]
    failed += [f"{section} on {database}" for section in SECTIONS for database in DATABASES
               if "error" in STORED[section].get(database, {})]
    assert not failed, f"the stored run failed in {failed}: the docs quote figures it does not hold"


def _flat(text: str) -> str:
    return " ".join(text.split())  # quoted figures may wrap across lines


def _measured_numbers() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("\n## Measured numbers\n", 1)[1].split("\n## ", 1)[0]


def _table_row(label: str) -> dict[str, str]:
    """README's row whose first cell is `label`: its SQLite and PostgreSQL cells."""
    rows = [line for line in _measured_numbers().splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, f"README's Measured numbers: one row '{label}', found {len(rows)}"
    _, sqlite, postgres = (cell.strip() for cell in rows[0].strip().strip("|").split("|"))
    return {"SQLite": sqlite, "PostgreSQL": postgres}


def _steady(section: str, database: str) -> dict:
    figures = STORED[section]["steady"][database] if section == "load" else STORED[section][database]
    return figures["by_connections"]


def _median(section: str, database: str, contender: str = "maxtwo") -> float:
    return STORED[section][database]["contenders"][contender]["median"]


def _per_second(section: str, database: str, connections: str, contender: str = "maxtwo serve") -> str:
    return f"{_steady(section, database)[connections][contender]['requests_per_second']:,.0f}"


def _pair(section: str, database: str, connections: tuple[str, str], key: str) -> str:
    return " / ".join(f"{_steady(section, database)[c][key]:.2f}x" for c in connections)


def _millions(rows: int) -> str:
    return f"{rows / 10**6:g}M"


def _largest_within_interval() -> dict | None:
    """The largest table randomized within the interval (its probe), if the search found one."""
    scale = STORED["scale"]["PostgreSQL"]
    rows = scale.get("largest_measured_within_interval")
    probes = [p for p in [*scale["points"], *scale["search"]["probes"]] if p["rows"] == rows]
    return probes[0] if rows is not None else None


def _peak_rss(database: str) -> float:
    """README's one RSS figure per database: the larger of GET /'s and POST /increment's peaks."""
    load = STORED["load"]
    peaks = [load[part][database]["serve_peak_rss_bytes"] for part in ("steady", "span", "span_mixed")]
    return max(*peaks, STORED["increment"][database]["serve_peak_rss_bytes"]) / MB


def _expected_table() -> dict[str, dict[str, list[str]]]:
    """Each row's label -> the figures its SQLite and PostgreSQL cells must hold, in order."""
    get_conns, post_conns = ("50", "200"), ("50", "400")
    rows: dict[str, dict[str, list[str]]] = {}

    def cell(label: str, database: str, *figures: str) -> None:
        rows.setdefault(label, {"SQLite": [], "PostgreSQL": []})[database] += figures

    for db in DATABASES:
        span = STORED["load"]["span"][db]
        cell("seed 1M users", db, f"{_median('seed', db):.2f} s", f"({STORED['seed'][db]['baseline_over_ours']:.2f}x")
        cell("randomize 1M users, one transaction", db, f"{_median('randomize', db):.2f} s",
             f"({STORED['randomize'][db]['ours_over_floor']:.2f}x")
        cell("GET / req/s at 50 / 200 connections (durable, 0 errors)", db,
             " / ".join(_per_second("load", db, c) for c in get_conns))
        cell("GET /: maxtwo / hello-world on maxtwo's transport, 50 / 200 connections", db,
             _pair("load", db, get_conns, "ours_over_hello"))
        cell("GET /: maxtwo / hello-world on stock waitress, 50 / 200 connections", db,
             _pair("load", db, get_conns, "ours_over_stock_hello"))
        cell("GET / p99 in a second that overlaps a randomization / one that does not", db,
             f"{span['inside_over_outside']:.2f}x ({span['inside']['median_p99_ms']:.1f} / "
             f"{span['outside']['median_p99_ms']:.1f} ms)")
        cell("POST /increment req/s at 50 / 400 connections (durable, 0 errors)", db,
             " / ".join(_per_second("increment", db, c) for c in post_conns))
        cell("POST /increment: maxtwo / do-nothing app on maxtwo's transport, 50 / 400 connections", db,
             _pair("increment", db, post_conns, "ours_over_do_nothing"))
        cell("the same, every request on one key", db, _pair("increment", db, post_conns, "hot_ours_over_do_nothing"))
        cell("POST /increment: maxtwo / one transaction per request, 50 / 400 connections", db,
             _pair("increment", db, post_conns, "ours_over_sync"))
        cell("`maxtwo serve` peak RSS under load (GET / or POST /increment)", db, f"{_peak_rss(db):.1f} MB")
    startup = STORED["startup"]
    commands = ("maxtwo --version", "maxtwo --help", "maxtwo query")
    cell("`maxtwo --version` / `--help` / `query` (whole process, SQLite)", "SQLite",
         " / ".join(f"{startup['contenders'][c]['median']:.3f}" for c in commands) + " s",
         " / ".join(f"{startup['over_typer'][c]:.2f}x" for c in commands))
    cell("`maxtwo randomize --timing`: whole process minus the time it reports", "SQLite",
         f"{startup['randomize_overhead']['median']:.3f} s")
    ten_million = [p for p in STORED["scale"]["PostgreSQL"]["points"] if p["rows"] == 10**7]
    assert ten_million, "the stored run did not randomize 10M users, which README's table quotes"
    cell("randomize 10M users", "PostgreSQL", f"{ten_million[0]['randomize']['median']:.2f} s")
    if largest := _largest_within_interval():
        runs = largest["randomize"]["runs"]
        cell("largest table randomized within the 60 s interval (measured; median of 3 runs)", "PostgreSQL",
             f"{_millions(largest['rows'])} users in {largest['randomize']['median']:.1f} s",
             f"(runs {min(runs):.1f}-{max(runs):.1f} s)")
    return rows


def test_performance_md_is_the_render_of_the_stored_results_and_notes():
    assert STORED["notes"] == read_notes(), f"bench/NOTES.md changed since docs/bench-results.json: {RERENDER}"
    assert STORED["goals"] == evaluate(STORED), f"the goals' verdicts changed: {RERENDER}"
    rendered = scrub(render_markdown(STORED))
    assert (ROOT / "docs" / "performance.md").read_text(encoding="utf-8") == rendered, f"docs/performance.md differs: {RERENDER}"


def test_readme_names_the_stored_run_and_its_goals():
    section = _flat(_measured_numbers())
    machine = STORED["machine"]
    met = sum(goal["met"] == "yes" for goal in STORED["goals"])
    expected = [f"commit {machine['commit']}", f"({machine['date'][:10]},",
                f"{met} of {len(STORED['goals'])} met",
                f"a 4 KiB fsync took {STORED['increment']['fsync']['median_ms']:.2f} ms"]
    assert [figure for figure in expected if figure not in section] == []


def test_readme_table_quotes_the_stored_run_cell_by_cell():
    expected = _expected_table()
    labels = [line.split("|")[1].strip() for line in _measured_numbers().splitlines() if line.startswith("| ")]
    assert labels[:1] == ["figure"] and labels[1:] and set(labels[1:]) <= set(expected), (
        f"rows in README's table that no figure of the run checks: {sorted(set(labels[1:]) - set(expected))}")
    wrong = []
    for label, cells in expected.items():
        actual = _table_row(label)
        for database, figures in cells.items():
            at = 0
            for figure in figures:  # each figure in its cell, in order
                found = actual[database].find(figure, at)
                if found < 0:
                    wrong.append(f"{label} / {database}: {figure!r} not in {actual[database]!r}")
                    break
                at = found + len(figure)
            if not figures and actual[database]:
                wrong.append(f"{label} / {database}: {actual[database]!r} where the run has no figure")
    assert not wrong, "README's Measured numbers differ from the stored run:\n" + "\n".join(wrong)


def test_readme_run_it_quotes_the_stored_run():
    readme = _flat((ROOT / "README.md").read_text(encoding="utf-8"))
    expected = [
        f"{_median('randomize', 'SQLite'):.2f} s for the 1M users in the last full benchmark run",
        f"the last full run took {STORED['runtime_seconds'] / 60:.0f} minutes",
    ]
    assert [figure for figure in expected if figure not in readme] == []


def test_deployment_quotes_the_stored_run():
    machine = STORED["machine"]
    steady = {db: _steady("load", db) for db in DATABASES}
    cpu = sorted(round(steady["PostgreSQL"][c]["maxtwo serve"]["cpu_us_per_request"]) for c in ("50", "200"))
    hello = [steady[db][c]["hello-world app, maxtwo's transport"]["requests_per_second"]
             for db in DATABASES for c in ("50", "200")]
    pg = "PostgreSQL"
    expected = [
        f"served **{_per_second('load', pg, '50')} req/s of `GET /` at 50 connections and "
        f"{_per_second('load', pg, '200')} at 200** (p99 {steady[pg]['50']['maxtwo serve']['p99_ms']:.1f} and "
        f"{steady[pg]['200']['maxtwo serve']['p99_ms']:.1f} ms, no errors), at "
        + (f"{cpu[0]}" if cpu[0] == cpu[1] else f"{cpu[0]}-{cpu[1]}") + " us of CPU per request",
        f"on SQLite {_per_second('load', 'SQLite', '50')} and {_per_second('load', 'SQLite', '200')} req/s",
        f"{_per_second('increment', pg, '50')} / {_per_second('increment', pg, '400')} req/s of `POST /increment`",
        f"the run of {machine['date'][:10]} on commit {machine['commit']}",
        f"{min(hello):,.0f}-{max(hello):,.0f} in the run of {machine['commit']}",
    ]
    if largest := _largest_within_interval():
        runs = largest["randomize"]["runs"]
        expected.append(f"{largest['rows']:,} users took {largest['randomize']['median']:.1f} s on a 2-core host "
                        f"in the last full run, the median of 3 runs of {min(runs):.1f}-{max(runs):.1f} s")
    deployment = _flat((ROOT / "docs" / "deployment.md").read_text(encoding="utf-8"))
    assert [figure for figure in expected if figure not in deployment] == []


@pytest.mark.parametrize("unit", ["maxtwo.service", "maxtwo@.service"])
def test_units_quote_the_stored_run(unit):
    text = (ROOT / "deploy" / "systemd" / unit).read_text(encoding="utf-8")
    comments = _flat(" ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#")))
    expected = [f"(on PostgreSQL, 1M: {_median('seed', 'PostgreSQL'):.2f} s in docs/performance.md;"]
    if largest := _largest_within_interval():
        expected.append(f"(on PostgreSQL, {_millions(largest['rows'])} users took "
                        f"{largest['randomize']['median']:.1f} s, the median of 3 runs")
    assert [figure for figure in expected if figure not in comments] == []
