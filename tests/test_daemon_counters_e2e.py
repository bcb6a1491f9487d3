"""End to end, the counters: real `maxtwo serve` processes, over sockets, on SQLite and PostgreSQL.

Exact totals from two daemons sharing a database, increments acknowledged before a SIGKILL kept
and none applied twice, an Idempotency-Key retried across a crash, an overflow inside a batch,
and every status POST /increment and GET /counters/{key} answer with.
"""

from __future__ import annotations

import http.client
import json
import random
import sqlite3
import threading
import time
import urllib.parse
from collections import Counter, defaultdict

import pytest
import sqlalchemy as sa

from devtools.pgserver import ThrowawayPostgres
from maxtwo_cli.core import db
from maxtwo_cli.core.counters import INT64_MAX, INT64_MIN, list_counters, read_counter
from maxtwo_cli.core.settings import Settings
from tests.serve_process import ServeProcess

JSON = {"Content-Type": "application/json"}
# Every loop of requests ends by this many seconds at the latest, whatever the machine's load.
LOAD_DEADLINE_SECONDS = 90.0


def body(key: object, value: object) -> bytes:
    return json.dumps({"key": key, "value": value}).encode()


def counter_path(key: str) -> str:
    return "/counters/" + urllib.parse.quote(key, safe="")


