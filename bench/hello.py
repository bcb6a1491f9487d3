"""The hello-world baseline for GET /: a Falcon app that answers a constant body, served by
waitress through maxtwo's own `daemon.server.bind()`, so every waitress setting (threads,
connection limit, backlog, channel timeout, poll) is the daemon's by construction. Whatever
separates its req/s from `maxtwo serve`'s is maxtwo's own work per request.

    python -m bench.hello --port 8000 --threads 16 [--workers 2]

`--workers N`: N processes on one listening socket, as `maxtwo serve --workers N` runs them
(the same listen() and bind(), forked the same way before any thread starts).
"""

from __future__ import annotations

import argparse

import falcon

import os

from daemon.server import bind, configure_logging, listen
from maxtwo_cli.core.settings import DEFAULT_THREADS, Settings


class EmptyAnswerResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"users": [], "timestamp": None}


def create_app() -> falcon.App:
    app = falcon.App()
    app.add_route("/", EmptyAnswerResource())
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hello", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    # The daemon's logging too: it silences waitress's per-request queue-depth warning, which
    # would otherwise cost this app time under load that maxtwo does not spend.
    configure_logging()
    settings = Settings(database_url="sqlite:///unused.db", host=args.host, port=args.port, threads=args.threads)
    listener = listen(settings)
    for _ in range(args.workers - 1):
        if os.fork() == 0:
            break  # a child serves too; SIGTERM from the harness reaches the whole process group
    bind(create_app(), settings, listener).run()  # until SIGTERM (the harness stops it)


if __name__ == "__main__":
    main()
