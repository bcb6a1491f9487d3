"""`maxtwo serve` with some of the transport's speed hooks turned off, for bench/hooks.py only.

    python -m bench.serve_variant --port 8001 [--no-lane] [--no-change-poller] [--no-quiet-channel]
        [--no-one-pull] [--no-accept-backlog]

Everything else is `maxtwo serve` as deployed (settings from MAXTWO_* variables); production has
no way to turn a hook off.
"""

from __future__ import annotations

import argparse
import os

from daemon.server import TransportOptions, serve
from maxtwo_cli.core.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--interval", type=float, default=3600.0)
    parser.add_argument("--seed-count", type=int, default=0)
    for hook in ("lane", "change-poller", "quiet-channel", "one-pull", "accept-backlog"):
        parser.add_argument(f"--no-{hook}", action="store_true")
    args = parser.parse_args()
    settings = Settings(database_url=os.environ["MAXTWO_DATABASE_URL"], host=args.host, port=args.port,
                        threads=args.threads, interval=args.interval, seed_count=args.seed_count)
    serve(settings, TransportOptions(lane=not args.no_lane, change_poller=not args.no_change_poller,
                                     quiet_channel=not args.no_quiet_channel, one_pull=not args.no_one_pull,
                                     accept_backlog=not args.no_accept_backlog))


if __name__ == "__main__":
    main()
