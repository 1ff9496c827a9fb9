#!/usr/bin/env python
"""Serve a bundle as an HTTP JSON ranking service (FastAPI + uvicorn).

    python jobs/serve.py --bundle bundles/amazon_sr [--host 127.0.0.1] [--port 8000] [--workers 1]

POST /rank ranks a request's candidates, GET /healthz, GET /metadata (see docs/serving.md for the request format).
Concurrent requests are micro-batched into one model call per worker process. Ctrl-C / SIGTERM shut down
gracefully (in-flight requests are answered first).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys.cli import run_main, setup_logging  # noqa: E402
from recsys.logs import CONSOLE  # noqa: E402


def main(argv=None) -> int:
    from recsys.serving.ranker import DEFAULT_MAX_CANDIDATES
    from recsys.serving.server import DEFAULT_MAX_BATCH_ROWS, DEFAULT_MAX_BODY

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="processes, each with its own copy of the model")
    p.add_argument("--max-candidates", type=int, default=DEFAULT_MAX_CANDIDATES)
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    p.add_argument("--max-batch-rows", type=int, default=DEFAULT_MAX_BATCH_ROWS, help="candidates per model call")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--no-access-log", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show uvicorn's and the libraries' log lines")
    args = p.parse_args(argv)
    setup_logging(verbose=args.verbose)
    import logging

    import uvicorn

    from recsys.serving.bundle import verify
    from recsys.serving.server import setup_access_log

    if args.workers < 1:
        raise SystemExit("error: --workers must be >= 1")
    verify(args.bundle)  # a bad bundle fails here, with one line, before any worker starts
    setup_access_log(enabled=not args.no_access_log)
    logging.getLogger("recsys.serving").info("listening on http://%s:%d (%d worker(s))", args.host, args.port,
                                             args.workers, extra=CONSOLE)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    common = dict(host=args.host, port=args.port, access_log=False, log_config=None, timeout_graceful_shutdown=30)
    if args.workers == 1:
        from recsys.serving.ranker import Ranker
        from recsys.serving.server import create_app

        ranker = Ranker.load(args.bundle, max_candidates=args.max_candidates, threads=threads)
        app = create_app(ranker, max_body_bytes=args.max_body_bytes, max_batch_rows=args.max_batch_rows)
        uvicorn.run(app, **common)
    else:
        os.environ.update(RECSYS_BUNDLE=str(args.bundle.resolve()), RECSYS_MAX_CANDIDATES=str(args.max_candidates),
                          RECSYS_MAX_BODY=str(args.max_body_bytes), RECSYS_THREADS=str(threads),
                          RECSYS_ACCESS_LOG="0" if args.no_access_log else "1")
        uvicorn.run("recsys.serving.server:app_from_env", factory=True, workers=args.workers, **common)
    return 0


if __name__ == "__main__":
    run_main(main)
