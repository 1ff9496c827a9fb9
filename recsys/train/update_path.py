"""Which of FBGEMM's two CPU row-wise Adagrad backward paths each fused embedding table trains through.

FBGEMM's CPU backward of a TorchRec table with a fused row-wise Adagrad (`split_embedding_backward_codegen_
rowwise_adagrad_cpu`) takes one of two paths per table, from how many features read the table:

* read by ONE feature (fp32): fbgemm's JIT-generated kernels (a gradient SpMDM, then a row-wise SparseAdaGrad),
  parallel over the updated rows;
* read by SEVERAL features: a plain compiled loop over the updated rows, on one thread.

Both apply the same update (`tests/train/test_update_path.py`). Which is faster depends on the CPU and the table:
the JIT row-wise kernel switches six times a row between legacy-SSE scalar and VEX-encoded 256-bit instructions,
which some Intel cores pay ~100 ns a switch for (benchmarks/sse_avx_transition.c; on the 2-core Xeon with AVX512 +
AMX ~500 ns a row against ~90 on the loop, benchmarks/tbe_backward.py) and other cores do not; and a table with few
distinct rows a step but many values (categories) gains less from the loop than its serial pass costs. So the
choice is measured per table on the machine that trains (`probe_table`: the table's own rows and width, a batch of
bags as long as its feature's, both paths, forward + backward; ~0.1 s a table at start), not written into a
default: `train.embedding_update_path: auto` takes the loop path for the tables it is clearly faster on; `jit` /
`loop` force one path for every table one feature reads. A table with fewer rows than a batch has bags is not
probed and stays on the JIT path: it updates at most that many rows a step, while its pad feature costs a forward
pass over every bag, and uniform random ids would overstate its rows a step (amazon-sr's brand, category and query
tables, 814-1,428 rows, on the loop path: the peers' configuration 0.89-0.99x in three runs).

The loop path is taken by giving such a table a second feature that never holds a value (`pad_key`): TorchRec then
builds the table's kernel as a shared table's. The pad keys exist only inside the sharded module, which inserts
their (empty) lengths into every KJT it receives (`recsys.train.sharding`), so batches, checkpoints, bundles and
serving never see them.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from recsys.spec.config import PAD_SUFFIX

PATHS = ("auto", "jit", "loop")
# the loop path is chosen only where the table's step is this much faster on it, so that timing noise never flips a
# choice that is close anyway (the pad feature itself costs a little in the forward, which the probe includes)
LOOP_MARGIN = 1.3
_PROBE_REPEAT = 6


def pad_key(table: str) -> str:
    """The KJT key of the empty second feature that moves `table` to the loop path."""
    return f"{table}{PAD_SUFFIX}"


def is_pad_key(key: str) -> bool:
    return key.endswith(PAD_SUFFIX)


def single_feature_tables(configs) -> List[str]:
    """Tables of `configs` (EmbeddingBagConfigs) that one feature reads: the ones the JIT path trains."""
    return [c.name for c in configs if len(c.feature_names) == 1]


def with_pad_features(configs, tables: Sequence[str]) -> list:
    """`configs` with a pad feature added to each of `tables` (same tables, same rows)."""
    pads = set(tables)
    return [dataclasses.replace(c, feature_names=[*c.feature_names, pad_key(c.name)]) if c.name in pads else c
            for c in configs]


@dataclass(frozen=True)
class ProbeResult:
    jit_ms: float
    loop_ms: float

    @property
    def chosen(self) -> str:
        return "loop" if self.jit_ms > LOOP_MARGIN * self.loop_ms else "jit"


def probe_table(rows: int, dim: int, bag: int, batch: int, repeat: int = _PROBE_REPEAT) -> ProbeResult:
    """One training step of a `rows` x `dim` table read by `batch` bags of `bag` uniform random ids, through each
    path (forward and backward with the fused update; the loop path's forward includes the empty pad feature).
    Medians of `repeat` steps after 2 warm-up steps."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                         SplitTableBatchedEmbeddingBagsCodegen)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, rows, (batch * bag,), generator=gen)
    grad = torch.randn(batch, dim, generator=gen)

    def step_ms(features: int) -> float:
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)], feature_table_map=[0] * features,
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.01, pooling_mode=PoolingMode.SUM)
        # `bag` values a bag in the first feature, none in the pad
        offsets = torch.cat([torch.arange(batch + 1) * bag, torch.full(((features - 1) * batch,), batch * bag)])
        g = torch.cat([grad, torch.zeros(batch, (features - 1) * dim)], dim=1)
        times = []
        for i in range(repeat + 2):
            t0 = time.perf_counter()
            tbe(ids, offsets).backward(g)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2] * 1e3

    return ProbeResult(jit_ms=step_ms(1), loop_ms=step_ms(2))


