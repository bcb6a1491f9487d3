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


class WrittenBack(list):
    """The path of every file whose write-back was started, in order."""

    def __init__(self) -> None:
        super().__init__()
        self._added = threading.Condition()

    def add(self, path: str) -> None:
        with self._added:
            self.append(path)
            self._added.notify_all()

    def wait_for(self, path: object, timeout: float = 30) -> None:
        """Until a write-back of `path` was started (generous: a loaded machine may not run the
        thread for a while)."""
        with self._added:
            assert self._added.wait_for(lambda: str(path) in self, timeout), f"{path} was never written back"


@pytest.fixture
def written_back(monkeypatch) -> WrittenBack:
    paths = WrittenBack()
    real = writebehind.start_writeback

    def recording(descriptor: int) -> None:
        try:
            paths.add(os.readlink(f"/proc/self/fd/{descriptor}"))
        except OSError:  # closed meanwhile: the real call says so
            pass
        real(descriptor)

    monkeypatch.setattr(writebehind, "start_writeback", recording)
    monkeypatch.setattr(writebehind, "PERIOD_SECONDS", 0.001)
    monkeypatch.setattr(writebehind, "SEARCH_AGAIN_SECONDS", 0.001)
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
        written_back.wait_for(first)
        assert str(later) not in written_back, "a file this process has not open was written back"
        with open(later, "rb"):  # as SQLite opens the WAL at its first read
            written_back.wait_for(later)
        assert len(_write_behind_threads()) == 1
    assert not _write_behind_threads()
    assert sorted(os.listdir("/proc/self/fd")) == descriptors_before


@pytest.mark.skipif(not writebehind.available(), reason="sync_file_range is Linux's")
def test_sqlites_lock_on_the_database_file_survives(tmp_path, written_back):
    # Closing any descriptor of a file drops the process's POSIX locks on it, SQLite's shared
    # lock included; another process closing its last connection would then delete the WAL
    # that this one still uses. So the write-behind must borrow SQLite's descriptors.
    path = tmp_path / "t.db"
    ours = sqlite3.connect(path, isolation_level=None)
    try:
        ours.execute("PRAGMA journal_mode=WAL")
        ours.execute("CREATE TABLE t (x)")
        ours.execute("INSERT INTO t VALUES (1)")
        with writebehind.write_behind([str(path), f"{path}-wal"]):
            written_back.wait_for(path)
            written_back.wait_for(f"{path}-wal")
        other = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('SELECT 1 FROM t').fetchall(); c.close()"
        subprocess.run([sys.executable, "-c", other, str(path)], check=True, timeout=60)
        assert os.path.exists(f"{path}-wal"), "another process deleted the WAL: this one's lock was dropped"
        assert ours.execute("SELECT count(*) FROM t").fetchone() == (1,)
    finally:
        ours.close()


def test_a_refused_writeback_stops_it_with_a_warning_and_the_block_goes_on(tmp_path, monkeypatch, caplog):
    calls = []
    called = threading.Event()

    def refused(descriptor: int) -> None:
        calls.append(descriptor)
        called.set()
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(writebehind, "_sync_file_range", lambda *args: 0)  # as on Linux, anywhere
    monkeypatch.setattr(writebehind, "start_writeback", refused)
    path = tmp_path / "main.db"
    path.write_bytes(b"x")
    with open(path, "rb"), caplog.at_level(logging.WARNING, logger=writebehind.__name__), writebehind.write_behind(
        [str(path)], period=0.001
    ):
        assert called.wait(30)
        time.sleep(0.05)  # time for the calls that must not come
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
