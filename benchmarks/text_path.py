#!/usr/bin/env python
"""Issue 14 item 3: the frozen text tables (commit a29f1e9) against the text path they replaced, side by side.

Two checkouts train amazon-sr with *each version's own default spec* (feature_specs/amazon_sr.yaml of that tree;
`--old-spec` gives the old tree another, e.g. its spec without the user id that the new default dropped, so both
train the same features):
the old one (a worktree at a29f1e9^: every rank holds each text table as dense fp32 buffers, raw 384-wide and
projected 64-wide) and the new one (this tree: frozen fp16 TorchRec tables, placed by the planner; amazon_sr.yaml
replicates its small text tables). Each launch is the training job itself (`jobs/pretrain.py` of that tree, run
through torchrun with that tree on PYTHONPATH), wrapped by this file's `--worker` entry point, which only observes:

* samples/s from the steady state: the wrapper timestamps every training step (the class method
  `progress` of TrainPipelineSparseDist or of recsys.train.step.OneProcessStep, whichever the version's loop calls
  once per step) and reports
  global batch x steps / time over steps `--warmup`..end; the job's own TensorBoard figure
  (`train/samples_per_s`, cumulative since the epoch began, every `train.log_every_steps`) is read as well and
  turned into the rate between two of its log points, so the warm-up steps drop out of it too.
* per-rank memory: VmHWM (peak RSS) at the end of the training steps and VmRSS after the model is built;
* the text path's own bytes on each rank: old = the text lookups' buffers (raw + projected, and the PCA basis),
  new = this rank's shards (or replicated copy) of the `l0.text_ebc` tables plus the projection buffers.

The job stops after its training steps (no validation pass, no checkpoint: neither is what item 3 measures).
Launches are interleaved (old, new, old, new, per rank count) so a machine that gets busier or quieter shifts both
alike; each launch takes the shared CPU lock (`--lock`, flock) when given, and records the 1-minute load average
before and after.

    python benchmarks/text_path.py --old-tree /work/wt-old [--new-tree .] [--ranks 1 2] [--rounds 2] \
        [--steps 120] [--warmup 20] [--lock /tmp/cpu.lock]

Each tree needs its own prepared data and text cache (run that tree's jobs/prepare_data.py and jobs/encode_text.py
with the same --set data.raw_dir=...). Writes benchmarks/results/text_path.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve()
NEW_TREE = HERE.parents[1]
RESULTS = NEW_TREE / "benchmarks" / "results"
OLD_COMMIT_NOTE = "a29f1e9^ (the last commit with the dense text buffers)"
DEFAULT_SPEC = "feature_specs/amazon_sr.yaml"
VERSIONS = ("old", "base", "new")  # tags of the launches, in report order; "base" only with --base-tree


# ------------------------------------------------------------------------------------------------ worker (per rank)
# Runs inside each torchrun rank with the measured tree first on PYTHONPATH. It must import nothing from this
# tree's `recsys` or `benchmarks` (the old tree's package is the one under test), hence no sys.path changes here.

def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _text_path_bytes(trainer) -> Dict[str, Any]:
    """Bytes this rank holds for the text path, counted once per storage (a view is not a second copy)."""
    import torch

    seen: set = set()
    parts: Dict[str, int] = {}

    def add(name: str, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = (st.data_ptr(), t.storage_offset(), t.numel())
        if t.numel() == 0 or key in seen:
            return
        seen.add(key)
        parts[name] = parts.get(name, 0) + t.numel() * t.element_size()

    l0 = trainer.dmp.module.model.l0
    version = "new" if hasattr(l0, "text_ebc") else "old"
    grads = None
    if version == "old":  # TextLookup buffers: `raw` [rows, 384] fp32 and `vectors` [rows, reduce_dim] fp32
        for name, b in l0.text_lookup.named_buffers():
            add(name.split(".")[-1], b)
        if getattr(l0, "text_basis", None) is not None:
            for name, b in l0.text_basis.named_buffers():
                add("projection", b)
    else:  # the tables as the sharded model holds them on this rank
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        state = trainer.dmp.state_dict()
        for key, v in state.items():
            if "l0.text_ebc." not in key or not key.endswith(".weight"):
                continue
            if isinstance(v, ShardedTensor):
                for shard in v.local_shards():
                    add("tables", shard.tensor)
            else:
                add("tables", v)
        if getattr(l0, "text_projection", None) is not None:
            for _, b in l0.text_projection.named_buffers():
                add("projection", b)
        grads = sorted({k for k, p in trainer.dmp.named_parameters() if "text_ebc" in k and p.requires_grad})
        # text weights DDP synchronises (it all-reduces a bucket whole, used or not)
        ddp = trainer.dmp._dmp_wrapped_module
        ignored = getattr(ddp, "parameters_to_ignore", None)  # only DDP has it; names relative to ddp.module
        if ignored is not None:
            parts["in_ddp_buckets"] = sum(p.numel() * p.element_size() for n, p in ddp.module.named_parameters()
                                          if "text_ebc" in n and p.requires_grad and n not in ignored)
    out: Dict[str, Any] = {"version": version, "parts": parts,
                           "total": sum(v for k, v in parts.items() if k != "in_ddp_buckets")}
    if grads is not None:
        out["text_params_requiring_grad"] = grads
    return out


def worker(argv: List[str]) -> None:
    """`--worker OUT_JSON WARMUP PROFILE_STEP JOB [job args...]`: run JOB (a jobs/pretrain.py) in this process."""
    out_path, warmup, profile_step, job = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    job_args = argv[4:]
    import torch
    import torch.distributed as dist

    import recsys.train.loop as loop

    rank = int(os.environ.get("RANK", "0"))
    rec: Dict[str, Any] = {"rank": rank, "recsys_file": loop.__file__, "step_times": [], "cpu_times": []}
    prof_holder: Dict[str, Any] = {}

    def timed(orig_progress):
        def progress(self, it):
            n = len(rec["step_times"])
            if profile_step and rank == 0 and n == profile_step:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
                prof.__enter__()
                prof_holder["p"] = prof
            out = orig_progress(self, it)
            rec["step_times"].append(time.perf_counter())
            rec["cpu_times"].append(time.process_time())  # this process's CPU time, all threads
            if "p" in prof_holder and n == profile_step + 2:  # three steps in the profile
                prof = prof_holder.pop("p")
                prof.__exit__(None, None, None)
                rec["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
                rec["profile_steps"] = 3
            return out
        return progress

    # every step class a tree's loop may drive: TorchRec's pipeline, and (newer trees, one CPU process) the plain
    # recsys.train.step.OneProcessStep
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    step_classes = [TrainPipelineSparseDist]
    try:
        from recsys.train.step import OneProcessStep
        step_classes.append(OneProcessStep)
    except ImportError:
        pass
    for cls in step_classes:
        cls.progress = timed(cls.progress)

    orig_init = loop.Trainer.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        rec["rss_after_build_kib"] = _proc_status_kib("VmRSS")
        rec["hwm_after_build_kib"] = _proc_status_kib("VmHWM")
        rec["text_path"] = _text_path_bytes(self)
        rec["global_batch"] = int(self.spec.train.batch_size)
        rec["world_size"] = int(self.ctx.world_size)
        rec["threads"] = torch.get_num_threads()

    loop.Trainer.__init__ = init

    orig_epoch = loop.Trainer._train_epoch

    def train_epoch(self, epoch):
        orig_epoch(self, epoch)
        rec["hwm_after_train_kib"] = _proc_status_kib("VmHWM")
        rec["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if self.writer is not None:
            self.writer.flush()
        out_path.with_name(f"{out_path.stem}.rank{rank}.json").write_text(json.dumps(rec))
        # stop here: validation and checkpointing are not what this benchmark measures
        if dist.is_initialized():
            dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    loop.Trainer._train_epoch = train_epoch

    # time spent producing batches (the loader runs in the training process on CPU): the step times include it,
    # so it is reported separately to tell the loader's share from the model step's
    orig_take = loop._take
    rec["loader_times"] = []

    def take(it, n):
        gen = orig_take(it, n)
        while True:
            t = time.perf_counter()
            try:
                x = next(gen)
            except StopIteration:
                return
            rec["loader_times"].append(time.perf_counter() - t)
            yield x

    loop._take = take
    if os.environ.get("TEXT_PATH_DIAG") == "index_select":
        _diag_index_select_text()
    sys.argv = [job, *job_args]
    runpy.run_path(job, run_name="__main__")


def _diag_index_select_text() -> None:
    """Diagnostic, new tree only (`--diag-index-select`): read the frozen text rows this rank holds whole
    (replicated, or the one rank's table-wise shard) with index_select on their fp16 weights instead of the text
    EBC's TBE lookup. Same values (a one-row bag's sum is the row); tells how much of the text path's step cost is
    the lookup kernel and the text KJT's distribution."""
    import torch

    import recsys.models.encoding as enc
    from recsys.models.tables import text_table_name

    def text_vectors(self, batch):
        if not hasattr(self, "_diag_rows"):
            self._diag_rows = {}
            for key, v in self.text_ebc.state_dict().items():
                t = v.local_shards()[0].tensor if hasattr(v, "local_shards") else v
                self._diag_rows[key.split(".")[-2]] = t.detach()
        out = {}
        for side in enc.SIDES:
            for f in self.text_feats[side]:
                w = self._diag_rows[text_table_name(f.text_table)]
                rows = batch.text[f.name]
                v = w.index_select(0, rows.reshape(-1)).float()
                v = v.view(-1, f.max_len, self.frozen_text_dim) if f.sequence else v
                out[f.name] = self._with_tokens(v, f, rows)  # mode hybrid: its token half beside the frozen rows
        return out

    enc.UserQueryItemEncoder.text_vectors = text_vectors


