"""The one place that builds TorchRec sharding plans (jobs/plan.py and the pretrain job both come here).

A plan is made on a *simulated* topology built through `TopologyFactory` (no devices needed), or, inside a running
process group, collectively (`planner.collective_plan`: rank 0 plans, everybody receives the same plan). Failures
of the planner are translated into a `SpecError` that names the tables that do not fit and by how many GiB, because
the planner's own message only gives global totals.

Sizes are in GiB (1024**3 bytes), as TorchRec counts them (it calls them "GB").
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.features import KjtOrder, kjt_keys, table_of_key, text_kjt_keys
from recsys.errors import SpecError
from recsys.models.tables import embedding_bag_configs
from recsys.spec.config import Spec
from recsys.train.update_path import is_pad_key

log = logging.getLogger("recsys.train.sharding")

GIB = 1024**3
FP32_BYTES = 4
DEFAULT_LOCAL_WORLD_SIZE = 8  # GPUs per host on the usual 8-GPU nodes
RESERVED_FRACTION = 0.15  # of every rank kept for the dense model, activations and input buffers
HEADROOM = 1.0 - RESERVED_FRACTION

ROW_WISE_TYPES = ("row_wise", "table_row_wise")
# The stock CPU sharder also offers table_column_wise, which we keep off as well: on gloo only these three are used
# and tested by the training job.
CPU_SHARDING_TYPES = ("table_wise", "column_wise", "data_parallel")
# Kernels that need no extra configuration (the SSD / key-value / virtual-table kernels need parameters a spec
# does not declare, so offering them would let the planner pick plans that cannot be built).
CUDA_COMPUTE_KERNELS = ("fused", "fused_uvm", "fused_uvm_caching", "dense")
CPU_COMPUTE_KERNELS = ("fused", "dense")

# Optimiser state per row, as a multiple of the row's weight (rowwise: one float per row).
_OPTIMIZER_STATE = {"sgd": 0.0, "rowwise_adagrad": None, "adagrad": 1.0, "adam": 2.0}


def _check_device(device_type: str) -> str:
    if device_type not in ("cpu", "cuda"):
        raise SpecError(f"device must be 'cpu' or 'cuda', got {device_type!r}")
    return device_type


# ----------------------------------------------------------------------------------------------------- topology
def make_topology(
    world_size: int,
    device_type: str,
    hbm_gb: Optional[float] = None,
    ddr_gb: Optional[float] = None,
    local_world_size: Optional[int] = None,
):
    """A planner Topology of `world_size` identical ranks. Capacities default to TorchRec's (32 GiB HBM,
    128 GiB DDR per rank). Built through `TopologyFactory` (a bare `Topology(...)` logs a warning on TorchRec 1.8)."""
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

    _check_device(device_type)
    if world_size < 1:
        raise SpecError(f"world size must be >= 1, got {world_size}")
    for name, value in (("hbm_gb", hbm_gb), ("ddr_gb", ddr_gb)):
        if value is not None and value <= 0:
            raise SpecError(f"{name} must be > 0, got {value}")
    if local_world_size is None:
        local_world_size = min(world_size, DEFAULT_LOCAL_WORLD_SIZE) if device_type == "cuda" else world_size
    if world_size % local_world_size:
        raise SpecError(f"world size {world_size} is not a multiple of local world size {local_world_size}")
    trainer = TrainerConfig(
        world_size=world_size,
        local_world_size=local_world_size,
        hbm_cap_bytes=int(hbm_gb * GIB) if hbm_gb is not None and device_type == "cuda" else None,
        ddr_cap_bytes=int(ddr_gb * GIB) if ddr_gb is not None else None,
    )
    return TopologyFactory.create_topology(trainer_config=trainer, kernel_config=KernelConfig(compute_device=device_type))


# ----------------------------------------------------------------------------------------------------- sharders
def data_parallel_wrapper_for(world_size: int):
    """DistributedModelParallel's wrapper of the dense (unsharded) part: TorchRec's DDP on several ranks; none on
    one rank, where DDP's per-step all-reduce of a one-rank group and its bucket bookkeeping are pure overhead (about
    a tenth of a small model's CPU step). Parameter and state-dict names are the same either way (TorchRec strips
    DDP's `module.` prefix), so checkpoints move between both."""
    from torchrec.distributed.model_parallel import DataParallelWrapper, DefaultDataParallelWrapper

    if world_size > 1:
        return DefaultDataParallelWrapper()

    class NoDataParallel(DataParallelWrapper):
        def wrap(self, dmp, env, device) -> None:
            return None

    return NoDataParallel()


