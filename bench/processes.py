"""HTTP servers under test as subprocesses: `maxtwo serve`, the hello-world app and the daemon
with a synchronous POST /increment (bench/sync_increment.py).

Each one gets a free port and a log file, is ready once it answers, and is always stopped:
SIGTERM first (maxtwo drains and exits 0), SIGKILL if it does not go in time.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from bench.targets import process_environment
from maxtwo_cli.core.settings import DEFAULT_THREADS

MAXTWO = Path(sys.executable).with_name("maxtwo")
HOST = "127.0.0.1"
SERVE_THREADS = DEFAULT_THREADS
STOP_SECONDS = 20.0  # maxtwo promises 10 s (drain, then a running randomization)
REPO_ROOT = Path(__file__).resolve().parent.parent


def read_process(pid: int, read: Callable[[psutil.Process], float]) -> float | None:
    """read(process) for `pid`; None once it is gone."""
    try:
        return read(psutil.Process(pid))
    except psutil.Error:
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, name: str, args: list[str], env: dict[str, str], port: int,
                 ready_path: str, log_path: Path) -> None:
        self.name = name
        self.url = f"http://{HOST}:{port}/"
        self.log_path = log_path
        self._args = args
        self._env = env
        self._ready_url = f"http://{HOST}:{port}{ready_path}"
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, ready_timeout: float) -> None:
        with open(self.log_path, "w", encoding="utf-8") as log:
            # The child keeps its own copy of the descriptor; ours can close at once.
            # A session of its own: a Ctrl-C in the harness's terminal does not reach the server,
            # which the harness then stops itself (running() below), politely.
            self.process = subprocess.Popen(self._args, env=self._env, cwd=REPO_ROOT,
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if _answers(self._ready_url):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer within {ready_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """Stop it, politely first; its exit status (None if it never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def running(server: ServerProcess, ready_timeout: float = 120.0) -> Iterator[ServerProcess]:
    try:
        server.start(ready_timeout)
        yield server
    finally:
        server.stop()


def maxtwo_serve(url: str, *, seed_count: int, interval: float, log_path: Path) -> ServerProcess:
    """The installed `maxtwo serve`, exactly as deployed but on a free local port."""
    if not MAXTWO.exists():
        raise RuntimeError(f"{MAXTWO} not found: install maxtwo into this Python (pip install -e .)")
    port = free_port()
    args = [str(MAXTWO), "serve", "--host", HOST, "--port", str(port), "--threads", str(SERVE_THREADS),
            "--interval", f"{interval:g}", "--seed-count", str(seed_count)]
    return ServerProcess("maxtwo serve", args, process_environment(url), port, "/healthz", log_path)


def synchronous_increment_serve(url: str, *, seed_count: int, interval: float, log_path: Path) -> ServerProcess:
    """bench/sync_increment.py: `maxtwo serve` with one transaction per POST /increment."""
    port = free_port()
    args = [sys.executable, "-m", "bench.sync_increment", "--host", HOST, "--port", str(port),
            "--threads", str(SERVE_THREADS), "--interval", f"{interval:g}", "--seed-count", str(seed_count)]
    return ServerProcess("synchronous increments", args, process_environment(url), port, "/healthz", log_path)


def hello_world(log_path: Path, *, stock: bool = False) -> ServerProcess:
    """bench/hello.py: a constant answer on maxtwo's own transport (or, `stock`, on waitress as
    shipped with the same settings)."""
    port = free_port()
    args = [sys.executable, "-m", "bench.hello", "--host", HOST, "--port", str(port),
            "--threads", str(SERVE_THREADS), "--transport", "stock" if stock else "maxtwo"]
    name = "hello-world app on stock waitress" if stock else "hello-world app on maxtwo's transport"
    return ServerProcess(name, args, process_environment(None), port, "/", log_path)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False
