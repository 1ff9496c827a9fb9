"""Where log records go: a short console, and everything in a log file beside the job's outputs.

Default console (rank 0): records logged with `extra=CONSOLE` (the plan table, one line per epoch, the final
table, "resumed from ..."), every WARNING or worse from `recsys.*`, every ERROR from anyone; progress bars are
tqdm's and go to stderr directly. Other ranks show only recsys warnings and errors.
The log file (`<run folder>/logs/<job>.rank<r>.log`, attached by `attach_log_file` once the job knows its folder)
gets every record at INFO and up from every library -- torchrec's and fbgemm's INFO lines, the planner's tables,
Python warnings (FutureWarnings and the like) -- including the ones emitted before the folder was known, which
are held in a bounded buffer until then.
`--verbose` (or $RECSYS_LOG_LEVEL) brings all of it back to the console.
"""
from __future__ import annotations

import collections
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Deque, Optional, Union

from recsys.errors import RecsysError

__all__ = ["CONSOLE", "setup_logging", "attach_log_file", "silence_known_warnings", "KNOWN_HARMLESS_WARNINGS",
           "log_file_path"]

CONSOLE = {"console": True}  # `log.info(..., extra=CONSOLE)`: this line belongs on the default console

# Warnings shown to be harmless, each with the test that shows it; filtered by exact message, never by category.
KNOWN_HARMLESS_WARNINGS = [
    # fbgemm's CPU `dense_embedding_codegen_lookup_function` (the kernel of a `data_parallel` table) is registered
    # on the CPU dispatch key and builds its own autograd node inside, so the dispatcher's "no autograd kernel"
    # check fires although the gradient is right: tests/train/test_known_warnings.py compares it with
    # torch.nn.functional.embedding_bag's gradient.
    (r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered", UserWarning),
]

_BUFFER_RECORDS = 20_000  # records kept until the log file is attached (a job's startup emits a few hundred)


class _ConsoleFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.name == "recsys" or record.name.startswith("recsys."):
            if record.levelno >= logging.WARNING:
                return True
            return self.rank == 0 and bool(getattr(record, "console", False))
        return False


class _Buffer(logging.Handler):
    """Holds the newest records until a file handler takes them (bounded: a job that never attaches a file
    loses the oldest ones, never memory)."""

    def __init__(self, capacity: int = _BUFFER_RECORDS):
        super().__init__(logging.INFO)
        self.records: Deque[logging.LogRecord] = collections.deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_state = {"rank": 0, "buffer": None, "file": None, "console": None, "format": ""}


def _rank_from_env() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def silence_known_warnings() -> None:
    """Ignore exactly the warnings in KNOWN_HARMLESS_WARNINGS (idempotent)."""
    for message, category in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _route_torch_logs() -> None:
    """torch's logging (`torch._logging`) gives the `torch` and `torch.distributed` loggers their own stderr
    handlers and stops propagation; hand their records to the root logger so they follow the rules above."""
    if "torch" not in sys.modules:
        return
    for name in ("torch", "torch.distributed"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.propagate = True


def setup_logging(rank: Optional[int] = None, level: Optional[Union[int, str]] = None,
                  verbose: bool = False) -> None:
    """Console + buffered file logging for a job (see the module docstring). `rank` defaults to $RANK; `level`
    or $RECSYS_LOG_LEVEL makes the console show every record at that level, as `verbose` does at INFO (rank 0)
    / WARNING (other ranks)."""
    rank = _rank_from_env() if rank is None else rank
    chosen = level if level is not None else os.environ.get("RECSYS_LOG_LEVEL")
    if chosen is None:
        console_level = logging.INFO if rank == 0 else logging.WARNING
    elif isinstance(chosen, str):
        console_level = logging.getLevelName(chosen.strip().upper())
        if not isinstance(console_level, int):
            raise RecsysError(f"unknown log level '{chosen}' (use DEBUG, INFO, WARNING or ERROR)")
    else:
        console_level = int(chosen)
    full = verbose or chosen is not None
    prefix = f"[rank {rank}] " if rank != 0 else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):  # jobs may run in-process (tests) more than once: replace, never stack
        root.removeHandler(h)
        if isinstance(h, logging.FileHandler):
            h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(fmt if full else logging.Formatter("%(message)s"))
    if not full:
        console.addFilter(_ConsoleFilter(rank))
    buffer = _Buffer()
    root.addHandler(console)
    root.addHandler(buffer)
    root.setLevel(min(console_level, logging.INFO))
    logging.getLogger("recsys").setLevel(min(console_level, logging.INFO))
    _state.update(rank=rank, buffer=buffer, file=None, console=console, format=fmt)
    # Python warnings become `py.warnings` records (file by default). Off-then-on: captureWarnings(True) is a no-op
    # when logging thinks it is already on, even after something (warnings.catch_warnings) restored showwarning
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    silence_known_warnings()
    _route_torch_logs()


def log_file_path(folder: Union[str, Path], job: Optional[str] = None, rank: Optional[int] = None) -> Path:
    job = job or Path(sys.argv[0]).stem or "job"
    rank = _state["rank"] if rank is None else rank
    return Path(folder) / "logs" / f"{job}.rank{rank}.log"


def attach_log_file(folder: Union[str, Path], job: Optional[str] = None) -> Optional[Path]:
    """Start writing `<folder>/logs/<job>.rank<r>.log` (appended: a resumed run keeps its history), beginning
    with the records buffered so far. Returns the path; None when setup_logging was not called."""
    buffer: Optional[_Buffer] = _state["buffer"]
    if buffer is None:
        return None
    _route_torch_logs()  # torch may have been imported since setup_logging
    path = log_file_path(folder, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    old = _state["file"]
    if old is not None:
        root.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(_state["format"])
    for record in buffer.records:
        handler.handle(record)
    buffer.records.clear()
    root.removeHandler(buffer)
    root.addHandler(handler)
    _state["file"] = handler
    return path
