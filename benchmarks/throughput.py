#!/usr/bin/env python
"""Training and inference throughput (samples/s) on amazon-sr, measured side by side in ONE launch and reported as
ratios: our full model against a plain-PyTorch reference of the same model code, our peers' configuration against
the public peers themselves (our re-implementations of Scenario-Wise-Rec's EPNet and SharedBottom,
benchmarks/peers.py), plus the loader alone, peak RSS, FLOPs per sample against this machine's fp32 matmul peak and
the profile of the distributed training step. Every report names the CPU (lscpu model name), torch's CPU capability,
the cores and the commit: absolute figures belong to one machine, the ratios are the claim.

    python benchmarks/throughput.py                    # amazon-sr, the default set, 3 interleaved rounds (~12 min
                                                       # on 2 quiet cores)
    python benchmarks/throughput.py --quick            # amazon-sr goal set, 1 round, few steps (~4 min); movielens
                                                       # when the amazon-sr files are absent
    python benchmarks/throughput.py --configs tr_full_train_2 plain_full_train_2
    python benchmarks/throughput.py --all              # every configuration

Every configuration is its own `torchrun` launch of this file's timing entry point (`--worker`): build the model
as the training job does, warm up, barrier, time N steps, barrier (no evaluation inside the timed window). With
`--repeat R` the configurations are launched in R interleaved rounds (A B C, A B C, ...) and each reports its median:
a machine that gets busier or quieter during the run then shifts every configuration alike, not the last ones only.
The TorchRec configurations run the job's own pieces (Trainer: planner-sharded DistributedModelParallel, fused
in-backward row-wise Adagrad, the job's training step (TrainPipelineSparseDist; one CPU process: recsys.train.step's
plain step), the finite-gradient guard); the plain ones run the same
recsys model code on benchmarks/plain_reference.py's EmbeddingBag collection with torch.optim (sparse Adagrad +
Adam) and DistributedDataParallel on 2 ranks. `*_prebuilt` configurations and the public peers time the step on
batches built before the timed window (how the peers are timed); the others include our loader. Each measurement
records the 1-minute load average before and after: figures taken under load are noisy, ratios less so.
The TorchRec training configurations run `train.compile` as `--compile` says (default on, the plan a training run
of >= 10,000 steps gets on a CPU with a C++ compiler): the compile happens in the warm-up, outside the timed window,
and each configuration reports its warm-up seconds with the compile in them.

Writes benchmarks/results/throughput.{json,md,png}.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from recsys.train.dist import GLOO_EXIT_ABORT  # noqa: E402

# The goals, as ratios measured in the same launch (CPU-independent): our peers' configuration >= 1.5x the fastest
# public peer at global batch 4,096 on the same protocol (pre-built batches, one process, all cores), and the full
# model on TorchRec at least as fast as the plain-PyTorch reference of the same model code.
GOAL_PEER_RATIO = 1.5
GOAL_FULL_VS_PLAIN = 1.0

# name -> (impl, task, nproc, variant[, overrides of this configuration only]). impl "peer" = benchmarks/peers.py
# (variant = the peer model), always one process with every core as an intra-op thread.
CONFIGS: Dict[str, tuple] = {
    "peer_epnet": ("peer", "train", 1, "epnet"),
    "peer_sharedbottom": ("peer", "train", 1, "sharedbottom"),
    "tr_peer_train_1_prebuilt": ("torchrec", "train", 1, "peer"),
    # information, not the goal: the peers' configuration with the default spec's wider tower (256-128, 3x the
    # tower FLOPs of EPNet's 128-64-32 MLP; the peers' configuration until 2026-12-01)
    "tr_peer256_train_1_prebuilt": ("torchrec", "train", 1, "peer", ["model.hidden=[256,128]"]),
    # information: the goal configuration with its dense layers uncompiled (what a run shorter than 10,000 steps
    # gets under train.compile auto)
    "tr_peer_train_1_prebuilt_uncompiled": ("torchrec", "train", 1, "peer", ["train.compile=off"]),
    # information: the goal configuration with every one-feature table on FBGEMM's JIT backward path, whichever
    # path `train.embedding_update_path: auto` picks on this CPU (recsys/train/update_path.py)
    "tr_peer_train_1_prebuilt_jit": ("torchrec", "train", 1, "peer", ["train.embedding_update_path=jit"]),
    # information: the goal configuration and the full model with their dense layers in fp32, whichever precision
    # `train.precision: auto` picks on this CPU (recsys/models/precision.py): what auto's choice buys here
    "tr_peer_train_1_prebuilt_fp32": ("torchrec", "train", 1, "peer", ["train.precision=fp32"]),
    "tr_full_train_1_fp32": ("torchrec", "train", 1, "full", ["train.precision=fp32"]),
    "loader_1": ("loader", "loader", 1, "full"),
    "loader_2": ("loader", "loader", 2, "full"),
    "tr_full_train_1": ("torchrec", "train", 1, "full"),
    "tr_full_train_2": ("torchrec", "train", 2, "full"),
    # information: the full model without its train counts (`statistics.counts`: computed per batch by the loader)
    "tr_full_train_1_no_counts": ("torchrec", "train", 1, "full", ["statistics.counts=[]"]),
    # information: the full model with LLM-only text (amazon-sr's default is hybrid: LLM vectors beside word tokens)
    "tr_full_train_1_llm_text": ("torchrec", "train", 1, "full", ["text.mode=llm"]),
    # information: the full model with 16-wide word vectors (amazon-sr's default until 2026-12-08 was 16, now 64)
    "tr_full_train_1_words16": ("torchrec", "train", 1, "full", ["text.random_dim=16"]),
    # information: the full model without the moving average of its dense weights (`train.ema_decay`: one more
    # elementwise pass over them per step)
    "tr_full_train_1_no_ema": ("torchrec", "train", 1, "full", ["train.ema_decay=null"]),
    "tr_peer_train_1": ("torchrec", "train", 1, "peer"),
    "tr_peer_train_2": ("torchrec", "train", 2, "peer"),
    # the same at a 4x larger global batch: per-step overheads (pipeline, DDP, all-to-all latency, Python) dominate
    # a model this small, so its samples/s depends on the batch; the public peers' batch size is not known
    "tr_peer_train_2_b16k": ("torchrec", "train", 2, "peer", ["train.batch_size=16384"]),
    "tr_peer_train_2_b32k": ("torchrec", "train", 2, "peer", ["train.batch_size=32768"]),
    "plain_full_train_1": ("plain", "train", 1, "full"),
    "plain_full_train_2": ("plain", "train", 2, "full"),
    "plain_peer_train_2": ("plain", "train", 2, "peer"),
    "tr_full_infer_1": ("torchrec", "infer", 1, "full"),
    "tr_full_infer_2": ("torchrec", "infer", 2, "full"),
    "plain_full_infer_1": ("plain", "infer", 1, "full"),
}
PREBUILT = {"tr_peer_train_1_prebuilt", "tr_peer256_train_1_prebuilt", "tr_peer_train_1_prebuilt_uncompiled",
            "tr_peer_train_1_prebuilt_jit", "tr_peer_train_1_prebuilt_fp32"}
# --emulate-isa: the environment that limits each library's CPU dispatch to that ISA
EMULATED_ISA = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                         "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}}
PREBUILT_BATCHES = 16  # batches built before the timed window of a pre-built configuration (the peers use as many)
DEFAULT_CONFIGS = ["peer_epnet", "peer_sharedbottom", "tr_peer_train_1_prebuilt", "tr_peer256_train_1_prebuilt",
                   "tr_peer_train_1", "tr_peer_train_2", "tr_full_train_1", "tr_full_train_2", "plain_full_train_1",
                   "plain_full_train_2", "loader_1", "tr_full_infer_1"]
QUICK_CONFIGS = ["peer_epnet", "peer_sharedbottom", "tr_peer_train_1_prebuilt", "tr_peer_train_1_prebuilt_uncompiled",
                 "tr_full_train_1",
                 "plain_full_train_1"]
QUICK_CONFIGS_MOVIELENS = ["loader_1", "tr_full_train_1", "plain_full_train_1", "tr_full_infer_1"]


# ============================================================================================== worker (torchrun)
def _overrides(variant: str, data: str, extra: List[str]) -> List[str]:
    return [*(common.peer_overrides(data) if variant == "peer" else []), *extra]


def config_specs(names: List[str], data: str, extra: List[str]) -> List[List[str]]:
    """The distinct spec overrides that the configurations `names` read prepared data with (the peers read the raw
    files), the default spec's first."""
    out: List[List[str]] = [list(extra)]
    for name in names:
        impl, _, _, variant, *own = CONFIGS[name]
        if impl != "peer":
            overrides = _overrides(variant, data, [*extra, *(own[0] if own else [])])
            if overrides not in out:
                out.append(overrides)
    return out