# ------------------------------------------------------------------------------------------- lookup, stand-alone
def lookup_micro(threads: int = 2, reps: int = 20) -> Dict[str, float]:
    """ms per batch of amazon-sr's text lookup alone (3 tables of 64-wide rows; 43 single-row bags per sample:
    item text, 20 history item texts, query text, item category text, 20 history category texts; batch 4,096):
    fbgemm's CPU TBE forward (what the frozen tables run on CPU) vs the old path's per-key index_select."""
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                         SplitTableBatchedEmbeddingBagsCodegen)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    b, d, rows = 4096, 64, [21245, 871, 21245]  # items, queries, item_queries (+1 row each for "no text")
    feats = [0] * 21 + [1] + [2] * 21
    idx = torch.cat([torch.randint(0, rows[t], (b,)) for t in feats])
    offsets = torch.arange(0, len(feats) * b + 1)

    def ms(f) -> float:
        for _ in range(3):
            f()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - t) / reps * 1e3

    out: Dict[str, float] = {}
    with torch.no_grad():
        for name, prec in (("tbe_fp16", SparseType.FP16), ("tbe_fp32", SparseType.FP32)):
            tbe = SplitTableBatchedEmbeddingBagsCodegen(
                [(r, d, EmbeddingLocation.HOST, ComputeDevice.CPU) for r in rows], feature_table_map=feats,
                weights_precision=prec, output_dtype=SparseType.FP32, optimizer=EmbOptimType.EXACT_SGD,
                learning_rate=0.0, pooling_mode=PoolingMode.SUM)
            out[name] = ms(lambda: tbe(idx, offsets))
        tables = [torch.randn(r, d) for r in rows]
        keys = [idx[k * b:(k + 1) * b] for k in range(len(feats))]
        out["index_select_fp32"] = ms(lambda: [tables[t].index_select(0, i) for t, i in zip(feats, keys)])
        half = [t.half() for t in tables]
        out["index_select_fp16_to_fp32"] = ms(lambda: [half[t].index_select(0, i).float()
                                                       for t, i in zip(feats, keys)])
    return out


