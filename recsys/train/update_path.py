"""Which of FBGEMM's two CPU row-wise Adagrad backward paths a fused embedding table trains through.

FBGEMM's CPU backward of a TorchRec table with a fused row-wise Adagrad (`split_embedding_backward_codegen_
rowwise_adagrad_cpu`) takes one of two paths per table, from how many features read the table:

* read by ONE feature (fp32): fbgemm's JIT-generated kernels (a gradient SpMDM, then a row-wise SparseAdaGrad),
  parallel over the updated rows;
* read by SEVERAL features: a plain compiled loop over the updated rows, on one thread.

Both apply the same update (`tests/train/test_update_path.py`). Which is faster depends on the CPU: the JIT
row-wise kernel switches six times a row between legacy-SSE scalar and VEX-encoded 256-bit instructions, which some
Intel cores pay ~100 ns a switch for (benchmarks/sse_avx_transition.c; on the 2-core Xeon with AVX512 + AMX ~500 ns
a row against ~90 on the loop, benchmarks/tbe_backward.py) and other cores do not. So the choice is measured on the
machine that trains (`probe`, ~0.1 s at start), not written into a default: `train.embedding_update_path: auto`
runs the probe; `jit` / `loop` force a path.

The loop path is taken by giving each table that one feature reads a second feature that never holds a value
(`pad_key`): TorchRec then builds the table's kernel as a shared table's. The pad keys exist only inside the
sharded module, which appends their (empty) lengths to every KJT it receives (`recsys.train.sharding`), so batches,
checkpoints, bundles and serving never see them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from recsys.spec.config import PAD_SUFFIX

log = logging.getLogger(__name__)

PATHS = ("auto", "jit", "loop")

# The probe's table: 4,096 one-value bags over 50,000 rows of 16 wide (amazon-sr's user table at the peers' width);
# the loop path is chosen only when the JIT path is this much slower per step, so that noise never flips a choice
# that is close anyway
_PROBE_ROWS, _PROBE_DIM, _PROBE_BATCH = 50_000, 16, 4096
LOOP_MARGIN = 1.5


def pad_key(table: str) -> str:
    """The KJT key of the empty second feature that moves `table` to the loop path."""
    return f"{table}{PAD_SUFFIX}"


def is_pad_key(key: str) -> bool:
    return key.endswith(PAD_SUFFIX)


def single_feature_tables(configs) -> List[str]:
    """Tables of `configs` (EmbeddingBagConfigs) that one feature reads: the ones the JIT path trains."""
    return [c.name for c in configs if len(c.feature_names) == 1]


def with_pad_features(configs) -> list:
    """`configs` with a pad feature added to every table that one feature reads (same tables, same rows)."""
    import dataclasses

    pads = set(single_feature_tables(configs))
    return [dataclasses.replace(c, feature_names=[*c.feature_names, pad_key(c.name)]) if c.name in pads else c
            for c in configs]


@dataclass(frozen=True)
class ProbeResult:
    jit_ms: float
    loop_ms: float

    @property
    def chosen(self) -> str:
        return "loop" if self.jit_ms > LOOP_MARGIN * self.loop_ms else "jit"


def probe(repeat: int = 8) -> ProbeResult:
    """Time one backward + update of the same table through each path on this machine (forward subtracted out by
    timing forward + backward against forward alone would double the noise; the forward is the same op in both, so
    the comparison keeps it in). Medians of `repeat` steps after 2 warm-up steps."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                         SplitTableBatchedEmbeddingBagsCodegen)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _PROBE_ROWS, (_PROBE_BATCH,), generator=gen)
    grad = torch.randn(_PROBE_BATCH, _PROBE_DIM, generator=gen)

    def step_ms(features: int) -> float:
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(_PROBE_ROWS, _PROBE_DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)], feature_table_map=[0] * features,
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.01, pooling_mode=PoolingMode.SUM)
        # one value a bag in the first feature, none in the others
        offsets = torch.cat([torch.arange(_PROBE_BATCH + 1),
                             torch.full(((features - 1) * _PROBE_BATCH,), _PROBE_BATCH)])
        g = torch.cat([grad, torch.zeros(_PROBE_BATCH, (features - 1) * _PROBE_DIM)], dim=1)
        times = []
        for i in range(repeat + 2):
            t0 = time.perf_counter()
            tbe(ids, offsets).backward(g)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2] * 1e3

    jit, loop = step_ms(1), step_ms(2)
    return ProbeResult(jit_ms=jit, loop_ms=loop)


def resolve(setting: str, device_type: str) -> Tuple[str, str]:
    """(path, why) for `train.embedding_update_path`; the JIT/loop choice exists on CPU only."""
    if device_type != "cpu":
        return "jit", f"{device_type}: FBGEMM's CPU paths do not apply"
    if setting in ("jit", "loop"):
        return setting, f"train.embedding_update_path: {setting}"
    r = probe()
    return r.chosen, (f"auto: probe on this CPU, one-feature table backward {r.jit_ms:.2f} ms on FBGEMM's JIT path "
                      f"vs {r.loop_ms:.2f} ms on its loop path (loop taken when > {LOOP_MARGIN}x faster)")


def choose(spec, ctx) -> Tuple[str, str]:
    """(path, why) for a training run: resolved on the main rank and shared with the others, since every rank's
    sharded tables must read the same keys."""
    if spec.train.embedding_optimizer != "rowwise_adagrad":
        return "jit", f"embedding_optimizer {spec.train.embedding_optimizer}: FBGEMM has one CPU path for it"
    choice = [resolve(spec.train.embedding_update_path, ctx.device.type) if ctx.is_main else None]
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def take_loop_path(l0) -> List[str]:
    """Give `l0.ebc` (a TorchRec EmbeddingBagCollection on the meta device, before sharding) a pad feature for
    every table one feature reads; returns those tables."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    configs = l0.ebc.embedding_bag_configs()
    tables = single_feature_tables(configs)
    if tables:
        l0.ebc = EmbeddingBagCollection(tables=with_pad_features(configs), device=torch.device("meta"))
    return tables
