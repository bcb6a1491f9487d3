"""Combining concurrent queries into one transaction: group commit, in the application.

Every query writes (it records its time), and a durable write costs a disk flush. The query
chain serialises those writes on one row, so on their own, queries could never go faster than
one flush each. Here the threads of a process that query at the same moment share one
transaction: a committer thread takes everybody waiting, runs one query batch for them and
hands each its own link of the chain, then takes whoever came meanwhile. A caller can also ask
for several queries at once (query_many: the daemon's query lane, for the requests it holds).
Nobody is answered before the commit, so nothing is less durable than a query of its own.
Queries from other processes still serialise on the database row.

NOTE: the transaction runs in a thread of its own, not in one of the callers', so that every
caller can give up after `max_wait` (or the timeout it asks for): a database that stops
answering without closing the connection (a frozen server) holds up the committer
indefinitely, a caller at most that long.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator

from sqlalchemy.engine import Engine

from maxtwo_cli.core.errors import DatabaseUnavailableError
from maxtwo_cli.core.query import AnswerCache, BatchRunner, QueryResult

log = logging.getLogger(__name__)

# The committer thread ends after this long without queries (and starts again on the next),
# so an idle combiner holds no thread.
_IDLE_SECONDS = 5.0


class _Waiter:
    """One caller's place in the queue, for `wanted` queries.

    NOTE: signalled through a bare lock, held until the answer is in, rather than a
    threading.Event, whose wait and set run several Python-level lock operations: this is paid
    twice per request.
    """

    __slots__ = ("_pending", "error", "results", "wanted")

    def __init__(self, wanted: int) -> None:
        self._pending = threading.Lock()
        self._pending.acquire()
        self.wanted = wanted
        self.results: list[QueryResult] = []
        self.error: BaseException | None = None

    def wait(self, timeout: float) -> bool:
        """Whether the answer (or an error) came within `timeout` seconds."""
        return self._pending.acquire(timeout=timeout)

    def answered(self) -> bool:
        return not self._pending.locked()

    def answer(self) -> None:
        """Called once, by the committer, after setting result or error."""
        self._pending.release()


class QueryCombiner:
    def __init__(
        self,
        engine: Engine,
        cache: AnswerCache | None = None,
        *,
        max_wait: float,
        max_batch: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """`max_wait`: seconds a caller waits for its answer (its batch and the one running when
        it came) before giving up with DatabaseUnavailableError."""
        self._engine = engine
        self._cache = cache
        self._max_wait = max_wait
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._waiting: deque[_Waiter] = deque()
        self._committing = False  # whether the committer thread is running
        self._committer: threading.Thread | None = None
        self._closing = False
        self._prefetched = _Prefetched()

    def query(self) -> QueryResult:
        """The same as core.query.query_users, sharing a transaction with concurrent callers
        (or the answer prefetched for this thread, see prefetched())."""
        prefetched = self._prefetched.answer
        if prefetched is not None:
            self._prefetched.answer = None
            if isinstance(prefetched, BaseException):
                raise _own_copy(prefetched) from None
            return prefetched
        return self.query_many(1)[0]

    @property
    def max_wait(self) -> float:
        return self._max_wait

    @property
    def max_batch(self) -> int:
        """Queries per transaction; a caller asking for more at once still gets one."""
        return self._max_batch

    def query_many(self, count: int, *, timeout: float | None = None) -> list[QueryResult]:
        """`count` queries in a row, as `count` callers of query() would get them, in one batch.
        `timeout`: seconds to wait instead of max_wait (0: only what is answered at once)."""
        if count < 1:
            raise ValueError("count must be >= 1")
        me = _Waiter(count)
        with self._lock:
            self._waiting.append(me)
            if self._committing:
                self._arrived.notify()
            else:
                try:
                    committer = threading.Thread(target=self._commit_loop, name="maxtwo-query-committer", daemon=True)
                    committer.start()
                except RuntimeError as ex:  # no thread to be had (resources, interpreter shutdown)
                    self._waiting.remove(me)
                    raise DatabaseUnavailableError(f"cannot start the query thread: {ex}") from None
                self._committing = True
                self._committer = committer
        if not me.wait(self._max_wait if timeout is None else max(timeout, 0.0)):
            with self._lock:
                if me in self._waiting:
                    self._waiting.remove(me)
                answered = me.answered()  # in the instant between the timeout and the lock
            if not answered:
                # NOTE: if its batch is running, the time it records will be the next caller's
                # `previous` although this caller got an error: as when a client gives up.
                raise DatabaseUnavailableError(f"no answer from the database within {self._max_wait:.0f} s")
        if me.error is not None:
            raise _own_copy(me.error) from None
        return me.results

    @contextlib.contextmanager
    def prefetched(self, answer: QueryResult | BaseException) -> Iterator[None]:
        """Inside, the calling thread's next query() returns `answer` (or raises it) without
        asking the database: for a caller that fetched answers for several requests at once
        (query_many) and then serves them one by one through code that calls query()."""
        self._prefetched.answer = answer
        try:
            yield
        finally:
            self._prefetched.answer = None

    def close(self, timeout: float) -> None:
        """Let the committer finish what is queued, give its connection back and end, waiting
        up to `timeout` s for it (a transaction stuck in the database is not waited out). For
        shutdown, once no more queries come: the engine's dispose() cannot close a connection
        the committer holds."""
        with self._lock:
            self._closing = True
            self._arrived.notify()
            committer = self._committer
        if committer is not None:
            committer.join(timeout)

    def _commit_loop(self) -> None:
        runner = None
        try:
            # Holds one database connection from batch to batch, and for up to _IDLE_SECONDS
            # after the last.
            runner = BatchRunner(self._engine, self._cache)
            while True:
                with self._lock:
                    if not self._waiting and not self._closing:
                        self._arrived.wait(_IDLE_SECONDS)
                    if not self._waiting:
                        self._committing = False
                        return
                    batch = self._take_batch()
                self._run_batch(runner, batch)
        except BaseException:
            # Never reached by design (_run_batch hands every error to its waiters); if it is,
            # the next caller starts a new committer rather than waiting for a dead one.
            with self._lock:
                self._committing = False
            raise
        finally:
            if runner is not None:
                runner.release()

    def _take_batch(self) -> list[_Waiter]:
        """The waiters at the front of the queue, as many as max_batch queries allows (at least
        one). Called with the lock held, the queue not empty."""
        waiting = self._waiting
        batch = [waiting.popleft()]
        queries = batch[0].wanted
        while waiting and queries + waiting[0].wanted <= self._max_batch:
            queries += waiting[0].wanted
            batch.append(waiting.popleft())
        return batch

    def _run_batch(self, runner: BatchRunner, batch: list[_Waiter]) -> None:
        queries = sum(waiter.wanted for waiter in batch)
        try:
            results = runner.run(queries)
        except BaseException as ex:  # noqa: BLE001 - every waiter gets the error, re-raised there
            with self._lock:
                # NOTE: those who queued while this batch failed would meet the same database
                # and wait a whole timeout more each, in turn; they share the error instead, so
                # nobody waits much longer than one timeout for a 503.
                batch += self._waiting
                self._waiting.clear()
            for waiter in batch:
                waiter.error = ex
                waiter.answer()
            return
        if self._on_batch is not None:
            try:
                self._on_batch(queries)
            except Exception:  # a metrics callback must never cost anybody an answer
                log.exception("on_batch callback failed")
        start = 0
        for waiter in batch:
            waiter.results = results[start : start + waiter.wanted]
            start += waiter.wanted
            waiter.answer()


class _Prefetched(threading.local):
    answer: QueryResult | BaseException | None = None


def _own_copy(error: BaseException) -> BaseException:
    """A copy of a shared error for one caller: raising one exception object in many threads
    would tangle their tracebacks together."""
    try:
        return copy.copy(error).with_traceback(None)
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied: share it
        return error
