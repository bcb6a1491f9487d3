"""The hello-world baseline for GET /: a Falcon app that answers a constant body, served by
waitress through maxtwo's own `daemon.server.bind()`, so every waitress setting (threads,
connection limit, backlog, channel timeout, poll) is the daemon's by construction. Whatever
separates its req/s from `maxtwo serve`'s is maxtwo's own work per request.

    python -m bench.hello --port 8000 --threads 16
"""

from __future__ import annotations

import argparse

import falcon

from daemon.server import bind, configure_logging
from maxtwo_cli.core.settings import Settings


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
    parser.add_argument("--threads", type=int, default=Settings().threads)
    args = parser.parse_args(argv)
    # The daemon's logging too: it silences waitress's per-request queue-depth warning, which
    # would otherwise cost this app time under load that maxtwo does not spend.
    configure_logging()
    server = bind(create_app(), Settings(host=args.host, port=args.port, threads=args.threads))
    server.run()  # until SIGTERM (the harness stops it)


if __name__ == "__main__":
    main()
