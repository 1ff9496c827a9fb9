#!/usr/bin/env python
"""Serve a bundle as an HTTP JSON ranking service (FastAPI + uvicorn).

    python jobs/serve.py --bundle bundles/amazon_sr [--host 127.0.0.1] [--port 8000] [--workers N] [--threads T]

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

from recsys import hardware  # noqa: E402
from recsys.cli import run_main, setup_logging  # noqa: E402
from recsys.logs import CONSOLE  # noqa: E402


# One single-threaded worker per core: each worker has its own GIL, event loop and scorer, so parsing, mapping and
# the model run in parallel, and one thread per model call avoids OpenMP hand-offs on requests of ~100 rows.
# Measured on amazon-sr, 2 cores (docs/serving.md): 2 workers x 1 thread served 44.7k candidates/s at 32 clients
# against 23.1k for 1 worker x 2 threads, p99 at 8 clients 35 ms against 60. Each worker holds a copy of the
# model, hence the cap; pass --workers for a bundle too large to copy.
MAX_AUTO_WORKERS = 8


def auto_workers(cores: int) -> int:
    return max(1, min(cores, MAX_AUTO_WORKERS))


def main(argv=None) -> int:
    from recsys.serving.ranker import DEFAULT_MAX_CANDIDATES
    from recsys.serving.server import DEFAULT_MAX_BATCH_ROWS, DEFAULT_MAX_BODY

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=0,
                   help="processes, each with its own copy of the model (default: one per usable core, at most "
                        f"{MAX_AUTO_WORKERS})")
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

    if args.workers < 0 or args.threads < 0:
        raise SystemExit("error: --workers and --threads must be >= 1 (or 0: automatic)")
    cores = hardware.cpu_info().cores
    workers = args.workers or auto_workers(cores)
    verify(args.bundle)  # a bad bundle fails here, with one line, before any worker starts
    setup_access_log(enabled=not args.no_access_log)
    threads = args.threads or max(1, cores // workers)
    logging.getLogger("recsys.serving").info("listening on http://%s:%d (%d worker(s) x %d torch thread(s))",
                                             args.host, args.port, workers, threads, extra=CONSOLE)
    common = dict(host=args.host, port=args.port, access_log=False, log_config=None, timeout_graceful_shutdown=30)
    if workers == 1:
        from recsys.serving.ranker import Ranker
        from recsys.serving.server import create_app

        ranker = Ranker.load(args.bundle, max_candidates=args.max_candidates, threads=threads)
        app = create_app(ranker, max_body_bytes=args.max_body_bytes, max_batch_rows=args.max_batch_rows)
        uvicorn.run(app, **common)
    else:
        os.environ.update(RECSYS_BUNDLE=str(args.bundle.resolve()), RECSYS_MAX_CANDIDATES=str(args.max_candidates),
                          RECSYS_MAX_BODY=str(args.max_body_bytes), RECSYS_THREADS=str(threads),
                          RECSYS_MAX_BATCH_ROWS=str(args.max_batch_rows), RECSYS_VERBOSE="1" if args.verbose else "0",
                          RECSYS_ACCESS_LOG="0" if args.no_access_log else "1")
        uvicorn.run("recsys.serving.server:app_from_env", factory=True, workers=workers, **common)
    return 0


if __name__ == "__main__":
    run_main(main)
