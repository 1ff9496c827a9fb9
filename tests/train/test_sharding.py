"""Sharding plans on simulated topologies (no GPU), fit errors, CPU restrictions, and one CUDA run when present."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from recsys.errors import SpecError
from recsys.models.tables import table_rows
from recsys.spec.loader import load_spec
from recsys.train.sharding import (CPU_SHARDING_TYPES, GIB, HEADROOM, ROW_WISE_TYPES, constraints_from_spec,
                                   make_topology, plan_for, sharders_for, table_bytes)

ROOT = Path(__file__).resolve().parents[2]
PROD = ROOT / "feature_specs" / "production_example.yaml"
AMAZON = ROOT / "feature_specs" / "amazon_sr.yaml"
# amazon_sr sizes its tables from prepared vocabularies; these stand in for them (the plan only needs shapes).
AMAZON_ROWS = {"item": 60_000, "brand": 4_000, "category": 1_500, "query": 20_000}
AMAZON_TEXT = {"text_items", "text_queries", "text_item_queries"}  # its frozen text tables (text.mode llm)
HUGE = ("user", "item", "query")


@pytest.fixture(scope="module")
def prod_spec():
    return load_spec(PROD)


@pytest.fixture(scope="module")
def prod_plan_64(prod_spec):
    from recsys.text.frozen import planned_text_rows

    return plan_for(prod_spec, table_rows(prod_spec, {}), world_size=64, device_type="cuda", hbm_gb=80,
                    text_rows=planned_text_rows(prod_spec), text_dim=prod_spec.text.reduce_dim)


# ----------------------------------------------------------------------------------------------- production / 64
def test_production_spec_has_production_sized_tables(prod_spec):
    rows = table_rows(prod_spec, {})
    assert rows["user"] == 1_000_000_000 and rows["item"] == 200_000_000 and rows["query"] == 50_000_000
    assert all(prod_spec.table(n).dim == 128 for n in HUGE)
    assert len(prod_spec.domains) >= 3


def test_every_table_is_placed_on_64_gpus(prod_spec, prod_plan_64):
    placed = {t.name for t in prod_plan_64.tables}
    assert placed == {t.name for t in prod_spec.tables} | {"text_items", "text_queries"}
    for t in prod_plan_64.tables:
        assert t.ranks and all(0 <= r < 64 for r in t.ranks), t


def test_huge_tables_are_row_sharded_over_several_ranks(prod_plan_64):
    by_name = {t.name: t for t in prod_plan_64.tables}
    for name in HUGE:
        assert by_name[name].sharding_type in ROW_WISE_TYPES, by_name[name]
    # 1B x 128 fp32 is ~480 GiB: it cannot sit on fewer than 8 ranks of 80 GiB.
    assert len(by_name["user"].ranks) >= 8


def test_production_text_tables_are_sharded_fp16(prod_spec, prod_plan_64):
    """LLM text at production size: 200M item and 50M query texts, 64-wide fp16, split over several ranks each, so
    no rank holds a whole text table."""
    by_name = {t.name: t for t in prod_plan_64.tables}
    items = by_name["text_items"]
    assert (items.rows, items.dim) == (200_000_001, 64) and items.bytes == items.rows * 64 * 2
    assert items.sharding_type in ROW_WISE_TYPES + ("column_wise",) and len(items.ranks) > 1
    assert len(by_name["text_queries"].ranks) > 1
    total = items.bytes + by_name["text_queries"].bytes
    assert sum(prod_plan_64.text_bytes) == total
    assert max(prod_plan_64.text_bytes) < items.bytes  # nobody holds even the item texts whole


def test_memory_per_rank_within_hbm(prod_plan_64):
    assert prod_plan_64.memory_from_planner
    assert prod_plan_64.hbm_cap_bytes == 80 * GIB
    assert len(prod_plan_64.ranks) == 64
    for r in prod_plan_64.ranks:
        assert r.hbm_bytes <= 80 * GIB * HEADROOM, r
    # what the ranks hold adds up to at least the weights of all tables
    weights = sum(t.rows * t.dim * (2 if t.name.startswith("text_") else 4) for t in prod_plan_64.tables)
    assert sum(r.hbm_bytes + r.ddr_bytes for r in prod_plan_64.ranks) >= weights
    assert prod_plan_64.perf_ms is not None and prod_plan_64.perf_ms > 0


def test_too_small_cluster_names_the_table(prod_spec):
    with pytest.raises(SpecError, match=r"table user .*GiB over") as err:
        plan_for(prod_spec, table_rows(prod_spec, {}), world_size=8, device_type="cuda", hbm_gb=16, ddr_gb=16)
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)


def test_total_over_capacity_names_largest_tables(prod_spec):
    # each table alone fits once row-sharded over 64 ranks, but not all of them together
    with pytest.raises(SpecError, match=r"largest: user"):
        plan_for(prod_spec, table_rows(prod_spec, {}), world_size=64, device_type="cuda", hbm_gb=5, ddr_gb=5)


# -------------------------------------------------------------------------------------------------- topology etc
def test_topology_capacities():
    topo = make_topology(16, "cuda", hbm_gb=80, ddr_gb=512)
    assert topo.world_size == 16 and topo.local_world_size == 8
    assert topo.devices[0].storage.hbm == 80 * GIB and topo.devices[0].storage.ddr == 512 * GIB
    cpu = make_topology(2, "cpu", ddr_gb=8)
    assert cpu.devices[1].storage.hbm == 0 and cpu.devices[1].storage.ddr == 8 * GIB
    with pytest.raises(SpecError, match="multiple"):
        make_topology(12, "cuda", local_world_size=8)
    with pytest.raises(SpecError, match="device"):
        make_topology(2, "tpu")


def test_table_bytes_counts_optimizer_state():
    assert table_bytes(10, 8, "sgd") == 10 * 8 * 4
    assert table_bytes(10, 8, "rowwise_adagrad") == 10 * 8 * 4 + 10 * 4
    assert table_bytes(10, 8, "adam") == 3 * 10 * 8 * 4


# --------------------------------------------------------------------------------------------------- constraints
def _with_constraints(path: Path, constraints: str):
    return load_spec(path, [f"train.sharding_constraints={constraints}"])


def test_cpu_constraints_never_row_wise(caplog):
    spec = _with_constraints(AMAZON, '{"query": ["row_wise"], "item": ["table_row_wise", "column_wise"]}')
    with caplog.at_level(logging.WARNING, logger="recsys.train.sharding"):
        cons = constraints_from_spec(spec, "cpu")
    assert set(cons) == set(AMAZON_ROWS) | AMAZON_TEXT
    for name in AMAZON_TEXT:  # frozen text tables: sharded, never replicated
        assert set(cons.pop(name).sharding_types) == {"table_wise", "column_wise"}
    for name, c in cons.items():
        assert c.sharding_types and not set(c.sharding_types) & set(ROW_WISE_TYPES), (name, c.sharding_types)
        assert set(c.sharding_types) <= set(CPU_SHARDING_TYPES)
    assert cons["item"].sharding_types == ["column_wise"]
    assert "query" in caplog.text and "row_wise" in caplog.text and "not available on CPU" in caplog.text
    # the sharder itself never offers row-wise on CPU either
    assert not set(sharders_for("cpu")[0].sharding_types("cpu")) & set(ROW_WISE_TYPES)


def test_cuda_constraints_follow_the_spec():
    spec = _with_constraints(AMAZON, '{"query": ["row_wise"]}')
    cons = constraints_from_spec(spec, "cuda")
    assert cons["query"].sharding_types == ["row_wise"]
    assert cons["item"].sharding_types is None  # the planner chooses
    # item is read by item_id and by the 20 history positions: one pooling factor per KJT key
    assert len(cons["item"].pooling_factors) == 21
    assert set(sharders_for("cuda")[0].sharding_types("cuda")) >= set(ROW_WISE_TYPES)


def test_constraint_on_unknown_table_is_a_spec_error():
    with pytest.raises(SpecError, match="sharding_constraints.nope"):  # the loader catches it ...
        _with_constraints(AMAZON, '{"nope": ["table_wise"]}')
    spec = load_spec(AMAZON)
    spec.train.sharding_constraints["nope"] = ["table_wise"]  # ... and so do we, for specs built in code
    with pytest.raises(SpecError, match="sharding_constraints.nope"):
        constraints_from_spec(spec, "cpu")


def test_cuda_constraint_is_obeyed(prod_spec):
    spec = load_spec(PROD, ['train.sharding_constraints={"user": ["row_wise"]}'])
    result = plan_for(spec, table_rows(spec, {}), world_size=64, device_type="cuda", hbm_gb=80)
    user = next(t for t in result.tables if t.name == "user")
    assert user.sharding_type == "row_wise" and len(user.ranks) == 64


# ---------------------------------------------------------------------------------------------------- amazon cpu
def test_amazon_sr_plan_on_two_cpu_ranks():
    spec = load_spec(AMAZON)
    result = plan_for(spec, table_rows(spec, AMAZON_ROWS), world_size=2, device_type="cpu")
    assert {t.name for t in result.tables} == set(AMAZON_ROWS)
    for t in result.tables:
        assert t.sharding_type in CPU_SHARDING_TYPES and set(t.ranks) <= {0, 1}
        assert t.rows == AMAZON_ROWS[t.name]
    assert len(result.ranks) == 2 and sum(r.ddr_bytes for r in result.ranks) > 0
    assert all(r.hbm_bytes == 0 for r in result.ranks)


def test_collective_plan_with_a_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        spec = load_spec(AMAZON)
        result = plan_for(spec, table_rows(spec, AMAZON_ROWS), world_size=2, device_type="cpu",
                          pg=dist.group.WORLD)
        assert {t.name for t in result.tables} == set(AMAZON_ROWS)
    finally:
        dist.destroy_process_group()


def test_plan_cli_prints_markdown(capsys):
    spec_mod = importlib.util.spec_from_file_location("plan_job", ROOT / "jobs" / "plan.py")
    job = importlib.util.module_from_spec(spec_mod)
    spec_mod.loader.exec_module(job)
    assert job.main(["--spec", str(PROD), "--world-size", "64", "--device", "cuda", "--hbm-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "| user | 1,000,000,000 | 128 |" in out and "### Memory per rank" in out and "ms per step" in out
    assert "| text_items | 200,000,001 | 64 |" in out and "Frozen text tables (weights, fp16)" in out
    assert job.rank_ranges([0, 1, 2, 3, 7], 64) == "0-3,7" and job.rank_ranges(list(range(4)), 4) == "all 4"


def _plan_job():
    spec_mod = importlib.util.spec_from_file_location("plan_job", ROOT / "jobs" / "plan.py")
    job = importlib.util.module_from_spec(spec_mod)
    spec_mod.loader.exec_module(job)
    return job


def test_plan_cli_without_vocab_sizes_is_a_clear_error(tmp_path):
    # no prepared vocabularies (a folder that surely has none, whatever this machine holds): one line naming the
    # missing file and the job that builds it
    from recsys.errors import DataError

    spec = load_spec(AMAZON, [f"data.prepared_dir={tmp_path / 'empty'}"])
    with pytest.raises(DataError) as info:
        _plan_job().rows_for(spec)
    msg = str(info.value)
    # the model reads table sizes from the resolved schema prepare writes: the missing file is that schema
    assert "\n" not in msg and str(tmp_path / "empty" / "resolved") in msg and "schema.json" in msg
    assert "jobs/prepare_data.py" in msg


def test_plan_cli_takes_bucket_counts_without_prepared_data(tmp_path):
    sets = [f"data.prepared_dir={tmp_path / 'empty'}"] + [f"tables.{t}.num_buckets={n}" for t, n in AMAZON_ROWS.items()]
    assert _plan_job().rows_for(load_spec(AMAZON, sets)) == AMAZON_ROWS


# ----------------------------------------------------------------------------------------------------------- gpu
def _cuda_fbgemm() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import fbgemm_gpu
    except Exception:
        return False
    return getattr(fbgemm_gpu, "__variant__", "cpu") != "cpu"  # fbgemm-gpu-cpu says "cpu"; CUDA builds e.g. "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_fbgemm(), reason="needs CUDA and the CUDA build of fbgemm-gpu")
def test_sharded_ebc_forward_backward_on_cuda():
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys.data.features import kjt_keys, table_of_key
    from recsys.train.sharding import build_meta_ebc, fused_params_for

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        spec = load_spec(AMAZON)
        rows = table_rows(spec, AMAZON_ROWS)
        free, _ = torch.cuda.mem_get_info()
        result = plan_for(spec, rows, world_size=1, device_type="cuda", hbm_gb=free / GIB, pg=dist.group.WORLD)
        model = DistributedModelParallel(build_meta_ebc(spec, rows), env=ShardingEnv.from_process_group(dist.group.WORLD),
                                         device=torch.device("cuda"), plan=result.plan,
                                         sharders=sharders_for("cuda", fused_params_for(spec)))
        keys, batch = kjt_keys(spec), 64
        values = torch.randint(0, 1_000, (batch * len(keys),), device="cuda")
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values,
                                                  lengths=torch.ones(batch * len(keys), dtype=torch.int32,
                                                                     device="cuda"))
        out = model(kjt)
        out = out.wait() if hasattr(out, "wait") else out  # a LazyAwaitable[KeyedTensor] on some versions
        dense = out.values()
        key_table = table_of_key(spec)
        assert dense.shape == (batch, sum(spec.table(key_table[k]).dim for k in keys))
        assert torch.isfinite(dense).all()
        dense.sum().backward()  # the fused optimiser updates the tables in the backward pass
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()



def test_all_to_all_precision_codecs():
    """`train.embedding_comm`: fp32 sends as is (no codecs); fp16 quantizes the pooled all-to-all both ways; gloo
    has no bf16 codec, so on CPU bf16 is sent as fp16 rather than failing at the first step."""
    import torch

    from recsys.train.sharding import qcomm_registry_for, sharders_for

    assert qcomm_registry_for("fp32", "cpu") is None
    for asked in ("fp16", "bf16"):
        codecs = qcomm_registry_for(asked, "cpu")["POOLED_EMBEDDINGS_ALL_TO_ALL"]
        assert codecs.forward.quantized_dtype == codecs.backward.quantized_dtype == torch.float16
    sharder = sharders_for("cpu", comm_precision="fp16")[0]
    assert "POOLED_EMBEDDINGS_ALL_TO_ALL" in sharder.qcomm_codecs_registry


@pytest.mark.parametrize("mode", ["none", "random"])
def test_text_table_constraints_survive_other_text_modes(mode):
    """amazon_sr.yaml places its frozen text tables; overridden to another text mode (the ablations) it still loads,
    and the text constraints are simply unused."""
    spec = load_spec(AMAZON, [f"text.mode={mode}"])
    assert "text_items" in spec.train.sharding_constraints
    assert set(constraints_from_spec(spec, "cpu", 2)) == set(AMAZON_ROWS)


def test_plan_cli_console_is_the_plan_only(child_env):
    """TorchRec's planner warns once per table ("Sharding spec not found for ebc.<table>") through the root logger:
    library noise, kept off the console like every job's."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "plan.py"), "--spec", str(PROD), "--world-size", "8",
                          "--device", "cuda", "--hbm-gb", "80"], capture_output=True, text=True, env=child_env,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| user |" in res.stdout
    assert "Sharding spec not found" not in res.stderr and "WARNING" not in res.stderr, res.stderr[-2000:]