def _cycle(loader):
    """Batches forever: a timed window may be longer than one pass over a small split."""
    while True:
        n = 0
        for b in loader:
            n += 1
            yield b
        if n == 0:
            raise RuntimeError("empty split")


def _timed(step, warmup: int, steps: int, barrier) -> Dict[str, float]:
    t_warm = time.perf_counter()
    for _ in range(warmup):
        step()
    barrier()
    warmup_s = time.perf_counter() - t_warm  # includes the compile where train.compile is on: paid once, here
    load0 = common.load_average()
    cpu0, t0 = time.process_time(), time.perf_counter()
    samples = 0
    for _ in range(steps):
        samples += step()
    barrier()
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0, "local_samples": samples,
            "load_avg_before": load0, "load_avg_after": common.load_average(), "warmup_seconds": warmup_s}


def _top_ops(prof, steps: int, limit: int = 30) -> List[Dict[str, Any]]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000.0 / steps,
             "self_pct": 100.0 * e.self_cpu_time_total / total, "calls_per_step": e.count / steps}
            for e in events[:limit]]


def peer_worker(cfg: Dict[str, Any]) -> None:
    """A public peer (our re-implementation, benchmarks/peers.py): one process, every core an intra-op thread,
    batches built before the timed window; no process group."""
    from benchmarks import peers
    from recsys import hardware

    rows = peers.load_rows(common.AMAZON_RAW)
    threads = hardware.cpu_info().cores
    res = peers.time_peer(cfg["variant"], rows, batch=cfg["batch"], threads=threads, steps=cfg["steps"],
                          warmup=cfg["warmup"])
    load0 = common.load_average()
    mine = {"rank": 0, "seconds": res["seconds"], "local_samples": res["steps"] * res["batch"],
            "load_avg_before": load0, "load_avg_after": common.load_average(), "peak_rss_mb": common.peak_rss_mb(),
            "threads": threads}
    common.write_json(Path(cfg["out"]), {
        "samples_per_s": res["samples_per_s"], "samples": mine["local_samples"], "seconds": res["seconds"],
        "steps": cfg["steps"], "warmup": cfg["warmup"], "batch_per_rank": cfg["batch"], "world_size": 1,
        "per_rank": [mine], "peak_rss_mb_per_process": [mine["peak_rss_mb"]], "load_avg_before": load0,
        "load_avg_after": mine["load_avg_after"], "prebuilt": True,
        "samples_per_cpu_s": mine["local_samples"] / max(res["cpu_seconds"], 1e-9)})


