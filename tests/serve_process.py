"""The installed `maxtwo` as a process: `maxtwo serve` on a free port for end-to-end tests,
and any other command run to its end (maxtwo_command)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Self

MAXTWO = Path(sys.executable).with_name("maxtwo")


# rich takes stderr or stdout for a terminal when these say so, whatever they are (many CI
# services set FORCE_COLOR), and lays its output out for their width, or for a terminal that
# moves no cursor (TERM=dumb). The tests expect its defaults: tests/conftest.py drops them too.
RICH_TERMINAL_OVERRIDES = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES", "TERM")


def maxtwo_command(*args: str | bytes, stdout: int = subprocess.PIPE, **extra: str) -> subprocess.CompletedProcess:
    """`maxtwo ARGS...` run to its end: stderr as text, stdout captured or sent to `stdout`. Its
    environment: this one without maxtwo's settings and without PYTHONUNBUFFERED (set on some
    machines: every print would write through at once, and the CLI's own flush of its output, and
    what it does when that fails, would go untested) and rich's terminal overrides, plus `extra`."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("MAXTWO_") and key not in ("PYTHONUNBUFFERED", *RICH_TERMINAL_OVERRIDES)}
    return subprocess.run([str(MAXTWO), *args], check=False, stdout=stdout, stderr=subprocess.PIPE,
                          encoding="utf-8", timeout=60, env={**env, **extra})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 10.0) -> tuple[int, dict | str]:
    """GET url; (status, parsed JSON body or text). Never raises for HTTP error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, raw, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as ex:
        status, raw, kind = ex.code, ex.read(), ex.headers.get_content_type()
    text = raw.decode()
    return status, json.loads(text) if kind == "application/json" else text


def post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None,
         timeout: float = 10.0) -> tuple[int, dict[str, str], dict | str]:
    """POST body to 127.0.0.1:port on a fresh connection, with exactly these headers (none
    added but Host and Content-Length); (status, headers lower-cased, parsed JSON body or text)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body, headers or {})
        response = connection.getresponse()
        raw = response.read()
        kind = response.headers.get_content_type()
        found = {name.lower(): value for name, value in response.getheaders()}
    finally:
        connection.close()
    text = raw.decode()
    return response.status, found, json.loads(text) if kind == "application/json" and text else text


@contextlib.contextmanager
def _sigint_for_the_child(ignored: bool) -> Iterator[None]:
    """A process started inside has SIGINT at its default action, as from a terminal, or
    ignored, as a job a script starts in the background does. exec keeps an ignored signal
    ignored and resets one with a handler to its default, hence the handler here for the moment
    of the Popen, whatever the tests' own (a suite run in the background ignores SIGINT: its
    daemons went on ignoring a Ctrl-C during the start's seed)."""
    before = signal.getsignal(signal.SIGINT)
    if (before is signal.SIG_IGN) == ignored:  # as wanted already (a handler: exec resets it)
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


class ServeProcess:
    def __init__(self, database_url: str, *, interval: float = 1.0, seed_count: int = 2000,
                 env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path: Path | None = None
        self._args = [
            str(MAXTWO), "serve", "--port", str(self.port), "--interval", str(interval),
            "--seed-count", str(seed_count), "--threads", "8", *extra_args,
        ]
        self._env = {**os.environ, "MAXTWO_DATABASE_URL": database_url, **(env or {})}
        self._env.pop("MAXTWO_DEBUG", None)
        self.process: subprocess.Popen | None = None

    def start(self, log_path: Path, wait: bool = True, sigint_ignored: bool = False) -> ServeProcess:
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        # A session of its own: stop() can kill whatever it started.
        with _sigint_for_the_child(sigint_ignored):
            self.process = subprocess.Popen(
                self._args, env=self._env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"maxtwo serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if get(self.base + "/healthz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"maxtwo serve did not become ready:\n{self.log()}")

    def get(self, path: str = "/", timeout: float = 10.0) -> tuple[int, dict | str]:
        return get(self.base + path, timeout=timeout)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None,
             timeout: float = 10.0) -> tuple[int, dict[str, str], dict | str]:
        return post(self.port, path, body, headers, timeout=timeout)

    def metric(self, name: str) -> float:
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def terminate(self, timeout: float = 15.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8") if self.log_path and self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
