"""The hello-world baseline for GET / (and the do-nothing one for POST /increment): a Falcon app
that answers a constant body, served by maxtwo's own transport (`daemon.server.listen()` and `daemon.transport.Transport`), so every
waitress setting (threads, connection limit, backlog, channel timeout, poll) and the busy-poll
fix are the daemon's by construction; the query lane (there is no query to batch) and the
change poller (below) are left out. Whatever separates its req/s from `maxtwo serve`'s is maxtwo's own work per
request.

POST /increment reads the body (waitress has buffered it already: reading it costs a copy, as it
does maxtwo) and answers 202 with no body, without parsing it or touching a database: the
peers' "simple" baseline (bench/increment.py).

    python -m bench.hello --port 8000 --threads 16
"""

from __future__ import annotations

import argparse

import falcon

from daemon.server import DRAIN_SECONDS, StopRequest, configure_logging, listen
from daemon.transport import Transport
from maxtwo_cli.core.settings import DEFAULT_THREADS, Settings


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hello", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    args = parser.parse_args(argv)
    # The daemon's logging too: it silences waitress's per-request queue-depth warning, which
    # would otherwise cost this app time under load that maxtwo does not spend.
    configure_logging()
    settings = Settings(database_url="sqlite:///unused.db", host=args.host, port=args.port, threads=args.threads)
    # NOTE: waitress's own serving loop, as before the transport was split out: the hello-world
    # app was 4-12 % slower on the ChangePoller (bench/NOTES.md), so the ratio gains only what
    # maxtwo gains.
    server = Transport(create_app(), listen(settings), threads=settings.threads, change_poller=False)
    stop = StopRequest().install()
    server.serve_until(stop.requested)  # until SIGTERM (the harness stops it)
    server.drain(DRAIN_SECONDS)


if __name__ == "__main__":
    main()