# -------------------------------------------------------------------------------------------------- orchestrator
def _git(tree: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True).stdout.strip()


def _tb_rate(tb_dir: Path, warmup: int) -> Optional[Dict[str, Any]]:
    """The job's own samples/s (cumulative since the epoch began, logged every log_every_steps) turned into the
    rate between the first log point at or after `warmup` and the last one: elapsed(step) = step * batch / rate."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/samples_per_s" not in acc.Tags().get("scalars", []):
        return None
    pts = [(e.step, e.value) for e in acc.Scalars("train/samples_per_s")]
    return {"points": pts}


def _steady(rec: Dict[str, Any], warmup: int) -> Dict[str, float]:
    t = rec["step_times"]
    steps = len(t) - 1 - warmup
    secs = t[-1] - t[warmup]
    gaps = [b - a for a, b in zip(t[warmup:], t[warmup + 1:])]
    lt = rec.get("loader_times") or []
    # the pipeline fetches one batch ahead: batch i+1 is read during step i, so the same window of batches
    window = lt[warmup + 2:warmup + 2 + steps]
    loader = sum(window) / len(window) if window else None
    cpu = rec.get("cpu_times") or []
    cpu_per_step = (cpu[-1] - cpu[warmup]) / steps if len(cpu) == len(t) else None
    return {"samples_per_s": rec["global_batch"] * steps / secs, "steps_timed": steps,
            "median_step_s": statistics.median(gaps), "loader_s_per_step": loader, "cpu_s_per_step": cpu_per_step}


def job_command(tree: Path, tag: str, args, run_dir: Path) -> List[str]:
    """The training job of one launch: the tree's pretrain.py on its spec (`--old-spec` for the old tree)."""
    spec = args.old_spec if tag.startswith("old") else DEFAULT_SPEC
    job = [str(tree / "jobs" / "pretrain.py"), "--spec", spec,
           "--set", f"data.raw_dir={args.raw_dir}", "--set", f"train.max_steps={args.steps}",
           "--set", "train.epochs=1", "--set", f"train.output_dir={run_dir}"]
    for kv in args.set:  # extra overrides for both versions (diagnostics: e.g. text.mode=none isolates the rest)
        job += ["--set", kv]
    return job


