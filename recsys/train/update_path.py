"""Which of FBGEMM's two CPU row-wise Adagrad backward paths each fused embedding table trains through.

FBGEMM's CPU backward of a TorchRec table with a fused row-wise Adagrad (`split_embedding_backward_codegen_
rowwise_adagrad_cpu`) takes one of two paths per table, from how many features read the table:

* read by ONE feature (fp32): fbgemm's JIT-generated kernels (a gradient SpMDM, then a row-wise SparseAdaGrad),
  parallel over the updated rows;
* read by SEVERAL features: a plain compiled loop over the updated rows, on one thread.

Both apply the same update (`tests/train/test_update_path.py`), though not bit for bit (summation order). Which is
faster depends on the CPU: the JIT row-wise kernel switches six times a row between legacy-SSE scalar and
VEX-encoded 256-bit instructions, which some Intel cores pay ~100 ns a switch for (benchmarks/sse_avx_transition.c;
on the 2-core Xeon with AVX512 + AMX ~500 ns a row against ~90 on the loop, benchmarks/tbe_backward.py) and other
cores do not. So `train.embedding_update_path: auto` measures that property of the machine once per process
(`probe`: a step of a 50,000 x 16 table, 4,096 one-value bags, on each path; ~0.1 s) and, where the JIT path is more
than `LOOP_MARGIN` x slower, moves the one-feature tables with at least a batch's rows to the loop path; `jit` /
`loop` force one path for every table one feature reads. The choice is deliberately coarse, so that it does not
flip between runs: a table-by-table timing near the margin picked different paths in two runs of the same job under
load, and the two paths round differently, which broke bit-exact resume. The probe's ratio is ~3.5x on the Xeon
(and about 1x or below where the penalty is absent), far from the margin. A table with fewer rows than a batch has
bags stays on the JIT path: it updates at most that many rows a step while its pad feature costs a forward pass over
every bag (amazon-sr's brand, category and query tables, 814-1,428 rows, on the loop path made the peers'
configuration 0.89-0.99x in three runs).

The loop path is taken by giving such a table a second feature that never holds a value (`pad_key`): TorchRec then
builds the table's kernel as a shared table's. The pad keys exist only inside the sharded module, which inserts
their (empty) lengths into every KJT it receives (`recsys.train.sharding`), so batches, checkpoints, bundles and
serving never see them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from recsys.fileio import write_text_atomic
from recsys.spec.config import PAD_SUFFIX

log = logging.getLogger(__name__)

# the loop path is chosen where the probe's JIT step is this much slower: the penalty is a property of the CPU
# (~3.5x on the AMX Xeon, about 1x or below without it), so a margin this wide keeps load from flipping the choice
LOOP_MARGIN = 2.0
_PROBE_SHAPE = (50_000, 16, 1, 4096)  # rows, width, values a bag, bags: amazon-sr's user table at the peers' width
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


def rowwise_adagrad_tbe(rows: int, dim: int, features: int, learning_rate: float = 0.01):
    """FBGEMM's CPU kernel of one `rows` x `dim` table with a fused row-wise Adagrad, read by `features` features
    (1: the JIT path; 2 or more: the loop path), SUM-pooled as TorchRec's tables here are."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                         SplitTableBatchedEmbeddingBagsCodegen)

    return SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)], feature_table_map=[0] * features,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=learning_rate, pooling_mode=PoolingMode.SUM)


def probe_table(rows: int, dim: int, bag: int, batch: int, repeat: int = _PROBE_REPEAT) -> ProbeResult:
    """One training step of a `rows` x `dim` table read by `batch` bags of `bag` uniform random ids, through each
    path (forward and backward with the fused update; the loop path's forward includes the empty pad feature).
    Medians of `repeat` steps after 2 warm-up steps."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, rows, (batch * bag,), generator=gen)
    grad = torch.randn(batch, dim, generator=gen)

    def step_ms(features: int) -> float:
        tbe = rowwise_adagrad_tbe(rows, dim, features)
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


@functools.lru_cache(maxsize=1)
def probe() -> ProbeResult:
    """This machine's JIT / loop step on the probe's table, measured once per process."""
    return probe_table(*_PROBE_SHAPE)


def resolve(setting: str, device_type: str, configs, batch: int) -> Tuple[List[str], str]:
    """(tables to move to the loop path, why) for `train.embedding_update_path`; GPUs have one path."""
    single = single_feature_tables(configs)
    if device_type != "cpu":
        return [], f"{device_type}: FBGEMM's CPU paths do not apply"
    if setting == "jit" or not single:
        return [], f"train.embedding_update_path: {setting}" + ("" if single else " (no table is read by one feature)")
    if setting == "loop":
        return single, f"train.embedding_update_path: loop, tables {', '.join(single)}"
    rows = {c.name: c.num_embeddings for c in configs}
    large = [n for n in single if rows[n] >= batch]
    small = f"; {', '.join(n for n in single if n not in large)} fewer rows than a batch's {batch:,} bags: jit" \
        if len(large) < len(single) else ""
    if not large:
        return [], f"auto: no one-feature table with at least a batch's {batch:,} rows{small}"
    r = probe()
    tables = large if r.chosen == "loop" else []
    return tables, (f"auto: FBGEMM's JIT / loop step on this CPU {r.jit_ms:.2f} / {r.loop_ms:.2f} ms (loop where > "
                    f"{LOOP_MARGIN}x): {r.chosen} for {', '.join(large)}{small}")


def choose(spec, ctx, configs, record: Optional[Path] = None) -> Tuple[List[str], str]:
    """(tables to move to the loop path, why) for a training run: resolved on the main rank and shared with the
    others, since every rank's sharded tables must read the same keys. `record` (a resumed run's file, written by
    `write_record` at its first start): under `auto` its tables are taken again instead of a new probe, so that a
    resumed run trains through the same kernels as before the interruption (the two paths round differently)."""
    if spec.train.embedding_optimizer != "rowwise_adagrad":
        return [], f"embedding_optimizer {spec.train.embedding_optimizer}: FBGEMM has one CPU path for it"
    batch = max(1, spec.train.batch_size // ctx.world_size)
    choice = [None]
    if ctx.is_main:
        recorded = read_record(record, configs) if record is not None and spec.train.embedding_update_path == "auto" \
            else None
        choice = [(recorded, f"auto: as recorded at this run's first start ({record})") if recorded is not None
                  else resolve(spec.train.embedding_update_path, ctx.device.type, configs, batch)]
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def write_record(path: Path, tables: Sequence[str], why: str) -> None:
    write_text_atomic(path, json.dumps({"loop_path_tables": list(tables), "why": why}, indent=1))


def read_record(path: Path, configs) -> Optional[List[str]]:
    """The recorded tables, or None (logged) when the file is absent, unreadable or names tables that are not
    one-feature tables of `configs`: a file is checked before it is trusted, and a bad one only costs a probe."""
    if not path.is_file():
        return None
    try:
        tables = json.loads(path.read_text())["loop_path_tables"]
        ok = isinstance(tables, list) and all(isinstance(t, str) for t in tables)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok or not set(tables) <= set(single_feature_tables(configs)):
        log.warning("%s: not a record of this model's one-feature tables; probing again", path)
        return None
    return tables


def take_loop_path(l0, tables: Sequence[str]) -> None:
    """Give `l0.ebc` (a TorchRec EmbeddingBagCollection on the meta device, before sharding) a pad feature for each
    of `tables`."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    if tables:
        l0.ebc = EmbeddingBagCollection(tables=with_pad_features(l0.ebc.embedding_bag_configs(), tables),
                                        device=torch.device("meta"))
