"""The measured figures in the docs are those of the stored run (docs/bench-results.json).

A full benchmark run rewrites docs/performance.md and the stored results itself; README's
"Measured numbers", docs/deployment.md and the units' comments are written by hand, and once
kept the figures of the run before without any test noticing. These tests recompute each
figure quoted by hand from the stored results, formatted as the docs quote it.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import scrub
from bench.goals import evaluate
from bench.report import read_notes, render_markdown

ROOT = Path(__file__).resolve().parents[1]
STORED = json.loads((ROOT / "docs" / "bench-results.json").read_text())
RERENDER = "re-render it: python -m bench.report"


def _measured_numbers() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("\n## Measured numbers\n", 1)[1].split("\n## ", 1)[0]


def _missing(text: str, expected: dict[str, str]) -> list[str]:
    flat = " ".join(text.split())  # quoted figures may wrap across lines
    return [f"{what}: {figure!r}" for what, figure in expected.items() if figure not in flat]


def _median(section: str, database: str, contender: str = "maxtwo") -> float:
    return STORED[section][database]["contenders"][contender]["median"]


def _per_second(section: str, database: str, connections: str, contender: str = "maxtwo serve") -> str:
    by_connections = STORED[section]["steady"][database] if section == "load" else STORED[section][database]
    return f"{by_connections['by_connections'][connections][contender]['requests_per_second']:,.0f}"


def _ratios(section: str, database: str, key: str, connections: tuple[str, str]) -> str:
    by_connections = STORED[section]["steady"][database] if section == "load" else STORED[section][database]
    return " / ".join(f"{by_connections['by_connections'][c][key]:.2f}x" for c in connections)


def _largest_within_interval() -> tuple[int, float] | None:
    """The largest table randomized within the interval, and the median of its runs."""
    scale = STORED["scale"]["PostgreSQL"]
    rows = scale.get("largest_measured_within_interval")
    if rows is None:
        return None
    [median] = [p["randomize"]["median"] for p in [*scale["points"], *scale["search"]["probes"]] if p["rows"] == rows]
    return rows, median


def test_performance_md_is_the_render_of_the_stored_results_and_notes():
    assert STORED["notes"] == read_notes(), f"bench/NOTES.md changed since docs/bench-results.json: {RERENDER}"
    assert STORED["goals"] == evaluate(STORED), f"the goals' verdicts changed: {RERENDER}"
    rendered = scrub(render_markdown(STORED))
    assert (ROOT / "docs" / "performance.md").read_text() == rendered, f"docs/performance.md differs: {RERENDER}"


def test_readme_names_the_stored_run_and_its_goals():
    section = _measured_numbers()
    machine = STORED["machine"]
    met = sum(goal["met"] == "yes" for goal in STORED["goals"])
    expected = {
        "the run's commit": f"commit {machine['commit']}",
        "the run's date": machine["date"][:10],
        "goals met": f"{met} of {len(STORED['goals'])} met",
    }
    assert not _missing(section, expected), _missing(section, expected)


def test_readme_quotes_the_stored_runs_figures():
    startup = STORED["startup"]["contenders"]
    expected = {}
    for db in ("SQLite", "PostgreSQL"):
        expected |= {
            f"{db} seed": f"{_median('seed', db):.2f} s",
            f"{db} seed over the chunked baseline": f"({STORED['seed'][db]['baseline_over_ours']:.2f}x",
            f"{db} randomize": f"{_median('randomize', db):.2f} s (",
            f"{db} randomize over its floor": f"({STORED['randomize'][db]['ours_over_floor']:.2f}x",
            f"{db} GET / req/s": f"{_per_second('load', db, '50')} / {_per_second('load', db, '200')}",
            f"{db} GET / over hello-world": _ratios("load", db, "ours_over_hello", ("50", "200")),
            f"{db} GET / over stock hello-world": _ratios("load", db, "ours_over_stock_hello", ("50", "200")),
            f"{db} POST req/s": f"{_per_second('increment', db, '50')} / {_per_second('increment', db, '400')}",
            f"{db} POST over do-nothing": _ratios("increment", db, "ours_over_do_nothing", ("50", "400")),
            f"{db} POST hot key over do-nothing": _ratios("increment", db, "hot_ours_over_do_nothing", ("50", "400")),
            f"{db} POST over synchronous": _ratios("increment", db, "ours_over_sync", ("50", "400")),
        }
    expected["fsync"] = f"a 4 KiB fsync took {STORED['increment']['fsync']['median_ms']:.2f} ms"
    expected["start-up"] = " / ".join(
        f"{startup[name]['median']:.3f}" for name in ("maxtwo --version", "maxtwo --help", "maxtwo query"))
    expected["randomize --timing over its report"] = f"{STORED['startup']['randomize_overhead']['median']:.3f} s"
    [ten_million] = [p["randomize"]["median"] for p in STORED["scale"]["PostgreSQL"]["points"] if p["rows"] == 10**7]
    expected["10M randomize"] = f"{ten_million:.2f} s"
    if largest := _largest_within_interval():
        expected["largest table"] = f"{largest[0] // 10**6}M users in {largest[1]:.1f} s"
    missing = _missing(_measured_numbers(), expected)
    assert not missing, "README's Measured numbers lack the stored run's " + "; ".join(missing)


def test_readme_run_it_quotes_the_stored_run():
    readme = (ROOT / "README.md").read_text()
    expected = {
        "the first randomization": f"{_median('randomize', 'SQLite'):.2f} s for the 1M users in the last full benchmark run",
        "the run's length": f"the last full run took {STORED['runtime_seconds'] / 60:.0f} minutes",
    }
    assert not _missing(readme, expected), _missing(readme, expected)


def test_deployment_and_units_quote_the_stored_run():
    machine = STORED["machine"]
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    expected = {
        "the run": f"the run of {machine['date'][:10]} on commit {machine['commit']}",
        "PostgreSQL GET /": f"{_per_second('load', 'PostgreSQL', '50')} req/s of `GET /` at 50 connections and "
                            f"{_per_second('load', 'PostgreSQL', '200')} at 200",
        "SQLite GET /": f"on SQLite {_per_second('load', 'SQLite', '50')} and {_per_second('load', 'SQLite', '200')} req/s",
        "PostgreSQL POST": f"{_per_second('increment', 'PostgreSQL', '50')} / "
                           f"{_per_second('increment', 'PostgreSQL', '400')} req/s of `POST /increment`",
    }
    largest = _largest_within_interval()
    assert largest, "the stored run measured no table within the interval: say so where it is quoted"
    rows, median = largest
    expected["largest table"] = f"{rows:,} users took {median:.1f} s"
    assert not _missing(deployment, expected), _missing(deployment, expected)
    for unit in ("maxtwo.service", "maxtwo@.service"):
        text = (ROOT / "deploy" / "systemd" / unit).read_text()
        comments = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
        expected = {
            "largest table": f"{rows // 10**6}M users took {median:.1f} s",
            "PostgreSQL seed": f"1M: {_median('seed', 'PostgreSQL'):.2f} s in docs/performance.md",
        }
        assert not _missing(comments, expected), (unit, _missing(comments, expected))
