"""The online ranking service: FastAPI on uvicorn, concurrent requests micro-batched into one model call.

    POST /rank      {"domain", "context": {...}, "candidates": [{...}], "top_k"?} -> candidates sorted by score
    GET  /healthz   liveness
    GET  /metadata  domains, request fields, features, the bundle's hash

Micro-batching without waiting: one scorer thread takes every request queued when it becomes free and scores them in
one call (up to `max_batch_rows` candidates), so a lone request is scored at once and requests arriving during a
model call share the next one. The request body is parsed and validated in one step by pydantic-core
(`model_validate_json`) and answers are serialised with orjson. A bad request gets a 4xx whose `field` names the
offending field; the server keeps serving. One JSON access-log line per request on stdout (logger `recsys.serving.access`).
On SIGTERM/SIGINT uvicorn stops accepting, finishes in-flight requests, then the scorer thread is stopped.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError

from recsys.errors import RecsysError
from recsys.logs import CONSOLE
from recsys.serving.ranker import Ranker, RequestError

log = logging.getLogger("recsys.serving.server")
access = logging.getLogger("recsys.serving.access")


def setup_access_log(stream=None, enabled: bool = True) -> None:
    """Access records as bare JSON lines on stdout (one per request), apart from the job's console and log file."""
    import sys

    for h in list(access.handlers):
        access.removeHandler(h)
    access.propagate = False
    access.setLevel(logging.INFO if enabled else logging.WARNING)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)

DEFAULT_MAX_BODY = 1 << 20  # bytes
DEFAULT_MAX_BATCH_ROWS = 8192  # candidates per model call


class MicroBatcher:
    """Runs `fn(items) -> results` in one thread over everything queued when it is free."""

    def __init__(self, fn: Callable[[Sequence[Any]], Sequence[Any]], size: Callable[[Any], int], max_rows: int):
        self.fn, self.size, self.max_rows = fn, size, int(max_rows)
        self._queue: Deque[Tuple[Any, asyncio.Future, asyncio.AbstractEventLoop]] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self.calls = 0
        self.items = 0
        self._thread = threading.Thread(target=self._run, name="scorer", daemon=True)
        self._thread.start()

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            if self._stop:
                raise RuntimeError("shutting down")
            self._queue.append((item, fut, loop))
            self._cv.notify()
        return await fut

    def _take(self) -> List[Tuple[Any, asyncio.Future, asyncio.AbstractEventLoop]]:
        with self._cv:
            while not self._queue and not self._stop:
                self._cv.wait()
            batch = [self._queue.popleft()] if self._queue else []
            rows = self.size(batch[0][0]) if batch else 0
            while self._queue and rows + self.size(self._queue[0][0]) <= self.max_rows:
                item = self._queue.popleft()
                rows += self.size(item[0])
                batch.append(item)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return  # stopped and drained
            self.calls += 1
            self.items += len(batch)
            try:
                results = self.fn([b[0] for b in batch])
                for (_, fut, loop), r in zip(batch, results):
                    loop.call_soon_threadsafe(_resolve, fut, r, None)
            except Exception as e:  # noqa: BLE001 -- delivered to the requests, which answer it
                if len(batch) > 1:  # one request's problem must not fail its neighbours: score them one by one
                    for item, fut, loop in batch:
                        try:
                            loop.call_soon_threadsafe(_resolve, fut, self.fn([item])[0], None)
                        except Exception as e1:  # noqa: BLE001
                            loop.call_soon_threadsafe(_resolve, fut, None, e1)
                else:
                    loop = batch[0][2]
                    loop.call_soon_threadsafe(_resolve, batch[0][1], None, e)

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the thread."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)


