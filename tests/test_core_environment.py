"""What the core takes from its environment: the default database's place (settings), the local
time zone (clock) and systemd's journal on stderr (journal)."""

from __future__ import annotations

import logging
import os
import time

import pytest

from maxtwo_cli.core.settings import Settings

# --- core/settings.py ----------------------------------------------------------------------


def test_an_empty_state_directory_is_taken_as_unset(monkeypatch, tmp_path):
    """`STATE_DIRECTORY=` (an empty value, e.g. `Environment=STATE_DIRECTORY=` or a wrapper
    script) must not make the default a relative "maxtwo.db" in the working directory."""
    from maxtwo_cli.core.settings import default_database_url

    monkeypatch.setenv("STATE_DIRECTORY", "")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_database_url() == f"sqlite:///{tmp_path / 'data' / 'maxtwo' / 'maxtwo.db'}"


@pytest.mark.parametrize("value", [":/var/lib/maxtwo", "relative/dir", "relative:/var/lib/maxtwo"])
def test_a_relative_state_directory_is_taken_as_unset(monkeypatch, tmp_path, value):
    from maxtwo_cli.core.settings import default_database_url

    monkeypatch.setenv("STATE_DIRECTORY", value)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_database_url() == f"sqlite:///{tmp_path / 'data' / 'maxtwo' / 'maxtwo.db'}"


def test_settings_cannot_be_changed_once_made():
    import dataclasses

    settings = Settings(database_url="sqlite:///unused.db")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


# --- core/clock.py -------------------------------------------------------------------------


@pytest.fixture
def local_zone_not_utc(monkeypatch):
    """The process's local time zone 5:30 east of UTC (a server not set to UTC)."""
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_naive_time_is_utc_whatever_the_local_zone(local_zone_not_utc):
    import datetime as dt

    from maxtwo_cli.core.clock import as_utc, format_api_timestamp

    naive = dt.datetime(2020, 7, 30, 17, 9, 33, 123456)
    assert as_utc(naive) == naive.replace(tzinfo=dt.UTC)
    assert format_api_timestamp(naive) == "2020-07-30 17:09:33Z"


# --- core/journal.py -----------------------------------------------------------------------


@pytest.mark.parametrize(("level", "prefix"), [
    (logging.CRITICAL, "<2>"), (logging.ERROR + 5, "<3>"), (logging.ERROR, "<3>"), (logging.WARNING, "<4>"),
    (logging.INFO, "<6>"), (logging.DEBUG, "<7>"), (logging.NOTSET, "<7>"),
])
def test_each_logging_level_has_its_syslog_priority(level, prefix):
    """journalctl -p crit / warning / debug filter on these: a critical line stored as "err",
    a warning as "notice" or debug as "info" would be missed or flood the wrong priority."""
    from maxtwo_cli.core.journal import priority_prefix

    assert priority_prefix(level) == prefix


def test_a_journal_stream_of_another_device_is_not_stderr(monkeypatch):
    """The same inode number on another file system is another file."""
    from maxtwo_cli.core.journal import stderr_is_journal

    found = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{found.st_dev + 1}:{found.st_ino}")
    assert not stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{found.st_dev}:{found.st_ino}")
    assert stderr_is_journal()


@pytest.mark.parametrize("journal_stream", [None, "1:2"])
def test_a_closed_stderr_is_not_the_journal_and_no_error(journal_stream):
    """A process started with its stderr closed (`2>&-`): the check must answer, not raise
    (it runs while an error is being reported)."""
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "JOURNAL_STREAM"}
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    code = "import os; from maxtwo_cli.core.journal import stderr_is_journal; os.close(2); print(stderr_is_journal())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=False, stdout=subprocess.PIPE, encoding="utf-8",
                          env=env, timeout=60, check=False)
    assert (done.returncode, done.stdout) == (0, "False\n")
