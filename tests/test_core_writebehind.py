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
from typing import ClassVar

import pytest

from maxtwo_cli.core import writebehind
from maxtwo_cli.core.randomize import randomize_if_due, randomize_points
from maxtwo_cli.core.seed import seed_users
from tests.conftest import is_postgres_url

linux_only = pytest.mark.skipif(not writebehind.available(), reason="sync_file_range is Linux's")

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


@linux_only
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


@linux_only
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


@linux_only
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


@linux_only
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


@linux_only
def test_a_scheduled_randomization_writes_back_too(engine, written_back):
    from maxtwo_cli.core.clock import utcnow

    seed_users(engine, USERS)
    written_back.clear()
    assert randomize_if_due(engine, due_at=utcnow(), interval=60) is not None
    expected = set() if is_postgres_url(str(engine.url)) else {engine.url.database, f"{engine.url.database}-wal"}
    assert set(written_back) == expected



@linux_only
def test_a_file_created_after_the_block_began_is_picked_up(tmp_path, written_back, caplog):
    """SQLite creates the WAL at the first read or write: a path that names no file yet is
    searched again later, not taken for a failure that stops the write-behind."""
    main, wal = tmp_path / "main.db", tmp_path / "main.db-wal"
    main.write_bytes(b"x" * 4096)
    with caplog.at_level(logging.WARNING, logger=writebehind.__name__), open(main, "rb"), \
            writebehind.write_behind([str(wal), str(main)]):
        written_back.wait_for(main)
        wal.write_bytes(b"y" * 4096)
        with open(wal, "rb"):
            written_back.wait_for(wal)
    assert not caplog.records


@linux_only
@pytest.mark.parametrize("then", ["closed", "deleted"])
def test_a_descriptor_number_taken_by_another_file_is_not_written_back(tmp_path, written_back, then):
    """SQLite closed the file (or deleted it, as it deletes the WAL) and the descriptor's number
    went to another file: the write-behind must notice, not write back whatever holds it now."""
    ours, other = tmp_path / "main.db", tmp_path / "unrelated"
    ours.write_bytes(b"x" * 4096)
    other.write_bytes(b"y" * 4096)
    with writebehind.write_behind([str(ours)]):
        file = open(ours, "rb")  # noqa: SIM115
        try:
            number = file.fileno()
            written_back.wait_for(ours)
            if then == "deleted":
                ours.unlink()
            # The number now names the other file, with no moment in between when it is closed
            # (a moment the thread could see, which would hide the mutant).
            replacement = os.open(other, os.O_RDONLY)
            os.dup2(replacement, number)
            os.close(replacement)
            written_back.clear()
            time.sleep(0.2)  # some 200 periods
            assert str(other) not in written_back
        finally:
            file.close()


@pytest.fixture
def fake_writeback(monkeypatch):
    """start_writeback() replaced by `fake_writeback.behaviour(descriptor)`; calls counted."""

    class Fake:
        calls: ClassVar[list[int]] = []
        searches = 0

        @staticmethod
        def behaviour(descriptor: int) -> None:
            pass

    real_search = writebehind._descriptor_of

    def counting_search(path):
        Fake.searches += 1
        return real_search(path)

    def start(descriptor: int) -> None:
        Fake.calls.append(descriptor)
        Fake.behaviour(descriptor)

    Fake.calls = []
    monkeypatch.setattr(writebehind, "_sync_file_range", lambda *args: 0)  # as on Linux, anywhere
    monkeypatch.setattr(writebehind, "start_writeback", start)
    monkeypatch.setattr(writebehind, "_descriptor_of", counting_search)
    monkeypatch.setattr(writebehind, "SEARCH_AGAIN_SECONDS", 0.2)
    return Fake


