"""`maxtwo serve --workers N`: real processes sharing a real port, on SQLite and PostgreSQL."""

from __future__ import annotations

import fcntl
import http.client
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from daemon import workers as workers_module
from daemon.workers import METRICS_DIRECTORY_PREFIX
from tests.helpers import notifications, notify_socket
from tests.serve_process import ServeProcess

WORKERS = 2


def _workers(daemon: ServeProcess) -> list[psutil.Process]:
    return psutil.Process(daemon.process.pid).children()


def _query(port: int, connection: http.client.HTTPConnection | None = None) -> tuple[str | None, str]:
    """One GET / (on `connection`, or a new one): (previous, recorded) from the chain headers."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        return response.getheader("X-Maxtwo-Previous-At"), response.getheader("X-Maxtwo-Recorded-At")
    finally:
        if own:
            connection.close()


def _holding_connections(workers: list[psutil.Process], port: int) -> list[psutil.Process]:
    return [
        worker for worker in workers
        if any(conn.laddr.port == port and conn.status == psutil.CONN_ESTABLISHED
               for conn in worker.net_connections(kind="tcp"))
    ]


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_workers_share_the_port_the_chain_the_metrics_and_one_randomizer(database_url, tmp_path):
    with ServeProcess(database_url, interval=1, seed_count=2000, extra_args=("--workers", str(WORKERS))) as daemon:
        daemon.start(tmp_path / "serve.log")
        workers = _workers(daemon)
        assert len(workers) == WORKERS

        # Keep-alive connections, opened together: the kernel hands them to both workers.
        connections = [http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=20) for _ in range(32)]
        results: list[tuple[str | None, str]] = []
        lock = threading.Lock()

        def client(connection: http.client.HTTPConnection) -> None:
            mine = [_query(daemon.port, connection) for _ in range(10)]
            with lock:
                results.extend(mine)

        threads = [threading.Thread(target=client, args=(connection,)) for connection in connections]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        # Every worker answers some connections. Whichever worker wakes first takes the next
        # connection, so on a busy machine one may take the whole burst: more connections
        # until both hold one (a worker that never accepts fails this).
        deadline = time.monotonic() + 20
        while len(_holding_connections(workers, daemon.port)) < WORKERS and time.monotonic() < deadline:
            extra = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=20)
            results.append(_query(daemon.port, extra))
            connections.append(extra)
        assert len(_holding_connections(workers, daemon.port)) == WORKERS
        for connection in connections:
            connection.close()
        total = len(results)
        assert total >= 320

        # One chain across the processes: every previous time was recorded by another query
        # and handed to exactly one.
        recorded = {recorded_at for _, recorded_at in results}
        previous = [previous_at for previous_at, _ in results]
        assert len(recorded) == total and len(set(previous)) == total
        assert len(set(previous) - recorded) == 1  # the one recorded before the burst

        # /metrics, from whichever worker answers, adds up every worker's requests.
        assert daemon.metric('maxtwo_http_requests_total{method="GET",route="/",status="200"}') == total

        # One randomizer (the supervisor's): it runs every interval and never finds that
        # someone else already did.
        _wait_for(lambda: daemon.metric("maxtwo_randomize_duration_seconds_count") >= 3)
        assert daemon.metric('maxtwo_randomize_skipped_total{reason="elsewhere"}') == 0
        assert daemon.metric("maxtwo_epoch") >= 4  # the seed's epoch 1, then 3 runs or more

        assert daemon.terminate() == 0
        assert not any(worker.is_running() for worker in workers)
        log = daemon.log()
    assert log.count("received SIGTERM") >= 1 and log.rstrip().endswith("stopped")
    assert f"with {WORKERS} worker processes" in log


def test_a_worker_that_dies_takes_the_daemon_down_with_exit_status_1(tmp_path):
    with ServeProcess(f"sqlite:///{tmp_path / 'maxtwo.db'}", interval=60, seed_count=10,
                      extra_args=("--workers", str(WORKERS))) as daemon:
        daemon.start(tmp_path / "serve.log")
        victim, survivor = _workers(daemon)
        victim.kill()
        assert daemon.process.wait(20) == 1
        assert not survivor.is_running()
        log = daemon.log()
    assert "ended: killed by SIGKILL; stopping the daemon" in log
    errors = [line for line in log.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in log


def _metrics_directories(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.glob(f"{METRICS_DIRECTORY_PREFIX}*"))


def test_workers_stop_when_their_supervisor_is_killed_and_the_next_daemon_cleans_up(tmp_path):
    # TMPDIR: the metrics directories in the test's own directory, where nothing else runs.
    tmp = tmp_path / "tmp"
    tmp.mkdir()

    def daemon() -> ServeProcess:
        return ServeProcess(f"sqlite:///{tmp_path / 'maxtwo.db'}", interval=60, seed_count=10,
                            env={"TMPDIR": str(tmp)}, extra_args=("--workers", str(WORKERS)))

    with daemon() as first:
        first.start(tmp_path / "serve.log")
        workers = _workers(first)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive
        assert "the supervisor" in first.log() and "is gone" in first.log()
    # A killed supervisor cannot remove its directory...
    [left_behind] = _metrics_directories(tmp)
    assert left_behind.startswith(f"{METRICS_DIRECTORY_PREFIX}{first.process.pid}-")

    with daemon() as second:
        second.start(tmp_path / "serve-2.log")
        # ... the next daemon does, and makes its own.
        [own] = _metrics_directories(tmp)
        assert own.startswith(f"{METRICS_DIRECTORY_PREFIX}{second.process.pid}-")
        # Locked while the daemon runs, whatever the pid in its name says to another namespace.
        probe = os.open(tmp / own, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
        assert second.terminate() == 0
    assert _metrics_directories(tmp) == []


def test_only_unlocked_directories_of_this_users_supervisors_that_are_gone_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = tmp_path / f"{METRICS_DIRECTORY_PREFIX}4194305-a"  # above the largest pid_max: not running
    running = tmp_path / f"{METRICS_DIRECTORY_PREFIX}{os.getpid()}-b"
    in_use = tmp_path / f"{METRICS_DIRECTORY_PREFIX}4194306-c"  # e.g. a supervisor in another pid namespace
    not_ours = [
        tmp_path / f"{METRICS_DIRECTORY_PREFIX}x-d",
        tmp_path / f"{METRICS_DIRECTORY_PREFIX}\u00b2-e",  # a digit to str.isdigit(), not to int()
        tmp_path / f"{METRICS_DIRECTORY_PREFIX}99999999999-f",  # beyond os.kill()'s range
        tmp_path / "maxtwo-metricsg",
    ]
    for directory in (gone, running, in_use, *not_ours):
        directory.mkdir()
    a_file = tmp_path / f"{METRICS_DIRECTORY_PREFIX}4194307-h"
    a_file.write_text("not a directory")
    a_link = tmp_path / f"{METRICS_DIRECTORY_PREFIX}4194308-i"
    a_link.symlink_to(running)
    holder = os.open(in_use, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        new, lock = workers_module._new_metrics_directory()
        os.close(lock)
        assert in_use.is_dir()
    finally:
        os.close(holder)

    assert not gone.exists()
    assert running.is_dir() and all(directory.is_dir() for directory in not_ours)
    assert a_file.is_file() and a_link.is_symlink()
    assert Path(new).parent == tmp_path and Path(new).name.startswith(f"{METRICS_DIRECTORY_PREFIX}{os.getpid()}-")

    # Unlocked now, and another user's: left alone all the same.
    euid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: euid + 1)
    os.close(workers_module._new_metrics_directory()[1])
    assert in_use.is_dir()
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    os.close(workers_module._new_metrics_directory()[1])
    assert not in_use.exists()


def test_only_the_supervisor_notifies_systemd(tmp_path):
    listener = notify_socket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    with ServeProcess(f"sqlite:///{tmp_path / 'maxtwo.db'}", interval=60, seed_count=10, env=env,
                      extra_args=("--workers", str(WORKERS))) as daemon:
        daemon.start(tmp_path / "serve.log")
        messages = notifications(listener, seconds=1.5)
        assert daemon.terminate() == 0
        messages += notifications(listener)
        log = daemon.log()
    listener.close()
    assert messages[0] == "READY=1" and messages.count("READY=1") == 1
    assert messages.count("STOPPING=1") == 1  # not one per worker
    assert messages.count("WATCHDOG=1") >= 2
    # READY=1 only once both workers serve.
    assert log.index("worker 1 serving") < log.index("worker processes")
    assert log.index("worker 2 serving") < log.index("worker processes")