def _resolve(fut: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
    if fut.done():  # the client went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _json(status: int, obj: Any) -> Response:
    return Response(content=orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def _error(status: int, field: str, message: str, errors: Optional[list] = None) -> Response:
    body = {"error": f"{field}: {message}" if field else message, "field": field}
    if errors:
        body["errors"] = errors
    return _json(status, body)


def _loc(loc: Sequence[Any]) -> str:
    return ".".join(str(x) for x in loc) if loc else "body"


def _validation_response(e: ValidationError) -> Response:
    errs = [{"field": _loc(err.get("loc", ())), "message": err.get("msg", ""), "type": err.get("type", "")}
            for err in e.errors(include_url=False, include_context=False, include_input=False)]
    first = errs[0] if errs else {"field": "body", "message": "invalid request"}
    if first.get("type") == "json_invalid":
        return _error(400, "body", f"not valid JSON ({first['message']})")
    return _error(422, first["field"], first["message"], errs)


def create_app(ranker: Ranker, max_body_bytes: int = DEFAULT_MAX_BODY,
               max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS) -> FastAPI:
    RankRequest = ranker.RankRequest
    state = {"batcher": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["batcher"] = MicroBatcher(ranker.rank, lambda r: len(r.candidates), max_batch_rows)
        log.info("serving %s (%d domains), pid %d", ranker.spec.name, len(ranker.spec.domains), os.getpid(),
                 extra=CONSOLE)
        try:
            yield
        finally:
            state["batcher"].close()
            log.info("shut down: scorer stopped after %d model calls for %d requests", state["batcher"].calls,
                     state["batcher"].items, extra=CONSOLE)

    app = FastAPI(title=f"recsys ranking: {ranker.spec.name}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    meta = ranker.metadata()

    def log_access(request: Request, status: int, t0: float, **extra: Any) -> None:
        if access.isEnabledFor(logging.INFO):
            rec = {"ts": round(time.time(), 3), "method": request.method, "path": request.url.path, "status": status,
                   "ms": round((time.perf_counter() - t0) * 1e3, 3),
                   "client": request.client.host if request.client else None, **extra}
            access.info(orjson.dumps(rec).decode())

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        t0 = time.perf_counter()
        log_access(request, 200, t0)
        return _json(200, {"status": "ok"})

    @app.get("/metadata")
    async def metadata(request: Request) -> Response:
        t0 = time.perf_counter()
        log_access(request, 200, t0)
        return _json(200, meta)

    @app.post("/rank")
    async def rank(request: Request) -> Response:
        t0 = time.perf_counter()
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            log_access(request, 413, t0)
            return _error(413, "body", f"{declared} bytes exceeds the limit of {max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                log_access(request, 413, t0)
                return _error(413, "body", f"more than {max_body_bytes} bytes (the limit)")
        try:
            req = RankRequest.model_validate_json(bytes(body))
        except ValidationError as e:
            resp = _validation_response(e)
            log_access(request, resp.status_code, t0)
            return resp
        try:
            ranked = await state["batcher"].submit(req)
        except RequestError as e:
            log_access(request, 422, t0)
            return _error(422, e.loc, e.message)
        except RecsysError as e:
            log_access(request, 422, t0)
            return _error(422, "", str(e))
        log_access(request, 200, t0, domain=req.domain, candidates=len(req.candidates))
        return _json(200, {"domain": req.domain, "ranked": ranked})

    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for `--workers N` (each worker process loads the bundle named by $RECSYS_BUNDLE)."""
    from recsys.logs import setup_logging

    setup_logging(verbose=os.environ.get("RECSYS_VERBOSE", "0") == "1")  # a worker starts with no log handlers
    setup_access_log(enabled=os.environ.get("RECSYS_ACCESS_LOG", "1") == "1")
    ranker = Ranker.load(os.environ["RECSYS_BUNDLE"],
                         max_candidates=int(os.environ.get("RECSYS_MAX_CANDIDATES", "1000")),
                         threads=int(os.environ.get("RECSYS_THREADS", "0")) or None)
    return create_app(ranker, max_body_bytes=int(os.environ.get("RECSYS_MAX_BODY", str(DEFAULT_MAX_BODY))),
                      max_batch_rows=int(os.environ.get("RECSYS_MAX_BATCH_ROWS", str(DEFAULT_MAX_BATCH_ROWS))))
