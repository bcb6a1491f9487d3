"""The benchmark harness's judgement: a goal is met only when the figures of the run say so,
all of them (bench/goals.py), and the figures compare like with like.

The results of the last full run (docs/bench-results.json) are the fixture; each test changes a
copy the way a failed or partial run would and checks the verdict."""

from __future__ import annotations

import collections
import copy
import json
from pathlib import Path

import pytest

from bench import increment, load, randomize, startup
from bench.common import Rounds, round_order, run_in_rounds
from bench.goals import evaluate
from bench.memory import MB
from bench.report import render_markdown
from bench.wrk import answered_per_second

STORED = json.loads((Path(__file__).parents[1] / "docs" / "bench-results.json").read_text(encoding="utf-8"))



@pytest.fixture
def results() -> dict:
    return copy.deepcopy(STORED)


def verdict(results: dict, starts_with: str) -> dict:
    [goal] = [goal for goal in evaluate(results) if goal["goal"].startswith(starts_with)]
    return goal


def verdicts(results: dict, containing: str) -> list[dict]:
    return [goal for goal in evaluate(results) if containing in goal["goal"]]


def test_the_stored_run_is_judged_as_its_report_says(results):
    assert [(goal["goal"], goal["measured"], goal["met"]) for goal in evaluate(results)] == [
        (goal["goal"], goal["measured"], goal["met"]) for goal in STORED["goals"]]


@pytest.mark.parametrize("part", ["steady warm-up", "span warm-up", "span window", "mixed window", "mixed warm-up"])
def test_get_zero_errors_counts_every_load_run(results, part):
    load_results = results["load"]
    if part == "steady warm-up":
        load_results["steady"]["SQLite"]["by_connections"]["50"][load.OURS]["warmup_errors"] = 40
    elif part == "span warm-up":
        load_results["span"]["SQLite"]["warmup"]["non_2xx_3xx"] = 40
    elif part == "span window":
        load_results["span"]["SQLite"]["errors"] = 40
    elif part == "mixed window":
        load_results["span_mixed"]["SQLite"]["errors"] = 40
    else:
        load_results["span_mixed"]["SQLite"]["warmup"]["socket_errors"]["timeout"] = 40
    assert verdict(results, "GET / on SQLite: zero errors")["met"] == "no"
    assert verdict(results, "GET / on PostgreSQL: zero errors")["met"] == "yes"


@pytest.mark.parametrize("failed", ["steady", "span", "span_mixed"])
def test_a_failed_load_run_leaves_zero_errors_and_rss_unjudged(results, failed):
    results["load"][failed]["PostgreSQL"] = {"error": "RuntimeError: gone"}
    assert verdict(results, "GET / on PostgreSQL: zero errors")["met"].startswith("no data")
    assert verdict(results, "maxtwo serve peak RSS under load on PostgreSQL")["met"].startswith("no data")
    assert verdict(results, "maxtwo serve peak RSS under load on SQLite")["met"] == "yes"


def test_serve_rss_under_load_counts_the_mixed_run(results):
    results["load"]["span_mixed"]["SQLite"]["serve_peak_rss_bytes"] = 300 * MB
    assert verdict(results, "maxtwo serve peak RSS under load on SQLite") == {
        "goal": "maxtwo serve peak RSS under load on SQLite <= 120 MB", "measured": "300.0 MB", "met": "no",
        "section": "load"}


@pytest.mark.parametrize(("kind", "value", "shown"), [
    ("ratio", 0.79996, "0.79996x"),
    ("seconds", 1.0004, "1.0004 s"),
    ("megabytes", 120.04 * MB, "120.04 MB"),
])
def test_no_figure_is_rounded_onto_the_other_side_of_its_goal(results, kind, value, shown):
    """0.79996x is no 0.800x, nor 1.0004 s a 1.000 s (a review: only ratios were so shown)."""
    if kind == "ratio":
        results["increment"]["PostgreSQL"]["by_connections"]["50"]["ours_over_do_nothing"] = value
        goal = verdict(results, "POST /increment on PostgreSQL, random keys, 50 connections: >= 0.8x")
    elif kind == "seconds":
        results["randomize"]["PostgreSQL"]["contenders"][randomize.OURS]["median"] = value
        goal = verdict(results, "PostgreSQL randomize 1M <= 1.0 s")
    else:
        results["load"]["span_mixed"]["SQLite"]["serve_peak_rss_bytes"] = value
        goal = verdict(results, "maxtwo serve peak RSS under load on SQLite")
    assert (goal["measured"], goal["met"]) == (shown, "no")


@pytest.mark.parametrize("where", ["load", "increment"])
def test_an_rss_never_read_is_no_data(results, where):
    if where == "load":
        results["load"]["span"]["SQLite"]["serve_peak_rss_bytes"] = 0
        goal = verdict(results, "maxtwo serve peak RSS under load on SQLite")
    else:
        results["increment"]["SQLite"]["serve_peak_rss_bytes"] = 0
        goal = verdict(results, "maxtwo serve peak RSS under POST /increment load on SQLite")
    assert goal["met"].startswith("no data")


def test_connection_counts_are_the_issues_not_the_runs(results):
    by_connections = results["load"]["steady"]["SQLite"]["by_connections"]
    by_connections["100"] = by_connections.pop("200")
    results["parameters"]["connections"] = [50, 100]
    goals = {goal["goal"].split(" at ")[-1]: goal["met"] for goal in verdicts(results, "GET / on SQLite >=")}
    assert goals == {"50 connections": "yes", "200 connections": "no data (benchmark failed or skipped)",
                     "100 connections": "not judged (the goal is at 50 and 200 connections)"}


