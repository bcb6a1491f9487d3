"""End to end: the documented deployment. A real nginx (the Debian package) runs the shipped
deploy/nginx/maxtwo.conf, only its ports changed, in front of two `maxtwo serve` instances on
one PostgreSQL database (docs/deployment.md, "Several instances behind nginx")."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from maxtwo_cli.core import db
from maxtwo_cli.core.settings import Settings
from tests.helpers import ClientThreads, assert_chain, state
from tests.serve_process import ServeProcess, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = ROOT / "deploy" / "nginx" / "maxtwo.conf"
# The ports the shipped file (and docs/deployment.md) uses; the test swaps them for free ones.
DOCUMENTED_LISTEN = "listen 80;"
DOCUMENTED_UPSTREAMS = ("server 127.0.0.1:4001;", "server 127.0.0.1:4002;")

INTERVAL = 1.0
CLIENTS = 4
# Bounds for every client loop: requests per client per phase, and seconds per phase.
MAX_REQUESTS_PER_CLIENT = 50_000
PHASE_SECONDS_LIMIT = 30.0
ANSWERED_GET = 'maxtwo_http_requests_total{method="GET",route="/",status="200"}'
STOOD_BACK = 'maxtwo_randomize_skipped_total{reason="elsewhere"}'


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail("nginx is not installed: `apt-get install nginx` (.ci/run installs it)")
    return found


def shipped_config_with_ports(listen_port: int, upstream_ports: tuple[int, int]) -> str:
    """deploy/nginx/maxtwo.conf with its documented ports replaced, and nothing else.

    The file must still have the shape the doc describes (one listen, two upstream servers), or
    the test fails here rather than testing something else than what is shipped."""
    text = SHIPPED_CONFIG.read_text(encoding="utf-8")
    directives = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    assert [line for line in directives if re.match(r"listen\b", line)] == [DOCUMENTED_LISTEN]
    assert [line for line in directives if re.match(r"server\s+\S+;$", line)] == list(DOCUMENTED_UPSTREAMS)
    replacements = {
        # The one change besides the port: the test listens on loopback only.
        DOCUMENTED_LISTEN: f"listen 127.0.0.1:{listen_port};",
        DOCUMENTED_UPSTREAMS[0]: f"server 127.0.0.1:{upstream_ports[0]};",
        DOCUMENTED_UPSTREAMS[1]: f"server 127.0.0.1:{upstream_ports[1]};",
    }
    for documented, ours in replacements.items():
        assert text.count(documented) == 1, documented
        text = text.replace(documented, ours)
    return text


class Nginx:
    """A non-daemon nginx master in a directory of its own: its config, pid file, logs and
    temporary files all live there (nothing under /etc/nginx or /var/log/nginx)."""

    def __init__(self, prefix: Path, site_config: str, port: int) -> None:
        self.prefix = prefix
        self.port = port
        self.access_log = prefix / "access.log"
        self.error_log = prefix / "error.log"
        (prefix / "maxtwo.conf").write_text(site_config)
        temp_paths = "\n".join(
            f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        # NOTE: what Debian's /etc/nginx/nginx.conf does around conf.d/*.conf, minus its paths;
        # the access log comes after the include, which defines its format.
        (prefix / "nginx.conf").write_text(
            f"worker_processes 2;\n"
            f"error_log {self.error_log} notice;\n"
            f"events {{ worker_connections 512; }}\n"
            f"http {{\n{temp_paths}\n"
            f"    include {prefix / 'maxtwo.conf'};\n"
            f"    access_log {self.access_log} maxtwo_upstream;\n"
            f"}}\n"
        )
        self._command = [
            nginx_binary(), "-p", f"{prefix}/", "-e", str(self.error_log), "-c", str(prefix / "nginx.conf"),
            "-g", f"daemon off; pid {prefix / 'nginx.pid'};",
        ]
        self.process: subprocess.Popen | None = None

    def check(self) -> None:
        """`nginx -t`, as the doc has the administrator run it."""
        result = subprocess.run([*self._command, "-t"], check=False, capture_output=True, encoding="utf-8", timeout=30)
        assert result.returncode == 0, result.stderr

    def start(self) -> None:
        self._output = open(self.prefix / "nginx.out", "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self._command, stdout=self._output, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        raise AssertionError(f"nginx did not listen on {self.port}:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # nginx's fast shutdown; its workers go with it
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if getattr(self, "_output", None):
            self._output.close()

    def log(self) -> str:
        return "\n".join(
            path.read_text(encoding="utf-8") for path in (self.prefix / "nginx.out", self.error_log) if path.exists()
        )


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int | str  # the HTTP status, or what went wrong
    recorded_at: dt.datetime | None = None
    previous: dt.datetime | None = None


def _timestamp(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value is not None else None


class Clients(ClientThreads):
    """A few threads sending GET / through nginx on keep-alive connections until stopped (or
    MAX_REQUESTS_PER_CLIENT each, or PHASE_SECONDS_LIMIT), keeping every answer."""

    def __init__(self, port: int) -> None:
        super().__init__(CLIENTS, join_seconds=PHASE_SECONDS_LIMIT)
        self.port = port
        self.answers: list[Answer] = []

    def _run(self) -> None:
        deadline = time.monotonic() + PHASE_SECONDS_LIMIT
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    connection.request("GET", "/")
                    response = connection.getresponse()
                    response.read()
                    answer = Answer(
                        response.status,
                        _timestamp(response.getheader("X-Maxtwo-Recorded-At")),
                        _timestamp(response.getheader("X-Maxtwo-Previous-At")),
                    )
                except (OSError, http.client.HTTPException) as ex:
                    answer = Answer(f"failed: {type(ex).__name__}: {ex}")
                    connection.close()  # the next request opens a new connection
                with self._lock:
                    self.answers.append(answer)
        finally:
            connection.close()


def sleep_to_mid_interval() -> None:
    """Sleep until the middle of an interval, away from the boundaries where runs happen."""
    now = time.time()
    time.sleep((math.floor(now / INTERVAL) + 1.5) * INTERVAL - now)


@pytest.fixture
def deployment(postgres_url, tmp_path):
    """Two instances on one PostgreSQL, and nginx in front of them with the shipped config."""
    instances = [ServeProcess(postgres_url, interval=INTERVAL, seed_count=2000) for _ in range(2)]
    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    port = free_port()
    nginx = Nginx(nginx_dir, shipped_config_with_ports(port, (instances[0].port, instances[1].port)), port)
    try:
        for number, instance in enumerate(instances):
            instance.start(tmp_path / f"instance-{number}.log")
        nginx.check()
        nginx.start()
        yield nginx, instances
    finally:
        nginx.stop()
        for instance in instances:
            instance.stop()


def test_two_instances_behind_nginx(deployment, postgres_url):
    nginx, (first, second) = deployment
    engine = db.create_engine(Settings(database_url=postgres_url))
    try:
        _check(nginx, first, second, engine)
    except AssertionError:
        print("nginx:", nginx.log(), sep="\n")
        print("access log (tail):", *nginx.access_log.read_text(encoding="utf-8").splitlines()[-40:], sep="\n")
        raise
    finally:
        engine.dispose()


def _check(nginx: Nginx, first: ServeProcess, second: ServeProcess, engine) -> None:
    # 1. Traffic through nginx over N whole intervals: every answer 200, one unbroken chain,
    # both instances serving, and one randomization per interval between them.
    windows = 6
    sleep_to_mid_interval()
    epoch_before = state(engine).epoch
    stood_back_before = first.metric(STOOD_BACK) + second.metric(STOOD_BACK)
    started = time.monotonic()
    with Clients(nginx.port) as clients:
        time.sleep(max(0.0, windows * INTERVAL - (time.monotonic() - started)))
    epoch_after = state(engine).epoch
    stood_back_after = first.metric(STOOD_BACK) + second.metric(STOOD_BACK)

    answers = clients.answers
    assert len(answers) > 100
    assert [answer for answer in answers if answer.status != 200] == []
    assert_chain(answers)  # the first query ever (and only it) has no previous time
    served = (first.metric(ANSWERED_GET), second.metric(ANSWERED_GET))
    assert sum(served) == len(answers)  # nothing answered twice, nothing lost
    assert min(served) >= len(answers) / 4  # round robin: both instances served their share
    # About one randomization per interval: a window of N intervals holds N boundaries, and the
    # window edges are taken loosely (a loaded machine), so allow one either way; two instances
    # each randomizing would advance the epoch by about 2N.
    assert windows - 1 <= epoch_after - epoch_before <= windows + 1
    assert stood_back_after - stood_back_before >= windows - 2  # the other instance stood back

    # 2. One instance stopped (SIGTERM) under traffic: it refuses new connections and closes
    # its kept ones, nginx sends those requests to the other instance (proxy_next_upstream), no
    # request fails, and the instance exits 0 within its promised 10 s. The chain stays whole: a
    # stopping instance closes each kept connection once it has answered what it received
    # (daemon/transport.py), so no query is recorded whose answer is never sent.
    with Clients(nginx.port) as clients:
        time.sleep(1.0)
        before_stop = len(clients.answers)
        sigterm_at = time.monotonic()
        code = first.terminate(timeout=15)
        stopped_in = time.monotonic() - sigterm_at
        during_stop = len(clients.answers) - before_stop
        time.sleep(2.0)  # and on after it, with one instance left
    stop_answers = clients.answers
    assert code == 0
    assert stopped_in < 10
    assert during_stop > 0 and len(stop_answers) > before_stop + during_stop
    assert [answer for answer in stop_answers if answer.status != 200] == []
    assert_chain([*answers, *stop_answers])

    # 3. No instance left: nginx answers as the daemon would, a JSON 503 asking to retry.
    assert second.terminate(timeout=15) == 0
    connection = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=30)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 503
    assert response.getheader("Retry-After") == "5"
    assert response.getheader("Content-Type") == "application/json"
    assert body["status"] == 503
    assert "Traceback" not in first.log() + second.log()
    print(
        f"\n{len(answers)} answers over {windows} intervals (per instance: {served}); "
        f"epoch +{epoch_after - epoch_before}; {len(stop_answers)} answers across the stop, "
        f"which took {stopped_in:.2f} s"
    )


class AnswersNothing:
    """An upstream that reads a request and closes the connection without an answer: an
    instance that died (SIGKILL, the watchdog, a crash) after it got a request."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.listener.accept()
                with connection:
                    if connection.recv(65536):
                        self.requests += 1

    def close(self) -> None:
        self.listener.close()


