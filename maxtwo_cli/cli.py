"""The `maxtwo` command: parse options, call one core function, render the result.

No SQL here. Errors from the core are MaxtwoErrors: one line on stderr and exit 1 (usage
errors stay Typer's exit 2); MAXTWO_DEBUG=1 shows the traceback instead.

NOTE: each command imports the core modules it calls, and rich, inside its own body. At the
top of this module, SQLAlchemy (about 150 ms here), psycopg and rich would be paid by
`maxtwo --version`, `--help` and every shell completion; imported inside, a command pays only
for what it runs, and psycopg only for a PostgreSQL URL (core/db.py). Only the standard library,
typer, and the core's settings and errors (standard library only) are imported here.
tests/test_cli_startup.py checks what each one imports.

NOTE: no `from __future__ import annotations` here: Typer reads every command's annotations
at each call, and as strings each is compiled and evaluated anew (142 eval()s per call);
written as objects, `--version` and `--help` took 5-8 % less (bench/NOTES.md).
"""

import atexit
import contextlib
import errno
import functools
import gc
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
import typer.core

from maxtwo_cli import __version__
from maxtwo_cli.core.errors import ConfigurationError, MaxtwoError
from maxtwo_cli.core.journal import ERROR_PREFIX, stderr_is_journal
from maxtwo_cli.core.redaction import mask_secret_syntax
from maxtwo_cli.core.settings import (
    DEFAULT_SEED_COUNT,
    DEFAULT_THREADS,
    MAX_SEED_COUNT,
    MAX_THREADS,
    MIN_THREADS,
    Settings,
    default_database_url,
)

if TYPE_CHECKING:
    from rich.console import Console
    from sqlalchemy.engine import Engine

# NOTE: at exit, the interpreter's last garbage collections walk every object SQLAlchemy's
# import made: 20-30 ms of each `maxtwo` call (bench/NOTES.md). Frozen objects are skipped
# (the gc module's documented permanent generation); atexit handlers, module teardown and
# reference counting still run as before, and every command disposes of its engine (closing
# its connections) before it returns, on errors too.
atexit.register(gc.freeze)


# What the running command has done that a failure to print its result does not undo (an
# increment committed, ...): said with that failure, so that nobody retries it blindly.
_done: list[str] = []


# Click's words for a number option given a word ("'abc' is not a valid int range.", "float
# range"), in the users' words.
_NOT_A_NUMBER = re.compile(r"""('[^']*'|"[^"]*") is not a valid (integer|int|float)\b(?: range)?""")
_NUMBER_KINDS = {"int": "an integer", "integer": "an integer", "float": "a number"}