def launch(tree: Path, nproc: int, args, tag: str, workdir: Path) -> Dict[str, Any]:
    out_json = workdir / f"{tag}.json"
    run_dir = workdir / f"run_{tag}"
    job = job_command(tree, tag, args, run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE), "--worker", str(out_json), str(args.warmup),
           str(args.profile_step if args.profile_step else 0), *job]
    if args.lock:
        cmd = ["flock", args.lock, *cmd]
    env = dict(os.environ, PYTHONPATH=str(tree))
    if args.diag_index_select and tag.startswith("new"):
        env["TEXT_PATH_DIAG"] = "index_select"
    load_before = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    load_after = os.getloadavg()[0]
    (workdir / f"{tag}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{tag}: exit {proc.returncode}; log {workdir / (tag + '.log')}\n{proc.stderr[-3000:]}")
    ranks = [json.loads((workdir / f"{tag}.rank{r}.json").read_text()) for r in range(nproc)]
    for r in ranks:  # the wrapper must have imported the tree under test, not another checkout's package
        assert r["recsys_file"].startswith(str(tree)), (r["recsys_file"], tree)
    steady = [_steady(r, args.warmup) for r in ranks]
    tb = _tb_rate(run_dir / "tensorboard", args.warmup)
    tb_rate = None
    if tb and len(tb["points"]) >= 2:
        pts = [p for p in tb["points"] if p[0] >= args.warmup] or tb["points"]
        (s0, r0), (s1, r1) = pts[0], pts[-1]
        b = ranks[0]["global_batch"]
        if s1 > s0:
            tb_rate = b * (s1 - s0) / (s1 * b / r1 - s0 * b / r0)
    res = {
        "tag": tag, "tree": str(tree), "nproc": nproc, "wall_s": wall,
        "load_before": load_before, "load_after": load_after,
        # the slowest rank sets the pace of a synchronous step; rank 0's figure is what the job reports
        "samples_per_s": min(s["samples_per_s"] for s in steady),
        "median_step_s": max(s["median_step_s"] for s in steady),
        # robust to bursts of other load: the batch over the slowest rank's median step
        "samples_per_s_median_step": ranks[0]["global_batch"] / max(s["median_step_s"] for s in steady),
        # CPU time the step costs, all ranks together (less sensitive to waiting for a busy core than wall time)
        "cpu_ms_per_step": (1e3 * sum(s["cpu_s_per_step"] for s in steady)
                            if all(s["cpu_s_per_step"] is not None for s in steady) else None),
        "loader_s_per_step": [s["loader_s_per_step"] for s in steady],
        "samples_per_s_job_log": tb_rate, "job_log_points": tb["points"] if tb else None,
        "per_rank": [{
            "rank": r["rank"], "threads": r.get("threads"),
            "peak_rss_mb": r["hwm_after_train_kib"] / 1024, "rss_after_build_mb": r["rss_after_build_kib"] / 1024,
            "text_path_bytes": r["text_path"]["total"], "text_path_parts": r["text_path"]["parts"],
            "text_params_requiring_grad": r["text_path"].get("text_params_requiring_grad"),
            "samples_per_s": s["samples_per_s"]} for r, s in zip(ranks, steady)],
    }
    if any("profile" in r for r in ranks):
        prof = next(r["profile"] for r in ranks if "profile" in r)
        (workdir / f"{tag}.profile.txt").write_text(prof)
        res["profile_file"] = str(workdir / f"{tag}.profile.txt")
    return res


def _machine() -> Dict[str, Any]:
    import torch

    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu_model": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _mb(b: float) -> str:
    return f"{b / 2**20:.1f}"


