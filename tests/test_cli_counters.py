"""`maxtwo increment` and `maxtwo counters`, on SQLite and PostgreSQL, through CliRunner."""

from __future__ import annotations

import json
import subprocess

import pytest

from maxtwo_cli import cli
from tests.serve_process import MAXTWO
from tests.test_cli import assert_one_line_error, invoke

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


@pytest.fixture(autouse=True)
def _fresh_consoles():
    # rich reads COLUMNS when a Console is made, and cli._console() is made once a process: without
    # this, the first test to print would set the width of every later one.
    cli._console.cache_clear()
    yield
    cli._console.cache_clear()


def increment(database_url: str, *args: str) -> str:
    # The options first: the arguments may follow a `--`.
    result = invoke("increment", "--database-url", database_url, *args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return result.stdout


def counters_json(database_url: str, *args: str) -> list[dict]:
    result = invoke("counters", "--json", "--database-url", database_url, *args)
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert list(body) == ["counters"]
    return body["counters"]


def assert_usage_error(result, *fragments: str) -> None:
    assert_one_line_error(result, *fragments, exit_code=2)


@pytest.mark.parametrize("command", ["increment", "counters"])
def test_help_has_an_example_and_the_env_var(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert f"Example: maxtwo {command}" in result.stdout
    assert "MAXTWO_DATABASE_URL" in result.stdout


@pytest.mark.parametrize("command", ["increment", "counters"])
def test_help_never_shows_the_database_url_from_the_environment(command):
    result = invoke(command, "--help", env={"MAXTWO_DATABASE_URL": "postgresql://u:s3cret@localhost/db"})
    assert result.exit_code == 0
    assert "s3cret" not in result.output


def test_the_help_names_the_output_format():
    assert '"KEY: TOTAL"' in invoke("increment", "--help").stdout


def test_the_usage_says_counters_takes_several_keys():
    assert "Usage: maxtwo counters [OPTIONS] [KEY]..." in invoke("counters", "--help").stdout


def test_increment_round_trip_and_totals(database_url):
    assert increment(database_url, "a", "1") == "a: 1\n"
    assert increment(database_url, "a", "2") == "a: 3\n"
    assert increment(database_url, "b", "7") == "b: 7\n"
    assert json.loads(increment(database_url, "a", "4", "--json")) == {"key": "a", "value": 7}
    assert increment(database_url, "--json", "b", "1") == '{"key": "b", "value": 8}\n'
    assert counters_json(database_url) == [{"key": "a", "value": 7}, {"key": "b", "value": 8}]


def test_negative_values_are_arguments_not_options(database_url):
    assert increment(database_url, "a", "-5") == "a: -5\n"
    assert increment(database_url, "a", "-5", "--json") == '{"key": "a", "value": -10}\n'
    assert increment(database_url, "--json", "a", "-1") == '{"key": "a", "value": -11}\n'
    assert increment(database_url, "a", "3") == "a: -8\n"
    # `--` works too, and is how a key that starts with '-' is given.
    assert increment(database_url, "--", "a", "-2") == "a: -10\n"
    assert increment(database_url, "--", "-key", "-1") == "-key: -1\n"
    # A key that looks like a negative number needs no `--`.
    assert increment(database_url, "-5", "-6") == "-5: -6\n"
    assert counters_json(database_url) == [
        {"key": "-5", "value": -6}, {"key": "-key", "value": -1}, {"key": "a", "value": -10},
    ]


def test_unknown_options_are_still_usage_errors(tmp_path):
    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    assert_usage_error(invoke("increment", "a", "-5", "--bogus", "--database-url", url), "--bogus")
    assert_usage_error(invoke("increment", "-x", "5", "--database-url", url), "-x")
    assert_usage_error(invoke("counters", "a", "-5", "--limit", "--database-url", url), "--limit")
    assert not (tmp_path / "maxtwo.db").exists()


def test_the_installed_command_takes_a_negative_value(tmp_path):
    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    done = subprocess.run([str(MAXTWO), "increment", "a", "-5", "--database-url", url],
                          check=False, capture_output=True, encoding="utf-8", timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "a: -5\n", "")


def test_zero_creates_the_counter_at_zero(database_url):
    assert increment(database_url, "zero", "0") == "zero: 0\n"
    assert increment(database_url, "zero", "0") == "zero: 0\n"
    assert counters_json(database_url, "zero") == [{"key": "zero", "value": 0}]


def test_a_plus_sign_is_accepted(database_url):
    assert invoke("increment", "a", "+5", "--database-url", database_url).output == "a: 5\n"


def test_the_64_bit_bounds_are_accepted(database_url):
    assert increment(database_url, "max", str(INT64_MAX)) == f"max: {INT64_MAX}\n"
    assert increment(database_url, "min", str(INT64_MIN)) == f"min: {INT64_MIN}\n"


@pytest.mark.parametrize(("start", "value"), [(INT64_MAX, "1"), (INT64_MIN, "-1"), (5, str(INT64_MAX))])
def test_an_overflow_is_one_line_and_the_counter_keeps_its_value(database_url, start, value):
    increment(database_url, "c", str(start))
    result = invoke("increment", "c", value, "--database-url", database_url)
    assert_one_line_error(result, "64-bit", "keeps its value", "'c'")
    assert counters_json(database_url, "c") == [{"key": "c", "value": start}]
    # Other counters are untouched, and the counter still takes increments that fit.
    assert increment(database_url, "c", "-1" if start > 0 else "1") == f"c: {start - 1 if start > 0 else start + 1}\n"


@pytest.mark.parametrize(
    ("key", "value", "fragments"),
    [
        ("a", str(2**63), ["VALUE", str(INT64_MAX)]),
        ("a", str(-(2**63) - 1), ["VALUE", str(INT64_MIN)]),
        ("a", str(10**30), ["VALUE"]),
        ("a", "1" * 4301, ["VALUE", str(INT64_MAX)]),  # past int()'s digits: the range's reason still given
        ("a", "-" + "9" * 5000, ["VALUE", str(INT64_MIN)]),
        ("a", "1.5", ["VALUE"]),
        ("a", "abc", ["VALUE"]),
        ("a", "", ["VALUE"]),
        ("a", "1_000", ["VALUE", "not an integer"]),
        ("a", "\u0663", ["VALUE", "not an integer"]),  # ARABIC-INDIC DIGIT THREE: int() takes it
        ("a", " 5", ["VALUE", "not an integer"]),
        ("", "1", ["KEY", "1 to 255"]),
        ("k" * 256, "1", ["KEY", "1 to 255"]),
        ("a\x00b", "1", ["KEY", "U+0000"]),
    ],
)
def test_bad_keys_and_values_are_one_line_usage_errors(tmp_path, key, value, fragments):
    result = invoke("increment", key, value, "--database-url", f"sqlite:///{tmp_path / 'maxtwo.db'}")
    assert_usage_error(result, *fragments)
    assert not (tmp_path / "maxtwo.db").exists()  # refused before the database is opened


@pytest.mark.parametrize("args", [[], ["a"], ["a", "1", "2"]])
def test_missing_or_extra_arguments_are_usage_errors(tmp_path, args):
    assert_usage_error(invoke("increment", *args, "--database-url", f"sqlite:///{tmp_path / 'maxtwo.db'}"))


def test_a_key_of_255_characters_is_fine(database_url):
    key = "k" * 255
    assert increment(database_url, key, "1") == f"{key}: 1\n"


@pytest.mark.parametrize("key", ["page views", "ünïcødé ✓ 日本", "a/b/../c", "[red]markup[/red]", "a: 1"])
def test_any_key_round_trips(database_url, key):
    assert increment(database_url, key, "2") == f"{key}: 2\n"
    assert json.loads(increment(database_url, key, "3", "--json")) == {"key": key, "value": 5}
    assert counters_json(database_url, key) == [{"key": key, "value": 5}]
    result = invoke("counters", key, "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert key in result.stdout  # rich markup in a key is shown, not applied


def test_the_table_shows_a_long_key_whole(database_url):
    key = "x" * 200
    increment(database_url, key, "1")
    result = invoke("counters", "--database-url", database_url, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and result.stdout.count("x") == 200


@pytest.mark.parametrize("columns", ["45", "36", "20"])
def test_a_total_is_shown_whole_however_narrow_the_terminal(database_url, columns):
    invoke("increment", "k" * 255, "-9223372036854775808", "--database-url", database_url)
    invoke("increment", "short", "1", "--database-url", database_url)
    result = invoke("counters", "--database-url", database_url, env={"COLUMNS": columns})
    assert result.exit_code == 0
    assert "-9223372036854775808" in result.output and "short" in result.output
    # And when there are more, it says so (a review: the narrowest lines left that out).
    result = invoke("counters", "--limit", "1", "--database-url", database_url, env={"COLUMNS": columns})
    assert result.exit_code == 0
    words = " ".join(result.stdout.split())  # (rich wraps the note at the terminal's width)
    assert "short" not in words and "the first counter by key; --limit 10 shows more" in words


def test_counters_on_a_fresh_database(database_url):
    result = invoke("counters", "--database-url", database_url)
    assert (result.exit_code, result.stdout) == (0, "no counters yet\n")
    result = invoke("counters", "--json", "--database-url", database_url)
    assert (result.exit_code, result.stdout) == (0, '{"counters": []}\n')


def test_counters_table_and_json_sorted_by_key(database_url):
    for key, value in [("c", "1"), ("a", "3"), ("b", "-2")]:
        increment(database_url, key, value)
    result = invoke("counters", "--json", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        '{"counters": [{"key": "a", "value": 3}, {"key": "b", "value": -2}, {"key": "c", "value": 1}]}\n'
    )
    result = invoke("counters", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1:3] for line in result.stdout.splitlines() if line.startswith("│")]
    assert [(key.strip(), total.strip()) for key, total in rows] == [("a", "3"), ("b", "-2"), ("c", "1")]
    assert "key" in result.stdout and "value" in result.stdout
    assert "--limit" not in result.stdout  # all of them shown


def test_counters_of_the_keys_given_leave_out_the_unknown_ones(database_url):
    for key in ["a", "b", "c"]:
        increment(database_url, key, "1")
    assert [row["key"] for row in counters_json(database_url, "c", "nope", "a")] == ["a", "c"]
    assert counters_json(database_url, "nope") == []
    result = invoke("counters", "nope", "--database-url", database_url)
    assert result.exit_code == 0
    assert result.stdout == "none of these counters was ever incremented\n"
    # --limit applies to listing all counters, not to the keys asked for.
    assert len(counters_json(database_url, "a", "b", "c", "--limit", "1")) == 3


def test_counters_limit(database_url):
    for key in ["d", "b", "a", "c"]:
        increment(database_url, key, "1")
    assert [row["key"] for row in counters_json(database_url, "--limit", "2")] == ["a", "b"]
    assert len(counters_json(database_url, "--limit", "4")) == 4
    result = invoke("counters", "--limit", "2", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert "the first 2 counters by key; --limit 20 shows more" in result.stdout
    one = invoke("counters", "--limit", "1", "--database-url", database_url)
    assert "the first counter by key; --limit 10 shows more" in one.stdout
    # --json: the same note on stderr, the JSON unchanged (a script is told it has not all).
    result = invoke("counters", "--json", "--limit", "2", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"counters": [{"key": "a", "value": 1}, {"key": "b", "value": 1}]}
    assert result.stderr == "Note: the first 2 counters by key; --limit 20 shows more\n"


def test_the_more_hint_only_when_there_are_more(database_url):
    for key in ["a", "b"]:
        increment(database_url, key, "1")
    result = invoke("counters", "--limit", "2", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert "shows more" not in result.stdout
    assert len(counters_json(database_url, "--limit", "1")) == 1
    assert invoke("counters", "--json", "--limit", "2", "--database-url", database_url).stderr == ""


def test_control_characters_in_a_key_reach_no_terminal(database_url):
    # Any HTTP client can make such a key; listing it must not retitle or recolour a terminal.
    key = "x\x1b]0;pwned\x07\x1b[31mRED\u202e\x9b"
    shown = "x\\x1b]0;pwned\\x07\\x1b[31mRED\\u202e\\x9b"
    assert increment(database_url, key, "1") == f"{shown}: 1\n"
    result = invoke("counters", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert shown in result.stdout
    assert not set(result.stdout) & {"\x1b", "\x07", "\x9b", "\u202e"}
    assert counters_json(database_url, key) == [{"key": key, "value": 1}]  # stored as given


def test_a_key_spelling_an_escape_is_told_apart_from_the_character(database_url):
    # A review: the four characters "\x1b" were shown as the ESC character's escape is.
    assert increment(database_url, "lit\\x1bkey", "1") == "lit\\\\x1bkey: 1\n"
    assert increment(database_url, "lit\x1bkey", "2") == "lit\\x1bkey: 2\n"
    assert increment(database_url, "plain/key", "3") == "plain/key: 3\n"  # others as they are
    result = invoke("counters", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert "lit\\\\x1bkey" in result.stdout and "lit\\x1bkey " in result.stdout


@pytest.mark.parametrize("limit", ["0", "-1", "x", "", "1000000001", str(2**63)])
def test_a_bad_limit_is_a_usage_error(tmp_path, limit):
    result = invoke("counters", "--limit", limit, "--database-url", f"sqlite:///{tmp_path / 'maxtwo.db'}")
    assert_usage_error(result, "--limit")
    assert not (tmp_path / "maxtwo.db").exists()


def test_counters_refuses_a_key_no_counter_can_have(tmp_path):
    result = invoke("counters", "a", "k" * 256, "--database-url", f"sqlite:///{tmp_path / 'maxtwo.db'}")
    assert_usage_error(result, "KEY", "1 to 255")


def test_database_url_from_the_environment(database_url):
    result = invoke("increment", "a", "-1", env={"MAXTWO_DATABASE_URL": database_url})
    assert (result.exit_code, result.stdout) == (0, "a: -1\n")
    result = invoke("counters", "--json", env={"MAXTWO_DATABASE_URL": database_url})
    assert result.stdout == '{"counters": [{"key": "a", "value": -1}]}\n'


@pytest.mark.parametrize("args", [["increment", "a", "1"], ["counters"], ["counters", "--json"]])
def test_an_unreachable_database_is_a_one_line_error(args):
    result = invoke(*args, "--database-url", "postgresql://maxtwo:s3cret@127.0.0.1:1/maxtwo")
    assert_one_line_error(result, "check that the server is running")
    assert "s3cret" not in result.output


def increment_many(database_url: str, keys: list[str]) -> None:
    from maxtwo_cli.core import counters, db, schema
    from maxtwo_cli.core.settings import Settings

    engine = db.create_engine(Settings(database_url=database_url), pool_size=1)
    try:
        schema.ensure_schema(engine)
        for key in keys:
            counters.increment(engine, key, 1)
    finally:
        engine.dispose()


def test_counters_shows_100_by_default(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    increment_many(url, [f"k{number:03}" for number in range(101)])
    result = invoke("counters", "--json", "--database-url", url)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["counters"]) == 100
    assert result.stderr == "Note: the first 100 counters by key; --limit 1000 shows more\n"


def test_counters_takes_the_largest_limit(tmp_path):
    result = invoke("counters", "--limit", "1000000000", "--json", "--database-url", f"sqlite:///{tmp_path / 'x.db'}")
    assert (result.exit_code, result.stdout) == (0, '{"counters": []}\n'), result.output


def test_the_more_hint_never_suggests_a_limit_that_is_refused(monkeypatch, tmp_path):
    from maxtwo_cli.core import counters

    class MoreThanShown(list):  # limit + 1 rows, without making them
        def __len__(self):
            return 500_000_001

    monkeypatch.setattr(counters, "list_counters", lambda engine, keys, limit: MoreThanShown([("a", 1)]))
    result = invoke("counters", "--json", "--limit", "500000000", "--database-url", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.exit_code == 0, result.output
    assert result.stderr == "Note: the first 500,000,000 counters by key; --limit 1000000000 shows more\n"


def test_no_more_hint_for_the_keys_asked_for(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    increment_many(url, ["a", "b", "c"])
    result = invoke("counters", "a", "b", "c", "--limit", "1", "--json", "--database-url", url)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    assert "shows more" not in invoke("counters", "a", "b", "c", "--limit", "1", "--database-url", url).stdout


def test_a_narrow_terminal_s_lines_escape_control_characters(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    increment_many(url, ["x\x1b[31mRED"])
    result = invoke("counters", "--database-url", url, env={"COLUMNS": "10"})
    assert (result.exit_code, result.stdout) == (0, "x\\x1b[31mRED: 1\n")


@pytest.mark.parametrize(("columns", "as_table"), [("33", False), ("34", True)])
def test_the_table_gives_way_below_a_key_column_of_8(tmp_path, columns, as_table):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    increment(url, "k" * 40, str(INT64_MAX))  # a total of 19 digits: lines below 19 + 15 columns
    result = invoke("counters", "--database-url", url, env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    assert ("│" in result.stdout) == as_table, result.stdout
    if not as_table:
        assert result.stdout == f"{'k' * 40}: {INT64_MAX}\n"


def test_totals_are_right_aligned(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    increment(url, "a", "1")
    increment(url, "b", "-2000")
    result = invoke("counters", "--database-url", url, env={"COLUMNS": "80"})
    assert [line.split("│")[2] for line in result.stdout.splitlines() if line.startswith("│")] == ["     1 ", " -2000 "]
