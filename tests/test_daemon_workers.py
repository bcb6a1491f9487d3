"""`maxtwo serve --workers N`: real processes sharing a real port, on SQLite and PostgreSQL."""

from __future__ import annotations

import http.client
import signal
import threading
import time

import psutil

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


def test_workers_stop_when_their_supervisor_is_killed(tmp_path):
    # NOTE: a killed supervisor cannot remove its metrics directory (under systemd, PrivateTmp=
    # goes with the service); TMPDIR keeps this one in the test's own directory.
    with ServeProcess(f"sqlite:///{tmp_path / 'maxtwo.db'}", interval=60, seed_count=10,
                      env={"TMPDIR": str(tmp_path)}, extra_args=("--workers", str(WORKERS))) as daemon:
        daemon.start(tmp_path / "serve.log")
        workers = _workers(daemon)
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(10)
        gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive
        assert "the supervisor" in daemon.log() and "is gone" in daemon.log()


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
