"""Fixtures: every core test runs on a SQLite file and on a real PostgreSQL server.

PostgreSQL comes from MAXTWO_TEST_POSTGRES_URL when set; otherwise the session starts a
throwaway server (devtools/pgserver.py) the first time a PostgreSQL test needs it. Each test gets
its own PostgreSQL schema (via search_path), so tests never see each other's tables.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from devtools import pgserver
from maxtwo_cli.core import db, schema
from maxtwo_cli.core.settings import Settings
from tests.serve_process import RICH_TERMINAL_OVERRIDES

DATABASES = ["sqlite", "postgres"]


@pytest.fixture(autouse=True)
def _rich_at_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's output as rich makes it by default, whatever the machine's terminal settings
    (tests/serve_process.py, RICH_TERMINAL_OVERRIDES); a test sets one itself to try it."""
    for name in RICH_TERMINAL_OVERRIDES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    if os.environ.get("MAXTWO_TEST_POSTGRES_URL") and os.environ.get("PYTEST_XDIST_WORKER"):
        # NOTE: a few tests find the backends they wait for or cancel server-wide
        # (pg_stat_activity, pg_locks): on one shared server they would catch another worker's.
        pytest.fail("MAXTWO_TEST_POSTGRES_URL needs the tests in one process: run without -n, or "
                    "unset it and each pytest-xdist worker starts a throwaway server of its own")
    with pgserver.from_env_or_start(fsync=False) as server:
        yield server


def libpq_url(url: str) -> str:
    """The same URL without SQLAlchemy's driver suffix, for psycopg.connect()."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def fresh_schema(postgres_server: Any) -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq_url(postgres_server.url), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    url = sa.make_url(postgres_server.url).update_query_dict({"options": f"-csearch_path={name}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(libpq_url(postgres_server.url), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')


@pytest.fixture
def postgres_url(postgres_server: Any) -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped after the test."""
    with fresh_schema(postgres_server) as url:
        yield url


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'maxtwo.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, statement_timeout=10.0)


@pytest.fixture
def engine(settings: Settings) -> Iterator[sa.Engine]:
    engine = db.create_engine(settings, pool_size=12)
    schema.ensure_schema(engine)
    yield engine
    engine.dispose()


def is_postgres_url(url: str) -> bool:
    return url.startswith("postgresql")


@pytest.fixture
def postgres_engine(postgres_url: str) -> Iterator[sa.Engine]:
    """For the few behaviours that exist on PostgreSQL only (server-side connections, MVCC)."""
    engine = db.create_engine(Settings(database_url=postgres_url, statement_timeout=10.0), pool_size=12)
    schema.ensure_schema(engine)
    yield engine
    engine.dispose()


class ReliabilityReport:
    """Figures that fault tests measure, written to a markdown file at the end of the session
    when MAXTWO_RELIABILITY_REPORT names one (docs/reliability.md is made this way)."""

    def __init__(self) -> None:
        self.sections: list[tuple[str, str, list[str]]] = []

    def record(self, promise: str, method: str, figures: list[str]) -> None:
        self.sections.append((promise, method, figures))

    # Everything above this line in the file is written by hand (what is promised) and kept.
    MARKER = "<!-- Below: written by the test run. -->"

    def write(self, path: str) -> None:
        import datetime as dt
        import platform

        try:
            with open(path, encoding="utf-8") as handle:
                kept = handle.read().split(self.MARKER)[0].rstrip("\n") + "\n\n"
        except FileNotFoundError:
            kept = "# Reliability\n\n"
        lines = [
            self.MARKER,
            "",
            "## Measured",
            "",
            ("Written by the test run (`MAXTWO_RELIABILITY_REPORT=docs/reliability.md "
             ".venv/bin/python -m pytest -m fault`), not by hand: each section is one fault test, "
             "its promise, how it is tested, and what it measured."),
            "",
            (f"Run on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC{_tested_commit()} on a "
             f"{os.cpu_count()}-core machine, Python {platform.python_version()}."),
            "",
        ]
        for promise, method, figures in sorted(self.sections):
            lines += [f"### {promise}", "", method, ""] + [f"- {figure}" for figure in figures] + [""]
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(kept + "\n".join(lines))


def _tested_commit() -> str:
    """' at commit X' (the code the fault tests ran, so a reader can tell a stale report), with
    a note if the checkout had other changes; '' outside a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                encoding="utf-8", check=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":!docs/reliability.md"], cwd=root, capture_output=True, encoding="utf-8",
                                 check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" at commit {commit}" + (" with uncommitted changes" if changed else "")


@pytest.fixture(scope="session")
def reliability() -> Iterator[ReliabilityReport]:
    path = os.environ.get("MAXTWO_RELIABILITY_REPORT")
    if path and os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.fail("MAXTWO_RELIABILITY_REPORT needs the tests in one process: run without -n "
                    "(each pytest-xdist worker would overwrite the report with its own part)")
    report = ReliabilityReport()
    yield report
    if path and report.sections:
        report.write(path)