def fused_params_for(spec: Spec) -> Dict[str, Any]:
    """FBGEMM fused-optimiser parameters from `train.embedding_optimizer` / `train.embedding_lr`."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    optim = {
        "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        "adagrad": EmbOptimType.EXACT_ADAGRAD,
        "sgd": EmbOptimType.EXACT_SGD,
        "adam": EmbOptimType.ADAM,
    }[spec.train.embedding_optimizer]
    return {"optimizer": optim, "learning_rate": spec.train.embedding_lr}


def _make_sharder_class():
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    class RecsysEBCSharder(EmbeddingBagCollectionSharder):
        """The stock EBC sharder, limited to the sharding types and kernels we can build on each device."""

        def sharding_types(self, compute_device_type: str) -> List[str]:
            types = super().sharding_types(compute_device_type)
            if compute_device_type == "cpu":
                types = [t for t in types if t in CPU_SHARDING_TYPES]
            return types

        def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
            allowed = CUDA_COMPUTE_KERNELS if compute_device_type == "cuda" else CPU_COMPUTE_KERNELS
            return [k for k in super().compute_kernels(sharding_type, compute_device_type) if k in allowed]

    return RecsysEBCSharder


# Frozen text tables (recsys.models.encoding.TextEmbeddingBagCollection): sharded unless the spec asks otherwise.
# The planner is offered only the sharded types; `data_parallel` (a full copy per rank, TorchRec's dense kernel, no
# all-to-all) is used only where `train.sharding_constraints.text_<name>` names it: worth it for a small table read
# many times per sample on few ranks (amazon-sr's 21k-row item texts, 41 lookups per sample), never at scale.
# Row-wise types only on GPU (as for id tables).
TEXT_CPU_SHARDING_TYPES = ("table_wise", "column_wise")
TEXT_CUDA_SHARDING_TYPES = ("table_wise", "row_wise", "table_row_wise", "column_wise")
TEXT_REPLICATED = "data_parallel"
TEXT_CUDA_COMPUTE_KERNELS = ("fused", "fused_uvm_caching", "fused_uvm", "dense")
TEXT_CPU_COMPUTE_KERNELS = ("fused", "dense")  # dense: the data_parallel kernel


def frozen_fused_params() -> Dict[str, Any]:
    """The fused kernel needs an optimiser; plain SGD keeps no per-row state, and the encoder detaches the tables'
    output, so its backward (and this optimiser) never runs: the rows stay as written."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.0}


def _make_text_sharder_class():
    from recsys.models.encoding import TextEmbeddingBagCollection

    class FrozenTextSharder(_make_sharder_class()):
        """Shards TextEmbeddingBagCollection (its own module type, so DistributedModelParallel picks this sharder
        for it): table-/column-wise (+ row-wise on GPU) with the fused kernels, which hold fp16 rows."""

        @property
        def module_type(self):
            return TextEmbeddingBagCollection

        def sharding_types(self, compute_device_type: str) -> List[str]:
            allowed = TEXT_CPU_SHARDING_TYPES if compute_device_type == "cpu" else TEXT_CUDA_SHARDING_TYPES
            return [t for t in super().sharding_types(compute_device_type) if t in allowed + (TEXT_REPLICATED,)]

        def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
            allowed = TEXT_CPU_COMPUTE_KERNELS if compute_device_type == "cpu" else TEXT_CUDA_COMPUTE_KERNELS
            return [k for k in super().compute_kernels(sharding_type, compute_device_type) if k in allowed]

        def shard(self, module, params, env, device=None, module_fqn=None):
            """The stock sharded EBC, its replicated lookups without the DistributedDataParallel wrapper
            (recsys.train.frozen_text.drop_data_parallel_wrappers: nothing to all-reduce); on CPU its kernels read
            the one-row bags of the text KJT by index_select (recsys.train.frozen_text.use_single_row_gather: same
            tables, same output, several times faster than fbgemm's CPU forward there)."""
            from recsys.train.frozen_text import drop_data_parallel_wrappers, use_single_row_gather

            sharded = super().shard(module, params, env, device=device, module_fqn=module_fqn)
            drop_data_parallel_wrappers(sharded)
            if device is None or device.type == "cpu":
                use_single_row_gather(sharded)
            return sharded

    return FrozenTextSharder