def test_increment_connection_counts_are_the_issues_not_the_runs(results):
    results["parameters"]["increment_connections"] = [50]
    for database in ("SQLite", "PostgreSQL"):
        del results["increment"][database]["by_connections"]["400"]
    at_400 = verdicts(results, "POST /increment on SQLite, random keys, 400 connections")
    assert [goal["met"] for goal in at_400] == ["no data (benchmark failed or skipped)"] * 2


def test_start_up_goals_need_medians_of_ten(results):
    results["parameters"]["startup_runs"] = 5
    goals = [goal for goal in evaluate(results) if goal["section"] == "startup"]
    assert len(goals) == 4
    assert {goal["met"] for goal in goals} == {"not judged (median of 5 runs; the goal is a median of 10)"}


def test_start_up_runs_from_cached_bytecode_and_the_report_says_so_when_the_run_did(results):
    env = startup.bytecode_cached({"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin"})
    assert env == {"PATH": "/usr/bin"}
    said = "maxtwo's own modules run from bytecode cached by the warm-up"
    results["startup"].pop("bytecode_cached", None)  # a run from before: the report must not claim it
    assert said not in render_markdown(results)
    results["startup"]["bytecode_cached"] = True
    assert said in render_markdown(results)


def test_a_span_ratio_of_one_window_on_a_side_is_not_judged(results):
    span = results["load"]["span"]["PostgreSQL"]
    span["outside"]["windows"] = 1
    assert verdict(results, "PostgreSQL GET / p99 during")["met"] == (
        "not judged (1 window(s) on one side; the ratio needs 2 on each)")
    assert verdict(results, "SQLite GET / p99 during")["met"] != verdict(results, "PostgreSQL GET / p99 during")["met"]


def test_error_answers_are_no_throughput():
    run = {"requests_per_second": 1000.0, "requests": 10_000, "non_2xx_3xx": 2_500,
           "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 7}}
    assert answered_per_second(run) == 750.0
    assert answered_per_second({**run, "requests": 0, "non_2xx_3xx": 0}) == 0.0
    fast_failing = {**run, "requests_per_second": 2000.0, "requests": 20_000, "non_2xx_3xx": 20_000}
    ratios = load.paired_ratios([fast_failing], [run], "hello")
    assert ratios["ours_over_hello"] == 0.0


def test_rounds_run_every_contender_once_each_in_a_williams_order():
    order: list[str] = []
    contenders = {name: lambda name=name: order.append(name) for name in "abcd"}
    rounds = run_in_rounds(contenders, 4)
    assert order == list("abcd" + "abdc" + "bcad" + "cdba" + "dacb")  # the warm-ups, then the rounds
    assert [len(rounds[name].runs) for name in "abcd"] == [4, 4, 4, 4]


@pytest.mark.parametrize("count", [2, 3, 4, 5, 6, 7])
def test_in_rounds_every_contender_comes_right_after_every_other_equally_often(count):
    """A plain rotation kept the cyclic order: each contender followed the same one in every
    round (a review)."""
    rows = [round_order(count, number) for number in range(count if count % 2 == 0 else 2 * count)]
    assert all(sorted(row) == list(range(count)) for row in rows)
    follows = collections.Counter((row[index], row[index + 1]) for row in rows for index in range(count - 1))
    assert set(follows) == {(a, b) for a in range(count) for b in range(count) if a != b}
    assert len(set(follows.values())) == 1


def test_a_baseline_round_that_answered_nothing_has_no_ratio():
    answered = {"requests_per_second": 1000.0, "requests": 10_000, "non_2xx_3xx": 0,
                "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}}
    refused = {**answered, "non_2xx_3xx": 10_000}
    ratios = load.paired_ratios([answered] * 3, [answered, refused, answered], "hello")
    assert (ratios["ours_over_hello"], ratios["ours_over_hello_by_round"]) == (1.0, [1.0, 1.0])
    assert load.paired_ratios([answered], [refused], "hello")["ours_over_hello"] is None


def test_the_synchronous_goal_shows_the_do_nothing_app_s_ratio(results):
    """The do-nothing app against the same synchronous server, in the same rounds: about the
    most a server on the transport reaches, shown beside maxtwo's ratio."""
    fast, slow = ({"requests_per_second": rate, "requests": 10_000, "non_2xx_3xx": 0,
                   "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}} for rate in (9000.0, 3000.0))
    rounds = {name: Rounds(warmup=fast, runs=[fast] * 3) for name in increment.CONTENDERS}
    rounds[increment.SYNC] = Rounds(warmup=slow, runs=[slow] * 3)
    assert increment.paired_ratios(rounds)["do_nothing_over_sync"] == 3.0
    results["increment"]["PostgreSQL"]["by_connections"]["50"]["do_nothing_over_sync"] = 2.9
    [goal] = verdicts(results, "PostgreSQL, random keys, 50 connections: >= 3x the synchronous")
    assert goal["measured"].endswith(" (the do-nothing app: 2.90x)")
    del results["increment"]["PostgreSQL"]["by_connections"]["50"]["do_nothing_over_sync"]
    [goal] = verdicts(results, "PostgreSQL, random keys, 50 connections: >= 3x the synchronous")
    assert "do-nothing" not in goal["measured"]
