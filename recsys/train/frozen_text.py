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


# ------------------------------------------------------------------------------------------ CPU lookup of the rows
# Every key of the text KJT holds exactly one row per sample (recsys.data.features.text_kjt_keys), so each "bag" the
# text tables pool is a single row and its sum IS that row. On CPU, fbgemm's TBE forward (the fused and the dense
# kernel alike) spends ~150 ns per bag on that: on amazon-sr (43 keys x 4,096 samples of 64-wide fp16 rows) 23-33 ms
# a batch on 1 or 2 threads, where gathering the same rows with index_select takes a few. The frozen-text sharder
# therefore gives each of its CPU kernels this forward: the same tables (TorchRec's, placed by the planner, state
# dict and checkpoints unchanged), the same KJT path (input dist, lookup module, output dist), the same output
# [batch, sum of dims] bit for bit; only the gather differs. A batch it cannot serve that way (a bag of 0 or 2+
# rows, per-sample weights, variable batch per key) goes to the kernel's own forward.

def single_row_gather(tbe: nn.Module, features) -> "torch.Tensor | None":
    """The pooled output of fbgemm TBE `tbe` (fused or dense, CPU) for `features` (a KJT) whose every bag holds
    exactly one row, read by index_select from the tables' own weights; None when some bag does not."""
    if features.variable_stride_per_key() or features.weights_or_none() is not None:
        return None
    keys, batch = len(features.keys()), features.stride()
    values = features.values()
    if values.numel() != keys * batch or not bool((features.lengths() == 1).all()):
        return None
    plan = _gather_plan(tbe, keys)
    if plan is None:
        return None
    weights = tbe.split_embedding_weights()  # views of the kernel's storage: rows written later are seen
    ids = values.view(keys, batch)
    out = torch.empty(batch, plan.total_dim, dtype=plan.out_dtype, device=values.device)
    with torch.no_grad():  # frozen: the encoder detaches this output anyway
        for table, f0, f1, c0, c1 in plan.runs:
            n, dim = f1 - f0, (c1 - c0) // (f1 - f0)
            rows = weights[table].index_select(0, ids[f0:f1].t().reshape(-1))  # [batch * n, dim], sample-major
            out[:, c0:c1].view(batch, n, dim).copy_(rows.view(batch, n, dim))  # (fp16 -> fp32 in the copy)
    return out


class _GatherPlan:
    """Where each table's keys sit in a TBE's output: runs of consecutive keys that read one table."""

    def __init__(self, runs, total_dim: int, out_dtype: torch.dtype):
        self.runs, self.total_dim, self.out_dtype = runs, total_dim, out_dtype


def _gather_plan(tbe: nn.Module, keys: int) -> "_GatherPlan | None":
    cached = getattr(tbe, "_recsys_gather_plan", False)
    if cached is not False:
        return cached
    from fbgemm_gpu.split_embedding_configs import SparseType

    plan = None
    table_of = _feature_tables(tbe)
    offsets = [int(x) for x in tbe.D_offsets.tolist()]
    pooling = getattr(tbe, "pooling_mode", None)
    pooling = getattr(pooling, "value", pooling)  # fbgemm PoolingMode SUM = 0, MEAN = 1: a one-row bag is the row
    floats = all(w.is_floating_point() for w in tbe.split_embedding_weights())  # not int8 rows with scale and bias
    if len(table_of) == keys and len(offsets) == keys + 1 and pooling in (0, 1) and floats:
        runs = []
        for f, t in enumerate(table_of):
            if runs and runs[-1][0] == t and runs[-1][2] == f:
                runs[-1][2] = f + 1
                runs[-1][4] = offsets[f + 1]
            else:
                runs.append([t, f, f + 1, offsets[f], offsets[f + 1]])
        dims_ok = all((c1 - c0) % (f1 - f0) == 0 and all(offsets[f + 1] - offsets[f] == (c1 - c0) // (f1 - f0)
                                                          for f in range(f0, f1)) for _, f0, f1, c0, c1 in runs)
        if dims_ok:
            plan = _GatherPlan([tuple(r) for r in runs], offsets[-1],
                               SparseType.from_int(int(tbe.output_dtype)).as_dtype())
    tbe._recsys_gather_plan = plan
    return plan


