"""200 concurrent clients for 60 s against the real daemon, across randomizations, on both
databases: no failed or non-2xx response, and the query chain intact."""

from __future__ import annotations

import http.client
import statistics
import threading
import time

import pytest

from tests.serve_process import ServeProcess

pytestmark = [pytest.mark.fault, pytest.mark.slow]  # 60 s of load on each database

CLIENTS = 200
SECONDS = 60


def _client(port: int, stop: threading.Event, out: list, lock: threading.Lock) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    mine = []
    while not stop.is_set():
        started = time.monotonic()
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
            mine.append((
                time.monotonic() - started,
                response.status,
                response.getheader("X-Maxtwo-Previous-At"),
                response.getheader("X-Maxtwo-Recorded-At"),
            ))
        except (OSError, http.client.HTTPException) as ex:
            mine.append((time.monotonic() - started, type(ex).__name__, None, None))
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.close()
    with lock:
        out.extend(mine)


def test_200_clients_for_60_seconds(database_url, tmp_path, reliability):
    samples: list = []
    lock, stop = threading.Lock(), threading.Event()
    with ServeProcess(database_url, interval=20, seed_count=100_000, extra_args=("--threads", "16")) as daemon:
        daemon.start(tmp_path / "serve.log")
        clients = [threading.Thread(target=_client, args=(daemon.port, stop, samples, lock)) for _ in range(CLIENTS)]
        for client in clients:
            client.start()
        time.sleep(SECONDS)
        stop.set()
        for client in clients:
            client.join(60)
        randomizations = daemon.metric("maxtwo_randomize_duration_seconds_count")
        assert daemon.terminate() == 0

    failed = [sample for sample in samples if sample[1] != 200]
    latencies = sorted(sample[0] for sample in samples)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    previous = [sample[2] for sample in samples if sample[2] is not None]
    recorded = {sample[3] for sample in samples}
    assert len(samples) > 1000
    assert failed == []
    assert randomizations >= 2  # the run spanned randomizations (every 20 s)
    # The chain: every previous time a client received is distinct and is the time some request
    # of this run recorded (apart from the one recorded before the run began).
    assert len(previous) == len(set(previous))
    assert len(set(previous) - recorded) <= 1
    kind = "PostgreSQL" if database_url.startswith("postgresql") else "SQLite"
    reliability.record(
        f"Load ({kind}): {CLIENTS} clients for {SECONDS} s, nothing fails, the chain holds",
        f"{CLIENTS} keep-alive clients (Python threads, on the same 2 cores as the server) request "
        f"`GET /` back to back for {SECONDS} s against `maxtwo serve --threads 16 --interval 20` "
        "with 100,000 users; the full-precision times in the X-Maxtwo-* headers are checked.",
        [
            (f"requests: {len(samples):,}; failed or non-2xx: {len(failed)}; randomizations during "
             f"the run: {randomizations:.0f}"),
            (f"latency p50 {statistics.median(latencies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
             f"max {latencies[-1] * 1000:.0f} ms"),
            (f"previous-query times received: {len(previous):,}, all distinct, all recorded by another "
             f"request of the run (but {len(set(previous) - recorded)} recorded just before it)"),
        ],
    )
