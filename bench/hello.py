"""The hello-world baseline for GET / (and the do-nothing one for POST /increment): a Falcon app
that answers a constant body, on one of two transports:

- `--transport maxtwo` (the default): exactly the transport `maxtwo serve` answers on, built by
  the daemon's own code (`daemon.server.listen()`, `open_transport()` with the default
  `TransportOptions`, `lanes_for()`): the busy-poll fix, the strict parser, the change poller
  (with its one pull per batch), the backlog accepted per turn, and the lane, which takes GET /
  and POST /increment as it takes maxtwo's. Its submit answers at once with no outcome (no
  database), and the app ignores the outcome. So a GET / here travels a maxtwo GET /'s path
  minus the database work and the app's own (routing aside): whatever separates its req/s from
  `maxtwo serve`'s is maxtwo's own work per request.
- `--transport stock`: waitress as shipped (`waitress.create_server(...).run()`), on the same
  documented settings (threads, connection limit, backlog, channel timeout, poll), none of
  maxtwo's hooks: what a plain waitress deployment of a hello-world app serves.

POST /increment reads the body (waitress has buffered it already; on maxtwo's transport the lane
has read it, as it does maxtwo's) and answers 202 with no body, without parsing it or touching a
database: the peers' "simple" baseline (bench/increment.py).

    python -m bench.hello --port 8000 --threads 16 [--transport stock]
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

import falcon
import waitress

from daemon.app import batch_timeout
from daemon.batcher import MAX_BATCH
from daemon.server import (
    DRAIN_SECONDS,
    StopRequest,
    TransportOptions,
    configure_logging,
    lanes_for,
    listen,
    open_transport,
)
from daemon.transport import LaneRequest, waitress_settings
from maxtwo_cli.core.settings import DEFAULT_THREADS, Settings

MAXTWO_TRANSPORT = "maxtwo"
STOCK_WAITRESS = "stock"


class EmptyAnswerResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"users": [], "timestamp": None}


class DoNothingIncrementResource:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.bounded_stream.read()
        resp.status = falcon.HTTP_202
        resp.data = b""


def create_app() -> falcon.App:
    app = falcon.App()
    app.add_route("/", EmptyAnswerResource())
    app.add_route("/increment", DoNothingIncrementResource())
    return app


def no_outcomes(requests: list[LaneRequest], wake: Callable[[], None]) -> list[None]:
    """The lane's submit without a database: nothing to wait for, nothing to hand the app."""
    return [None] * len(requests)


def ready(outcomes: list[None]) -> bool:
    """The lane's ready: the outcomes are there at once."""
    return True


def collected(outcomes: list[None], timeout: float) -> list[None]:
    """The lane's collect: the outcomes are there already."""
    return outcomes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hello", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--transport", choices=(MAXTWO_TRANSPORT, STOCK_WAITRESS), default=MAXTWO_TRANSPORT)
    args = parser.parse_args(argv)
    # The daemon's logging too: it silences waitress's per-request queue-depth warning, which
    # would otherwise cost this app time under load that maxtwo does not spend.
    configure_logging()
    settings = Settings(database_url="sqlite:///unused.db", host=args.host, port=args.port, threads=args.threads)
    listener = listen(settings)
    if args.transport == STOCK_WAITRESS:
        server = waitress.create_server(create_app(), sockets=[listener], **waitress_settings(settings.threads))
        # waitress's run() closes the server on SystemExit (the harness stops it with SIGTERM).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server.run()
        return
    lanes = lanes_for(no_outcomes, ready, collected, max_batch=MAX_BATCH, max_wait=batch_timeout(settings))
    transport = open_transport(create_app(), listener, settings.threads, lanes, TransportOptions())
    stop = StopRequest().install()
    transport.serve_until(stop.requested)  # until SIGTERM (the harness stops it)
    transport.drain(DRAIN_SECONDS)


if __name__ == "__main__":
    main()
