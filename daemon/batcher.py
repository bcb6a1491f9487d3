"""Group commit for every kind of write the daemon makes: many requests, one transaction per kind.

Every GET / writes (it records its time), and a durable write costs a disk flush; on their own,
writes could never go faster than one flush each. Here the requests of this process that write
the same kind at the same moment share one transaction: a committer thread takes everybody
waiting, runs one batch for them and hands each its own outcome, then takes whoever came
meanwhile. Nobody is answered before the commit, so nothing is less durable than a transaction
of its own.

Operations come in kinds (`Kind`: GET /'s query, POST /increment's increment), each applied to its part of the batch
by one call. A kind reports an operation's own failure by returning the exception in its place;
a kind that raises fails its whole part. Each kind's part is committed by the kind itself, in
the order the kinds were given, and answered at once; a part that fails for a reason of its own
(DatabaseBusyError: a lock, a timeout) or after another committed fails alone. Any other failure
of the first part (most likely the database gone) fails everybody, and whoever queued meanwhile
shares it (a DatabaseBusyError, only whoever queued for the same kind).

NOTE: the transaction runs in a thread of its own, not in one of the callers', so that every
caller can give up after `max_wait` (or the timeout it asks for): a database that stops
answering without closing the connection (a frozen server) holds up the committer
indefinitely, a caller at most that long. running_for() lets the watchdog see such a batch.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy.engine import Engine

from maxtwo_cli.core.batch import HeldConnection
from maxtwo_cli.core.counters import add_increments
from maxtwo_cli.core.errors import DatabaseBusyError, DatabaseUnavailableError
from maxtwo_cli.core.query import AnswerCache, run_query_batch

log = logging.getLogger(__name__)

# The committer thread ends after this long without work (and starts again on the next), so an
# idle batcher holds no thread and no connection.
IDLE_SECONDS = 5.0


class Kind(Protocol):
    """One kind of write operation."""

    name: str

    def apply(self, held: HeldConnection, payloads: Sequence[Any]) -> list[Any]:
        """The outcome of each operation, in order: its result, or the exception it fails with.

        apply() commits what it writes itself (a single statement in autocommit is its own
        transaction, so a batch needs no BEGIN and COMMIT round trips); should a caller have
        opened a transaction (held.in_transaction), it commits with that instead."""
        ...


class QueryKind:
    """GET /: record the query time, return the answer (core.query)."""

    name = "query"

    def __init__(self, cache: AnswerCache | None = None) -> None:
        self._cache = cache if cache is not None else AnswerCache()

    def apply(self, held: HeldConnection, payloads: Sequence[Any]) -> list[Any]:
        return list(run_query_batch(held, len(payloads), self._cache))


class IncrementKind:
    """POST /increment: add to a counter (core.counters); its payloads are Increments."""

    name = "increment"

    def apply(self, held: HeldConnection, payloads: Sequence[Any]) -> list[Any]:
        return add_increments(held, payloads)


class QueueFullError(DatabaseUnavailableError):
    """More operations wait for the database than the batcher holds: try again shortly."""


class Ticket:
    """One caller's place in the queue, for len(payloads) operations of one kind.

    NOTE: signalled through a bare lock, held until the outcome is in, rather than a
    threading.Event, whose wait and set run several Python-level lock operations: this is paid
    twice per request.
    """

    __slots__ = ("_on_answer", "_pending", "_unanswered", "kind", "outcomes", "payloads")

    def __init__(self, kind: str, payloads: Sequence[Any], on_answer: Callable[[], None] | None = None) -> None:
        self._pending = threading.Lock()
        self._pending.acquire()
        # Taken by whoever answers first: the committer, or abandon() at shutdown.
        self._unanswered = threading.Lock()
        self._on_answer = on_answer
        self.kind = kind
        self.payloads = payloads
        self.outcomes: list[Any] = []

    def wait(self, timeout: float) -> bool:
        """Whether the outcome came within `timeout` seconds."""
        return self._pending.acquire(timeout=timeout)

    def answered(self) -> bool:
        return not self._pending.locked()

    def answer(self, outcomes: list[Any]) -> bool:
        """Hand the waiter its outcomes; whether this was the first answer (a later one is
        dropped: the committer's for a ticket abandon() answered already)."""
        if not self._unanswered.acquire(blocking=False):
            return False
        self.outcomes = outcomes
        self._pending.release()
        callback, self._on_answer = self._on_answer, None
        if callback is not None:
            try:
                callback()
            except Exception:  # the callback's failure must cost no other waiter its answer
                log.exception("a ticket's on_answer callback failed")
        return True


# Operations per transaction, by default (the lane takes as many requests per batch).
MAX_BATCH = 256


class Batcher:
    def __init__(
        self,
        engine: Engine,
        kinds: Iterable[Kind],
        *,
        max_wait: float,
        max_batch: int = MAX_BATCH,
        max_pending: int = 100_000,
        on_batch: Callable[[str, list[Any]], None] | None = None,
        on_commit: Callable[[float], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """`max_wait`: seconds a caller waits for its outcome (its batch and the one running when
        it came) before giving up with DatabaseUnavailableError. `max_batch`: operations per
        transaction; a caller asking for more at once still gets one. `max_pending`: operations
        waiting at most (more: QueueFullError at once, so memory stays flat whatever the load).
        `on_batch(kind, outcomes)`: called with each kind's part of every batch once it has
        committed (a part that failed on its own while the rest committed: with its errors);
        `on_commit(seconds)`: once per committed batch, with its duration; `on_failure(error)`:
        once per batch that failed as a whole, and once per part of a batch of several kinds
        that failed on its own."""
        self._engine = engine
        self._kinds = {kind.name: kind for kind in kinds}
        self.max_wait = max_wait
        self.max_batch = max_batch
        self._on_batch = on_batch
        self._on_commit = on_commit
        self._on_failure = on_failure
        self.max_pending = max_pending
        self._queued = 0  # operations waiting, not yet taken into a batch
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._waiting: deque[Ticket] = deque()
        self._committing = False  # whether the committer thread is running
        self._committer: threading.Thread | None = None
        self._closing = False
        self._abandoned: str | None = None  # abandon()'s reason: nobody waits any more
        self._running: list[Ticket] = []  # the running batch's waiters
        self._batch_started: float | None = None  # time.monotonic() of the running batch

    def submit(self, kind: str, payload: Any = None) -> Any:
        """Apply one operation in the next batch; its result once committed, or its error."""
        [outcome] = self.submit_many(kind, [payload])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def submit_many(self, kind: str, payloads: Sequence[Any], *, timeout: float | None = None) -> list[Any]:
        """Several operations of one kind in one batch, in order, as many callers of submit()
        would get them; each outcome is its result or its exception (raised by nobody).
        `timeout`: seconds to wait instead of max_wait (0: only what is answered at once)."""
        return self.outcomes(self.enqueue(kind, payloads), timeout)

    def enqueue(self, kind: str, payloads: Sequence[Any], on_answer: Callable[[], None] | None = None) -> Ticket:
        """Queue operations of one kind for the next batch without waiting: a caller with
        operations of several kinds enqueues each, then waits for them all (outcomes()), and
        they share a batch. `on_answer()`: called once the ticket is answered (from the thread
        that answers it; at once if that is this one), so a caller can wait for several."""
        if not payloads:
            raise ValueError("no operations")
        if kind not in self._kinds:
            raise ValueError(f"unknown kind of operation {kind!r}")
        me = Ticket(kind, payloads, on_answer)
        with self._lock:
            if self._abandoned is not None:
                me.answer([DatabaseUnavailableError(self._abandoned)] * len(payloads))
                return me
            if self._queued + len(payloads) > self.max_pending and self._queued:
                me.answer([QueueFullError(f"{self._queued} operations already wait for the database")] * len(payloads))
                return me
            self._queued += len(payloads)
            self._waiting.append(me)
            if self._committing:
                self._arrived.notify()
            else:
                try:
                    committer = threading.Thread(target=self._commit_loop, name="maxtwo-batcher", daemon=True)
                    committer.start()
                except RuntimeError as ex:  # no thread to be had (resources, interpreter shutdown)
                    self._waiting.remove(me)
                    self._queued -= len(payloads)
                    raise DatabaseUnavailableError(f"cannot start the batch thread: {ex}") from None
                self._committing = True
                self._committer = committer
        return me

    def outcomes(self, ticket: Ticket, timeout: float | None = None) -> list[Any]:
        """The outcomes of enqueue()d operations, waiting up to `timeout` s (default max_wait)."""
        me = ticket
        if not me.wait(self.max_wait if timeout is None else max(timeout, 0.0)):
            with self._lock:
                if me in self._waiting:
                    self._waiting.remove(me)
                    self._queued -= len(me.payloads)
                answered = me.answered()  # in the instant between the timeout and the lock
            if not answered:
                # NOTE: if its batch is running, what it writes will still commit although
                # this caller got an error: as when a client gives up.
                # (A lane's timeout is what its request had left: no time worth giving.)
                within = f"within {self.max_wait:g} s" if timeout is None else "in the time its caller had left"
                error = DatabaseUnavailableError(f"no answer from the database {within}")
                return [error] * len(me.payloads)
        return [_own_copy(outcome) if isinstance(outcome, BaseException) else outcome for outcome in me.outcomes]

    def pending(self) -> int:
        """Operations waiting for a batch (the running one's not counted)."""
        return self._queued

    def running_for(self) -> float:
        """Seconds the running batch has taken so far; 0 when none runs."""
        started = self._batch_started
        return 0.0 if started is None else time.monotonic() - started

    def abandon(self, reason: str) -> int:
        """Answer every waiter now, the running batch's included, with DatabaseUnavailableError
        (`reason`), and every later one at once; the number answered. For a shutdown that cannot
        wait any longer for a database that does not answer: a 503 then, not a connection
        closed unanswered. The running batch may still commit later: an unknown outcome, as
        when a waiter's own timeout runs out (docs/reliability.md)."""
        with self._lock:
            self._abandoned = reason
            waiters = self._running + list(self._waiting)
            self._waiting.clear()
            self._queued = 0
        error = DatabaseUnavailableError(reason)
        return sum(waiter.answer([error] * len(waiter.payloads)) for waiter in waiters)

    def close(self, timeout: float) -> None:
        """Let the committer finish what is queued, give its connection back and end, waiting
        up to `timeout` s for it (a transaction stuck in the database is not waited out). For
        shutdown, once no more operations come: the engine's dispose() cannot close a
        connection the committer holds."""
        with self._lock:
            self._closing = True
            self._arrived.notify()
            committer = self._committer
        if committer is not None:
            committer.join(timeout)

    def _commit_loop(self) -> None:
        # Holds one database connection from batch to batch, and for up to IDLE_SECONDS after.
        held = HeldConnection(self._engine)
        try:
            while True:
                with self._lock:
                    if not self._waiting and not self._closing:
                        self._arrived.wait(IDLE_SECONDS)
                    if not self._waiting:
                        self._committing = False
                        return
                    batch = self._take_batch()
                self._run_batch(held, batch)
        except BaseException:
            # Never reached by design (_run_batch hands every error to its waiters); if it is,
            # the next caller starts a new committer rather than waiting for a dead one.
            with self._lock:
                self._committing = False
            raise
        finally:
            held.release()

    def _take_batch(self) -> list[Ticket]:
        """The waiters at the front of the queue, as many as max_batch operations allows (at
        least one). Called with the lock held, the queue not empty."""
        waiting = self._waiting
        batch = [waiting.popleft()]
        count = len(batch[0].payloads)
        while waiting and count + len(waiting[0].payloads) <= self.max_batch:
            count += len(waiting[0].payloads)
            batch.append(waiting.popleft())
        self._queued -= count
        self._running = batch
        return batch

    def _run_batch(self, held: HeldConnection, batch: list[Ticket]) -> None:
        # NOTE: the parts in the order the kinds were given, whatever arrived first: queries
        # first, answered without waiting for the rest.
        by_kind: dict[str, list[Ticket]] = {name: [] for name in self._kinds}
        for waiter in batch:
            by_kind[waiter.kind].append(waiter)
        parts = {name: waiters for name, waiters in by_kind.items() if waiters}
        self._batch_started = time.monotonic()
        outcomes: dict[str, list[Any]] = {}
        answered: set[str] = set()  # kinds answered already (several kinds)
        try:
            if len(parts) == 1:
                outcomes = {batch[0].kind: self._apply(held, batch[0].kind, parts[batch[0].kind])}
                committed = True
            else:
                committed = self._run_kind_by_kind(held, parts, answered)
        except BaseException as ex:  # noqa: BLE001 - every waiter gets the error
            batch = [waiter for waiter in batch if waiter.kind not in answered]
            # NOTE: those who queued while this batch failed would meet the same database and
            # wait a whole timeout more each, in turn; they share the error instead, so nobody
            # waits much longer than one timeout for a 503. A lock or timeout (DatabaseBusyError)
            # only those of the same kind share: a counter's row lock, or SQLite's main file
            # held by a randomization, says nothing of the queries queued behind it.
            kinds = {waiter.kind for waiter in batch} if isinstance(ex, DatabaseBusyError) else None
            with self._lock:
                sharing = [waiter for waiter in self._waiting if kinds is None or waiter.kind in kinds]
                for waiter in sharing:
                    self._waiting.remove(waiter)
                    self._queued -= len(waiter.payloads)
            batch += sharing
            for waiter in batch:
                waiter.answer([ex] * len(waiter.payloads))
            self._failed(ex)
            return
        finally:
            started, self._batch_started = self._batch_started, None
            self._running = []
        if self._on_commit is not None and started is not None and committed:
            try:
                self._on_commit(time.monotonic() - started)
            except Exception:  # a metrics callback must never cost anybody an answer
                log.exception("on_commit callback failed")
        for name, waiters in parts.items():
            if name not in answered:
                self._answer(name, waiters, outcomes[name])

    def _failed(self, error: BaseException) -> None:
        if self._on_failure is not None:
            try:
                self._on_failure(error)
            except Exception:  # a health callback must never cost anybody an answer
                log.exception("on_failure callback failed")

    def _answer(self, name: str, waiters: list[Ticket], results: list[Any], *, committed: bool = True) -> None:
        """Hand each waiter of one kind its outcomes (counted as a batch if its part committed)."""
        if self._on_batch is not None and committed:
            try:
                self._on_batch(name, results)
            except Exception:  # a metrics callback must never cost anybody an answer
                log.exception("on_batch callback failed")
        start = 0
        for waiter in waiters:
            waiter.answer(results[start : start + len(waiter.payloads)])
            start += len(waiter.payloads)

    def _apply(self, held: HeldConnection, name: str, waiters: list[Ticket]) -> list[Any]:
        payloads = [payload for waiter in waiters for payload in waiter.payloads]
        outcomes = self._kinds[name].apply(held, payloads)
        if len(outcomes) != len(payloads):
            raise RuntimeError(f"{name}: {len(outcomes)} outcomes for {len(payloads)} operations")
        return outcomes

    def _run_kind_by_kind(self, held: HeldConnection, parts: dict[str, list[Ticket]], answered: set[str]) -> bool:
        """Several kinds in a batch: each kind commits on its own and is answered at once, in
        the order the kinds were given (queries first); `answered` gets the name of each kind
        answered. Whether any kind committed (a part that failed as a whole is answered with
        its error, and counted in no batch metric).

        NOTE: not one transaction with a savepoint per kind, as this was on PostgreSQL: that
        took eight round trips (BEGIN, SAVEPOINT, RELEASE twice, COMMIT) where each kind alone
        takes one, and each round trip wakes the committer and hands the interpreter lock
        around. Measured (bench/NOTES.md) under a mix of GET / and POST /increment: 1.09x the
        req/s, and never slower even with commits made 3 ms slow. The queries are answered
        without waiting for the next kind, which may wait for locks (on SQLite the main file's,
        which a randomization holds for a while; the kinds write different files there, and a
        transaction across files would commit file by file anyway)."""
        committed = False
        for name, waiters in parts.items():
            size = sum(len(waiter.payloads) for waiter in waiters)
            try:
                results = self._apply(held, name, waiters)
            except Exception as ex:
                if not answered and not isinstance(ex, DatabaseBusyError):
                    # Nothing committed, and not for a reason of this part's own (a lock, a
                    # timeout): most likely the database is gone, and the batch fails as one
                    # (and shares its error).
                    raise
                log.warning("%d %s operations failed, the rest of their batch goes on: %s", size, name, ex)
                self._answer(name, waiters, [ex] * size, committed=False)
                self._failed(ex)
            else:
                self._answer(name, waiters, results)
                committed = True
            answered.add(name)
        return committed


class Batchers:
    """The batcher of each kind of write: on PostgreSQL one per kind, so that each kind commits
    on a connection and in a thread of its own, and an increment waiting for a counter's row
    lock (another daemon's batch, an operator's transaction) holds up no GET /; on SQLite one
    for every kind, which all write the one query-state file, where a second writer would only
    wait for the first's lock (and SQLite's busy handler sleeps a millisecond or more a try)."""

    def __init__(self, by_kind: Mapping[str, Batcher]) -> None:
        self._by_kind = dict(by_kind)
        # Each batcher once, however many kinds it takes.
        self._distinct = list({id(batcher): batcher for batcher in by_kind.values()}.values())
        self._abandoned: list[Batcher] = []

    @classmethod
    def shared(cls, batcher: Batcher) -> Batchers:
        """One batcher for both kinds (GET /'s and POST /increment's)."""
        return cls(dict.fromkeys((QueryKind.name, IncrementKind.name), batcher))

    def __getitem__(self, kind: str) -> Batcher:
        return self._by_kind[kind]

    def each(self) -> list[Batcher]:
        return list(self._distinct)

    def separate(self) -> bool:
        """Whether the kinds have batchers of their own (PostgreSQL)."""
        return len(self._distinct) > 1

    def pending(self) -> int:
        return sum(batcher.pending() for batcher in self._distinct)

    def running_for(self) -> float:
        """The longest any batch has been running; 0 when none runs."""
        return max(batcher.running_for() for batcher in self._distinct)

    def abandon_stuck(self, reason: str, running_for: float) -> int:
        """Abandon (Batcher.abandon) each batcher whose batch has run `running_for` s or more,
        once: the others' waiters still get their answers. The number of waiters answered."""
        answered = 0
        for batcher in self._distinct:
            if batcher not in self._abandoned and batcher.running_for() >= running_for:
                self._abandoned.append(batcher)
                answered += batcher.abandon(reason)
        return answered

    def close(self, timeout: float) -> None:
        """Close every batcher, within `timeout` s in all."""
        for batcher in self._distinct:
            batcher.close(0)  # each told to close first, so that they finish side by side
        deadline = time.monotonic() + timeout
        for batcher in self._distinct:
            batcher.close(max(deadline - time.monotonic(), 0.0))


def _own_copy(error: BaseException) -> BaseException:
    """A copy of a shared error for one caller: raising one exception object in many threads
    would tangle their tracebacks together."""
    try:
        return copy.copy(error).with_traceback(None)
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied: share it
        return error