class Client:
    """One thread's keep-alive HTTP/1.1 connection to one daemon."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self._port = port
        self._timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def connect(self) -> None:
        """Connect now (a refusal here means no request was sent)."""
        if self._connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=self._timeout)
            connection.connect()
            self._connection = connection

    def post_increment(self, key: str, value: int, idempotency_key: str | None = None) -> int:
        """The status POST /increment answers; OSError or HTTPException when there is no answer."""
        self.connect()
        headers = dict(JSON)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        try:
            self._connection.request("POST", "/increment", body(key, value), headers)
            response = self._connection.getresponse()
            response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def start_together(workers: list) -> None:
    """Start the threads and wait for them all (each bounded by LOAD_DEADLINE_SECONDS)."""
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(LOAD_DEADLINE_SECONDS + 30)
        assert not worker.is_alive(), "a client thread did not finish"


def get_counter(daemon: ServeProcess, key: str) -> int | None:
    status, answer = daemon.get(counter_path(key))
    if status == 404:
        return None
    assert status == 200, (status, answer)
    assert answer["key"] == key
    return answer["value"]


@pytest.mark.slow  # 32k increments through two daemons
def test_two_daemons_on_one_postgresql_keep_exact_totals(postgres_url, tmp_path):
    threads_per_daemon, per_thread, keys = 16, 1000, [f"key-{index:03d}" for index in range(100)]
    with ServeProcess(postgres_url, interval=1, seed_count=200) as first, \
            ServeProcess(postgres_url, interval=1, seed_count=200) as second:
        first.start(tmp_path / "first.log")
        second.start(tmp_path / "second.log")
        daemons = [first, second]
        lock = threading.Lock()
        acknowledged: dict[str, int] = defaultdict(int)  # key -> sum of the values answered 202
        outcomes: Counter = Counter()
        barrier = threading.Barrier(2 * threads_per_daemon)
        deadline = time.monotonic() + LOAD_DEADLINE_SECONDS

        def work(index: int) -> None:
            rng = random.Random(20240 + index)  # seeded: the same increments every run
            client = Client(daemons[index % 2].port)
            sums: dict[str, int] = defaultdict(int)
            seen: Counter = Counter()
            barrier.wait()
            try:
                for _ in range(per_thread):
                    if time.monotonic() > deadline:
                        seen["not sent: deadline"] += 1
                        continue
                    key = rng.choice(keys)
                    # Mostly small, some large, negatives and zero included.
                    value = rng.choice([rng.randint(-1000, 1000), rng.randint(-10**12, 10**12), 0, -1, 1])
                    try:
                        status = client.post_increment(key, value)
                    except (OSError, http.client.HTTPException) as ex:
                        seen[f"no answer: {type(ex).__name__}"] += 1
                        continue
                    seen[status] += 1
                    if status == 202:
                        sums[key] += value
            finally:
                client.close()
                with lock:
                    outcomes.update(seen)
                    for key, total in sums.items():
                        acknowledged[key] += total

        started = time.monotonic()
        start_together([threading.Thread(target=work, args=(index,)) for index in range(2 * threads_per_daemon)])
        seconds = time.monotonic() - started

        assert outcomes == {202: 2 * threads_per_daemon * per_thread}, outcomes
        for index, key in enumerate(keys):
            # Read back through either daemon: both see every commit.
            assert get_counter(daemons[index % 2], key) == acknowledged.get(key), key
        engine = db.create_engine(Settings(database_url=postgres_url))
        try:
            assert dict(list_counters(engine, limit=1000)) == {key: acknowledged[key] for key in acknowledged}
        finally:
            engine.dispose()
        applied = first.metric("maxtwo_increments_applied_total") + second.metric("maxtwo_increments_applied_total")
        assert applied == 2 * threads_per_daemon * per_thread
        batches = first.metric("maxtwo_increment_batch_size_count") + second.metric("maxtwo_increment_batch_size_count")
        print(f"{applied:.0f} increments in {seconds:.1f} s ({applied / seconds:.0f}/s), {batches:.0f} batches")
        assert first.terminate() == 0 and second.terminate() == 0
        assert "Traceback" not in first.log() + second.log()


def _load_then_sigkill(daemon: ServeProcess, keys: list[str], acked: Counter, unanswered: Counter,
                       statuses: Counter, kill_after_acks: int) -> None:
    """One client thread per key, each posting 1 over and over until the daemon is SIGKILLed
    (once kill_after_acks increments are acknowledged in all). Each thread stops at its first
    request without an answer: at most one request per key is unanswered."""
    lock = threading.Lock()
    progress = [0]
    deadline = time.monotonic() + LOAD_DEADLINE_SECONDS

    def work(key: str) -> None:
        client = Client(daemon.port)
        try:
            client.connect()
        except OSError:
            return  # nothing sent
        try:
            while time.monotonic() < deadline:
                try:
                    status = client.post_increment(key, 1)
                except (OSError, http.client.HTTPException):
                    # Sent, and no answer: it may or may not have been applied.
                    with lock:
                        unanswered[key] += 1
                    return
                with lock:
                    statuses[status] += 1
                    if status == 202:
                        acked[key] += 1
                        progress[0] += 1
        finally:
            client.close()

    workers = [threading.Thread(target=work, args=(key,)) for key in keys]
    for worker in workers:
        worker.start()
    while progress[0] < kill_after_acks and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon.stop()  # SIGKILL to its process group, mid-load
    for worker in workers:
        worker.join(60)
        assert not worker.is_alive(), "a client thread did not finish"


@pytest.mark.slow  # three daemon starts, two SIGKILLs under load
def test_sigkill_under_load_keeps_every_acknowledged_increment_and_applies_none_twice(database_url, tmp_path):
    keys = [f"thread-{index:02d}" for index in range(16)]
    acked, unanswered, statuses = Counter(), Counter(), Counter()
    for round_number, kill_after_acks in enumerate([1000, 2000]):
        daemon = ServeProcess(database_url, interval=1, seed_count=200)
        try:
            daemon.start(tmp_path / f"serve-{round_number}.log")
            _load_then_sigkill(daemon, keys, acked, unanswered, statuses, kill_after_acks)
        finally:
            daemon.stop()
        assert daemon.process.returncode == -9
    assert set(statuses) == {202}, statuses
    assert sum(acked.values()) >= 3000

    # What the database holds, read directly...
    engine = db.create_engine(Settings(database_url=database_url))
    try:
        totals = {key: read_counter(engine, key) or 0 for key in keys}
    finally:
        engine.dispose()
    # ...and through a new daemon on it.
    with ServeProcess(database_url, interval=1, seed_count=200) as daemon:
        daemon.start(tmp_path / "after.log")
        assert {key: get_counter(daemon, key) or 0 for key in keys} == totals
        assert daemon.terminate() == 0

    applied_unanswered = sum(totals[key] - acked[key] for key in keys)
    print(f"acknowledged {sum(acked.values())}, unanswered {sum(unanswered.values())} "
          f"(of which applied {applied_unanswered})")
    for key in keys:
        assert unanswered[key] <= 2  # one per round at most
        # Every acknowledged increment is in; each unanswered one at most once.
        assert acked[key] <= totals[key] <= acked[key] + unanswered[key], (key, acked[key], unanswered[key], totals[key])


def test_an_idempotency_key_retried_across_a_sigkill_applies_once(database_url, tmp_path):
    headers = {**JSON, "Idempotency-Key": "answered-then-killed"}
    unread_headers = {**JSON, "Idempotency-Key": "killed-before-reading"}
    with ServeProcess(database_url, interval=60, seed_count=10) as daemon:
        daemon.start(tmp_path / "first.log")
        # Answered 202, and the daemon killed at once: the client might not have seen it.
        status, _, answer = daemon.post("/increment", body("acknowledged", 7), headers)
        assert (status, answer) == (202, "")
        # Sent, then the daemon killed before the answer is read: applied or not, unknown.
        connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        connection.request("POST", "/increment", body("unknown", 11), unread_headers)
        daemon.stop()
        connection.close()

    engine = db.create_engine(Settings(database_url=database_url))
    try:
        assert read_counter(engine, "acknowledged") == 7
        unknown_before_retry = read_counter(engine, "unknown")
    finally:
        engine.dispose()
    assert unknown_before_retry in (None, 11)  # all of it or nothing
    with ServeProcess(database_url, interval=60, seed_count=10) as daemon:
        daemon.start(tmp_path / "second.log")
        for _ in range(2):  # the retry, and a retry of the retry
            assert daemon.post("/increment", body("acknowledged", 7), headers)[0] == 202
            assert daemon.post("/increment", body("unknown", 11), unread_headers)[0] == 202
        assert get_counter(daemon, "acknowledged") == 7
        assert get_counter(daemon, "unknown") == 11

        # The same key for a different increment: 422, and nothing applied.
        for other in [body("acknowledged", 8), body("elsewhere", 7)]:
            status, _, answer = daemon.post("/increment", other, headers)
            assert status == 422 and answer["status"] == 422 and "Idempotency-Key" in answer["description"]
        assert get_counter(daemon, "acknowledged") == 7
        assert get_counter(daemon, "elsewhere") is None
        assert daemon.terminate() == 0


def test_one_idempotency_key_sent_at_once_to_two_daemons_applies_once(database_url, tmp_path):
    senders = 16
    with ServeProcess(database_url, interval=60, seed_count=10) as first, \
            ServeProcess(database_url, interval=60, seed_count=10) as second:
        first.start(tmp_path / "first.log")
        second.start(tmp_path / "second.log")
        for round_number in range(4):
            # Half the senders ask for +3 and half for +5 under one key, to either daemon: the
            # first to commit wins, its copies are replays (202), the other body conflicts (422).
            requests = [("race", 3 if index % 2 else 5) for index in range(senders)]
            before = get_counter(first, "race") or 0
            headers = {**JSON, "Idempotency-Key": f"race-{round_number}"}
            answers = post_together([((first, second)[index // 2 % 2], body(key, value), headers)
                                     for index, (key, value) in enumerate(requests)])
            winners = {value for (_, value), answer in zip(requests, answers, strict=True) if answer == 202}
            assert len(winners) == 1, answers
            [winner] = winners
            assert all(answer == (202 if value == winner else 422)
                       for (_, value), answer in zip(requests, answers, strict=True)), answers
            assert get_counter(second, "race") == before + winner
        assert first.terminate() == 0 and second.terminate() == 0


def test_an_overflow_inside_a_concurrent_batch_fails_alone(database_url, tmp_path):
    rounds, others = 5, [f"other-{index}" for index in range(10)]
    with ServeProcess(database_url, interval=60, seed_count=10) as daemon:
        daemon.start(tmp_path / "serve.log")
        assert daemon.post("/increment", body("high", INT64_MAX - 10), JSON)[0] == 202
        assert daemon.post("/increment", body("low", INT64_MIN + 10), JSON)[0] == 202
        batches_before = daemon.metric("maxtwo_increment_batch_size_count")
        expected: dict[str, int] = defaultdict(int)
        expected.update({"high": INT64_MAX - 10, "low": INT64_MIN + 10})
        rng = random.Random(4242)
        for round_number in range(rounds):
            # "high" + 11 and "low" - 11 overflow whatever the order; in the first round "high"
            # + 5 and "low" - 5 fit beside them (in range whether applied before or after).
            posts = [("high", 11), ("low", -11)] + [(key, rng.randint(-10**6, 10**6)) for key in others]
            if round_number == 0:
                posts += [("high", 5), ("low", -5)]
            answers = post_together([(daemon, body(key, value), JSON) for key, value in posts])
            for index, (key, value) in enumerate(posts):
                overflows = key in ("high", "low") and abs(value) == 11
                assert answers[index] == (409 if overflows else 202), (key, value, answers[index])
                if not overflows:
                    expected[key] += value
            for key, total in expected.items():
                assert get_counter(daemon, key) == total, key
        assert expected["high"] == INT64_MAX - 5 and expected["low"] == INT64_MIN + 5
        # They did share transactions: fewer batches than increments.
        increments = rounds * (2 + len(others)) + 2
        assert daemon.metric("maxtwo_increment_batch_size_count") - batches_before < increments

        # To the very edge, and not a step beyond.
        assert daemon.post("/increment", body("high", 5), JSON)[0] == 202
        assert daemon.post("/increment", body("low", -5), JSON)[0] == 202
        status, _, answer = daemon.post("/increment", body("high", 1), JSON)
        assert status == 409 and answer["status"] == 409 and "64-bit" in answer["description"]
        assert daemon.post("/increment", body("low", -1), JSON)[0] == 409
        assert get_counter(daemon, "high") == INT64_MAX
        assert get_counter(daemon, "low") == INT64_MIN
        assert daemon.terminate() == 0
        assert "Traceback" not in daemon.log()


def post_together(posts: list[tuple[ServeProcess, bytes, dict[str, str]]]) -> list[int | str]:
    """POST /increment each (daemon, body, headers) from a thread of its own, all released at
    once; the statuses (or the exception's name for a request without an answer), in order."""
    answers: list[int | str] = ["not sent"] * len(posts)
    barrier = threading.Barrier(len(posts))

    def send(index: int, daemon: ServeProcess, payload: bytes, headers: dict[str, str]) -> None:
        barrier.wait()
        try:
            answers[index] = daemon.post("/increment", payload, headers, timeout=30)[0]
        except (OSError, http.client.HTTPException) as ex:
            answers[index] = type(ex).__name__

    start_together([threading.Thread(target=send, args=(index, *post)) for index, post in enumerate(posts)])
    return answers


def _chunked_post(port: int, payload: bytes) -> int:
    """POST payload with Transfer-Encoding: chunked (no Content-Length); the status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/increment", iter([payload[:1000], payload[1000:]]),
                           {**JSON, "Transfer-Encoding": "chunked"}, encode_chunked=True)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_every_status_of_the_counters_api(tmp_path):
    database_url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    invalid = {
        "missing field": json.dumps({"key": "k"}),
        "unknown field": json.dumps({"key": "k", "value": 1, "extra": 2}),
        "value true": json.dumps({"key": "k", "value": True}),
        "value 1.0": json.dumps({"key": "k", "value": 1.0}),
        'value "5"': json.dumps({"key": "k", "value": "5"}),
        "value 2**63": json.dumps({"key": "k", "value": 2**63}),
        "value -2**63-1": json.dumps({"key": "k", "value": -(2**63) - 1}),
        'key ""': json.dumps({"key": "", "value": 1}),
        "key of 256 characters": json.dumps({"key": "k" * 256, "value": 1}),
        "key 5": json.dumps({"key": 5, "value": 1}),
    }
    with ServeProcess(database_url, interval=60, seed_count=10) as daemon:
        daemon.start(tmp_path / "serve.log")

        status, _, answer = daemon.post("/increment", body("plain", 3), JSON)
        assert (status, answer) == (202, "")
        assert daemon.post("/increment", body("plain", 2), {"Content-Type": "application/json; charset=utf-8"})[0] == 202
        assert daemon.get(counter_path("plain")) == (200, {"key": "plain", "value": 5})

        for case, raw in {"bad JSON": b'{"key": "k", "value": 1', "a JSON array": b'["k", 1]',
                          "not UTF-8": b'{"key": "\xff", "value": 1}'}.items():
            status, _, answer = daemon.post("/increment", raw, JSON)
            assert (status, answer["status"]) == (400, 400), case
        status, _, answer = daemon.post("/increment", body("k", 1), {**JSON, "Idempotency-Key": "x" * 256})
        assert status == 400 and "Idempotency-Key" in answer["description"]

        for case, raw in invalid.items():
            status, _, answer = daemon.post("/increment", raw.encode(), JSON)
            assert (status, answer["status"]) == (422, 422), case
            assert answer["description"], case

        padded = json.dumps({"key": "k", "value": 1, "pad": " " * 5000}).encode()
        assert daemon.post("/increment", padded, JSON)[0] == 413
        assert _chunked_post(daemon.port, padded) == 413  # no Content-Length to refuse it by

        for content_type in [{"Content-Type": "text/plain"}, {}, {"Content-Type": "application/x-www-form-urlencoded"}]:
            status, _, answer = daemon.post("/increment", body("k", 1), content_type)
            assert (status, answer["status"]) == (415, 415), content_type

        assert daemon.post("/increment", body("full", INT64_MAX), JSON)[0] == 202
        status, _, answer = daemon.post("/increment", body("full", 1), JSON)
        assert (status, answer["status"]) == (409, 409)
        assert get_counter(daemon, "full") == INT64_MAX

        status, answer = daemon.get(counter_path("never-incremented"))
        assert status == 404 and answer["status"] == 404
        assert daemon.get("/counters/")[0] == 404
        assert get_counter(daemon, "k") is None  # nothing refused above was applied

        # Keys that need percent-encoding: "/" (as %2F), a literal "%2F" (decoded once only),
        # spaces, "?" and "#", non-ASCII and astral characters.
        for key in ["a/b", "/lead/and/trail/", "x%2Fy", "100% sure?", "#hash", "zähler €", "😀", "ключ"]:
            assert daemon.post("/increment", body(key, 9), JSON)[0] == 202, key
            assert daemon.get(counter_path(key)) == (200, {"key": key, "value": 9}), key
        assert get_counter(daemon, "x/y") is None

        assert daemon.terminate() == 0
        assert "Traceback" not in daemon.log()


@pytest.mark.slow  # its own PostgreSQL server, stopped under the daemon
def test_503_with_retry_after_while_the_database_is_down(tmp_path):
    with ThrowawayPostgres(fsync=False) as server, ServeProcess(server.url, interval=60, seed_count=10) as daemon:
        daemon.start(tmp_path / "serve.log")
        assert daemon.post("/increment", body("k", 1), JSON)[0] == 202

        server.stop()
        started = time.monotonic()
        status, headers, answer = daemon.post("/increment", body("k", 1), JSON, timeout=30)
        assert (status, answer["status"]) == (503, 503)
        assert int(headers["retry-after"]) > 0
        # The connect timeout (5 s) plus slack for a loaded machine; a hang hits the 30 s.
        assert time.monotonic() - started < 20
        status, answer = daemon.get(counter_path("k"), timeout=30)
        assert status == 503 and answer["status"] == 503

        server.start()
        deadline = time.monotonic() + 20
        while daemon.post("/increment", body("k", 1), JSON, timeout=30)[0] != 202:
            assert time.monotonic() < deadline, "no 202 within 20 s of the database's return"
            time.sleep(0.2)
        # Refused while the database was down: never applied (a connection refused commits nothing).
        assert get_counter(daemon, "k") == 2
        assert daemon.terminate() == 0


def test_on_sqlite_both_routes_are_answered_while_a_randomization_holds_the_main_file(tmp_path):
    # The counters live in the query-state file: neither an increment nor a query queued behind
    # one waits for the main file's lock, which a randomization holds for its whole length.
    database = tmp_path / "maxtwo.db"
    with ServeProcess(f"sqlite:///{database}", interval=3600, seed_count=10) as daemon:
        daemon.start(tmp_path / "serve.log")
        locker = sqlite3.connect(database, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            started = time.monotonic()
            statuses = [daemon.post("/increment", body("k", 1), JSON, timeout=30)[0], daemon.get("/", timeout=30)[0],
                        daemon.get(counter_path("k"), timeout=30)[0]]
            waited = time.monotonic() - started
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert daemon.terminate() == 0
    assert statuses == [202, 200, 200]
    assert waited < 2.5  # behind the lock, the increment alone would wait out 5 s and fail


@pytest.mark.slow  # a daemon start and a SIGTERM under load, on both databases
def test_sigterm_under_load_answers_every_request_it_read(database_url, tmp_path):
    """SIGTERM mid-load: every request the daemon read is committed and answered 202, the rest
    are refused at the connection and never applied; exit 0 within 10 s."""
    keys = [f"term-{index:02d}" for index in range(16)]
    acked, unanswered, statuses = Counter(), Counter(), Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + LOAD_DEADLINE_SECONDS
    with ServeProcess(database_url, interval=1, seed_count=200) as daemon:
        daemon.start(tmp_path / "serve.log")

        def work(key: str) -> None:
            client = Client(daemon.port)
            try:
                while time.monotonic() < deadline:
                    try:
                        client.connect()
                    except OSError:
                        return  # refused: nothing sent
                    try:
                        status = client.post_increment(key, 1)
                    except (OSError, http.client.HTTPException):
                        with lock:
                            unanswered[key] += 1
                        continue  # a closed keep-alive connection: the next try reconnects
                    with lock:
                        statuses[status] += 1
                        acked[key] += status == 202
            finally:
                client.close()

        workers = [threading.Thread(target=work, args=(key,)) for key in keys]
        for worker in workers:
            worker.start()
        while sum(acked.values()) < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        assert daemon.terminate(timeout=15) == 0
        stopped_in = time.monotonic() - started
        for worker in workers:
            worker.join(60)
            assert not worker.is_alive(), "a client thread did not finish"
        log = daemon.log()
    assert stopped_in < 10
    assert set(statuses) == {202}, statuses
    assert "still unanswered" not in log and "Traceback" not in log
    engine = db.create_engine(Settings(database_url=database_url))
    try:
        totals = {key: read_counter(engine, key) or 0 for key in keys}
    finally:
        engine.dispose()
    # Nothing the daemon acknowledged is lost, and nothing it did not read was applied: a
    # request without an answer is one it never read (the drain answers every one it did).
    assert totals == {key: acked[key] for key in keys}, (totals, dict(acked), dict(unanswered))


def test_the_queue_depth_counts_the_increments_waiting_in_the_lane(postgres_url, tmp_path):
    """maxtwo_batch_queue_depth read 0 while 100 requests waited (an audit): they wait in the
    lane's queue behind its batch in flight, and only the batchers' queues were counted. Here a
    counter's row lock holds the batch in flight."""
    engine = db.create_engine(Settings(database_url=postgres_url, statement_timeout=30))  # idle in a transaction
    with ServeProcess(postgres_url, interval=3600, seed_count=10) as daemon, engine.connect() as holder:
        daemon.start(tmp_path / "serve.log")
        assert daemon.post("/increment", body("held", 1), JSON)[0] == 202
        holder.execute(sa.text("SELECT value FROM counters WHERE key = 'held' FOR UPDATE"))  # until rollback
        statuses: list[int] = []
        senders = [threading.Thread(target=lambda: statuses.append(daemon.post("/increment", body("held", 1), JSON,
                                                                                timeout=30)[0]))
                   for _ in range(6)]
        try:
            senders[0].start()  # the batch in flight, waiting for the lock
            time.sleep(0.5)
            for sender in senders[1:]:
                sender.start()
            deadline = time.monotonic() + 3  # (within the daemon's 5 s statement timeout)
            while daemon.metric("maxtwo_batch_queue_depth") < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            depth = daemon.metric("maxtwo_batch_queue_depth")
        finally:
            holder.rollback()
        for sender in senders:
            sender.join(30)
        assert daemon.terminate() == 0
    engine.dispose()
    assert depth == 5  # the five behind the batch in flight
    assert statuses == [202] * 6