def worker(cfg: Dict[str, Any]) -> None:
    if cfg["impl"] == "peer":
        return peer_worker(cfg)
    import torch
    import torch.distributed as dist

    from recsys.data.loader import BatchLoader
    from recsys.train.dist import init_distributed, shutdown

    ctx = init_distributed("cpu")
    barrier = (lambda: dist.barrier()) if ctx.world_size > 1 else (lambda: None)
    spec = common.load(cfg["data"], [*_overrides(cfg["variant"], cfg["data"], cfg["extra"]),
                                     f"train.output_dir={cfg['tmp']}"])
    world, impl, task_kind = ctx.world_size, cfg["impl"], cfg["task"]
    split = "train" if task_kind in ("train", "loader") else "valid"
    bs = (spec.train.batch_size if task_kind != "infer" else spec.train.eval_batch_size) // world
    trainer = None
    if impl == "torchrec":
        from recsys.train.loop import Trainer

        trainer = Trainer(spec, ctx, for_training=False)
    # batches in the key order the sharded tables read, as the training job's loaders assemble them
    loader = BatchLoader(spec, split, bs, rank=ctx.rank, world_size=world, seed=spec.train.seed,
                         eval_mode=task_kind == "infer", kjt_order=trainer.kjt_order if trainer else None)
    if cfg.get("prebuilt"):  # built before timing, as the peers are timed; cycled (the step never sees the loader)
        it = iter(_cycle(loader))
        built = [next(it) for _ in range(PREBUILT_BATCHES)]
        batches = (built[i % len(built)] for i in itertools.count())
    else:
        batches = _cycle(loader)
    prof_result = None

    if impl == "loader":
        def step() -> int:
            return next(batches).size
    elif impl == "torchrec":
        from recsys.train.step import make_train_step

        dmp = trainer.dmp
        if task_kind == "train":
            # train.compile as the training job applies it; `auto` judges this launch's own few steps too short
            # to repay a compile, so the benchmark's --compile (default on) states the choice for a long run
            compiled = trainer.compile_dense(cfg["warmup"] + cfg["steps"])
            dmp.train()
            guard = trainer.finite_grad_guard()  # what training steps (deferred, no host sync, on CUDA)
            pipeline = make_train_step(dmp, guard, ctx.device, ctx.world_size)  # the job's step for this launch

            def step() -> int:
                return int(pipeline.progress(batches)[2].shape[0])
        else:
            dmp.eval()

            def step() -> int:
                with torch.no_grad():
                    b = next(batches)
                    dmp(b)
                    return b.size
    else:
        from benchmarks.plain_reference import build_plain_task

        task, opts = build_plain_task(spec)
        model = task
        if world > 1 and task_kind == "train":
            # Parameters this configuration never uses (text_temperature under text.mode none) would make DDP
            # wait for their gradients; one probe backward finds them and they are frozen, which is cheaper than
            # find_unused_parameters' graph walk on every step.
            probe_loss, _ = task(next(batches))
            probe_loss.backward()
            for p in task.parameters():
                if p.requires_grad and p.grad is None:
                    p.requires_grad_(False)
            task.zero_grad(set_to_none=True)
            # broadcast_buffers off, as TorchRec's DDP wrapper has it: the buffers are the constant text-vector
            # tables (tens of MB), which the default would re-broadcast from rank 0 before every forward
            model = torch.nn.parallel.DistributedDataParallel(task, broadcast_buffers=False)
        if task_kind == "train":
            model.train()

            def step() -> int:
                b = next(batches)
                loss, _ = model(b)
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in opts:
                    o.step()
                return b.size
        else:
            model.eval()

            def step() -> int:
                with torch.no_grad():
                    b = next(batches)
                    model(b)
                    return b.size

    res = _timed(step, cfg["warmup"], cfg["steps"], barrier)
    if cfg.get("profile_steps"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(cfg["profile_steps"]):
                step()
            barrier()
        prof_result = _top_ops(prof, cfg["profile_steps"])
    mine = {"rank": ctx.rank, **res, "peak_rss_mb": common.peak_rss_mb(), "threads": torch.get_num_threads()}
    per_rank = [mine]
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)
    if ctx.is_main:
        seconds = max(r["seconds"] for r in per_rank)
        samples = sum(r["local_samples"] for r in per_rank)
        out = {"samples_per_s": samples / seconds, "samples": samples, "seconds": seconds, "steps": cfg["steps"],
               "warmup": cfg["warmup"], "batch_per_rank": bs, "world_size": world, "per_rank": per_rank,
               "peak_rss_mb_per_process": [r["peak_rss_mb"] for r in per_rank],
               "load_avg_before": max(r["load_avg_before"] for r in per_rank),
               "load_avg_after": max(r["load_avg_after"] for r in per_rank),
               "samples_per_cpu_s": samples / max(sum(r["cpu_seconds"] for r in per_rank), 1e-9),
               "prebuilt": bool(cfg.get("prebuilt"))}
        if prof_result is not None:
            out["profile_top_ops_rank0"] = prof_result
        if impl == "torchrec" and task_kind == "train":
            out["compiled"] = compiled
            out["warmup_seconds"] = max(r["warmup_seconds"] for r in per_rank)
        common.write_json(Path(cfg["out"]), out)
    shutdown()


