"""Combining concurrent queries into one transaction: group commit, in the application.

Every query writes (it records its time), and a durable write costs a disk flush. The query
chain serialises those writes on one row, so on their own, queries could never go faster than
one flush each. Here the threads of a process that query at the same moment share one
transaction: one of them (the leader) runs `query_users_batch` for everybody waiting, and each
gets its own link of the chain. Nobody is answered before the commit, so nothing is less durable
than a query of its own. Queries from other processes still serialise on the database row.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from collections.abc import Callable

from sqlalchemy.engine import Engine

from maxtwo_cli.core.errors import DatabaseUnavailableError
from maxtwo_cli.core.query import AnswerCache, QueryResult, query_users_batch


class _Waiter:
    __slots__ = ("done", "lead", "result", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.lead = False
        self.result: QueryResult | None = None
        self.error: BaseException | None = None


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
        """`max_wait`: seconds a caller waits for others' transactions before giving up with
        DatabaseUnavailableError (a bound above the database timeouts, never reached normally)."""
        self._engine = engine
        self._cache = cache
        self._max_wait = max_wait
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._lock = threading.Lock()
        self._waiting: deque[_Waiter] = deque()
        self._leading = False

    def query(self) -> QueryResult:
        """The same as core.query.query_users, sharing a transaction with concurrent callers."""
        me = _Waiter()
        with self._lock:
            self._waiting.append(me)
            if not self._leading:
                # Invariant: whenever somebody waits, there is a leader; now it is me (and I
                # am first in line, so my query is in the batch I run).
                self._leading = me.lead = True
        if not me.lead and not me.done.wait(self._max_wait):
            with self._lock:
                if me in self._waiting and not me.lead:
                    self._waiting.remove(me)
                    raise DatabaseUnavailableError(
                        f"no answer from the database within {self._max_wait:.0f} s"
                    )
            me.done.wait()  # it was taken into a batch (or handed the lead) just now
        if me.lead:
            self._run_batch()
        if me.error is not None:
            raise _own_copy(me.error) from None
        assert me.result is not None
        return me.result

    def _run_batch(self) -> None:
        with self._lock:
            batch = [self._waiting.popleft() for _ in range(min(self._max_batch, len(self._waiting)))]
        error: BaseException | None = None
        try:
            results = query_users_batch(self._engine, len(batch), self._cache)
            for waiter, result in zip(batch, results):
                waiter.result = result
            if self._on_batch is not None:
                self._on_batch(len(batch))
        except BaseException as ex:  # noqa: BLE001 - every waiter gets the error, re-raised there
            error = ex
        finally:
            # Whatever happened above, the lead is handed on, or nobody would ever lead again.
            with self._lock:
                if error is not None:
                    # NOTE: those who queued while this batch failed would meet the same
                    # database and wait a whole timeout more each, in turn; they share the
                    # error instead, so nobody waits much longer than one timeout for a 503.
                    batch += self._waiting
                    self._waiting.clear()
                    for waiter in batch:
                        waiter.error = error
                if self._waiting:
                    # Hand the lead to the first in line, who came while this batch ran.
                    successor = self._waiting[0]
                    successor.lead = True
                    successor.done.set()
                else:
                    self._leading = False
            for waiter in batch:
                waiter.done.set()


def _own_copy(error: BaseException) -> BaseException:
    """A copy of a shared error for one caller: raising one exception object in many threads
    would tangle their tracebacks together."""
    try:
        return copy.copy(error).with_traceback(None)
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied: share it
        return error
