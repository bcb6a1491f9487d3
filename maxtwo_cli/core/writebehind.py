"""Write-back started early for the SQLite files a randomization or a seed rewrites (Linux).

A randomization rewrites every user: about 30 MB per million users goes into the WAL, and its
commit's checkpoint writes as much into the database file. Left to the kernel, those pages stay
dirty in memory until SQLite's fsync sends them all to the disk at once, and every other flush
meanwhile waits behind them, each GET /'s commit (to the query-state file) included: queries
stalled 40-100 ms, twice per randomization (bench/NOTES.md). Here a thread asks the kernel every
10 ms to start writing those files' dirty pages back (sync_file_range with SYNC_FILE_RANGE_WRITE,
which neither waits for the writes nor flushes the disk's cache), so they leave in small pieces,
and the fsyncs of the commit and of the checkpoint find little left.

This decides nothing about durability: SQLite's own fsyncs still do, and the kernel may write a
dirty page back at any moment anyway. Python's os module has no sync_file_range, hence ctypes;
where the C library lacks it (not Linux) this does nothing.

NOTE: the descriptors are SQLite's own, found in /proc/self/fd, never opened nor closed here:
closing any descriptor of a file drops every POSIX lock the process holds on it, SQLite's
included. Without the database file's shared lock, another process closing its last connection
takes itself for the last of all and deletes the WAL under this one (reproduced,
bench/NOTES.md; tests/test_core_writebehind.py checks it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

log = logging.getLogger(__name__)

# How often the write-back is started: often enough that each piece is small (at about 50 MB/s
# of writes, half a megabyte), rarely enough to cost nothing measurable.
PERIOD_SECONDS = 0.01
THREAD_NAME = "maxtwo-write-behind"

_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start write-back of dirty pages, do not wait


def _load_sync_file_range() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def available() -> bool:
    """Whether write_behind() does anything here."""
    return _sync_file_range is not None and os.path.isdir("/proc/self/fd")


def start_writeback(descriptor: int) -> None:
    """Start writing back every dirty page of the open file, without waiting; OSError if refused."""
    if _sync_file_range is None:
        raise OSError("sync_file_range is not available here")
    # NOTE: ctypes releases the interpreter lock for the call, which may block for a moment
    # when the disk's queue is full.
    if _sync_file_range(descriptor, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


@contextlib.contextmanager
def write_behind(paths: Sequence[str], period: float | None = None) -> Iterator[None]:
    """While the block runs, start the write-back of the files at `paths` every `period` s
    (default PERIOD_SECONDS), through the descriptors this process already has open on them.

    A file not open yet is picked up once it is. A failure stops the write-behind with a
    warning and nothing else: the block goes on, as durable as without it."""
    if not paths or not available():
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(
        target=_write_back_until,
        args=(list(paths), PERIOD_SECONDS if period is None else period, stop),
        name=THREAD_NAME,
        daemon=True,
    )
    try:
        thread.start()
    except RuntimeError as ex:  # no thread to be had: the block goes on without
        log.warning("no write-behind for the database's files (%s); SQLite's own flushes go on as before", ex)
        yield
        return
    try:
        yield
    finally:
        stop.set()
        thread.join()


# Seconds between two searches of /proc/self/fd for a file not found open: a daemon may have
# hundreds of descriptors (its connections), each searched with a stat().
SEARCH_AGAIN_SECONDS = 0.1


def _write_back_until(paths: list[str], period: float, stop: threading.Event) -> None:
    borrowed: dict[str, int] = {}  # path -> SQLite's descriptor of it
    search_after: dict[str, float] = {}  # path -> time.monotonic() before which not to search
    try:
        while not stop.wait(period):
            for path in paths:
                descriptor = borrowed.get(path)
                if descriptor is None or not _is_open_on(descriptor, path):
                    borrowed.pop(path, None)
                    if time.monotonic() < search_after.get(path, 0.0):
                        continue
                    descriptor = _descriptor_of(path)
                    if descriptor is None:
                        search_after[path] = time.monotonic() + SEARCH_AGAIN_SECONDS
                        continue
                    borrowed[path] = descriptor
                try:
                    start_writeback(descriptor)
                except OSError as ex:
                    # Closed by SQLite since it was checked (and its number perhaps taken by
                    # a socket or a pipe): look again next time.
                    if ex.errno not in (errno.EBADF, errno.ESPIPE, errno.EINVAL):
                        raise
                    borrowed.pop(path, None)
                    search_after[path] = time.monotonic() + SEARCH_AGAIN_SECONDS
    except OSError as ex:
        log.warning("starting the write-back of the database's files failed (%s); "
                    "SQLite's own flushes go on as before", ex)


def _descriptor_of(path: str) -> int | None:
    """A descriptor this process has open on the file at `path` (SQLite's), or None."""
    try:
        wanted = os.stat(path)
    except FileNotFoundError:  # SQLite creates the WAL at the first read or write
        return None
    for name in os.listdir("/proc/self/fd"):
        try:
            found = os.stat(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        if os.path.samestat(found, wanted):
            return int(name)
    return None


def _is_open_on(descriptor: int, path: str) -> bool:
    try:
        found, wanted = os.fstat(descriptor), os.stat(path)
    except OSError:
        return False
    return os.path.samestat(found, wanted)
