"""A real waitress server (daemon/transport.py) with a WSGI app, in a thread of the test
process, on a free port: for tests that speak HTTP over real sockets but need to look inside."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from collections.abc import Callable, Iterator

from daemon.batcher import Batchers
from daemon.server import TransportOptions, batched_routes, open_transport
from daemon.transport import Lane, Transport


class Running:
    def __init__(self, transport: Transport, listener: socket.socket, stop: threading.Event,
                 loop: threading.Thread) -> None:
        self.transport = transport
        self.server = transport.server
        self.port = listener.getsockname()[1]
        self.stop = stop
        self.loop = loop  # serving until stop is set
        self.connections: list[http.client.HTTPConnection] = []

    def connect(self, timeout: float = 30) -> http.client.HTTPConnection:
        """A client connection, closed when the server stops if the test did not close it."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        self.connections.append(connection)
        return connection


@contextlib.contextmanager
def running(
    app: Callable,
    *,
    batchers: Batchers | None = None,
    threads: int = 4,
    options: TransportOptions = TransportOptions(),
    on_turn: Callable[[], None] = lambda: None,
    lanes: list[Lane] | None = None,
    on_refused: Callable[[int], None] | None = None,
) -> Iterator[Running]:
    """`batchers`: GET / and POST /increment go through the lanes with them (if options.lane);
    `lanes`: through these lanes instead. `on_refused`: see transport.Transport."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    if lanes is None:
        lanes = batched_routes(batchers) if batchers is not None else []
    transport = open_transport(app, listener, threads, lanes, options, on_refused=on_refused)
    stop = threading.Event()
    loop = threading.Thread(target=transport.serve_until, args=(stop.is_set, on_turn), daemon=True)
    loop.start()
    served = Running(transport, listener, stop, loop)
    try:
        yield served
    finally:
        for connection in served.connections:
            connection.close()
        stop.set()
        loop.join(5)
        transport.close()