def _name_only_the_source(ex: Exception) -> None:
    """A bad value of an option that an environment variable can set names the variable only if
    the value came from it: Typer names it always, and `--threads 1` then sent users looking for
    a MAXTWO_THREADS they never set."""
    param, ctx = getattr(ex, "param", None), getattr(ex, "ctx", None)
    if param is None or ctx is None or getattr(ex, "param_hint", None) is not None or not getattr(param, "envvar", None):
        return
    source = ctx.get_parameter_source(param.name)
    if getattr(source, "name", None) != "ENVIRONMENT":
        ex.param_hint = " / ".join(f"'{opt}'" for opt in param.opts)


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors as one line on stderr (exit 2), instead of a usage banner and a box; so is a
    failure to write the output (exit 1)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        for stream in (sys.stdout, sys.stderr):
            # NOTE: a counter's key is any text a client sent; on a terminal or pipe whose
            # encoding cannot show a character, it is shown as its escape (\u2603), not a crash.
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(errors="backslashreplace")
        if sys.stdout is None:  # started with it closed: Python would drop the output silently
            sys.stdout = _ClosedOutput()
        if sys.stderr is None:
            # Started with it closed (`2>&-`): print(file=None) wrote the errors into stdout's
            # data (a review). They go nowhere now; the exit status tells.
            sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (the process's)
        try:
            outcome = super().main(*args, standalone_mode=False, **kwargs)
            sys.stdout.flush()  # here, where a failure is reported; at exit it would be a traceback
        except OSError as ex:
            # The database's errors are MaxtwoErrors by now (_reported_errors): this is the output.
            _output_failed(ex)
        except typer.Abort:
            _print_error("aborted")
            sys.exit(1)
        except Exception as ex:
            # NOTE: click's exceptions (vendored privately by typer) are recognised by shape.
            format_message = getattr(ex, "format_message", None)
            exit_code = getattr(ex, "exit_code", None)
            if format_message is None or exit_code is None:
                raise
            if type(ex).__name__ == "NoArgsIsHelpError":
                # `maxtwo` alone: its message is the help itself, shown as Click shows it.
                _to_stderr(format_message())
                sys.exit(exit_code)
            hint = f" (see {ex.ctx.command_path} --help)" if getattr(ex, "ctx", None) else ""
            _name_only_the_source(ex)
            # APPSEC: a database URL given where an argument or a command was expected is quoted.
            message = mask_secret_syntax(" ".join(format_message().split()))
            message = _NOT_A_NUMBER.sub(lambda m: f"{m[1]} is not {_NUMBER_KINDS[m[2]]}", message)
            if message:
                _print_error(f"{message}{hint}")
            sys.exit(exit_code)
        # In non-standalone mode an Exit comes back as its code, success as the command's None.
        sys.exit(outcome if isinstance(outcome, int) else 0)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as ex:
            # NOTE: caught here, before Click's main() does: Click silences stderr too on a
            # closed pipe and exits 1, which would hide that the command's change is committed.
            _output_failed(ex)
        except KeyboardInterrupt:
            # Typer makes it exit 130 (128 + SIGINT, as shells do) without a word; whether the
            # change had committed is not known here, so the line says what holds either way.
            _print_error("interrupted; a change not yet committed was rolled back, one committed is kept")
            raise


def _print_error(message: str) -> None:
    """An "Error: ..." line on stderr (printed without rich: usage errors come before any command)."""
    _to_stderr(f"{_error_prefix()}Error: {message}")


def _to_stderr(text: str) -> None:
    """NOTE: if stderr cannot take it (`2>/dev/full`), the exit status alone tells: the failure
    turned a usage error's 2 into 1 (a review), and the interpreter's last flush at exit would
    fail again (status 120), hence /dev/null in its place."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def _error_prefix() -> str:
    # Under systemd (`maxtwo serve` failing to start), journald stores the line as an error.
    return ERROR_PREFIX if stderr_is_journal() else ""


class _ClosedOutput(io.TextIOBase):
    """Standard output for a process started without one: writing is an error, as to a closed
    descriptor (a command that prints nothing, `serve`, never notices)."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "standard output is closed")


def _output_failed(error: OSError) -> NoReturn:
    """One line on stderr for output that could not be written (a full disk, a closed pipe),
    with what the command did all the same; exit 1."""
    # NOTE: stdout is pointed at /dev/null first: the interpreter flushes it again at exit and
    # would fail there a second time, with a traceback (the signal module's documented way).
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    done = "".join(f"; {what}" for what in _done)
    # A reader that stopped early (`maxtwo counters | head`) is told nothing it did not ask
    # for, as with any command in a pipe; unless the command changed something.
    if done or not isinstance(error, BrokenPipeError):
        with contextlib.suppress(OSError):
            _print_error(f"cannot write the output ({error.strerror or error}){done}")
    sys.exit(1)


_NEGATIVE_INTEGER = re.compile(r"-[0-9]+")


class NegativeNumberArguments(typer.core.TyperCommand):
    """A command whose arguments may be negative integers (`maxtwo increment a -5`).

    Click takes every word that starts with '-' for an option, so `-5` would be "No such option".
    Here the words are put in the order Click reads unambiguously: the options (with their
    values), then `--`, then the arguments, in their order. Unknown options stay errors.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        valued = {
            name
            for param in self.get_params(ctx)
            if getattr(param, "param_type_name", None) == "option" and not getattr(param, "is_flag", False)
            for name in param.opts
        }
        options: list[str] = []
        arguments: list[str] = []
        words = iter(args)
        for word in words:
            if word == "--":
                arguments.extend(words)
            elif _NEGATIVE_INTEGER.fullmatch(word) or not word.startswith("-") or word == "-":
                arguments.append(word)
            else:
                options.append(word)
                if word in valued:
                    value = next(words, None)
                    if value is None:  # `--limit` last, without its value: Click says so (given
                        return super().parse_args(ctx, options)  # the words before, it would name a -5)
                    options.append(value)
        if not any(_NEGATIVE_INTEGER.fullmatch(word) for word in arguments):
            return super().parse_args(ctx, args)
        return super().parse_args(ctx, [*options, "--", *arguments])


# APPSEC: database URLs carry passwords; tracebacks must never print local variables.
app = typer.Typer(
    name="maxtwo",
    cls=OneLineErrors,
    help="The points service (a million users, re-rolled every minute, two served at a time) and durable counters.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # NOTE: Click's plain help: rich's (typer.rich_utils, which loads rich.markdown) would add
    # about 90 ms to every `--help`, almost doubling it (bench/NOTES.md).
    rich_markup_mode=None,
)


@functools.cache
def _console(*, stderr: bool = False) -> "Console":
    """rich's console for stdout (or stderr), made on first use: rich is imported to render only."""
    from rich.console import Console

    class OutputErrorsRaised(Console):
        def on_broken_pipe(self) -> None:
            # rich's documented hook; its default exits 1 without a word, where OneLineErrors
            # says what the command did all the same (`maxtwo query | true`: the query is recorded).
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return OutputErrorsRaised(stderr=stderr)


def _not_blank(value: str | None) -> str | None:
    """NOTE: an empty --database-url is refused rather than taken for "not given": `--database-url
    "$URL"` with $URL unset would otherwise write to the default SQLite file instead of the
    database meant. (An empty MAXTWO_DATABASE_URL is unset, as click treats every empty variable;
    one of blanks is refused too, and the error names it: a review.)"""
    if value is not None and not value.strip():
        raise typer.BadParameter("empty; give a URL, or leave it out for the default")
    return value


DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="MAXTWO_DATABASE_URL",
        metavar="URL",
        show_default=False,
        callback=_not_blank,
        help=(
            "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB. "
            "Default: a SQLite file in the user's data directory "
            "($STATE_DIRECTORY/maxtwo.db under systemd)."
        ),
    ),
]


