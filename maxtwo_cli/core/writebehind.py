"""Write-back started early for the SQLite files a randomization rewrites (Linux).

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
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
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
    return _sync_file_range is not None


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
    (default PERIOD_SECONDS).

    A file that does not exist yet is picked up once it does (SQLite creates the WAL at the
    first write). A failure stops the write-behind with a warning and nothing else: the block
    goes on, as durable as without it."""
    if _sync_file_range is None or not paths:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(
        target=_write_back_until,
        args=(list(paths), PERIOD_SECONDS if period is None else period, stop),
        name=THREAD_NAME,
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _write_back_until(paths: list[str], period: float, stop: threading.Event) -> None:
    descriptors: dict[str, int] = {}
    try:
        while not stop.wait(period):
            for path in paths:
                descriptor = descriptors.get(path)
                if descriptor is None:
                    try:
                        descriptor = descriptors[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        continue
                start_writeback(descriptor)
    except OSError as ex:
        log.warning("starting the write-back of the database's files failed (%s); "
                    "SQLite's own flushes go on as before", ex)
    finally:
        for descriptor in descriptors.values():
            os.close(descriptor)
