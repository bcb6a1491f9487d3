"""GET / answered in batches by one thread, instead of one request thread each.

waitress hands every complete request to a pool of request threads: the serving thread wakes
one (a condition variable), the request thread waits for the interpreter, runs the app, and
pulls the serving thread's trigger. For GET / the request thread then waits once more, for the
query batch it shares with the others (core/combiner.py), and is woken again when it commits:
two sleeps and wake-ups per request, which cost more than the app itself (bench/NOTES.md).

QueryLaneDispatcher is waitress's dispatcher with one lane more: requests for the query's paths
queue for one lane thread, which takes all of them at once, asks the combiner for as many
answers in one batch, then answers each request in turn through the same Falcon app, whose
query() returns the answer fetched for it (QueryCombiner.prefetched). Everything else (and a
GET / the lane would not recognise, e.g. a malformed one) goes to the request threads as
before. Per batch, three wake-ups (the lane's, the committer's, the lane's again for the
answers) instead of two per request; every response is still made by the app, in order, once
its batch has committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable

from waitress.task import ThreadedTaskDispatcher

from maxtwo_cli.core.combiner import QueryCombiner

log = logging.getLogger(__name__)

# When the request this thread is answering arrived (see arrived_at()).
_serving = threading.local()


def arrived_at() -> float | None:
    """time.perf_counter() when the lane got the request this thread is answering; None outside
    the lane. The app's latency histogram starts there, so it counts the wait for the batch."""
    return getattr(_serving, "arrived", None)


class QueryLaneDispatcher(ThreadedTaskDispatcher):
    def __init__(self, combiner: QueryCombiner, paths: Iterable[str]) -> None:
        super().__init__()
        self._combiner = combiner
        self._paths = frozenset(paths)
        self._lane: deque = deque()  # (channel, arrived): channels whose first request is a query
        self._lane_lock = threading.Lock()
        self._lane_ready = threading.Condition(self._lane_lock)
        self._lane_thread: threading.Thread | None = None
        self._lane_stopping = False

    def add_task(self, task) -> None:
        # NOTE: called with the channel's requests_lock held (by the serving thread when a
        # request is complete, or by a request thread for the next pipelined request), so its
        # first request cannot change under us.
        if self._is_query(task):
            with self._lane_lock:
                self._lane.append((task, time.perf_counter()))
                self._lane_ready.notify()
            return
        super().add_task(task)

    def _is_query(self, channel) -> bool:
        requests = getattr(channel, "requests", None)
        if not requests:
            return False
        request = requests[0]
        return request.error is None and request.command == "GET" and request.path in self._paths

    def set_thread_count(self, count: int) -> None:
        super().set_thread_count(count)
        with self._lane_lock:
            # The lane runs while there are request threads (waitress sets 0 to shut down).
            self._lane_stopping = count == 0
            if count > 0 and self._lane_thread is None:
                # NOTE: one thread: a second one, waiting for its batch while the first answers
                # its own, cost 40-70 us more CPU per request and served less (bench/NOTES.md).
                self._lane_thread = threading.Thread(target=self._serve_lane, name="maxtwo-query-lane", daemon=True)
                self._lane_thread.start()
            self._lane_ready.notify()

    def shutdown(self, cancel_pending: bool = True, timeout: float = 5) -> bool:
        lane_thread = self._lane_thread
        result = super().shutdown(cancel_pending, timeout)  # stops the lane too (set_thread_count)
        if lane_thread is not None:
            lane_thread.join(timeout)  # a batch stuck in the database is not waited out
        if cancel_pending:
            with self._lane_lock:
                pending = [channel for channel, _ in self._lane]
                self._lane.clear()
            for channel in pending:
                channel.cancel()
        return result

    def _serve_lane(self) -> None:
        while True:
            with self._lane_lock:
                while not self._lane and not self._lane_stopping:
                    self._lane_ready.wait()
                if self._lane_stopping:
                    self._lane_thread = None
                    return
                # At most one transaction's worth; the rest go in the next.
                queued = [self._lane.popleft() for _ in range(min(len(self._lane), self._combiner.max_batch))]
            # NOTE: every request waits for the database at most max_wait from its arrival, as
            # it would in a request thread of its own; the oldest of the batch sets the bound.
            timeout = queued[0][1] + self._combiner.max_wait - time.perf_counter()
            try:
                answers: list = self._combiner.query_many(len(queued), timeout=timeout)
            except BaseException as ex:  # noqa: BLE001 - each request turns it into its error response
                if not isinstance(ex, Exception):
                    # NOTE: raised in the committer and handed over; raising it here would end
                    # the lane, and every GET / after would wait forever. The app answers 500.
                    ex = RuntimeError(f"the query batch failed: {ex!r}")
                with self._lane_lock:
                    # NOTE: as in the combiner: those who queued while this batch failed would
                    # meet the same database and wait a whole timeout more; they share the error.
                    queued += self._lane
                    self._lane.clear()
                answers = [ex] * len(queued)
            for (channel, arrived), answer in zip(queued, answers):
                _serving.arrived = arrived
                with self._combiner.prefetched(answer):
                    try:
                        channel.service()
                    except BaseException:
                        # As waitress's own request threads: log it and go on with the rest.
                        log.exception("Exception when servicing %r", channel)
            _serving.arrived = None
