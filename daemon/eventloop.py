"""waitress's connection and event loop, adjusted for many keep-alive clients whose requests
wait on the database.

- QuietChannel: waitress's connection, minus a busy loop that starved the request threads.
- ChangePoller: the serving loop's poller. waitress's own (wasyncore.poll2) builds a new poll
  set on every pass, asking every open connection whether it wants to read or write; a pass
  runs every time a response is sent or a request arrives. While GET / requests wait for their
  shared commit, the serving thread has the interpreter to itself and makes pass after pass:
  with 200 connections, most of its time went into asking (bench/NOTES.md). Here one epoll set
  lives across passes, and a pass asks only what may have changed since the last:
  - the connections that had an event in the last pass (reading or writing changed them);
  - the connections a request thread touched: it pulls the loop's trigger when it finishes a
    request (or needs the loop to write for it), and the pull records which connection it was
    answering. A connection that waits for its request to be answered changes in no other way;
  - new connections, and the listening socket and the trigger (always);
  - every connection once a second: waitress's maintenance closes idle connections from the
    loop, and whatever the rules above could miss is caught within that second.

The graceful drain at shutdown goes back to waitress's own loop (it asks everything).
"""

from __future__ import annotations

import collections
import select
import threading
import time

from waitress.channel import HTTPChannel
from waitress import wasyncore
from waitress.server import BaseWSGIServer

# Seconds between passes that ask every connection.
FULL_CHECK_SECONDS = 1.0

# epoll's event bits are poll()'s (EPOLLIN == POLLIN and so on), which wasyncore.readwrite reads.
_READ = select.POLLIN | select.POLLPRI
_WRITE = select.POLLOUT

# The connection this thread is answering a request of, if any (see QuietChannel.service).
_answering = threading.local()


class QuietChannel(HTTPChannel):
    """waitress's channel, minus a busy loop that starves the request threads, and telling the
    ChangePoller (if the server has one) about itself.

    NOTE: while a request is being answered, its worker thread writes and flushes the response
    itself (holding the channel's output lock). Stock waitress still asks poll() for POLLOUT on
    that socket, which is always ready, so the main loop spins on a lock it cannot take, holding
    the GIL: measured, the main thread burned a whole core and GET / fell to a few hundred
    requests/s. Here the main loop only waits to write when no request is running (the worker
    pulls the loop's trigger when it finishes) or when a huge response must be drained while the
    worker waits at the high-water mark.
    """

    def writable(self) -> bool:
        if self.requests and self.total_outbufs_len < self.adj.outbuf_high_watermark:
            return bool(self.will_close)
        return super().writable()

    def service(self) -> None:
        _answering.channel = self
        try:
            super().service()
        finally:
            _answering.channel = None

    def add_channel(self, map=None) -> None:
        super().add_channel(map)
        poller = getattr(self.server, "change_poller", None)
        if poller is not None:
            poller.touched(self._fileno)

    def del_channel(self, map=None) -> None:
        descriptor = self._fileno
        super().del_channel(map)
        poller = getattr(self.server, "change_poller", None)
        if poller is not None:
            poller.forget(descriptor)


class ChangePoller:
    """One pass of the serving loop at a time (poll()), for a server whose channels are
    QuietChannels; close() hands the server back to waitress's own loop. Linux only (epoll):
    see available()."""

    @staticmethod
    def available() -> bool:
        return hasattr(select, "epoll")

    def __init__(self, server: BaseWSGIServer) -> None:
        self._server = server
        self._map = server._map
        self._epoll = select.epoll()
        self._registered: dict[int, tuple[object, int]] = {}  # descriptor -> (dispatcher, events)
        # Appended to by request threads, emptied by the loop: deque's append and popleft are
        # atomic, a set's iteration is not.
        self._touched: collections.deque[int] = collections.deque()
        self._fired: list[int] = []
        self._next_full_check = 0.0
        # The listening socket and the trigger: not connections, few, asked every pass.
        self._others = [fd for fd, dispatcher in self._map.items() if not isinstance(dispatcher, HTTPChannel)]
        self._pull_trigger = server.pull_trigger
        server.pull_trigger = self._pull_trigger_for
        server.change_poller = self

    def close(self) -> None:
        del self._server.pull_trigger  # the class's own again
        del self._server.change_poller
        self._epoll.close()

    def touched(self, descriptor: int | None) -> None:
        if descriptor is not None:
            self._touched.append(descriptor)

    def forget(self, descriptor: int | None) -> None:
        """A connection is closing (its descriptor is still open)."""
        known = self._registered.pop(descriptor, None)
        if known is not None and known[1]:
            try:
                self._epoll.unregister(descriptor)
            except OSError:  # closed already, or epoll is
                pass

    def poll(self, timeout: float) -> None:
        """Ask what may have changed, wait up to `timeout` s for events, handle them."""
        channels = self._map
        now = time.monotonic()
        if now >= self._next_full_check:
            self._next_full_check = now + FULL_CHECK_SECONDS
            for descriptor, (dispatcher, _) in list(self._registered.items()):
                if channels.get(descriptor) is not dispatcher:
                    self.forget(descriptor)
            candidates = set(channels)
        else:
            candidates = set(self._fired)
            candidates.update(self._others)
            touched = self._touched
            while touched:
                candidates.add(touched.popleft())
        for descriptor in candidates:
            dispatcher = channels.get(descriptor)
            if dispatcher is None:
                self.forget(descriptor)
            else:
                self._update(descriptor, dispatcher)
        events = self._epoll.poll(timeout)
        self._fired = [descriptor for descriptor, _ in events]
        for descriptor, flags in events:
            dispatcher = channels.get(descriptor)
            if dispatcher is not None:
                wasyncore.readwrite(dispatcher, flags)

    def _pull_trigger_for(self, *args) -> None:
        channel = getattr(_answering, "channel", None)
        if channel is not None:
            self.touched(channel._fileno)
        self._pull_trigger(*args)

    def _update(self, descriptor: int, dispatcher) -> None:
        """Register what the dispatcher waits for now, as wasyncore.poll2 would ask it."""
        wanted = 0
        if dispatcher.readable():
            wanted |= _READ
        if dispatcher.writable() and not dispatcher.accepting:
            wanted |= _WRITE
        known = self._registered.get(descriptor)
        # NOTE: another dispatcher on a known descriptor: the old one was closed, and the
        # kernel dropped its registration with it.
        current = known[1] if known is not None and known[0] is dispatcher else 0
        if known is not None and known[0] is dispatcher and current == wanted:
            return
        epoll = self._epoll
        try:
            if wanted and current:
                epoll.modify(descriptor, wanted)
            elif wanted:
                epoll.register(descriptor, wanted)
            else:
                # NOTE: poll2 leaves out a dispatcher that waits for nothing; so must epoll, or
                # it would still report a hang-up of a client whose request is being answered.
                epoll.unregister(descriptor)
        except FileExistsError:  # registered after all (a dispatcher we had not seen yet)
            epoll.modify(descriptor, wanted)
        except FileNotFoundError:  # not registered after all
            if wanted:
                epoll.register(descriptor, wanted)
        except OSError:  # the descriptor is closed: the dispatcher is on its way out
            self._registered.pop(descriptor, None)
            return
        self._registered[descriptor] = (dispatcher, wanted)