def _version(value: bool) -> None:
    if value:
        print(f"maxtwo {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """The points service: a million users, re-rolled every minute, two served at a time."""


@app.command()
def seed(
    count: Annotated[
        int, typer.Option("--count", min=0, max=MAX_SEED_COUNT, help="How many users to create, all at 0 points.")
    ] = DEFAULT_SEED_COUNT,
    reset: Annotated[
        bool,
        typer.Option("--reset", help="Replace existing users and forget the last query time."),
    ] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create users with 0 points, in one transaction.

    Example: maxtwo seed --count 1000000
    """
    from maxtwo_cli.core.seed import seed_users

    settings = _settings(database_url)
    with _reported_errors(settings):
        engine = _open(settings)
        try:
            with _progress_bar(count) as on_progress:
                result = seed_users(engine, count, reset=reset, on_progress=on_progress)
        finally:
            engine.dispose()
    _done.append(f"the {result.rows:,} users are committed")
    # Plain print: importing rich for one line would cost `maxtwo seed` 20-25 ms.
    if result.replaced:
        # No rows/s: the time holds the removal of the users replaced (10 users "at 12 rows/s").
        print(f"replaced {result.replaced:,} users with {result.rows:,} in {result.seconds:.2f} s")
    else:
        print(f"seeded {result.rows:,} users in {result.seconds:.2f} s ({result.rows_per_second:,.0f} rows/s)")
    if result.statistics_warning:
        # The users are committed; only the planner's statistics wait for autovacuum.
        _console(stderr=True).print(
            "note: the planner's statistics were not refreshed; autovacuum will, "
            "or run VACUUM (ANALYZE) users",
            markup=False, highlight=False, soft_wrap=True,
        )


@app.command()
def randomize(
    timing: Annotated[
        bool, typer.Option("--timing", help="Print rows updated, seconds and rows/s.")
    ] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Give every user new random points (0..100) and draw a new hidden number, atomically.

    Example: maxtwo randomize --timing
    """
    from maxtwo_cli.core.randomize import randomize_points

    settings = _settings(database_url)
    with _reported_errors(settings):
        engine = _open(settings)
        try:
            result = randomize_points(engine)
        finally:
            engine.dispose()
    _done.append("the randomization is committed")
    if timing:
        print(f"randomized {result.rows:,} users in {result.seconds:.3f} s ({result.rows_per_second:,.0f} rows/s)")


@app.command()
def query(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the API body instead of a table.")
    ] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Show at most 2 users above the hidden number, and when the previous query ran.

    Example: maxtwo query --json
    """
    from maxtwo_cli.core.query import query_users

    settings = _settings(database_url)
    with _reported_errors(settings):
        engine = _open(settings)
        try:
            result = query_users(engine)
        finally:
            engine.dispose()
    _done.append("the query is recorded")
    if as_json:
        # Plain print: rich would re-wrap and colour the JSON.
        print(result.api_json())
        return
    from rich.table import Table

    from maxtwo_cli.core.clock import format_api_timestamp

    table = Table("id", "points")
    for user in result.users:
        table.add_row(str(user.id), str(user.points))
    _console().print(table)
    _console().print(f"previous query: {format_api_timestamp(result.previous) or 'never'}")


# NOTE: shell completion parses the words typed so far too (ctx.resilient_parsing), and must not
# pay for the core's imports: the argument callbacks check values only when a command runs.
def _counter_key(ctx: typer.Context, key: str) -> str:
    if ctx.resilient_parsing:
        return key
    from maxtwo_cli.core.counters import InvalidIncrementError, check_key

    try:
        return check_key(key)
    except InvalidIncrementError as ex:
        raise typer.BadParameter(str(ex)) from None


def _counter_keys(ctx: typer.Context, keys: list[str] | None) -> list[str] | None:
    return [_counter_key(ctx, key) for key in keys] if keys else keys


# Decimal digits, ASCII only: Python's int() also takes "1_000" and other scripts' digits.
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _integer(text: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise typer.BadParameter(f"{text!r} is not an integer")
    sign = "-" if text.startswith("-") else ""
    digits = text.lstrip("+-").lstrip("0") or "0"
    # NOTE: int() refuses more than 4,300 digits (sys.set_int_max_str_digits), and click would
    # then print the value without a reason; 20 digits already leave the range the value's own
    # check names, so that check gets a stand-in as far out of range, and says why.
    return int(sign + (digits if len(digits) <= 20 else "1" + "0" * 20))


def _increment_value(ctx: typer.Context, value: int) -> int:
    if ctx.resilient_parsing:  # completing: the core's import is not paid for a check
        return value
    from maxtwo_cli.core.counters import InvalidIncrementError, check_value

    # NOTE: int() takes integers of any size; a total is a signed 64-bit integer.
    try:
        return check_value(value)
    except InvalidIncrementError as ex:
        raise typer.BadParameter(str(ex)) from None


@app.command(cls=NegativeNumberArguments)
def increment(
    key: Annotated[
        str,
        typer.Argument(callback=_counter_key, metavar="KEY", show_default=False, help="The counter: 1 to 255 characters."),
    ],
    value: Annotated[
        int,
        typer.Argument(
            parser=_integer,
            callback=_increment_value,
            metavar="VALUE",
            show_default=False,
            help="The integer to add (negative subtracts), in the signed 64-bit range.",
        ),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"key": KEY, "value": TOTAL} instead.')
    ] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Add VALUE to the counter KEY, durably; print "KEY: TOTAL" (its new total).

    The same increment as POST /increment. TOTAL is always the line's last word.
    A total stays in the signed 64-bit range: an increment that would leave it
    fails (exit 1) and the counter keeps its value.
    Negative values need no quoting; a KEY that starts with '-' goes after '--'.

    Example: maxtwo increment page-views -5
    """
    from maxtwo_cli.core.counters import increment as increment_counter

    settings = _settings(database_url)
    with _reported_errors(settings):
        engine = _open(settings)
        try:
            applied = increment_counter(engine, key, value)
        finally:
            engine.dispose()
    _done.append(f"the increment is committed (total {applied.total})")
    # Plain print: rich would read markup in the key, and re-wrap or colour the line.
    if as_json:
        print(json.dumps({"key": applied.key, "value": applied.total}))
    else:
        print(f"{_printable(applied.key)}: {applied.total}")


def _printable(key: str) -> str:
    """A counter's key as a terminal may show it: any HTTP client can choose a key, and one
    holding control characters (ESC ...) would otherwise move the cursor, recolour or retitle
    the terminal of whoever lists the counters. Each character that is not printable, or that
    the output's encoding cannot hold, is shown as its Python escape (\\x1b, \\u202e), so that a
    table measures it as it is shown; --json escapes them its own way. A backslash is shown as
    \\\\: else the key holding the four characters \\x1b and the one holding ESC looked the same."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    if key.isprintable() and "\\" not in key and _encodable(key, encoding):
        return key
    return "".join(
        char if char != "\\" and char.isprintable() and _encodable(char, encoding)
        else char.encode("unicode_escape").decode("ascii")
        for char in key
    )


def _encodable(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


# The table's borders and padding, and a few characters of a key's column.
_NARROWEST_KEY_COLUMN = 7 + 8

# `counters --limit` at most (the databases take a 64-bit LIMIT; nobody reads a billion rows).
MAX_COUNTERS_LISTED = 1_000_000_000


@app.command(cls=NegativeNumberArguments)
def counters(
    keys: Annotated[
        list[str] | None,
        typer.Argument(
            callback=_counter_keys,
            metavar="[KEY]...",
            show_default=False,
            help="Show these counters only (those never incremented are left out). Default: all.",
        ),
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", min=1, max=MAX_COUNTERS_LISTED, help="Show at most this many counters when no KEY is given."
        ),
    ] = 100,
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"counters": [{"key": KEY, "value": TOTAL}, ...]} instead.')
    ] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Show counters and their totals, sorted by key.

    Example: maxtwo counters page-views signups --json
    """
    from maxtwo_cli.core.counters import list_counters

    settings = _settings(database_url)
    with _reported_errors(settings):
        engine = _open(settings)
        try:
            # One more than shown tells whether there are more.
            rows = list_counters(engine, keys, limit=limit + 1)
        finally:
            engine.dispose()
    more = not keys and len(rows) > limit
    rows = rows[:limit] if not keys else rows
    shown = "the first counter" if limit == 1 else f"the first {limit:,} counters"
    more_hint = f"{shown} by key; --limit {min(limit * 10, MAX_COUNTERS_LISTED)} shows more"
    if as_json:
        # Plain print: rich would re-wrap and colour the JSON.
        print(json.dumps({"counters": [{"key": key, "value": total} for key, total in rows]}))
        if more:  # on stderr: the JSON keeps the shape scripts read, and they are told
            print(f"Note: {more_hint}", file=sys.stderr)
        return
    from rich.table import Table
    from rich.text import Text

    if not rows:
        _console().print("none of these counters was ever incremented" if keys else "no counters yet")
        return
    # A total is shown whole however narrow the terminal: the key's column gives way, and where
    # even the total's own column would not fit, the lines of `maxtwo increment` instead.
    value_width = max(len(str(total)) for _, total in rows)
    if _console().width < value_width + _NARROWEST_KEY_COLUMN:
        for key, total in rows:
            print(f"{_printable(key)}: {total}")
    else:
        table = Table("key", "value")
        table.columns[0].overflow = "fold"  # a long key wraps whole, never cut to "…"
        table.columns[1].justify = "right"
        table.columns[1].no_wrap = True
        table.columns[1].min_width = value_width
        for key, total in rows:
            # Text: a key is data, never rich markup.
            table.add_row(Text(_printable(key)), str(total))
        _console().print(table)
    if more:
        _console().print(more_hint)


def _interval(value: float) -> float:
    # NOTE: nan and inf are floats too; a day is a generous upper bound for "every interval", and
    # a tenth of a second a lower one (boundaries a picosecond apart are no longer apart as
    # floats: the scheduler would spin on one of them, deaf to SIGTERM).
    if not math.isfinite(value) or not 0.1 <= value <= 86_400:
        raise typer.BadParameter("must be a number of seconds from 0.1 to 86400")
    return value


@app.command()
def serve(
    host: Annotated[
        str, typer.Option("--host", envvar="MAXTWO_HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option("--port", envvar="MAXTWO_PORT", min=1, max=65535, help="TCP port to listen on."),
    ] = 4000,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            envvar="MAXTWO_THREADS",
            min=MIN_THREADS,
            max=MAX_THREADS,
            help="Request threads, for every route but GET / and POST /increment (one thread answers "
            "those in batches).",
        ),
    ] = DEFAULT_THREADS,
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            envvar="MAXTWO_INTERVAL",
            min=0.1,  # shown in --help as the others' ranges are; _interval also refuses nan
            max=86_400,
            callback=_interval,
            help="Seconds between randomizations, aligned to the wall clock.",
        ),
    ] = 60.0,
    seed_count: Annotated[
        int,
        typer.Option(
            "--seed-count",
            envvar="MAXTWO_SEED_COUNT",
            min=0,
            max=MAX_SEED_COUNT,
            help="Users to create at start-up if there are none (0: never seed).",
        ),
    ] = DEFAULT_SEED_COUNT,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Serve the HTTP API and randomize every interval, until SIGTERM or Ctrl-C.

    Example: MAXTWO_DATABASE_URL=postgresql+psycopg://maxtwo:PASSWORD@db/maxtwo maxtwo serve --port 4000
    """
    settings = Settings(
        database_url=_database_url(database_url),
        host=host,
        port=port,
        threads=threads,
        interval=interval,
        seed_count=seed_count,
    )
    with _reported_errors(settings):
        # NOTE: imported here so that `maxtwo --help` never pays for falcon and waitress.
        from daemon.server import serve as run_server

        run_server(settings)


def _settings(database_url: str | None) -> Settings:
    return Settings(database_url=_database_url(database_url))


def _database_url(given: str | None) -> str:
    """The URL given (never blank: _not_blank), else the default."""
    if given is None:
        try:
            return default_database_url()
        except ConfigurationError as ex:  # before any settings: nothing to scrub
            _print_error(str(ex))
            raise typer.Exit(1) from None
    return given


def _open(settings: Settings) -> "Engine":
    from maxtwo_cli.core import db, schema

    engine = db.create_engine(settings, pool_size=1)
    try:
        schema.ensure_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


@contextlib.contextmanager
def _progress_bar(total: int) -> Iterator[object]:
    """A rich progress bar on a terminal; nothing at all otherwise (scripts, pipes, CI)."""
    # rich is imported only where it may find a terminal (a tty, or rich's TTY_COMPATIBLE=1 or
    # FORCE_COLOR saying there is one): a script's `maxtwo seed` prints plainly, as fast as it can.
    maybe_terminal = os.environ.get("TTY_COMPATIBLE") == "1" or os.environ.get("FORCE_COLOR") or _is_a_tty(sys.stderr)
    if not maybe_terminal or total == 0:
        yield None
        return
    stderr = _console(stderr=True)
    if not stderr.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("seeding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task("seed", total=total)
        yield lambda done, _total: progress.update(task, completed=done)


def _is_a_tty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # None (started without it), or closed
        return False


@contextlib.contextmanager
def _reported_errors(settings: Settings) -> Iterator[None]:
    """One line on stderr and exit 1 for anything that goes wrong past option parsing."""
    if os.environ.get("MAXTWO_DEBUG") == "1":
        yield
        return
    try:
        yield
    except MaxtwoError as ex:
        _fail(str(ex), settings)
    except Exception as ex:  # noqa: BLE001 - the last line of defence against a traceback
        _fail(f"unexpected {type(ex).__name__}: {ex} (set MAXTWO_DEBUG=1 for details)", settings)


def _fail(message: str, settings: Settings) -> NoReturn:
    _console(stderr=True).print(f"{_error_prefix()}Error: {_scrub(message, settings)}", markup=False,
                                highlight=False, soft_wrap=True)
    raise typer.Exit(1) from None


def _scrub(message: str, settings: Settings) -> str:
    # APPSEC: whatever produced the message, the password in the URL never reaches the screen.
    from maxtwo_cli.core import db

    try:
        url = db.parse_database_url(settings.database_url)
    except MaxtwoError:
        return mask_secret_syntax(message)  # the URL was refused, and that message never quotes it
    except Exception:  # noqa: BLE001 - an unparseable URL: say nothing that could quote it
        return "the database URL is not valid; " + db.URL_HELP
    return db.redact_message(message, url)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
