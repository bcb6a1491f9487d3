"""Hostile HTTP against the real daemon: the service keeps serving others, memory stays bounded."""

from __future__ import annotations

import socket
import time

import psutil
import pytest

from tests.serve_process import ServeProcess

pytestmark = pytest.mark.fault


@pytest.fixture
def daemon(tmp_path):
    with ServeProcess(f"sqlite:///{tmp_path / 'maxtwo.db'}", interval=60, seed_count=1000) as serving:
        serving.start(tmp_path / "serve.log")
        yield serving
        assert serving.terminate() == 0


def raw_request(port: int, payload: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0


def test_oversized_urls_and_headers_get_4xx_and_the_service_goes_on(daemon):
    long_url = b"GET /" + b"a" * 300_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert 400 <= status_of(raw_request(daemon.port, long_url)) < 500
    many_headers = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-Header-%d: %s\r\n" % (number, b"v" * 100) for number in range(5000)
    ) + b"Connection: close\r\n\r\n"
    assert 400 <= status_of(raw_request(daemon.port, many_headers)) < 500
    assert daemon.get("/")[0] == 200


def test_a_body_on_get_is_ignored(daemon):
    body = b"x" * 10_000
    request = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    assert status_of(raw_request(daemon.port, request)) == 200


def test_garbage_gets_400(daemon):
    assert status_of(raw_request(daemon.port, b"\x00\x01\x02 nonsense\r\n\r\n")) == 400
    assert daemon.get("/")[0] == 200


@pytest.mark.slow  # 3 s of trickling clients
def test_slow_clients_do_not_block_the_others(daemon):
    """Slowloris: 100 connections that trickle a header byte now and then."""
    slow = []
    for _ in range(100):
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    try:
        answered = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for sock in slow[:10]:
                sock.sendall(b"X: y\r\n")
            status, _ = daemon.get("/", timeout=5)
            answered += status == 200
        assert answered >= 10
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.slow  # 700 connections held open
def test_a_burst_above_the_connection_limit(daemon):
    """More connections than waitress's limit (512): the excess waits in the backlog, memory and
    threads stay bounded, and the service answers as soon as the burst goes away."""
    process = psutil.Process(daemon.process.pid)
    rss_before, threads_before = process.memory_info().rss, process.num_threads()
    burst = []
    try:
        for _ in range(700):
            burst.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=5))
        time.sleep(1)
        rss_during, threads_during = process.memory_info().rss, process.num_threads()
    finally:
        for sock in burst:
            sock.close()
    time.sleep(0.5)
    assert daemon.get("/", timeout=10)[0] == 200
    # A fixed pool, no thread per connection (that would be hundreds more). The randomizer's run
    # and write-behind threads come and go meanwhile (the start's run ending: 13 before, 11
    # during, in a CI run), hence the slack rather than equality.
    assert threads_during <= threads_before + 4, (threads_before, threads_during)
    assert rss_during - rss_before < 50 * 2**20


@pytest.mark.slow  # 200 connections, 5 s
def test_clients_that_pipeline_and_never_read_keep_memory_bounded_and_others_served(daemon):
    """Each holds one read's requests parsed (2 KiB: about 40 KB) and 32 KiB of answers at most
    (and as much in the kernel), not the answers to every request of its reads (waitress's own
    reads of 8 KiB, answered up to 16 MiB a connection, to temporary files past 1 MiB).
    Measured: 12 MB with the bound, 37 MB without."""
    process = psutil.Process(daemon.process.pid)
    rss_before = process.memory_info().rss
    pipelined = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 1200  # 48 KB; 12 MB of answers
    readers_of_nothing = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernels take in little
            sock.sendall(pipelined)
            readers_of_nothing.append(sock)
        time.sleep(4)
        rss_during = process.memory_info().rss
        started = time.monotonic()
        assert daemon.get("/", timeout=10)[0] == 200
        assert time.monotonic() - started < 2
    finally:
        for sock in readers_of_nothing:
            sock.close()
    assert rss_during - rss_before < 24 * 2**20