def _feature_tables(tbe: nn.Module) -> list:
    """Table index of each feature of `tbe`: the fused kernel keeps `feature_table_map`; the dense one only each
    feature's offset into its flat weights, which is its table's offset (the last table at that offset: a table
    before it at the same offset has no rows)."""
    if hasattr(tbe, "feature_table_map"):
        return list(tbe.feature_table_map)
    starts = list(tbe.weights_physical_offsets)[:len(tbe.split_embedding_weights())]
    return [max(t for t, s in enumerate(starts) if s == off) for off in tbe.weights_offsets.tolist()]


def drop_data_parallel_wrappers(sharded: nn.Module) -> int:
    """Unwrap the DistributedDataParallel that TorchRec puts around each data_parallel (replicated) lookup of
    sharded module `sharded` (the frozen text tables' sharded EBC). DDP is there to all-reduce the replicas'
    gradients, and a frozen table gets none (the encoder detaches its output). Kept, it cost ~8 ms of CPU a step
    on each of 2 amazon-sr ranks (benchmarks/text_path.py's profile): its forward bookkeeping, and an output sink
    that clones the [batch, 43 x 64] lookup output on every step, because a detached output never runs the sink's
    backward that ends static_graph's first iteration. Returns the number of lookups unwrapped."""
    from torch.nn.parallel import DistributedDataParallel

    lookups = getattr(sharded, "_lookups", None)
    unwrapped = 0
    for i, lookup in enumerate(lookups or []):
        while isinstance(lookup, DistributedDataParallel):
            lookup, unwrapped = lookup.module, unwrapped + 1
        lookups[i] = lookup
    return unwrapped


class SingleRowGatherKernel:
    """Marks a TorchRec batched embedding kernel (BatchedFusedEmbeddingBag, BatchedDenseEmbeddingBag) of the frozen
    text tables on CPU whose forward is `single_row_gather`, else the kernel's own (see `_gather_kernel_class`)."""

    __slots__ = ()  # no instance layout of its own: an existing kernel's class can become the subclass


def _gather_kernel_class(cls: type) -> type:
    """`cls` with the single-row gather forward. The forward lives in the subclass's own dict and the marker comes
    after `cls` in its bases: with a base before `cls`, Python refuses to change an existing object's class to it
    ("object layout differs")."""

    def forward(self, features, vbe_output=None, vbe_output_offsets=None):
        if vbe_output is None:
            out = single_row_gather(self.emb_module, features)
            if out is not None:
                return out
        return cls.forward(self, features, vbe_output, vbe_output_offsets)

    return type(f"SingleRowGather{cls.__name__}", (cls, SingleRowGatherKernel), {"forward": forward})


_GATHER_CLASSES: Dict[type, type] = {}


def use_single_row_gather(sharded: nn.Module) -> int:
    """Give every CPU batched embedding kernel of sharded module `sharded` (the frozen text tables' sharded EBC) the
    single-row gather forward (a subclass of its own class, so isinstance checks, state dict and parameters are
    untouched). Returns the number of kernels changed."""
    from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag

    changed = 0
    for lookup in getattr(sharded, "_lookups", []):
        for emb in getattr(getattr(lookup, "module", lookup), "_emb_modules", []):
            if not isinstance(emb, BaseBatchedEmbeddingBag) or isinstance(emb, SingleRowGatherKernel):
                continue
            tbe = getattr(emb, "emb_module", None)
            if tbe is None or not hasattr(tbe, "split_embedding_weights") or not hasattr(tbe, "D_offsets"):
                continue
            if any(w.device.type != "cpu" for w in tbe.split_embedding_weights()):
                continue
            cls = type(emb)
            if cls not in _GATHER_CLASSES:
                _GATHER_CLASSES[cls] = _gather_kernel_class(cls)
            emb.__class__ = _GATHER_CLASSES[cls]
            changed += 1
    return changed
