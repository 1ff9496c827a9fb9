"""`encode_text_tables` over the ranks of a torchrun launch (one process: no process group at all).

Ranks share nothing but the cache folder: each encodes its own chunks (`pipeline.plan_chunks`) and commits them as
cache parts under the folder's lock. The process group is only used at the end, to wait for every rank and to
collect the counts for rank 0's summary; rank 0 then checks that every text of the spec is in the cache.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from recsys.spec.config import Spec
from recsys.text.pipeline import check_complete, encode_text_tables

PER_RANK = ("encoded", "forward_calls", "encode_seconds")


def launch_world() -> tuple:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def merge_rank_stats(per_rank: list) -> Dict[str, dict]:
    """Whole-spec counts from rank 0, per-rank work summed; texts_per_s = texts encoded per second of the ranks'
    mean encoding time (the job's aggregate rate)."""
    merged = {name: dict(s) for name, s in per_rank[0].items()}
    for name, s in merged.items():
        for field in PER_RANK:
            s[field] = sum(r[name][field] for r in per_rank)
        s["seconds"] = max(r[name]["seconds"] for r in per_rank)
        busy = s["encode_seconds"] / len(per_rank)
        s["texts_per_s"] = s["encoded"] / busy if busy > 0 else 0.0
    return merged


def encode_on_all_ranks(spec: Spec, device: Optional[str] = None, progress: bool = True) -> Optional[Dict[str, dict]]:
    """Run this rank's share; returns the merged stats on rank 0 and None on the other ranks."""
    rank, world = launch_world()
    if world == 1:
        stats = encode_text_tables(spec, device=device, progress=progress)
        return stats
    import torch.distributed as dist

    from recsys.train.dist import init_distributed

    ctx = init_distributed(device or spec.text.encoder.device)
    stats = encode_text_tables(spec, device=device, progress=progress and ctx.is_main, rank=ctx.rank,
                               world_size=ctx.world_size)
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, stats)  # also the barrier: every rank has committed its parts
    if not ctx.is_main:
        return None
    if stats:
        check_complete(spec)
    return merge_rank_stats(gathered)
