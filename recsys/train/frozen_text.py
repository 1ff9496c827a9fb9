"""Filling the sharded frozen text tables: each rank copies in only the rows/columns of its own shards, read from
the memory-mapped stored tables (`recsys.text.frozen`), so no rank materialises a table it does not hold."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from torch import nn

from recsys.models.tables import text_table_name

TEXT_EBC_PATH = "l0.text_ebc."  # where the model keeps its frozen text tables (state-dict key fragment)


def is_text_table_key(key: str) -> bool:
    """True for state-dict keys of the frozen text tables: they are rebuilt from the text cache, never trained,
    never transferred between specs (a fine-tune's tables hold its own texts, in the pretrained projection)."""
    return TEXT_EBC_PATH in key


@torch.no_grad()
def fill_text_tables(model: nn.Module, tables: Dict[str, np.ndarray]) -> int:
    """Copy each text table's rows into this rank's shards of `model` (DistributedModelParallel or plain);
    returns the number of elements copied here."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    names = {text_table_name(n): n for n in tables}
    state = model.state_dict()
    copied = 0
    mine = {k: v for k, v in state.items() if is_text_table_key(k) and k.endswith(".weight")}
    for key, target in mine.items():
        rows = tables[names[key.split(".")[-2]]]
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                part = torch.from_numpy(np.array(rows[r0:r0 + nr, c0:c0 + nc]))  # a copy: the rows are read-only
                shard.tensor.copy_(part)
                copied += part.numel()
        else:
            target.copy_(torch.from_numpy(np.array(rows)).to(target.device))
            copied += target.numel()
    model.load_state_dict(mine, strict=False)  # state_dict views may alias the kernels' weights; do not rely on it
    return copied
