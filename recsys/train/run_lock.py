"""One training at a time per run folder.

Two trainings writing one `train.output_dir` interleave checkpoints, prune each other's files and leave a summary
naming a checkpoint the other run wrote. `RunFolderLock` takes an exclusive `flock` on `<output_dir>/.lock` for the
life of the process (the kernel drops it when the process ends, however it ends, so a killed run leaves no stale
lock) and writes who holds it into the file, so the second run's error names the first.

Limits: `flock` is advisory (it stops our jobs, not `rm -r`), and on some network file systems it only excludes
processes of one host.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from recsys.errors import RecsysError

LOCK_NAME = ".lock"


class RunFolderLock:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunFolderLock":
        """Take the lock or raise RecsysError naming the process that holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise RecsysError(f"train.output_dir {self.folder} is in use by another training ({holder}); wait for "
                              f"it to end or use another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "command": " ".join(sys.argv)[:500]}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode("utf-8"))
        return f"pid {info['pid']} on {info['host']} since {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its details yet"


def lock_for_this_rank(folder: Path) -> Optional[RunFolderLock]:
    """The held lock on global rank 0 ($RANK, 0 when unset); None on the other ranks, which write nothing to the
    run folder before rank 0 has joined the process group (and so holds the lock)."""
    if os.environ.get("RANK", "0") != "0":
        return None
    return RunFolderLock(folder).acquire()