def qcomm_registry_for(comm_precision: str, device_type: str) -> Optional[Dict[str, Any]]:
    """TorchRec's quantized-comms codecs for the pooled-embedding all-to-all (`train.embedding_comm`), or None for
    fp32. Forward and backward use the same precision; gloo (CPU) has no bf16 codec, so bf16 becomes fp16 there."""
    if comm_precision == "fp32":
        return None
    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry

    if device_type == "cpu" and comm_precision == "bf16":
        log.info("train.embedding_comm bf16: gloo has no bf16 codec, using fp16")
        comm_precision = "fp16"
    kind = CommType(comm_precision)
    return get_qcomm_codecs_registry(QCommsConfig(forward_precision=kind, backward_precision=kind),
                                     device=torch.device(device_type))


def sharders_for(device_type: str, fused_params: Optional[Dict[str, Any]] = None,
                 comm_precision: str = "fp32", text_dtype: str = "fp32") -> List[Any]:
    """The id-table sharder (fused optimiser, all-to-all precision; on CPU only table/column-wise and DP) and the
    frozen-text sharder. Text rows stored in fp16 cross ranks in fp16: exact (they are fp16 already), half the
    bytes."""
    _check_device(device_type)
    text_comm = "fp16" if text_dtype == "fp16" and comm_precision == "fp32" else comm_precision
    return [_make_sharder_class()(fused_params=dict(fused_params) if fused_params else None,
                                  qcomm_codecs_registry=qcomm_registry_for(comm_precision, device_type)),
            _make_text_sharder_class()(fused_params=frozen_fused_params(),
                                       qcomm_codecs_registry=qcomm_registry_for(text_comm, device_type))]


# -------------------------------------------------------------------------------------------------- constraints
# On one rank every table is table_wise (see constraints_from_spec). A switch only so tests can exercise the
# replicated-table path (which matters on 2+ ranks) in a one-rank process.
ONE_RANK_TABLE_WISE = True

def _pooling_factors(spec: Spec, table: str) -> List[float]:
    """Expected values per sample for each feature of `table`, in KJT order: ids and sequence positions hold
    exactly one; a sparse feature at most `max_values` (an upper bound keeps the comms estimate conservative)."""
    by_name = {f.name: f for f in spec.features}
    out: List[float] = []
    key_table = table_of_key(spec)
    for key in kjt_keys(spec):
        if key_table[key] != table:
            continue
        feat = by_name.get(key)
        if feat is not None and feat.kind == "sparse":
            out.append(float(feat.max_values))
        elif feat is not None and feat.kind == "sequence":  # a mean-pooled history: one key, up to max_len ids
            out.append(float(feat.max_len))
        else:
            out.append(1.0)
    return out


