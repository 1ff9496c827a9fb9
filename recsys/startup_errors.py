"""Start-up errors under torchrun: shown once per host, and never lost.

Before the process group exists, every rank of a host reads the same spec, arguments and files, so a bad spec fails
on each of them with the same message; printing it from every rank repeats it (8 ranks, 8 lines). The host's first
rank (LOCAL_RANK 0) prints it. The other ranks must not simply stay silent, though: torchrun stops a launch as soon
as one worker exits, so a quiet rank that exits before the first rank has printed gets it killed mid-way and the
user sees no error at all (seen in CI under load).

So the ranks agree through torchrun's own key-value store (the agent's TCPStore, which every worker can reach):
the first rank records what it printed before the group, or "" once it is past that point without an error
(`publish_outcome`); a quiet rank that failed waits for that record, and prints its own message unless the first
rank printed the same one (`shown_by_first_rank`). A rank-specific error (one file unreadable on one rank) is
therefore printed by the rank that met it. Outside torchrun, or without the agent's store, every rank prints.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

__all__ = ["under_torchrun", "is_host_first_rank", "publish_outcome", "shown_by_first_rank"]

# How long a quiet rank waits for the first rank's record. The first rank reaches it after local work only (spec,
# files, the run lock): the bound is for a first rank stuck elsewhere, and when it passes the quiet rank prints its
# own line, so the error is still shown.
WAIT_SECONDS = 300.0

_published = False


def under_torchrun() -> bool:
    return "TORCHELASTIC_RESTART_COUNT" in os.environ and "LOCAL_RANK" in os.environ


def is_host_first_rank() -> bool:
    return os.environ.get("LOCAL_RANK", "0") in ("", "0")


def _key() -> str:
    # the agent's store lives for the whole launch: scope by restart attempt and by host (node rank)
    return f"recsys/startup/{os.environ['TORCHELASTIC_RESTART_COUNT']}/{os.environ.get('GROUP_RANK', '0')}"


def _agent_store(wait_seconds: float):
    """A client of torchrun's agent store, or None where the workers cannot rely on one (then every rank prints)."""
    if not under_torchrun() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=wait_seconds))


def publish_outcome(message: str) -> None:
    """On the host's first rank under torchrun: record the start-up error it has printed ("" = none). Only the first
    call counts (the error path and the later "past start-up" points may both call it)."""
    global _published
    if _published or not is_host_first_rank():
        return
    _published = True
    store = _agent_store(WAIT_SECONDS)
    if store is not None:
        store.set(_key(), message)


def shown_by_first_rank(message: str, wait_seconds: float = WAIT_SECONDS) -> bool:
    """On a quiet rank that failed before the group: True once the host's first rank has printed this very message;
    False if it printed another, none, or did not answer within `wait_seconds`, so the caller prints its own."""
    try:
        store = _agent_store(wait_seconds)
        if store is None:
            return False
        store.wait([_key()])
        shown: Optional[bytes] = store.get(_key())
    except Exception:  # the store is gone or silent: print rather than risk showing nothing
        return False
    return shown is not None and shown.decode("utf-8", "replace") == message