@pytest.mark.parametrize("number", [errno.EBADF, errno.ESPIPE, errno.EINVAL])
def test_a_descriptor_closed_since_it_was_checked_is_looked_for_again_later(tmp_path, fake_writeback, caplog, number):
    """The race the thread expects (SQLite closed the file between the check and the call, its
    number perhaps taken by a socket or a pipe): no warning, the write-behind goes on, and the
    file is searched for again only after SEARCH_AGAIN_SECONDS, not at every period."""
    def refused_once(descriptor: int) -> None:
        if len(fake_writeback.calls) == 1:
            raise OSError(number, os.strerror(number))

    fake_writeback.behaviour = refused_once
    path = tmp_path / "main.db"
    path.write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger=writebehind.__name__), open(path, "rb"), \
            writebehind.write_behind([str(path)], period=0.001):
        deadline = time.monotonic() + 10
        while len(fake_writeback.calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(fake_writeback.calls) >= 3, "the write-behind stopped at the refusal"
    assert not caplog.records
    assert fake_writeback.searches == 2  # once at first, once after the refusal


def test_a_descriptor_refused_every_time_is_not_retried_at_every_period(tmp_path, fake_writeback):
    def refused(descriptor: int) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    fake_writeback.behaviour = refused
    path = tmp_path / "main.db"
    path.write_bytes(b"x")
    with open(path, "rb"), writebehind.write_behind([str(path)], period=0.001):
        time.sleep(0.5)  # some 500 periods, 2 or 3 searches
    assert 1 <= len(fake_writeback.calls) <= 4


def test_an_open_file_is_found_once_and_a_missing_one_searched_for_rarely(tmp_path, fake_writeback):
    """Each search stats every descriptor of the process (hundreds in a daemon): a file found
    is kept, one not found is looked for again every SEARCH_AGAIN_SECONDS, not every period."""
    found, missing = tmp_path / "main.db", tmp_path / "main.db-wal"
    found.write_bytes(b"x")
    with open(found, "rb"), writebehind.write_behind([str(found)], period=0.001):
        time.sleep(0.5)
    assert len(fake_writeback.calls) > 20
    assert fake_writeback.searches == 1
    fake_writeback.searches = 0
    with writebehind.write_behind([str(missing)], period=0.001):
        time.sleep(0.5)
    assert 1 <= fake_writeback.searches <= 4


def test_the_period_given_is_the_one_used(tmp_path, fake_writeback, monkeypatch):
    monkeypatch.setattr(writebehind, "PERIOD_SECONDS", 600)
    path = tmp_path / "main.db"
    path.write_bytes(b"x")
    with open(path, "rb"), writebehind.write_behind([str(path)], period=0.001):
        deadline = time.monotonic() + 10
        while not fake_writeback.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake_writeback.calls


def test_no_file_to_write_back_starts_no_thread(monkeypatch):
    """PostgreSQL's randomizations and seeds pass no file (core/db.py, sqlite_main_files)."""
    monkeypatch.setattr(writebehind, "_sync_file_range", lambda *args: 0)
    with writebehind.write_behind([]):
        assert not _write_behind_threads()


def test_no_thread_to_be_had_the_block_goes_on_with_a_warning(tmp_path, monkeypatch, caplog):
    class NoThread(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(writebehind, "_sync_file_range", lambda *args: 0)
    monkeypatch.setattr(writebehind.threading, "Thread", NoThread)
    ran = False
    with caplog.at_level(logging.WARNING, logger=writebehind.__name__), writebehind.write_behind([str(tmp_path / "x")]):
        ran = True
    assert ran
    [record] = caplog.records
    assert "can't start new thread" in record.getMessage()


def test_start_writeback_starts_the_write_back_of_the_whole_file_without_waiting(monkeypatch):
    calls = []
    monkeypatch.setattr(writebehind, "_sync_file_range", lambda *args: calls.append(args) or 0)
    writebehind.start_writeback(7)
    # offset 0 and length 0: to the end of the file; SYNC_FILE_RANGE_WRITE (<fcntl.h>) alone:
    # WAIT_BEFORE (1) or WAIT_AFTER (4) would make the thread wait for the disk.
    assert calls == [(7, 0, 0, 2)]


def test_start_writeback_refuses_where_sync_file_range_is_missing(monkeypatch):
    monkeypatch.setattr(writebehind, "_sync_file_range", None)
    with pytest.raises(OSError, match="not available"):
        writebehind.start_writeback(0)


def test_without_proc_the_write_behind_does_nothing(monkeypatch):
    """A Linux without /proc mounted (some containers): the descriptors cannot be found, so
    nothing is started (rather than a thread failing with a warning at every randomization)."""
    real_isdir = os.path.isdir
    monkeypatch.setattr(writebehind.os.path, "isdir", lambda path: path != "/proc/self/fd" and real_isdir(path))
    assert not writebehind.available()


def test_a_c_library_without_sync_file_range_means_none(monkeypatch):
    import ctypes

    class NoSuchFunction:
        def __init__(self, *args, **kwargs) -> None:
            pass

    monkeypatch.setattr(writebehind.sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", NoSuchFunction)
    assert writebehind._load_sync_file_range() is None