def _ask(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def test_a_post_that_reached_an_instance_but_got_no_answer_is_not_told_to_retry(tmp_path):
    """Its outcome is unknown: a 502 that says so, without Retry-After (a review: nginx's 503
    "try again" made a client apply it twice). A GET, and a POST no instance took, get the 503.

    NOTE: a fresh nginx for each first request: one failed request takes both instances out of
    rotation for fail_timeout (10 s), and later requests reach none."""
    silent = AnswersNothing()
    refusing = free_port()  # nothing listens there
    increment = json.dumps({"key": "k", "value": 1}).encode()
    try:
        for method in ("GET", "POST"):
            port = free_port()
            (tmp_path / method).mkdir()
            nginx = Nginx(tmp_path / method, shipped_config_with_ports(port, (silent.port, refusing)), port)
            taken = silent.requests
            try:
                nginx.check()
                nginx.start()
                status, headers, body = _ask(port, method, "/increment" if method == "POST" else "/",
                                             increment if method == "POST" else None)
                assert silent.requests == taken + 1, nginx.log()
                if method == "GET":  # tried on the other instance too, then given up
                    assert (status, body["status"], headers.get("Retry-After")) == (503, 503, "5")
                    continue
                assert (status, body["status"]) == (502, 502), nginx.log()
                assert "Idempotency-Key" in body["description"] and "Retry-After" not in headers
                assert headers["Content-Type"] == "application/json"
                # Both instances out of rotation now: nothing of this POST is sent anywhere.
                status, headers, body = _ask(port, "POST", "/increment", increment)
                assert (status, body["status"], headers.get("Retry-After")) == (503, 503, "5")
                assert silent.requests == taken + 1
            finally:
                nginx.stop()
    finally:
        silent.close()