def constraints_from_spec(spec: Spec, device_type: str, world_size: Optional[int] = None) -> Dict[str, Any]:
    """`train.sharding_constraints` (table -> allowed sharding types) as TorchRec ParameterConstraints.

    Every table some feature reads gets an entry (it carries the pooling factors the cost model needs). On CPU each
    entry lists only CPU-buildable types: row-wise types are dropped with a warning, and a table left with nothing
    falls back to all CPU types. On CUDA unconstrained tables leave the choice to the planner.

    On one rank (`world_size` 1) every table is `table_wise`: the constraints exist to place tables across ranks,
    and with a single rank the other types only add work -- `data_parallel` wraps the lookup in DDP (an all-reduce
    of a one-rank group) and trains the table through a dense gradient and a separate optimiser step instead of
    the fused in-backward update, `column_wise`/`row_wise` split a table into shards that all live on that rank."""
    from torchrec.distributed.planner.types import ParameterConstraints

    _check_device(device_type)
    read_tables = set(table_of_key(spec).values())
    from recsys.models.tables import text_table_name

    declared = {t.name for t in spec.tables} | {text_table_name(t.name) for t in spec.text.tables}
    for name in spec.train.sharding_constraints:
        if name not in declared:
            raise SpecError(f"train.sharding_constraints.{name}: no such table (tables: {sorted(declared)})")
    out: Dict[str, ParameterConstraints] = {}
    if world_size == 1 and ONE_RANK_TABLE_WISE:
        if spec.train.sharding_constraints:
            log.info("one rank: every table table_wise (train.sharding_constraints place tables across ranks)")
        one = {t.name: ParameterConstraints(sharding_types=["table_wise"],
                                            pooling_factors=_pooling_factors(spec, t.name))
               for t in spec.tables if t.name in read_tables}
        one.update({name: ParameterConstraints(sharding_types=["table_wise"], pooling_factors=c.pooling_factors)
                    for name, c in _text_constraints(spec, device_type).items()})
        return one
    for table in spec.tables:
        if table.name not in read_tables:
            continue
        wanted = spec.train.sharding_constraints.get(table.name)
        types: Optional[List[str]] = list(dict.fromkeys(wanted)) if wanted else None
        if device_type == "cpu":
            if types is None:
                types = list(CPU_SHARDING_TYPES)
            else:
                dropped = [t for t in types if t not in CPU_SHARDING_TYPES]
                types = [t for t in types if t in CPU_SHARDING_TYPES]
                if dropped:
                    log.warning("train.sharding_constraints.%s: %s not available on CPU, dropped%s", table.name,
                                "/".join(dropped), "" if types else "; using " + "/".join(CPU_SHARDING_TYPES))
                types = types or list(CPU_SHARDING_TYPES)
        out[table.name] = ParameterConstraints(sharding_types=types,
                                               pooling_factors=_pooling_factors(spec, table.name))
    out.update(_text_constraints(spec, device_type))
    return out


def _text_constraints(spec: Spec, device_type: str) -> Dict[str, Any]:
    """Frozen text tables: the text sharder's types, narrowed by `train.sharding_constraints.text_<name>`; one
    row per key (each key is one text or one history position)."""
    from torchrec.distributed.planner.types import ParameterConstraints

    if not spec.text.frozen:
        return {}
    from recsys.data.features import text_kjt_keys
    from recsys.models.tables import text_table_name

    sharded = TEXT_CPU_SHARDING_TYPES if device_type == "cpu" else TEXT_CUDA_SHARDING_TYPES
    allowed = sharded + (TEXT_REPLICATED,)
    by_name = {f.name: f for f in spec.features_of("text")}
    out: Dict[str, Any] = {}
    for name in spec.used_text_tables():
        table = text_table_name(name)
        wanted = spec.train.sharding_constraints.get(table)
        types = [t for t in dict.fromkeys(wanted) if t in allowed] if wanted else list(sharded)
        if wanted and len(types) < len(set(wanted)):
            log.warning("train.sharding_constraints.%s: frozen text tables on %s take %s only; using %s", table,
                        device_type, "/".join(allowed), "/".join(types or sharded))
        n_keys = sum(1 for k in text_kjt_keys(spec) if by_name[k.split("__pos")[0]].text_table == name)
        out[table] = ParameterConstraints(sharding_types=types or list(sharded), pooling_factors=[1.0] * n_keys)
    return out


# -------------------------------------------------------------------------------------------------------- sizes
def table_bytes(rows: int, dim: int, optimizer: str) -> int:
    """fp32 weights plus the embedding optimiser's state (what a table costs wherever it is placed)."""
    weights = rows * dim * FP32_BYTES
    mult = _OPTIMIZER_STATE[optimizer]
    state = rows * FP32_BYTES if mult is None else int(weights * mult)
    return weights + state


