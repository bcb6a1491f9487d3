"""`maxtwo serve --workers N`: N serving processes sharing one listening socket, and a
supervisor that runs the randomizer.

One process answers on one core at a time (the GIL), and its threads spend most of a request
handing work to each other; several processes spread that over the cores (bench/NOTES.md).

- The supervisor prepares the database, opens the listening socket and forks the workers
  before it starts any thread (a child gets a copy of the forking thread only, and of every
  lock as it was). Each worker builds its own engine, app and waitress server on the inherited
  socket; the kernel gives each new connection to one of them.
- The supervisor alone talks to systemd: READY=1 once every worker serves, WATCHDOG=1 from its
  scheduler, STOPPING=1. It alone randomizes: one scheduler per daemon, as with one process.
- /metrics, from whichever worker answers, sums every process's figures (daemon/metrics.py),
  kept in a temporary directory the supervisor removes, or the next one if it was killed.
- SIGTERM or SIGINT: each worker drains as a single process does; the supervisor passes the
  signal on, waits for them, stops its scheduler and exits 0.
- A worker that ends on its own takes the daemon down (the others drain, exit status 1):
  systemd's Restart=on-failure then starts it afresh, rather than a daemon limping on with
  fewer workers than it was given.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from typing import NoReturn

from daemon import systemd
from daemon.metrics import Metrics, share_between_processes
from daemon.scheduler import RandomizeScheduler
from daemon.server import (
    DRAIN_SECONDS,
    SCHEDULER_STOP_SECONDS,
    listen,
    prepare_database,
    scheduled_job,
    serve_requests,
    stop_on_signals,
)
from maxtwo_cli.core import db
from maxtwo_cli.core.errors import MaxtwoError
from maxtwo_cli.core.settings import Settings

log = logging.getLogger("maxtwo")

# A worker builds an app and binds its server: seconds, not minutes (the database is ready).
WORKER_START_SECONDS = 30.0
POLL_SECONDS = 0.2
# Workers drain for DRAIN_SECONDS; then they are killed.
WORKER_STOP_SECONDS = DRAIN_SECONDS + 2.0
ORPHAN_CHECK_SECONDS = 1.0
# The workers' shared metrics live in <temporary directory>/<prefix><supervisor pid>-<random>.
METRICS_DIRECTORY_PREFIX = "maxtwo-metrics-"
_METRICS_DIRECTORY_NAME = re.compile(re.escape(METRICS_DIRECTORY_PREFIX) + r"([0-9]{1,7})-.+")  # pid_max <= 2**22


class WorkerError(MaxtwoError):
    """A serving process failed to start or ended on its own."""


def supervise(settings: Settings) -> None:
    """Run `settings.workers` serving processes and the scheduler until SIGTERM or SIGINT."""
    engine = db.create_engine(settings, pool_size=2)
    try:
        prepare_database(engine, settings)
    finally:
        engine.dispose()  # NOTE: no database connection may be shared through fork()
    listener = listen(settings)
    metrics_directory, metrics_directory_lock = _new_metrics_directory()
    workers: dict[int, int] = {}  # pid -> worker number
    scheduler: RandomizeScheduler | None = None
    scheduler_engine = None
    failure: str | None = None
    try:
        share_between_processes(metrics_directory)
        stop = stop_on_signals()  # the workers inherit it, and set their own copy
        ready_read, ready_write = os.pipe()
        try:
            for number in range(1, settings.workers + 1):
                supervisor = os.getpid()
                pid = os.fork()
                if pid == 0:
                    try:
                        os.close(ready_read)
                        _work(settings, listener, metrics_directory, stop, ready_write, number, supervisor)
                    finally:
                        os._exit(1)  # NOTE: a child must never unwind into the supervisor's code
                workers[pid] = number
        finally:
            os.close(ready_write)
            listener_name = listener.getsockname()
            listener.close()  # the workers hold it
        failure = _await_ready(ready_read, workers, stop)
        os.close(ready_read)
        if failure is None and not stop.is_set():
            log.info(
                "listening on http://%s:%s with %d worker processes (pids %s)",
                *listener_name[:2], len(workers), ", ".join(map(str, workers)),
            )
            systemd.notify("READY=1")
            scheduler_engine = db.create_engine(settings, pool_size=2)
            scheduler = RandomizeScheduler(
                scheduled_job(scheduler_engine, settings.interval), settings.interval, Metrics(metrics_directory)
            )
            scheduler.start()
            failure = _watch(workers, stop)
    finally:
        if failure is not None:
            systemd.notify("STOPPING=1")
        # The workers drain while a running randomization commits or rolls back.
        _signal(workers, signal.SIGTERM)
        if scheduler is not None:
            scheduler.stop(SCHEDULER_STOP_SECONDS)
        _wait_for(workers)
        if scheduler_engine is not None:
            scheduler_engine.dispose()
        shutil.rmtree(metrics_directory, ignore_errors=True)
        os.close(metrics_directory_lock)
    if failure is not None:
        raise WorkerError(failure)
    log.info("stopped")


def _work(
    settings: Settings,
    listener: socket.socket,
    metrics_directory: str,
    stop: threading.Event,
    ready_write: int,
    number: int,
    supervisor: int,
) -> NoReturn:
    """A worker's whole life, in the forked child: it never returns into the supervisor's code."""
    status = 1
    try:
        _stop_when_orphaned(stop, supervisor)
        # Only the supervisor may talk to systemd (NotifyAccess=main refuses the others anyway).
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)

        def ready() -> None:
            log.info("worker %d serving (pid %d)", number, os.getpid())
            # A supervisor stopped while its workers start has stopped listening: no matter.
            with contextlib.suppress(BrokenPipeError):
                os.write(ready_write, b".")
            os.close(ready_write)

        serve_requests(settings, listener, Metrics(metrics_directory), stop, on_ready=ready)
        status = 0
    except MaxtwoError as ex:
        log.error("worker %d (pid %d): %s", number, os.getpid(), ex)
    except BaseException:  # noqa: BLE001 - whatever it is, the supervisor hears of it by the exit status
        log.exception("worker %d (pid %d) failed", number, os.getpid())
    finally:
        logging.shutdown()
        os._exit(status)


def _new_metrics_directory() -> tuple[str, int]:
    """A fresh directory for the workers' metrics, named after this supervisor, and a descriptor
    holding its lock, once the directories that killed supervisors left behind are gone.

    NOTE: a supervisor removes its directory when it stops; one that was killed (SIGKILL, the
    OOM killer) cannot. Under systemd PrivateTmp= goes with the service; elsewhere each such
    directory would stay in /tmp for good. The lock (flock(), inherited by the workers through
    fork()) is what tells a directory in use: held until the supervisor and every worker it
    forked have ended, whichever pid namespace they are in. Only this user's directories are
    looked at, and only those whose supervisor pid does not run here either, so a directory
    made a moment ago, not yet locked, is left alone.
    """
    parent = tempfile.gettempdir()
    entries: list[os.DirEntry[str]] = []
    with contextlib.suppress(OSError):
        entries = list(os.scandir(parent))
    for entry in entries:
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to look at
            if _left_by_a_killed_supervisor(entry):
                log.info("removing the metrics directory of a supervisor that was killed: %s", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)
    directory = tempfile.mkdtemp(prefix=f"{METRICS_DIRECTORY_PREFIX}{os.getpid()}-", dir=parent)
    lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    with contextlib.suppress(OSError):  # a file system without flock(): the pid check remains
        fcntl.flock(lock, fcntl.LOCK_EX)
    return directory, lock


def _left_by_a_killed_supervisor(entry: os.DirEntry[str]) -> bool:
    name = _METRICS_DIRECTORY_NAME.fullmatch(entry.name)
    if (
        name is None
        or not entry.is_dir(follow_symlinks=False)
        or entry.stat(follow_symlinks=False).st_uid != os.geteuid()
        or _running(int(name[1]))
    ):
        return False
    descriptor = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError (EWOULDBLOCK): in use
    finally:
        os.close(descriptor)  # releases the lock taken just now
    return True


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running all the same
        pass
    return True


def _stop_when_orphaned(stop: threading.Event, supervisor: int) -> None:
    """A worker whose supervisor is gone (killed: it had no chance to stop it) drains and ends,
    rather than serving on with nobody randomizing."""

    def watch() -> None:
        while not stop.wait(ORPHAN_CHECK_SECONDS):
            if os.getppid() != supervisor:
                log.error("the supervisor (pid %d) is gone: stopping worker pid %d", supervisor, os.getpid())
                stop.set()

    threading.Thread(target=watch, name="maxtwo-orphan-watch", daemon=True).start()


def _await_ready(ready_read: int, workers: dict[int, int], stop: threading.Event) -> str | None:
    """Wait until every worker serves; a message if one ended first or none came in time."""
    deadline = time.monotonic() + WORKER_START_SECONDS
    pending = len(workers)
    while pending and not stop.is_set():
        ended = _reap(workers)
        if ended:
            return ended
        if time.monotonic() > deadline:
            return f"{pending} of {len(workers)} workers not serving after {WORKER_START_SECONDS:.0f} s"
        readable, _, _ = select.select([ready_read], [], [], POLL_SECONDS)
        if readable:
            pending -= len(os.read(ready_read, pending))
    return None


def _watch(workers: dict[int, int], stop: threading.Event) -> str | None:
    """Until SIGTERM or SIGINT (None), or until a worker ends on its own (a message)."""
    # NOTE: sleep, not stop.wait(): the signal handler that sets `stop` runs in this thread,
    # and Event.set() in it would deadlock on the lock Event.wait() may be holding.
    while not stop.is_set():
        time.sleep(POLL_SECONDS)
        ended = _reap(workers)
        if ended and not stop.is_set():  # under systemd every process gets SIGTERM at once
            return ended
    return None


def _reap(workers: dict[int, int]) -> str | None:
    """Collect workers that have ended; describe the first, if any."""
    message = None
    while workers:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        number = workers.pop(pid, None)
        if number is not None and message is None:
            message = f"worker {number} (pid {pid}) ended: {_describe(status)}; stopping the daemon"
    return message


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _signal(workers: dict[int, int], signum: int) -> None:
    for pid in workers:
        with _gone_already():
            os.kill(pid, signum)


def _wait_for(workers: dict[int, int]) -> None:
    """Until every (signalled) worker has ended; SIGKILL for those that outstay their drain."""
    deadline = time.monotonic() + WORKER_STOP_SECONDS
    while workers and time.monotonic() < deadline:
        _reap_quietly(workers)
        time.sleep(0.05)
    for pid, number in list(workers.items()):
        log.warning("worker %d (pid %d) still running after %.0f s: killing it", number, pid, WORKER_STOP_SECONDS)
        with _gone_already():
            os.kill(pid, signal.SIGKILL)
        with _gone_already():
            os.waitpid(pid, 0)
        workers.pop(pid)


def _reap_quietly(workers: dict[int, int]) -> None:
    while workers:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            workers.clear()
            return
        if pid == 0:
            return
        workers.pop(pid, None)


class _gone_already:
    """Ignore a worker that has already ended (and been reaped)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, *rest: object) -> bool:
        return kind is not None and issubclass(kind, ProcessLookupError | ChildProcessError)
