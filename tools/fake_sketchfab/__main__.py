"""CLI: ``python -m fake_sketchfab --models 200 --seed 0 --port 8765 [--faults ...]``.

Serves until SIGTERM or SIGINT. ``--ready-file`` lets scripts wait for the
listening socket instead of sleeping.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path

from .catalog import Catalog, FaultConfig
from .server import start_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fake_sketchfab", description=__doc__)
    parser.add_argument("--models", type=int, default=200, help="catalog size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--media-host", default="localhost", help="host name used in thumbnail URLs")
    parser.add_argument("--token", help="if set, a different Authorization token gets 401")
    parser.add_argument(
        "--faults",
        type=FaultConfig.parse,
        default=FaultConfig(),
        help='e.g. "rate_limit_every=10,rate_limit_burst=2,broken_thumbnails,bad_records,latency_ms=20"',
    )
    parser.add_argument("--ready-file", type=Path, help="write {api_base_url, media_host, port} JSON here")
    parser.add_argument("--publish-every", type=float, default=0.0, help="publish new models every S seconds")
    parser.add_argument("--publish-count", type=int, default=1, help="models per --publish-every tick")
    parser.add_argument("--listing-cap", type=int, default=10_000, help="results one query yields at most")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    catalog = Catalog.generate(args.models, seed=args.seed, faults=args.faults)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with start_server(
        catalog,
        args.host,
        args.port,
        token=args.token,
        media_host=args.media_host,
        verbose=args.verbose,
        listing_cap=args.listing_cap,
    ) as server:
        print(f"api_base_url={server.api_base_url}", flush=True)
        print(f"media_host={server.media_host}", flush=True)
        if args.ready_file:
            info = {"api_base_url": server.api_base_url, "media_host": server.media_host, "port": server.port}
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, args.ready_file)
        while not stop.wait(args.publish_every or None):
            server.publish(args.publish_count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