def bag_lengths(spec) -> Dict[str, int]:
    """Feature -> the most values a bag of it holds (an id: 1; a sparse feature: max_values; a mean-pooled history,
    one key holding it all: max_len): what the probe builds its bags of."""
    out: Dict[str, int] = {}
    for f in spec.features:
        out[f.name] = {"id": 1, "sparse": getattr(f, "max_values", 1),
                       "sequence": getattr(f, "max_len", 1)}.get(f.kind, 1)
    return out


def resolve(setting: str, device_type: str, configs, bags: Dict[str, int], batch: int) -> Tuple[List[str], str]:
    """(tables to move to the loop path, why) for `train.embedding_update_path`; GPUs have one path."""
    single = single_feature_tables(configs)
    if device_type != "cpu":
        return [], f"{device_type}: FBGEMM's CPU paths do not apply"
    if setting == "jit" or not single:
        return [], f"train.embedding_update_path: {setting}" + ("" if single else " (no table is read by one feature)")
    if setting == "loop":
        return single, f"train.embedding_update_path: loop, tables {', '.join(single)}"
    by_name = {c.name: c for c in configs}
    parts, loop = [], []
    small = [n for n in single if by_name[n].num_embeddings < batch]
    if small:  # no probe: at most that many rows updated a step, and the pad's forward pass costs every bag
        parts.append(f"{', '.join(small)} fewer rows than a batch's {batch:,} bags: jit")
    for name in (n for n in single if n not in small):
        c = by_name[name]
        bag = max(1, bags.get(c.feature_names[0], 1))
        r = probe_table(c.num_embeddings, c.embedding_dim, bag, batch)
        parts.append(f"{name} {r.jit_ms:.2f} / {r.loop_ms:.2f} ms")
        if r.chosen == "loop":
            loop.append(name)
    return loop, (f"auto: a step of each one-feature table on this CPU, FBGEMM's JIT / loop path: {'; '.join(parts)} "
                  f"(loop where > {LOOP_MARGIN}x faster): loop for {', '.join(loop) or 'none'}")


def choose(spec, ctx, configs) -> Tuple[List[str], str]:
    """(tables to move to the loop path, why) for a training run: resolved on the main rank and shared with the
    others, since every rank's sharded tables must read the same keys."""
    if spec.train.embedding_optimizer != "rowwise_adagrad":
        return [], f"embedding_optimizer {spec.train.embedding_optimizer}: FBGEMM has one CPU path for it"
    batch = max(1, spec.train.batch_size // ctx.world_size)
    choice = [resolve(spec.train.embedding_update_path, ctx.device.type, configs, bag_lengths(spec), batch)
              if ctx.is_main else None]
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def take_loop_path(l0, tables: Sequence[str]) -> None:
    """Give `l0.ebc` (a TorchRec EmbeddingBagCollection on the meta device, before sharding) a pad feature for each
    of `tables`."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    if tables:
        l0.ebc = EmbeddingBagCollection(tables=with_pad_features(l0.ebc.embedding_bag_configs(), tables),
                                        device=torch.device("meta"))
