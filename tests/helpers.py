"""Small helpers shared by tests: direct SQL for checking what the core did."""

from __future__ import annotations

import contextlib
import itertools
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Self

import sqlalchemy as sa

from daemon.batcher import Batcher, Batchers
from maxtwo_cli.core import db, schema
from maxtwo_cli.core.schema import query_state, randomizer_state, users
from maxtwo_cli.core.settings import Settings


def points_histogram(engine: sa.Engine) -> dict[int, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(users.c.points, sa.func.count()).group_by(users.c.points)
        ).all()
    return dict(rows)


def state(engine: sa.Engine) -> sa.Row:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(
                randomizer_state.c.epoch,
                randomizer_state.c.max_number,
                randomizer_state.c.randomized_at,
                query_state.c.last_query_at,
                query_state.c.previous_query_at,
            ).join_from(randomizer_state, query_state, randomizer_state.c.id == query_state.c.id)
        ).one()


def user_rows(engine: sa.Engine) -> list[sa.Row]:
    with engine.connect() as conn:
        return conn.execute(sa.select(users).order_by(users.c.id)).all()


def distinct_updated_at(engine: sa.Engine) -> list:
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(users.c.updated_at).distinct()))


def set_max_number(engine: sa.Engine, value: int) -> None:
    with engine.begin() as conn:
        conn.execute(randomizer_state.update().values(max_number=value))


def assert_chain(results) -> None:
    """In the order of their recorded times, each query got the time recorded by the one just
    before it, and the first (the first query ever, and only it) got None."""
    ordered = sorted(results, key=lambda result: result.recorded_at)
    assert ordered[0].previous is None
    for earlier, later in itertools.pairwise(ordered):
        assert later.previous == earlier.recorded_at
        assert later.recorded_at > earlier.recorded_at


def run_in_threads(work, threads: int, per_thread: int) -> list:
    """Call work() per_thread times in each of `threads` threads started together; all results."""
    results, lock = [], threading.Lock()
    barrier = threading.Barrier(threads)

    def worker() -> None:
        barrier.wait()
        for _ in range(per_thread):
            result = work()
            with lock:
                results.append(result)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return results


class ClientThreads:
    """`count` threads running self._run() from `with` until the block ends (self._stop set),
    each joined for at most `join_seconds` then. Subclasses record what they see under
    self._lock."""

    def __init__(self, count: int, join_seconds: float) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._join_seconds = join_seconds
        self._threads = [threading.Thread(target=self._run) for _ in range(count)]

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self._join_seconds)


def notify_socket(path) -> socket.socket:
    """A stand-in for systemd's notification socket (NOTIFY_SOCKET=path)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(0.2)
    return listener


def notifications(listener: socket.socket, seconds: float = 0.0) -> list[str]:
    """The messages it receives for `seconds`, then until 0.2 s pass without one.

    NOTE: read as they come: the kernel queues only a few datagrams (net.unix.max_dgram_qlen,
    10 here), and then the sender blocks."""
    messages = []
    deadline = time.monotonic() + seconds
    while True:
        try:
            messages.append(listener.recv(4096).decode())
        except TimeoutError:
            if time.monotonic() >= deadline:
                return messages


def unreachable_settings(database_url: str, tmp_path) -> Settings:
    """Settings for a database of the same kind that cannot be reached."""
    if database_url.startswith("sqlite"):
        blocker = tmp_path / "file"
        blocker.write_text("a file where a directory should be")
        return Settings(database_url=f"sqlite:///{blocker / 'maxtwo.db'}")
    # A port nobody listens on: connection refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return Settings(database_url=f"postgresql://maxtwo:s3cret@127.0.0.1:{port}/maxtwo", connect_timeout=2)


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    """Poll until condition() holds; fail naming `what` if it never does."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.01)


def prepare(database_url: str, users_count: int = 0) -> None:
    """The schema (and `users_count` users) made with the default timeouts: a test engine whose
    statement timeout is a fraction of a second is also PostgreSQL's idle-in-transaction
    timeout, which a busy machine's pause between the schema set-up's statements can pass
    (a CI run: the set-up's connection terminated)."""
    from maxtwo_cli.core.seed import seed_users

    engine = db.create_engine(Settings(database_url=database_url))
    try:
        schema.ensure_schema(engine)
        if users_count:
            seed_users(engine, users_count)
    finally:
        engine.dispose()


@contextlib.contextmanager
def main_file_locked(tmp_path) -> Iterator[sa.Engine]:
    """An engine on a new SQLite database whose main file another connection holds the write
    lock of, as a randomization does; statements give up on a lock after 0.5 s."""
    path = tmp_path / "maxtwo.db"
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}", statement_timeout=0.5))
    schema.ensure_schema(engine)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield engine
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()


class _Stalled:
    """A kind of operation whose every batch waits for a gate (10 s at most), then answers None."""

    def __init__(self, name: str, gate: threading.Event) -> None:
        self.name = name
        self._gate = gate

    def apply(self, held, payloads):
        self._gate.wait(10)
        return [None] * len(payloads)


def stalled_batchers(engine: sa.Engine, gate: threading.Event) -> Batchers:
    """A batcher for each kind ("query" and "increment"), whose batches wait for `gate`."""
    return Batchers({name: Batcher(engine, [_Stalled(name, gate)], max_wait=30) for name in ("query", "increment")})