def _rank_range(rs: List[Dict[str, Any]], rank: int) -> str:
    """min-max over launches of one rank's peak RSS, MB."""
    v = [p["peak_rss_mb"] for r in rs for p in r["per_rank"] if p["rank"] == rank]
    return f"{min(v):,.0f}-{max(v):,.0f}"


def report(results: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"# Text path: dense buffers (old) vs frozen text tables (new), amazon-sr default spec", "",
             f"Machine: {meta['machine']['cpu_model']}, {meta['machine']['cores']} cores, torch "
             f"{meta['machine']['torch']} (CPU capability {meta['machine']['cpu_capability']}), "
             f"{meta['machine']['date']}.",
             f"Old tree: `{meta['old_commit']}` ({OLD_COMMIT_NOTE}); new tree: `{meta['new_commit']}`"
             + (f"; base tree (the new path before this tree's changes): `{meta['base_commit']}`"
                if meta.get("base_commit") else "") + ".",
             f"{meta['steps']} training steps per launch (global batch {meta['global_batch']}), steady state = "
             f"steps {meta['warmup']}..{meta['steps']}; launches interleaved {'/'.join(VERSIONS)}, {meta['rounds']} round(s); "
             f"1-minute load average {min(r['load_before'] for r in results):.1f}-"
             f"{max(max(r['load_before'], r['load_after']) for r in results):.1f}."]
    if meta.get("overrides"):  # diagnostics: then not each version's default spec
        lines[0] = lines[0].replace("amazon-sr default spec", "amazon-sr, overridden")
        lines.append(f"Overrides for both versions: `{' '.join(meta['overrides'])}`.")
    if meta.get("old_spec", DEFAULT_SPEC) != DEFAULT_SPEC:
        lines[0] = lines[0].replace("amazon-sr default spec", "amazon-sr, same features")
        lines.append(f"Old tree's spec: `{meta['old_spec']}` (the new tree: its default `{DEFAULT_SPEC}`).")
    lines.append("")
    lines += ["| ranks | version | samples/s (each launch) | median | job's own log (median) | median-step rate "
              "(median) | CPU ms per step, all ranks (median) | peak RSS per rank, MiB | text path per rank, MiB |",
              "|---|---|---|---:|---:|---:|---:|---|---|"]
    summary: Dict[str, Any] = {}
    for nproc in sorted({r["nproc"] for r in results}):
        for ver in VERSIONS:
            rs = [r for r in results if r["nproc"] == nproc and r["tag"].startswith(ver + "_")]
            if not rs:
                continue
            sps = [r["samples_per_s"] for r in rs]
            job = [r["samples_per_s_job_log"] for r in rs if r["samples_per_s_job_log"]]
            rss = [max(p["peak_rss_mb"] for p in r["per_rank"] if p["rank"] == k) for r in rs
                   for k in range(nproc)]
            text = rs[-1]["per_rank"]
            med_step = [r["samples_per_s_median_step"] for r in rs if r.get("samples_per_s_median_step")]
            cpu = [r["cpu_ms_per_step"] for r in rs if r.get("cpu_ms_per_step")]
            summary[(nproc, ver)] = {"sps": statistics.median(sps), "rss": statistics.median(rss),
                                     "text": statistics.median(p["text_path_bytes"] for p in text),
                                     "med_step": statistics.median(med_step) if med_step else None,
                                     "cpu": statistics.median(cpu) if cpu else None}
            med_s = f"{summary[(nproc, ver)]['med_step']:,.0f}" if med_step else "-"
            cpu_s = f"{summary[(nproc, ver)]['cpu']:,.0f}" if cpu else "-"
            job_s = f"{statistics.median(job):,.0f}" if job else "-"
            rss_s = " / ".join(_rank_range(rs, k) for k in range(nproc))
            text_s = " / ".join(_mb(p["text_path_bytes"]) for p in text)
            lines.append(f"| {nproc} | {ver} | {', '.join(f'{s:,.0f}' for s in sps)} | "
                         f"{statistics.median(sps):,.0f} | {job_s} | {med_s} | {cpu_s} | {rss_s} | {text_s} |")
    lines += ["", "| ranks | version | /old samples/s | /old median-step rate | /old CPU per step | /old peak RSS | "
              "text path bytes old -> this, per rank |", "|---|---|---:|---:|---:|---:|---|"]
    for nproc in sorted({r["nproc"] for r in results}):
        o = summary.get((nproc, "old"))
        for ver in VERSIONS[1:]:
            n = summary.get((nproc, ver))
            if not (o and n):
                continue
            ratio = (lambda k: f"{n[k] / o[k]:.2f}x" if n.get(k) and o.get(k) else "-")
            lines.append(f"| {nproc} | {ver} | {ratio('sps')} | {ratio('med_step')} | {ratio('cpu')} | {ratio('rss')} | "
                         f"{_mb(o['text'])} -> {_mb(n['text'])} MiB |")
    lines += ["", "Per-rank figures: peak RSS = VmHWM after the training steps (rank 0 / rank 1, range over "
              "launches); text path = old: raw fp32 + projected fp32 buffers + PCA basis; new: the rank's shards of "
              "the frozen tables (replicated here by amazon_sr.yaml) + projection buffers."]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old-tree", type=Path, required=True)
    p.add_argument("--old-spec", default=DEFAULT_SPEC,
                   help="the old tree's spec, relative to it (default its own amazon_sr.yaml). The default specs "
                        "differ in features since amazon_sr.yaml dropped its user id: a copy of the old spec without "
                        "it compares the text paths on the same features (prepare its data in the old tree first)")
    p.add_argument("--new-tree", type=Path, default=NEW_TREE)
    p.add_argument("--base-tree", type=Path, default=None,
                   help="also launch this tree (e.g. the new path before a change) in the same interleaved rounds")
    p.add_argument("--raw-dir", default=os.environ.get("RECSYS_AMAZON_SR", "/work/shared/data/bench/amazon-sr"))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the steady-state rate")
    p.add_argument("--lock", default=None, help="flock this file around each launch (shared machines)")
    p.add_argument("--profile-step", type=int, default=0,
                   help="rank 0 profiles 3 steps from this one (torch.profiler); 0 = no profile")
    p.add_argument("--only", choices=list(VERSIONS), default=None, help="launch one version only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra spec override for both versions (diagnostics; the result is then not the default "
                        "spec's)")
    p.add_argument("--diag-index-select", action="store_true",
                   help="diagnostic: the new tree reads its whole-on-this-rank text tables with index_select "
                        "instead of the text EBC (same values)")
    p.add_argument("--lookup-micro", action="store_true",
                   help="only time the text lookup alone (TBE vs index_select), 1 and 2 threads, and print it")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "text_path")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.lookup_micro:
        res = {f"{th}_threads": lookup_micro(th) for th in (1, 2)}
        out = {"machine": _machine(), "lookup_ms_per_batch": res}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(str(args.out) + "_lookup.json").write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps(out, indent=1))
        return 0
    old, new = args.old_tree.resolve(), args.new_tree.resolve()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="text_path_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: List[Dict[str, Any]] = []
    versions = [("old", old)] + ([("base", args.base_tree.resolve())] if args.base_tree else []) + [("new", new)]
    if args.only:
        versions = [v for v in versions if v[0] == args.only]
    for rnd in range(args.rounds):
        for nproc in args.ranks:
            for ver, tree in versions:
                tag = f"{ver}_{nproc}r_{rnd}"
                res = launch(tree, nproc, args, tag, workdir)
                print(f"{tag}: {res['samples_per_s']:,.0f} samples/s (job log {res['samples_per_s_job_log']}, "
                      f"loader s/step {res['loader_s_per_step']}), "
                      f"peak RSS {[round(r['peak_rss_mb']) for r in res['per_rank']]} MB, text "
                      f"{[_mb(r['text_path_bytes']) for r in res['per_rank']]} MB, load "
                      f"{res['load_before']:.1f}->{res['load_after']:.1f}", flush=True)
                results.append(res)
                _write(results, args, old, new, workdir)  # after every launch: a cut-short run keeps its results
    md = _write(results, args, old, new, workdir)
    print(md)
    return 0


def _write(results: List[Dict[str, Any]], args, old: Path, new: Path, workdir: Path) -> str:
    meta = {"machine": _machine(), "old_commit": _git(old, "rev-parse", "HEAD"),
            "new_commit": _git(new, "rev-parse", "HEAD") + ("+dirty" if _git(new, "status", "--porcelain",
                                                                               "--untracked-files=no") else ""),
            "base_commit": _git(args.base_tree.resolve(), "rev-parse", "HEAD") if args.base_tree else None,
            "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "overrides": args.set,
            "old_spec": args.old_spec,
            "global_batch": results[0]["per_rank"] and json.loads(
                (workdir / f"{results[0]['tag']}.rank0.json").read_text())["global_batch"],
            "workdir": str(workdir)}
    md = report(results, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "launches": results}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(md)
    return md


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        sys.exit(main())
