"""The write-behind thread that starts the write-back of SQLite's files early (core/writebehind.py).

Its effect, queries no longer stalled by a randomization's flushes, is measured by the benchmark
harness (p99 of GET / inside and outside a randomization) and in bench/NOTES.md; these tests
check that it runs, on which files, and that it can only ever cost the write-back, not a write.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from maxtwo_cli.core import writebehind
from maxtwo_cli.core.randomize import randomize_if_due, randomize_points
from maxtwo_cli.core.seed import seed_users
from tests.conftest import is_postgres_url

# Enough that a seed and a randomization take a few write-back periods each on a fast machine.
USERS = 100_000


@pytest.fixture
def written_back(monkeypatch):
    """The path of every file whose write-back was started, in order."""
    paths: list[str] = []
    real = writebehind.start_writeback

    def recording(descriptor: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real(descriptor)

    monkeypatch.setattr(writebehind, "start_writeback", recording)
    monkeypatch.setattr(writebehind, "PERIOD_SECONDS", 0.001)
    return paths


def _write_behind_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == writebehind.THREAD_NAME]


def test_sync_file_range_is_found_on_linux():
    if sys.platform.startswith("linux"):
        assert writebehind.available(), "sync_file_range not found in the C library: write-behind does nothing"
    else:
        assert not writebehind.available()


@pytest.mark.skipif(not writebehind.available(), reason="sync_file_range is Linux's")
def test_start_writeback_takes_a_file_and_refuses_a_bad_descriptor(tmp_path):
    path = tmp_path / "data"
    with open(path, "wb") as file:
        file.write(os.urandom(1 << 20))
        file.flush()
        writebehind.start_writeback(file.fileno())  # dirty pages: no error, no wait
    descriptor = os.open(path, os.O_RDONLY)
    os.close(descriptor)
    with pytest.raises(OSError) as raised:
        writebehind.start_writeback(descriptor)
    assert raised.value.errno == errno.EBADF


@pytest.mark.skipif(not writebehind.available(), reason="sync_file_range is Linux's")
def test_the_files_open_in_this_process_are_written_back_while_the_block_runs(tmp_path, written_back):
    first, later = tmp_path / "main.db", tmp_path / "main.db-wal"
    first.write_bytes(b"x" * 4096)
    later.write_bytes(b"y" * 4096)
    descriptors_before = sorted(os.listdir("/proc/self/fd"))
    with open(first, "rb"), writebehind.write_behind([str(first), str(later)]):
        time.sleep(0.05)
        assert str(later) not in written_back, "a file this process has not open was written back"
        with open(later, "rb"):  # as SQLite opens the WAL at its first read
            time.sleep(0.05)
        assert len(_write_behind_threads()) == 1
    assert str(first) in written_back
    assert str(later) in written_back, "a file opened during the block was not picked up"
    assert not _write_behind_threads()
    assert sorted(os.listdir("/proc/self/fd")) == descriptors_before


@pytest.mark.skipif(not writebehind.available(), reason="sync_file_range is Linux's")
def test_sqlites_lock_on_the_database_file_survives(tmp_path):
    # Closing any descriptor of a file drops the process's POSIX locks on it, SQLite's shared
    # lock included; another process closing its last connection would then delete the WAL
    # that this one still uses. So the write-behind must borrow SQLite's descriptors.
    path = tmp_path / "t.db"
    ours = sqlite3.connect(path, isolation_level=None)
    try:
        ours.execute("PRAGMA journal_mode=WAL")
        ours.execute("CREATE TABLE t (x)")
        ours.execute("INSERT INTO t VALUES (1)")
        with writebehind.write_behind([str(path), f"{path}-wal"], period=0.001):
            time.sleep(0.05)
        other = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('SELECT 1 FROM t').fetchall(); c.close()"
        subprocess.run([sys.executable, "-c", other, str(path)], check=True, timeout=60)
        assert os.path.exists(f"{path}-wal"), "another process deleted the WAL: this one's lock was dropped"
        assert ours.execute("SELECT count(*) FROM t").fetchone() == (1,)
    finally:
        ours.close()


def test_a_refused_writeback_stops_it_with_a_warning_and_the_block_goes_on(tmp_path, monkeypatch, caplog):
    calls = []

    def refused(descriptor: int) -> None:
        calls.append(descriptor)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(writebehind, "_sync_file_range", lambda *args: 0)  # as on Linux, anywhere
    monkeypatch.setattr(writebehind, "start_writeback", refused)
    path = tmp_path / "main.db"
    path.write_bytes(b"x")
    with open(path, "rb"), caplog.at_level(logging.WARNING, logger=writebehind.__name__), writebehind.write_behind(
        [str(path)], period=0.001
    ):
        time.sleep(0.05)
        reached = True
    assert reached
    assert len(calls) == 1, "it went on after the failure"
    [record] = caplog.records
    assert "write-back" in record.getMessage() and os.strerror(errno.EIO) in record.getMessage()


def test_nothing_runs_where_sync_file_range_is_missing(tmp_path, monkeypatch, written_back):
    monkeypatch.setattr(writebehind, "_sync_file_range", None)
    with writebehind.write_behind([str(tmp_path / "main.db")]):
        assert not _write_behind_threads()
    assert not written_back


@pytest.mark.skipif(not writebehind.available(), reason="sync_file_range is Linux's")
def test_a_randomization_and_a_seed_write_back_the_main_file_and_its_wal(engine, written_back):
    seed_users(engine, USERS)
    seeded = list(written_back)
    written_back.clear()
    randomize_points(engine)
    randomized = list(written_back)
    if is_postgres_url(str(engine.url)):
        # PostgreSQL's server writes its own files.
        assert not seeded and not randomized
        return
    database = engine.url.database
    for files in (seeded, randomized):
        assert set(files) == {database, f"{database}-wal"}, "not the main file and its WAL alone"
    assert not _write_behind_threads()


@pytest.mark.skipif(not writebehind.available(), reason="sync_file_range is Linux's")
def test_a_scheduled_randomization_writes_back_too(engine, written_back):
    from maxtwo_cli.core.clock import utcnow

    seed_users(engine, USERS)
    written_back.clear()
    assert randomize_if_due(engine, due_at=utcnow(), interval=60) is not None
    expected = set() if is_postgres_url(str(engine.url)) else {engine.url.database, f"{engine.url.database}-wal"}
    assert set(written_back) == expected
