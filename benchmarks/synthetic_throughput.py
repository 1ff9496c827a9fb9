#!/usr/bin/env python
"""Training samples/s of the full model on synthetic amazon-sr-shaped batches: needs no data files, so it runs on a
bare GPU machine (benchmarks/gpu_check.sh) as well as here.

    python benchmarks/synthetic_throughput.py --device cuda --batch-sizes 4096 16384
    torchrun --nproc_per_node=2 benchmarks/synthetic_throughput.py --device cpu

Table sizes are amazon-sr's prepared vocabularies, text tables are random unit vectors of the MiniLM width, and
batches follow the data's shapes (history 0-20 items, 1-16 category tokens, one query in three rows). The model is
built from feature_specs/amazon_sr.yaml exactly as the pretraining job builds it: meta-device tables, fused
in-backward optimiser, DistributedModelParallel with the planner's plan, TrainPipelineSparseDist.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROWS = {"user": 58985, "item": 19965, "brand": 1428, "category": 997, "query": 814}  # amazon-sr vocabularies
TEXT_ROWS = {"items": 21245, "queries": 871, "item_queries": 21245}


def synthetic_batches(spec, batch: int, n: int, seed: int, device):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys.data.batch import Batch
    from recsys.data.features import kjt_keys, table_of_key

    g = torch.Generator().manual_seed(seed)
    keys, key_table = kjt_keys(spec), table_of_key(spec)
    seq = next(f for f in spec.features if f.kind == "sequence")
    out = []
    for _ in range(n):
        hist_len = torch.randint(0, seq.max_len + 1, (batch,), generator=g)
        lengths, values = [], []
        for k in keys:
            if "__pos" in k:
                pos = int(k.rsplit("__pos", 1)[1])
                ln = (hist_len > pos).long()
            elif k == "item_category":
                ln = torch.randint(1, 17, (batch,), generator=g)
            else:
                ln = torch.ones(batch, dtype=torch.long)
            lengths.append(ln)
            values.append(torch.randint(1, ROWS[key_table[k]], (int(ln.sum()),), generator=g))
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
        text = {}
        for f in spec.features:
            if f.kind != "text":
                continue
            n_rows = TEXT_ROWS[f.text_table]
            if f.sequence:
                rows = torch.randint(1, n_rows, (batch, f.max_len), generator=g)
                rows[torch.arange(f.max_len).unsqueeze(0) >= hist_len.unsqueeze(1)] = 0
            else:
                rows = torch.randint(1, n_rows, (batch,), generator=g)
            text[f.name] = rows
        out.append(Batch(sparse=kjt, dense=torch.zeros(batch, 0), text=text, seq_lengths={seq.name: hist_len},
                         labels=(torch.rand(batch, generator=g) < 0.2).float(),
                         domain=torch.randint(0, len(spec.domains), (batch,), generator=g),
                         row_id=torch.arange(batch)))
    return out


def measure(spec, ctx, batch: int, steps: int, warmup: int) -> dict:
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.optim import rowwise_adagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from recsys.models.model import SRFoundationModel, TrainTask
    from recsys.train.frozen_text import fill_text_tables, is_text_table_key
    from recsys.train.sharding import plan_for, sharders_for

    rng = np.random.default_rng(0)
    text = {}
    for name, n in TEXT_ROWS.items():  # frozen text tables as recsys.text.frozen writes them: projected, unit rows
        v = rng.standard_normal((n, spec.text.reduce_dim or 384)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        v[0] = 0
        text[name] = v.astype(np.float16 if spec.text.dtype == "fp16" else np.float32)
    # mode hybrid: token ids beside the frozen rows, random words per text like the rows' random vectors
    tokens = ({name: rng.integers(1, spec.text.random_buckets, (n, spec.text.random_max_tokens)) for name, n in
               TEXT_ROWS.items()} if spec.text.mode == "hybrid" else None)
    model = SRFoundationModel(spec, ROWS, text if spec.text.frozen else {}, device=torch.device("meta"),
                              text_tokens=tokens)
    task = TrainTask(model, spec)
    apply_optimizer_in_backward(rowwise_adagrad.RowWiseAdagrad, list(model.l0.ebc.parameters()),
                                {"lr": spec.train.embedding_lr})
    plan = plan_for(spec, ROWS, ctx.world_size, ctx.device.type, pg=dist.group.WORLD, module=task,
                    batch_size=batch)
    dmp = DistributedModelParallel(module=task, device=ctx.device, plan=plan.plan,
                                   sharders=sharders_for(ctx.device.type, text_dtype=spec.text.dtype))
    if spec.text.frozen:
        fill_text_tables(dmp, text)
    dense = {k: v for k, v in in_backward_optimizer_filter(dmp.named_parameters()) if not is_text_table_key(k)}
    opt = CombinedOptimizer([dmp.fused_optimizer,
                             KeyedOptimizerWrapper(dense, lambda ps: torch.optim.Adam(ps, lr=spec.train.lr))])
    batches = synthetic_batches(spec, batch, min(steps + warmup, 16), seed=ctx.rank, device=ctx.device)
    pipe = TrainPipelineSparseDist(dmp, opt, ctx.device, execute_all_batches=True)

    def feed(n):
        for i in range(n):
            yield batches[i % len(batches)]

    it = feed(warmup + steps + 2)
    for _ in range(warmup):
        pipe.progress(it)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        pipe.progress(it)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"batch_per_rank": batch, "world_size": ctx.world_size, "steps": steps,
            "samples_per_s": steps * batch * ctx.world_size / dt,
            "plan": {t.name: t.sharding_type for t in plan.tables}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[2048])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from recsys.spec.loader import load_spec
    from recsys.train.dist import init_distributed, shutdown

    ctx = init_distributed(args.device)
    configs = {
        "sr_foundation (default spec)": [],
        "peers' configuration (dim 16, shared_bottom, no text)":
            ["model.tower=shared_bottom", "text.mode=none"] + [f"tables.{t}.dim=16" for t in ROWS],
    }
    results = []
    try:
        for name, sets in configs.items():
            spec = load_spec(ROOT / "feature_specs" / "amazon_sr.yaml", sets)
            for b in args.batch_sizes:
                r = measure(spec, ctx, b, args.steps, args.warmup)
                r.update(config=name, device=str(ctx.device.type),
                         gpu=torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else None)
                results.append(r)
                if ctx.is_main:
                    print(f"{name:55s} batch/rank {b:6d}  {r['samples_per_s']:12,.0f} samples/s", flush=True)
        if ctx.is_main and args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    from recsys.cli import exit_with  # after a gloo group (a worker): no interpreter finalisation, see there

    exit_with(main())