# ================================================================================================ parent measures
def matmul_peak_gflops(n: int = 2048, reps: int = 8, dtype: str = "float32") -> float:
    """Best GEMM rate of this process with all cores' threads; fp32's is the denominator of the FLOP fraction,
    bf16's (measured only where bf16 is native: emulated, one 2048^3 product takes ~15 s) tells what
    `train.precision: auto` can gain on this CPU."""
    import torch

    from recsys import hardware

    torch.set_num_threads(hardware.cpu_info().cores)
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def flops_per_sample(data: str, variant: str, extra: List[str], batch: int = 512) -> Dict[str, float]:
    """FLOPs of forward + backward per sample, counted by FlopCounterMode on the plain-EBC model (same dense
    code; the embedding lookups are memory traffic, which FlopCounterMode does not count as FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.plain_reference import build_plain_task
    from recsys.data.loader import BatchLoader

    spec = common.load(data, _overrides(variant, data, extra))
    task, _ = build_plain_task(spec)
    b = next(iter(BatchLoader(spec, "train", batch, seed=0)))
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = task(b)
        loss.backward()
    total = counter.get_total_flops()
    counts = counter.get_flop_counts()
    by_op = {str(k): v for k, v in counts.get("Global", {}).items()}
    # where the FLOPs are: modules up to five levels deep (l0.proj.item_id, l2.tower.shared, ...)
    by_module = {name: sum(ops.values()) / b.size for name, ops in counts.items()
                 if name != "Global" and 0 < name.count(".") <= 5 and sum(ops.values())}
    return {"flops_per_sample": total / b.size, "batch": b.size,
            "by_op_per_sample": {k: v / b.size for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "by_module_per_sample": dict(sorted(by_module.items(), key=lambda kv: -kv[1])[:25])}


def launch(name: str, data: str, steps: int, warmup: int, extra: List[str], profile_steps: int,
           tmp: Path, timeout: float, batch: int = 4096) -> Dict[str, Any]:
    impl, task, nproc, variant, *own = CONFIGS[name]
    out = tmp / f"{name}.json"
    cfg = {"impl": impl, "task": task, "variant": variant, "data": data, "steps": steps, "warmup": warmup,
           "extra": [*extra, *(own[0] if own else [])], "out": str(out), "tmp": str(tmp / f"run_{name}"),
           "profile_steps": profile_steps if (impl == "torchrec" and task == "train" and nproc > 1) else 0,
           "prebuilt": name in PREBUILT, "batch": batch}
    cmd = [common.PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    t0 = time.time()
    retried = False
    while True:
        try:
            proc = subprocess.run(cmd, cwd=common.REPO, env=common.env_for_children(), capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            tail = "\n".join(((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                               else (e.stdout or "")).splitlines()[-12:])
            return {"error": f"timed out after {timeout:.0f} s", "log_tail": tail}
        # The gloo abort at exit (recsys.train.dist.exit_process removed its known cause): if it recurs, measure
        # once more and record it (retried_after_abort)
        if proc.returncode != 0 and GLOO_EXIT_ABORT in proc.stdout + proc.stderr and not retried:
            retried = True
            continue
        break
    if proc.returncode != 0 or not out.exists():
        # the whole log is kept: torchrun's own summary fills the last lines and hides the worker's error
        log_path = common.RUNS / "throughput_logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(proc.stdout + proc.stderr)
        lines = (proc.stdout + proc.stderr).splitlines()
        first = next((i for i, ln in enumerate(lines) if "Error" in ln or "terminate called" in ln), len(lines) - 12)
        tail = "\n".join(lines[max(first - 8, 0):first + 4])
        return {"error": f"exit {proc.returncode}", "log_tail": f"{tail}\n(whole log: {log_path})"}
    res = json.loads(out.read_text())
    res.update(impl=impl, task=task, nproc=nproc, variant=variant, wall_s_with_startup=time.time() - t0,
               measured_at=time.strftime("%Y-%m-%d %H:%M:%S"), retried_after_abort=retried)
    return res


def median_run(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The median of one configuration's launches (samples/s of every launch kept); the last error if none ran."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["samples_per_s"])
    if not ok:
        return runs[-1]
    res = dict(ok[len(ok) // 2])
    res["runs_samples_per_s"] = [r.get("samples_per_s") for r in runs]
    return res


def measure_rounds(names: List[str], repeat: int, **kwargs) -> Dict[str, Dict[str, Any]]:
    """`repeat` interleaved rounds over all configurations (A B C, A B C, ...), the median launch of each reported:
    load that comes and goes during the run then shifts every configuration alike, which keeps the ratios fair."""
    runs: Dict[str, List[Dict[str, Any]]] = {n: [] for n in names}
    for r in range(repeat):
        for name in names:
            print(f"[{time.strftime('%H:%M:%S')}] round {r + 1}/{repeat} {name} (load {common.load_average():.2f}) "
                  f"...", flush=True)
            res = launch(name, **kwargs)
            runs[name].append(res)
            print(f"    -> {res['samples_per_s']:,.0f} samples/s" if "error" not in res
                  else f"    -> {res['error']}\n{res['log_tail']}", flush=True)
    return {n: median_run(rs) for n, rs in runs.items()}


def _rate(configs: Dict[str, Any], name: str, metric: str = "samples_per_s") -> Optional[float]:
    r = configs.get(name) or {}
    return r.get(metric) if "error" not in r else None


def ratios(configs: Dict[str, Any], metric: str = "samples_per_s") -> Dict[str, Any]:
    """The claims of a run, each a ratio of two configurations measured in it (None where one is missing).
    `metric`: samples_per_s (wall clock, the claim on a quiet machine) or samples_per_cpu_s (--load-robust)."""
    def rate(name: Optional[str]) -> Optional[float]:
        return _rate(configs, name, metric) if name else None

    peers = {n: rate(n) for n in configs if CONFIGS.get(n, ("",))[0] == "peer"}
    peers = {n: v for n, v in peers.items() if v}
    fastest = max(peers, key=peers.get) if peers else None

    def over(a: str, b: Optional[str]) -> Optional[float]:
        va, vb = rate(a), rate(b)
        return va / vb if va and vb else None

    rows = {
        "peers_config_prebuilt_vs_fastest_peer": over("tr_peer_train_1_prebuilt", fastest),
        "peers_config_with_loader_1_rank_vs_fastest_peer": over("tr_peer_train_1", fastest),
        "peers_config_with_loader_2_ranks_vs_fastest_peer": over("tr_peer_train_2", fastest),
        "peers_config_wide_tower_prebuilt_vs_fastest_peer": over("tr_peer256_train_1_prebuilt", fastest),
        "peers_config_uncompiled_prebuilt_vs_fastest_peer": over("tr_peer_train_1_prebuilt_uncompiled", fastest),
        "peers_config_jit_path_prebuilt_vs_fastest_peer": over("tr_peer_train_1_prebuilt_jit", fastest),
        "peers_config_auto_vs_jit_update_path": over("tr_peer_train_1_prebuilt", "tr_peer_train_1_prebuilt_jit"),
        "peers_config_auto_vs_fp32_precision": over("tr_peer_train_1_prebuilt", "tr_peer_train_1_prebuilt_fp32"),
        "full_auto_vs_fp32_precision": over("tr_full_train_1", "tr_full_train_1_fp32"),
        "full_vs_no_weight_average": over("tr_full_train_1", "tr_full_train_1_no_ema"),
        "full_vs_16_wide_words": over("tr_full_train_1", "tr_full_train_1_words16"),
        "full_vs_plain_reference_1_rank": over("tr_full_train_1", "plain_full_train_1"),
        "full_vs_plain_reference_2_ranks": over("tr_full_train_2", "plain_full_train_2"),
        "full_2_ranks_vs_1_rank": over("tr_full_train_2", "tr_full_train_1"),
        "peers_config_2_ranks_vs_1_rank": over("tr_peer_train_2", "tr_peer_train_1"),
        "full_vs_fastest_peer": over("tr_full_train_1", fastest),
    }
    goal_peer = rows["peers_config_prebuilt_vs_fastest_peer"]
    goal_full = rows["full_vs_plain_reference_1_rank"]
    return {"metric": metric, "fastest_peer": fastest,
            "fastest_peer_samples_per_s": peers.get(fastest) if fastest else None, "ratios": rows, "goal_peer_ratio": GOAL_PEER_RATIO,
            "peer_goal_met": None if goal_peer is None else goal_peer >= GOAL_PEER_RATIO,
            "goal_full_vs_plain": GOAL_FULL_VS_PLAIN,
            "full_goal_met": None if goal_full is None else goal_full >= GOAL_FULL_VS_PLAIN}


RATIO_LABELS = {
    "peers_config_prebuilt_vs_fastest_peer": "peers' configuration / fastest peer, both on pre-built batches, 1 "
                                             "process (**the goal: >= 1.5**)",
    "peers_config_with_loader_1_rank_vs_fastest_peer": "peers' configuration with our loader in the loop, 1 process "
                                                       "/ fastest peer (pre-built)",
    "peers_config_with_loader_2_ranks_vs_fastest_peer": "the same on 2 gloo ranks / fastest peer",
    "peers_config_wide_tower_prebuilt_vs_fastest_peer": "peers' configuration with the default spec's tower "
                                                        "(hidden 256-128), pre-built / fastest peer (information)",
    "peers_config_uncompiled_prebuilt_vs_fastest_peer": "peers' configuration with train.compile off, pre-built "
                                                        "/ fastest peer (information)",
    "peers_config_jit_path_prebuilt_vs_fastest_peer": "peers' configuration with train.embedding_update_path jit, "
                                                      "pre-built / fastest peer (information)",
    "peers_config_auto_vs_jit_update_path": "peers' configuration, update path auto / jit (what the start-up probe "
                                            "buys on this CPU)",
    "peers_config_auto_vs_fp32_precision": "peers' configuration, train.precision auto / fp32, pre-built (what "
                                           "auto's choice of dense precision buys on this CPU)",
    "full_auto_vs_fp32_precision": "full model, train.precision auto / fp32, 1 process (the same for the full "
                                   "model)",
    "full_vs_no_weight_average": "full model with / without its weight average (train.ema_decay), 1 process",
    "full_vs_16_wide_words": "full model / the same with 16-wide word vectors (text.random_dim), 1 process",
    "full_vs_plain_reference_1_rank": "full model, TorchRec / plain-PyTorch reference, 1 process (goal: >= 1.0)",
    "full_vs_plain_reference_2_ranks": "full model, TorchRec / plain-PyTorch reference, 2 ranks",
    "full_2_ranks_vs_1_rank": "full model, 2 ranks / 1 process (TorchRec)",
    "peers_config_2_ranks_vs_1_rank": "peers' configuration, 2 ranks / 1 process (TorchRec, with loader)",
    "full_vs_fastest_peer": "full model (1 process, with loader) / fastest peer",
}


def machine_line(m: Dict[str, Any]) -> str:
    return (f"{m.get('cpu_model', '?')} ({m.get('cores', m.get('nproc', '?'))} cores, torch CPU capability "
            f"{m.get('cpu_capability', '?')}, bf16 {'native' if m.get('bf16_native') else 'not native'}), "
            f"torch {m.get('torch', '?')}, commit `{m.get('commit', '?')}`, {m.get('date', '?')}")


def render(report: Dict[str, Any]) -> str:
    m = report["machine"]
    rows = []
    for name, r in report["configs"].items():
        if "error" in r:
            rows.append([name, "-", "-", "-", "-", "-", f"error: {r['error']}", "-", "-", "-"])
            continue
        frac = r.get("flop_fraction_of_peak")
        batch = r.get("batch_per_rank", 0) * r.get("world_size", r["nproc"])
        runs = [x for x in r.get("runs_samples_per_s", []) if x]
        rate = f"{r['samples_per_s']:,.0f}" + (f" (median of {' / '.join(f'{x:,.0f}' for x in runs)})"
                                               if len(runs) > 1 else "")
        model = r["variant"] + (" (pre-built batches)" if r.get("prebuilt") else "")
        if r.get("compiled"):
            model += f"; compiled (warm-up incl. compile {r['warmup_seconds']:.0f} s)"
        per_cpu = r.get("samples_per_cpu_s")
        rows.append([name, r["impl"], r["task"], model, r["nproc"], f"{batch:,}", rate,
                     f"{per_cpu:,.0f}" if per_cpu else "-",
                     " / ".join(f"{x:,.0f}" for x in r["peak_rss_mb_per_process"]),
                     f"{r['load_avg_before']:.2f} -> {r['load_avg_after']:.2f}"
                     + (f"; {100 * frac:.2f}% of fp32 peak" if frac is not None else "")])
    emulated = report.get("emulated_isa")
    if emulated:
        m = {**m, "cpu_capability": f"{m.get('cpu_capability')}; an older ISA emulated: "
                                    + " ".join(f"{k}={v}" for k, v in emulated.items())}
    text = (f"# Throughput on {report['data']}\n\nMachine: {machine_line(m)}. Load average at the start "
            f"{m.get('load_avg_1min', float('nan')):.2f}. Training: global batch {report['global_batch']} (unless "
            f"the table says otherwise), {report['steps']} timed steps after {report['warmup']} warm-up steps, "
            f"{report.get('repeat', 1)} interleaved round(s), no evaluation in the window; inference: eval batch "
            f"{report['eval_batch']} on valid. Overrides of every configuration: "
            f"`{' '.join(report.get('overrides') or []) or 'none'}` (train.compile: the dense layers compiled in the "
            f"TorchRec training configurations, the compile paid in the warm-up). Samples/s are global (all ranks). Load average = 1-min, before -> "
            f"after each measurement (above the core count means other jobs shared the CPU).\n\n")
    g = report.get("goals")
    if g:
        text += "## Ratios measured in this run\n\n"
        fastest = g.get("fastest_peer")
        cpu = g.get("metric") == "samples_per_cpu_s"
        if cpu:
            text += ("Ratios of **samples per CPU-second** (process CPU time over the timed window, OpenMP threads "
                     "waiting passively; `--load-robust`): taken on a shared machine, where wall-clock rates "
                     "swing with other jobs. The loader's worker process is not counted, so configurations with "
                     "the loader in the loop look cheaper than they are.\n\n")
        if fastest:
            text += (f"Fastest public peer in this run: `{fastest}` ({g['fastest_peer_samples_per_s']:,.0f} "
                     f"samples/{'CPU-' if cpu else ''}s; our re-implementation, benchmarks/peers.py).\n\n")
        text += common.markdown_table(["ratio", "value"], [
            [RATIO_LABELS.get(k, k), "not measured" if v is None else f"{v:.2f}x"] for k, v in g["ratios"].items()])

        def verdict(key: str) -> str:
            v = g.get(key)
            return "not measured" if v is None else ("met" if v else "NOT met")

        text += (f"\n\nGoals: peers' configuration >= {GOAL_PEER_RATIO}x the fastest peer at global batch 4,096 "
                 f"-> {verdict('peer_goal_met')}; full model on TorchRec >= {GOAL_FULL_VS_PLAIN}x the plain-PyTorch "
                 f"reference -> {verdict('full_goal_met')}.\n\n")
    text += "## Every configuration\n\n"
    text += common.markdown_table(["config", "impl", "task", "model", "ranks", "global batch", "samples/s",
                                   "samples/CPU-s", "peak RSS MB/process", "load avg; FLOP use"], rows)
    if report.get("matmul_peak_gflops"):
        names = {"full": "full", "peer": "peers' configuration"}
        flops = ", ".join(f"{names.get(v, v)} {f['flops_per_sample'] / 1e6:.2f} MFLOP"
                          for v, f in report.get("flops", {}).items())
        bf16 = report.get("matmul_peak_gflops_bf16")
        bf16_text = (f" (bf16: {bf16:.1f} GFLOP/s, {bf16 / report['matmul_peak_gflops']:.2f}x)" if bf16 else
                     " (bf16 not measured: not native here, or an older ISA emulated)")
        text += (f"\n\nfp32 matmul peak (2048^3 GEMM, all cores): {report['matmul_peak_gflops']:.1f} GFLOP/s"
                 f"{bf16_text}. FLOPs per sample (forward+backward, FlopCounterMode): {flops}. Dense precision: "
                 f"{report.get('precision', '?')}.\n")
    prof = report.get("profile_top_ops")
    if prof:
        text += "\n## Profile of the 2-rank TorchRec training step (rank 0, self CPU time)\n\n"
        text += common.markdown_table(["op", "self ms/step", "% of self time", "calls/step"],
                                      [[p["op"], f"{p['self_ms_per_step']:.2f}", f"{p['self_pct']:.1f}",
                                        f"{p['calls_per_step']:.0f}"] for p in prof])
        text += "\n"
    return text


def plot(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = report.get("goals") or {}
    metric = g.get("metric", "samples_per_s")  # the bars in the unit the goals were judged in
    items = [(n, r[metric], r["impl"]) for n, r in report["configs"].items() if "error" not in r
             and r["task"] != "loader" and r.get(metric)]
    if not items:
        return
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(items) + 2.0))
    colour = {"torchrec": "tab:blue", "plain": "tab:orange", "peer": "tab:gray"}
    ax.barh([n for n, _, _ in items], [v for _, v, _ in items], color=[colour.get(i, "k") for _, _, i in items])
    if g.get("fastest_peer_samples_per_s"):
        best = g["fastest_peer_samples_per_s"]
        ax.axvline(best, color="r", ls=":", lw=1, label=f"fastest peer in this run ({best:,.0f})")
        ax.axvline(GOAL_PEER_RATIO * best, color="r", ls="--", lw=1,
                   label=f"goal: {GOAL_PEER_RATIO}x the fastest peer ({GOAL_PEER_RATIO * best:,.0f})")
        ax.legend(fontsize=7)
        ax.set_xlim(0, 1.05 * max(GOAL_PEER_RATIO * best, max(v for _, v, _ in items)))
    ax.set_xlabel("samples per CPU-second (--load-robust)" if metric == "samples_per_cpu_s"
                  else "samples/s (all ranks)")
    m = report["machine"]
    ax.set_title(f"{report['data']} throughput (blue TorchRec, orange plain PyTorch, grey public peers)\n"
                 f"{m.get('cpu_model')}, {m.get('cores')} cores, torch CPU capability {m.get('cpu_capability')}, "
                 f"commit {str(m.get('commit'))[:10]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="amazon_sr", choices=list(common.SPEC_FILES))
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS))
    ap.add_argument("--all", action="store_true", help="every configuration, not the default set")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="spec override for every config")
    ap.add_argument("--quick", action="store_true", help="the goal configurations, 1 round, 10 steps (amazon-sr; "
                    "movielens, 1 rank, 5 steps where the amazon-sr files are absent)")
    ap.add_argument("--results-dir", type=Path, default=common.RESULTS)
    ap.add_argument("--merge", action="store_true", help="keep the configurations of the existing result file that "
                    "this run does not re-measure")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--load-robust", action="store_true", help="for a shared machine: OpenMP threads wait "
                    "passively (OMP_WAIT_POLICY=PASSIVE in every launch, peers and ours alike) and the ratios use "
                    "samples per CPU-second instead of wall-clock samples/s")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="on", help="train.compile of the TorchRec "
                    "configurations (default on: the plan `auto` picks for a training run of >= 10,000 steps; "
                    "auto judges a benchmark launch's few steps too short). The compile is paid in the warm-up, "
                    "whose seconds each configuration reports")
    ap.add_argument("--repeat", type=int, help="interleaved rounds, each configuration reporting its median "
                    "(default 3; 1 with --quick)")
    ap.add_argument("--emulate-isa", choices=sorted(EMULATED_ISA), help="every launch, the peers' too, on this "
                    "CPU's code paths of an older ISA (ATen, oneDNN, MKL and FBGEMM limited to it) with the dense "
                    "layers in fp32, as train.precision: auto runs them there: an approximation of such a CPU on "
                    "this one (same cores, caches and clock)")
    args = ap.parse_args(argv)
    if args.emulate_isa:  # before this process or a launch initialises torch's kernels (common.env_for_children)
        os.environ.update(EMULATED_ISA[args.emulate_isa])
        args.extra = ["train.precision=fp32", *args.extra]
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.quick:
        if args.data == "amazon_sr" and common.data_available("amazon_sr"):
            args.data = "movielens"
        args.configs = args.configs or (QUICK_CONFIGS if args.data == "amazon_sr" else QUICK_CONFIGS_MOVIELENS)
        args.steps, args.warmup, args.profile_steps = min(args.steps, 10), min(args.warmup, 2), 0
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.extra = [f"train.compile={args.compile}", *args.extra]  # an explicit --set train.compile=... wins
    why = common.data_available(args.data)
    if why:
        print(f"skip {args.data}: {why}")
        return 0
    from recsys.data.prepare import prepare
    from recsys.models.precision import resolve_precision

    spec = common.load(args.data, args.extra)
    names = args.configs or (list(CONFIGS) if args.all else DEFAULT_CONFIGS)
    if args.data != "amazon_sr":
        names = [n for n in names if CONFIGS[n][0] != "peer"]  # the peers are defined on amazon-sr's features
    for overrides in config_specs(names, args.data, args.extra):
        # each configuration that reads the prepared data reads its own resolved schema (the peers' configuration
        # has no text and no counts): prepared here, once, so that no launch meets a missing one (a fresh machine)
        prepare(common.load(args.data, overrides))
    machine = common.machine()
    print(f"machine: {machine_line(machine)}", flush=True)
    if args.load_robust:  # inherited by every launch (common.env_for_children copies os.environ)
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    report: Dict[str, Any] = {"data": args.data, "machine": machine, "steps": args.steps, "repeat": args.repeat,
                              "warmup": args.warmup, "global_batch": spec.train.batch_size,
                              "eval_batch": spec.train.eval_batch_size, "overrides": args.extra,
                              "precision": resolve_precision(spec.train.precision, "cpu")[1],
                              "peer_overrides": common.peer_overrides(args.data), "configs": {},
                              "emulated_isa": EMULATED_ISA.get(args.emulate_isa)}
    stem = "throughput" if args.data == "amazon_sr" and not args.quick else f"throughput_{args.data}_quick"
    previous = args.results_dir / f"{stem}.json"
    if args.merge and previous.exists():  # re-measure some configurations, keep the others (each has its time)
        report["configs"] = json.loads(previous.read_text()).get("configs", {})
    report["matmul_peak_gflops"] = matmul_peak_gflops()
    report["matmul_peak_gflops_bf16"] = (matmul_peak_gflops(dtype="bfloat16")
                                         if machine["bf16_native"] and not args.emulate_isa else None)
    report["flops"] = {v: flops_per_sample(args.data, v, args.extra)
                       for v in sorted({CONFIGS[n][3] for n in names if CONFIGS[n][0] != "peer"})}
    with tempfile.TemporaryDirectory(prefix="recsys_tput_") as tmp:
        measured = measure_rounds(names, args.repeat, data=args.data, steps=args.steps, warmup=args.warmup,
                                  extra=args.extra, profile_steps=args.profile_steps, tmp=Path(tmp),
                                  timeout=args.timeout, batch=spec.train.batch_size)
    for name, r in measured.items():
        if "error" not in r and r["task"] == "train" and r["variant"] in report["flops"]:
            fl = report["flops"][r["variant"]]["flops_per_sample"]
            r["flop_fraction_of_peak"] = fl * r["samples_per_s"] / (report["matmul_peak_gflops"] * 1e9)
        report["configs"][name] = r
    c = report["configs"]
    prof = next((r.get("profile_top_ops_rank0") for r in c.values() if r.get("profile_top_ops_rank0")), None)
    if prof:
        report["profile_top_ops"] = prof
    report["goals"] = ratios(c, "samples_per_cpu_s" if args.load_robust else "samples_per_s")
    report["load_robust"] = args.load_robust
    report["samples_per_s"] = {n: r.get("samples_per_s") for n, r in c.items()}
    common.write_json(args.results_dir / f"{stem}.json", report)
    (args.results_dir / f"{stem}.md").write_text(render(report))
    plot(report, args.results_dir / f"{stem}.png")
    print(render(report))
    return 0


if __name__ == "__main__":
    from recsys.cli import exit_with  # after a gloo group (a worker): no interpreter finalisation, see there

    exit_with(main())