def _min_split(allowed: Sequence[str], world_size: int, dim: int) -> int:
    """Into how many ranks a table can at best be divided under the allowed sharding types."""
    best = 1
    if any(t in ROW_WISE_TYPES for t in allowed):
        best = max(best, world_size)
    if "column_wise" in allowed or "table_column_wise" in allowed:
        best = max(best, min(world_size, max(1, dim // 4)))  # column shards are at least 4 wide
    return best


def explain_no_fit(spec: Spec, rows: Dict[str, int], world_size: int, device_type: str,
                   hbm_gb: Optional[float], ddr_gb: Optional[float]) -> str:
    """Which tables cannot be placed, and by how much, on `world_size` ranks of the given capacity."""
    from torchrec.distributed.planner.constants import DDR_CAP, HBM_CAP

    hbm = hbm_gb * GIB if hbm_gb is not None else HBM_CAP
    ddr = ddr_gb * GIB if ddr_gb is not None else DDR_CAP
    # On CUDA the UVM kernels may place a table in host memory; on CPU there is only DDR.
    per_rank = (hbm + ddr if device_type == "cuda" else ddr) * HEADROOM
    where = "HBM+DDR" if device_type == "cuda" else "DDR"
    constraints = constraints_from_spec(spec, device_type)
    cpu_or_all = CPU_SHARDING_TYPES if device_type == "cpu" else ROW_WISE_TYPES + ("column_wise", "table_wise")
    sizes: Dict[str, int] = {}
    problems: List[str] = []
    for t in spec.tables:
        if t.name not in constraints:
            continue
        sizes[t.name] = table_bytes(rows[t.name], t.dim, spec.train.embedding_optimizer)
        allowed = constraints[t.name].sharding_types or list(cpu_or_all)
        split = _min_split(allowed, world_size, t.dim)
        need = sizes[t.name] / split
        if need > per_rank:
            problems.append(f"table {t.name} ({rows[t.name]:,} rows x {t.dim}) needs {sizes[t.name] / GIB:.1f} GiB, "
                            f"at best {need / GIB:.1f} GiB per rank over {split} rank(s) ({'/'.join(allowed)}), "
                            f"{(need - per_rank) / GIB:.1f} GiB over the {per_rank / GIB:.1f} GiB usable {where} per rank")
    total, capacity = sum(sizes.values()), per_rank * world_size
    if not problems and total > capacity:
        largest = sorted(sizes, key=sizes.get, reverse=True)[:3]
        problems.append(f"tables need {total / GIB:.1f} GiB, {(total - capacity) / GIB:.1f} GiB over the "
                        f"{capacity / GIB:.1f} GiB usable {where} of {world_size} ranks; largest: "
                        + ", ".join(f"{n} {sizes[n] / GIB:.1f} GiB" for n in largest))
    return "; ".join(problems)


# --------------------------------------------------------------------------------------------------------- plan
@dataclass
class TableShardSummary:
    name: str
    sharding_type: str
    compute_kernel: str
    ranks: List[int]  # ranks holding a shard (all ranks for data_parallel)
    rows: int
    dim: int
    bytes: int  # weights + optimiser state, whole table


@dataclass
class RankMemory:
    rank: int
    hbm_bytes: int
    ddr_bytes: int


@dataclass
class PlanResult:
    plan: Any  # torchrec ShardingPlan
    tables: List[TableShardSummary]
    ranks: List[RankMemory]  # planner's estimate (weights, optimiser state, I/O buffers); weights only off rank 0
    world_size: int
    device_type: str
    hbm_cap_bytes: int  # per rank, before the planner's reservation
    ddr_cap_bytes: int
    perf_ms: Optional[float] = None  # planner's estimate of the slowest rank's fwd+bwd embedding time per step
    memory_from_planner: bool = field(default=False)
    text_bytes: List[int] = field(default_factory=list)  # per rank: weights of the frozen text tables' shards


def build_meta_ebc(spec: Spec, rows: Dict[str, int]) -> nn.Module:
    """The spec's EmbeddingBagCollection on the meta device: planning needs shapes, not memory."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    return EmbeddingBagCollection(tables=embedding_bag_configs(spec, rows), device=torch.device("meta"))


def build_meta_tables(spec: Spec, rows: Dict[str, int], text_rows: Dict[str, int], text_dim: int) -> nn.Module:
    """Every embedding module of the spec on the meta device: the id tables (`ebc`) and the frozen text tables
    (`text_ebc`, `text_rows` rows of width `text_dim` each), as the model holds them."""
    from recsys.models.encoding import TextEmbeddingBagCollection
    from recsys.models.tables import text_table_configs

    tables = nn.Module()
    tables.ebc = build_meta_ebc(spec, rows)
    tables.text_ebc = TextEmbeddingBagCollection(tables=text_table_configs(spec, text_rows, text_dim),
                                                 device=torch.device("meta"))
    return tables


def _capturing_stats():
    from torchrec.distributed.planner.types import Stats

    class CapturingStats(Stats):
        """Keeps the planner's chosen sharding options (with per-shard storage and perf) for our summary."""

        def __init__(self) -> None:
            self.best_plan: Optional[list] = None

        def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans,
                run_time, best_plan, *args, **kwargs) -> None:
            if sharding_plan.plan:  # the failure path also logs, with an empty plan
                self.best_plan = best_plan
            log.debug("planner: %d proposals, %d plans, %.2fs", num_proposals, num_plans, run_time)

    return CapturingStats()


def _shard_rank(placement: Any) -> int:
    return int(str(placement).split("/")[0].split(":")[1])  # "rank:3/cuda:3"


def _table_facts(module: nn.Module, spec: Spec) -> Dict[str, Tuple[int, int, int]]:
    """Embedding-table name -> (rows, dim, bytes with optimiser state), from every EBC config in `module`: frozen
    text tables count their storage dtype and no optimiser state."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from recsys.models.encoding import TextEmbeddingBagCollection

    out: Dict[str, Tuple[int, int, int]] = {}
    for m in module.modules():
        if not isinstance(m, EmbeddingBagCollection):
            continue
        frozen = isinstance(m, TextEmbeddingBagCollection)
        for c in m.embedding_bag_configs():
            size = (c.num_embeddings * c.embedding_dim * _DATA_TYPE_BYTES[c.data_type.name] if frozen
                    else table_bytes(c.num_embeddings, c.embedding_dim, spec.train.embedding_optimizer))
            out[c.name] = (c.num_embeddings, c.embedding_dim, size)
    return out


_DATA_TYPE_BYTES = {"FP32": 4, "FP16": 2, "BF16": 2, "INT8": 1}


def _summarise(plan: Any, facts: Dict[str, Tuple[int, int, int]], world_size: int) -> List[TableShardSummary]:
    out: List[TableShardSummary] = []
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():
            if ps.sharding_type == "data_parallel":
                ranks = list(range(world_size))
            elif ps.sharding_spec is not None:
                ranks = sorted({_shard_rank(s.placement) for s in ps.sharding_spec.shards})
            else:
                ranks = sorted(set(ps.ranks or []))
            n_rows, dim, size = facts[name]
            out.append(TableShardSummary(name=name, sharding_type=ps.sharding_type, compute_kernel=ps.compute_kernel,
                                         ranks=ranks, rows=n_rows, dim=dim, bytes=size))
    return out


def _memory_from_weights(plan: Any, world_size: int, facts: Dict[str, Tuple[int, int, int]]) -> List[RankMemory]:
    """Weights per rank from the shard metadata (ranks that did not plan have no planner estimate)."""
    per_rank = [0] * world_size
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():
            if ps.sharding_spec is None:
                continue
            n_rows, dim, size = facts[name]
            per_element = size / (n_rows * dim)  # weights and optimiser state, spread over the elements
            for s in ps.sharding_spec.shards:
                n = 1
                for d in s.shard_sizes:
                    n *= d
                per_rank[_shard_rank(s.placement)] += int(n * per_element)
    return [RankMemory(r, b, 0) for r, b in enumerate(per_rank)]


def _only_tables(plan: Any, keep) -> Any:
    """A shallow view of `plan` with only the tables `keep(name)` accepts (for per-rank sums)."""
    class _View:
        pass

    view = _View()
    view.plan = {path: {n: ps for n, ps in module_plan.items() if keep(n)} for path, module_plan in plan.plan.items()}
    return view


def plan_for(
    spec: Spec,
    rows: Dict[str, int],
    world_size: int,
    device_type: str,
    hbm_gb: Optional[float] = None,
    ddr_gb: Optional[float] = None,
    batch_size: Optional[int] = None,
    pg: Optional[Any] = None,
    module: Optional[nn.Module] = None,
    local_world_size: Optional[int] = None,
    text_rows: Optional[Dict[str, int]] = None,
    text_dim: Optional[int] = None,
) -> PlanResult:
    """Shard the spec's tables over `world_size` ranks.

    `rows`: table -> row count (`recsys.models.tables.table_rows`). `batch_size`: per-rank batch (default: the
    spec's global batch / world size). `module`: the model to plan (its EBCs on meta or real devices); default a
    bare meta EBC built from the spec, whose plan is keyed by the empty module path, or with `text_rows` (text
    table -> rows) and `text_dim` the id and frozen text tables together (`build_meta_tables`). With `pg` the plan is made on
    rank 0 and broadcast (every rank must call); ranks per host then default to $LOCAL_WORLD_SIZE.
    Raises SpecError when the tables cannot be placed."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import PlannerError

    _check_device(device_type)
    if local_world_size is None and pg is not None and os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
        local_world_size = int(os.environ["LOCAL_WORLD_SIZE"])  # under torchrun: the real ranks per host
    topology = make_topology(world_size, device_type, hbm_gb, ddr_gb, local_world_size)
    local_batch = batch_size if batch_size is not None else max(1, spec.train.batch_size // world_size)
    stats = _capturing_stats()
    # A fixed reservation, not TorchRec's default heuristic: the heuristic sizes the dense part from materialised
    # tensors, which a meta-device dry run does not have (TorchRec warns about exactly that).
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=local_batch,
                                       storage_reservation=FixedPercentageStorageReservation(RESERVED_FRACTION),
                                       constraints=constraints_from_spec(spec, device_type, world_size), stats=stats,
                                       debug=False)
    if module is not None:
        target = module
    elif text_rows and spec.text.frozen:
        target = build_meta_tables(spec, rows, text_rows, text_dim or spec.text.reduce_dim)
    else:
        target = build_meta_ebc(spec, rows)
    sharders = sharders_for(device_type, fused_params_for(spec), text_dtype=spec.text.dtype)
    try:
        plan = planner.plan(target, sharders) if pg is None else planner.collective_plan(target, sharders, pg)
    except PlannerError as err:
        why = explain_no_fit(spec, rows, world_size, device_type, hbm_gb, ddr_gb)
        first_line = str(err).strip().splitlines()[0]
        if not why and batch_size is None:  # nothing too big but the batch: its buffers count in the estimate
            why = (f"{first_line} The estimate counts each rank's batch buffers: train.batch_size="
                   f"{spec.train.batch_size:,} gives {local_batch:,} rows per rank; lower train.batch_size")
        raise SpecError(f"{spec.name}: no sharding plan on {world_size} {device_type} rank(s): "
                        f"{why or first_line}") from None

    dev0 = topology.devices[0].storage
    facts = _table_facts(target, spec)
    result = PlanResult(plan=plan, tables=_summarise(plan, facts, world_size), ranks=[],
                        world_size=world_size, device_type=device_type, hbm_cap_bytes=int(dev0.hbm),
                        ddr_cap_bytes=int(dev0.ddr))
    if stats.best_plan is not None:
        hbm, ddr, perf = [0] * world_size, [0] * world_size, [0.0] * world_size
        for option in stats.best_plan:
            for shard in option.shards:
                hbm[shard.rank] += shard.storage.hbm
                ddr[shard.rank] += shard.storage.ddr
                if shard.perf is not None:
                    perf[shard.rank] += shard.perf.total
        result.ranks = [RankMemory(r, hbm[r], ddr[r]) for r in range(world_size)]
        result.perf_ms = max(perf) if any(perf) else None
        result.memory_from_planner = True
    else:
        result.ranks = _memory_from_weights(plan, world_size, facts)
    from recsys.models.tables import TEXT_TABLE_PREFIX

    text_plan = _only_tables(plan, lambda name: name.startswith(TEXT_TABLE_PREFIX) and name not in
                             {t.name for t in spec.tables})
    result.text_bytes = [r.hbm_bytes for r in _memory_from_weights(text_plan, world_size, facts)]
    return result


def _sharded_input_keys(module: Optional[nn.Module]) -> Optional[List[str]]:
    """The feature order in which sharded EmbeddingBagCollection `module` distributes its input: its shardings'
    features, one sharding after the other (what TorchRec's input dist compares the KJT's keys with); None for a
    module that is not sharded that way."""
    shardings = getattr(module, "_embedding_shardings", None)
    if not shardings:
        return None
    return [f for sharding in shardings for f in sharding.feature_names()]


def _l0_of(model: nn.Module) -> Optional[nn.Module]:
    while hasattr(model, "module") and not hasattr(model, "l0"):  # DMP -> (DDP ->) TrainTask
        model = model.module
    return getattr(getattr(model, "model", model), "l0", None)


class _InputKeyOrder:
    """A sharded EmbeddingBagCollection's `input_dist`, fed its features in one fixed key order, with the empty
    pad features of the tables trained on FBGEMM's loop path added (`recsys.train.update_path`).

    TorchRec's sharded EBC compares the keys of the FIRST KJT it receives with the order its shardings read and
    from then on permutes every KJT by that comparison's indices without looking at its keys again: a later KJT in
    another key order would be permuted wrongly, silently. With batches assembled in the shardings' own order
    (`KjtOrder`) as well as in the spec's (serving, other producers), each KJT is therefore brought to the
    shardings' order here first (a no-op for batches already in it, which then skip TorchRec's permute too). Pad
    keys hold no values, so adding them only inserts zero lengths: the values stay as they are."""

    def __init__(self, module: nn.Module, keys: List[str]):
        self.input_dist, self.keys = module.input_dist, list(keys)
        self.real = [k for k in self.keys if not is_pad_key(k)]  # the keys a batch brings
        self._indices: Dict[Tuple[str, ...], List[int]] = {}
        self._pad_index: Dict[int, torch.Tensor] = {}  # batch size -> where each length of the padded KJT comes from

    def __call__(self, ctx, features, *args, **kwargs):
        keys = features.keys()
        if keys != self.real:
            indices = self._indices.get(tuple(keys))
            if indices is None:
                where = {k: i for i, k in enumerate(keys)}
                missing = [k for k in self.real if k not in where]
                if missing or len(keys) != len(self.real):
                    raise RuntimeError(f"the embedding input has keys {keys}; its sharded tables read {self.real}")
                indices = self._indices[tuple(keys)] = [where[k] for k in self.real]
            features = features.permute(indices)
        if len(self.real) != len(self.keys):
            features = self._padded(features)
        return self.input_dist(ctx, features, *args, **kwargs)

    def _padded(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        b = features.stride()
        index = self._pad_index.get(b)
        if index is None:
            at = {k: i for i, k in enumerate(self.real)}
            zero = len(self.real) * b  # the one zero appended after the batch's lengths
            index = self._pad_index[b] = torch.cat([
                torch.arange(at[k] * b, (at[k] + 1) * b) if k in at else torch.full((b,), zero)
                for k in self.keys])
        lengths = features.lengths()
        lengths = torch.cat([lengths, lengths.new_zeros(1)]).index_select(0, index.to(lengths.device))
        return KeyedJaggedTensor(keys=self.keys, values=features.values(), lengths=lengths,
                                 weights=features.weights_or_none(), stride=b)


def pin_kjt_order(model: nn.Module, spec: Spec) -> KjtOrder:
    """Make the sharded embedding modules of `model` (DistributedModelParallel or what it wraps) read every KJT in
    their shardings' own key order (`_InputKeyOrder`) and return that order as a `KjtOrder`, for loaders to
    assemble batches in: those need no permute before their input distribution. A module whose order is not a
    reordering of whole features (column-wise shards read a feature once each) is left to TorchRec, and its KJT
    stays in the spec's order (with its pad features, if any, added after the spec's keys)."""
    l0 = _l0_of(model)
    for name in ("ebc", "text_ebc"):
        module = getattr(l0, name, None)
        keys = _sharded_input_keys(module)
        if keys is None:
            continue
        if len(set(keys)) != len(keys):
            pads = list(dict.fromkeys(k for k in keys if is_pad_key(k)))
            if not pads:
                continue
            keys = (kjt_keys(spec) if name == "ebc" else text_kjt_keys(spec)) + pads
        if not isinstance(module.__dict__.get("input_dist"), _InputKeyOrder):
            module.input_dist = _InputKeyOrder(module, keys)
    return sharded_kjt_order(model, spec)


def sharded_kjt_order(model: nn.Module, spec: Spec) -> KjtOrder:
    """The `KjtOrder` that `pin_kjt_order` gave `model`'s sharded embedding modules (spec order where it gave none:
    their input is then never in another order than the spec's)."""
    l0 = _l0_of(model)
    pinned = {name: getattr(getattr(l0, name, None), "__dict__", {}).get("input_dist") for name in ("ebc", "text_ebc")}
    return KjtOrder.from_keys(spec, *(p.real if isinstance(p, _InputKeyOrder) else None
                                      for p in (pinned["ebc"], pinned["text_ebc"])))
