"""The serving loop (daemon/eventloop.py's ChangePoller where epoll exists) with a real waitress
server and real sockets: a change it missed would leave a client waiting for the next full
check (a second) or loop tick."""

from __future__ import annotations

import http.client
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from daemon import eventloop
from daemon.eventloop import FULL_CHECK_SECONDS
from daemon.server import _serve_until, bind
from maxtwo_cli.core.settings import Settings

# More than waitress's outbuf_high_watermark (16 MiB): the request thread must wait for the
# loop to drain it, which it asks for through the trigger.
HUGE = 20 * 1024 * 1024


def app(environ, start_response):
    if environ["PATH_INFO"] == "/huge":
        body = b"x" * HUGE
    elif environ["PATH_INFO"] == "/slow":
        time.sleep(0.3)  # the connection is busy for a while: only its thread can free it
        body = b"slow"
    else:
        body = b"hello"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture
def passes(monkeypatch) -> list[float]:
    """The times of the serving loop's passes."""
    times: list[float] = []
    original = eventloop.ChangePoller.poll

    def counted(self, timeout: float) -> None:
        times.append(time.monotonic())
        original(self, timeout)

    monkeypatch.setattr(eventloop.ChangePoller, "poll", counted)
    return times


@pytest.fixture
def port(passes) -> Iterator[int]:
    server = bind(app, Settings(database_url="sqlite:///unused.db", port=0, threads=4))
    stop = threading.Event()
    loop = threading.Thread(target=_serve_until, args=(server, stop), daemon=True)
    loop.start()
    try:
        yield server.socket.getsockname()[1]
    finally:
        stop.set()
        loop.join(5)
        server.close()


def timed_get(connection: http.client.HTTPConnection, path: str = "/") -> tuple[float, bytes]:
    started = time.monotonic()
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    assert response.status == 200
    return time.monotonic() - started, body


def test_requests_on_one_keep_alive_connection_never_wait_for_a_tick(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies = [timed_get(connection)[0] for _ in range(200)]
    # A missed re-registration costs at least a loop tick (0.2 s) per request.
    assert statistics.median(latencies) < 0.05
    assert sum(latencies) < 10


def test_many_connections_taking_turns(port):
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(20)]
    started = time.monotonic()
    for _ in range(10):
        for connection in connections:
            assert timed_get(connection)[1] == b"hello"
    assert time.monotonic() - started < 20


def test_a_connection_idle_past_a_full_check_is_still_heard(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    timed_get(connection)
    time.sleep(FULL_CHECK_SECONDS * 1.5)
    assert timed_get(connection)[0] < 0.5


def test_a_connection_freed_by_its_request_thread_is_heard_again(port):
    slow = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    other = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(5):
        waiting = threading.Thread(target=timed_get, args=(slow, "/slow"))
        waiting.start()
        timed_get(other)  # the loop makes passes while the slow one is answered
        waiting.join()
        assert timed_get(slow)[0] < 0.5


def test_a_huge_response_is_drained_by_the_loop(port, passes):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    seconds, body = timed_get(connection, "/huge")
    assert len(body) == HUGE
    assert timed_get(connection)[1] == b"hello"  # and the connection goes on
    # Once drained, the connection no longer waits to write: the idle loop only ticks (every
    # 0.2 s) instead of spinning on a socket that is always writable.
    quiet_from = time.monotonic()
    time.sleep(1.0)
    assert passes  # the loop under test is the one that records them
    assert len([moment for moment in passes if moment > quiet_from]) <= 10
