"""`maxtwo serve` with POST /increment answered the synchronous way, for bench/increment.py only.

    python -m bench.sync_increment --port 8002 --threads 8 [--interval 3600] [--seed-count 0]

The issue's "synchronous approach": one transaction per request doing the same upsert, in the
same server. Everything is the daemon as deployed (settings from MAXTWO_* variables: engine,
start-up, transport, waitress settings, the app's middleware and error handlers), except that
the lane is off and POST /increment's resource calls `core.counters.increment()` in the
request thread, a transaction of its own per request (the same validation, the same
`add_increments` as a batch of one: without an Idempotency-Key, the one upsert statement in
autocommit, as maxtwo's batches), instead of handing the increment to the batcher.
"""

from __future__ import annotations

import argparse
import os

import falcon

import daemon.server
from daemon.resources import MAX_INCREMENT_BODY, parse_increment
from maxtwo_cli.core.counters import CounterOverflowError, IdempotencyKeyReusedError, increment
from maxtwo_cli.core.settings import Settings

_create_app = daemon.server.create_app


class SynchronousIncrementResource:
    """POST /increment: 202 once the increment's own transaction has committed."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        item = parse_increment(req.content_type, req.bounded_stream.read(MAX_INCREMENT_BODY + 1),
                               req.get_header("Idempotency-Key"))
        try:
            increment(self._engine, item.key, item.value, item.idempotency_key)
        except CounterOverflowError as ex:
            raise falcon.HTTPConflict(description=str(ex)) from None
        except IdempotencyKeyReusedError as ex:
            raise falcon.HTTPUnprocessableEntity(description=str(ex)) from None
        resp.status = falcon.HTTP_202
        resp.data = b""


def create_synchronous_app(settings: Settings, engine, **kwargs) -> falcon.App:
    """The daemon's app, its POST /increment route replaced (falcon's add_route on a template
    already routed replaces its resource). `engine`: the daemon's request engine, pooled for
    every request thread."""
    app = _create_app(settings, engine, **kwargs)
    app.add_route("/increment", SynchronousIncrementResource(engine))
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sync_increment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--interval", type=float, default=3600.0)
    parser.add_argument("--seed-count", type=int, default=0)
    args = parser.parse_args()
    settings = Settings(database_url=os.environ["MAXTWO_DATABASE_URL"], host=args.host, port=args.port,
                        threads=args.threads, interval=args.interval, seed_count=args.seed_count)
    # NOTE: daemon.server builds its app inside serve_requests() with the create_app it imported;
    # production offers no way to swap a resource, and a copy of serve() here would drift from the
    # daemon it stands in for. So this bench-only process rebinds that one name, before serving.
    daemon.server.create_app = create_synchronous_app
    # NOTE: without the lane, which would batch POST /increment itself: every request in a
    # request thread of its own, its own transaction.
    daemon.server.serve(settings, daemon.server.TransportOptions(lane=False))


if __name__ == "__main__":
    main()
