#!/usr/bin/env python
"""Offline quality benchmark: a table of models x domains (overall, per-domain AUC, cold-item AUC, GAUC, logloss)
on amazon-sr and on the embedded MovieLens data, mean +- std over seeds.

    python benchmarks/auc.py --quick                     # minutes: movielens, 1 seed, 2 models, few steps
    python benchmarks/auc.py --data amazon_sr            # hours: every model, 3 seeds, 2 epochs each
    python benchmarks/auc.py --data amazon_sr --models sr_foundation --seeds 1 2 3
    python benchmarks/auc.py --data amazon_sr --report-only   # rebuild JSON/markdown/PNG from finished runs

Each (model, seed) runs the real jobs -- `torchrun jobs/pretrain.py` (train on train, best epoch chosen on valid)
then `jobs/evaluate.py --split test --save-predictions` -- into benchmarks/runs/<data>/<model>/seed<k>/; its metrics
JSON is written as soon as it finishes and a re-run skips finished ones, so a long run can be stopped and resumed.
`single_domain` trains one model per domain (model.single_domain=X) and scores each domain's test rows with its own
model; `popularity` scores an item by its train impression count (no training, no seeds).
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

log = logging.getLogger("benchmarks.auc")

RUNS = common.RUNS

# Model name -> spec overrides relative to the default spec (sr_foundation: domain fusion, js, llm text).
VARIANTS: Dict[str, List[str]] = {
    "sr_foundation": [],
    "fusion_mean": ["model.fusion=mean"],
    "fusion_cls": ["model.fusion=cls"],
    "reg_mmd": ["model.regularizer=mmd"],
    "reg_none": ["model.regularizer=none"],
    "text_random": ["text.mode=random"],
    # both data sets default to llm; text_llm is the default's text mode named explicitly (an ablation row that
    # stays LLM-only if a default changes), text_hybrid the frozen LLM vectors beside trainable tokens
    "text_llm": ["text.mode=llm"],
    "text_hybrid": ["text.mode=hybrid"],
    "text_none": ["text.mode=none"],
    "tower_shared_bottom": ["model.tower=shared_bottom"],
    "tower_mmoe": ["model.tower=mmoe"],
    "tower_ple": ["model.tower=ple"],
    "tower_star": ["model.tower=star"],
    # (The committed peer_config rows were measured before 2026-12-01, with the 256-128 tower.)
    # Our model at the public peers' configuration (benchmarks/common.py: dim 16, mean-pooled history, shared-bottom,
    # no text), at the throughput benchmark's default global batch and at the batch where it meets the speed goal:
    # what that speed costs in AUC, next to the peers' reference row. amazon-sr only; not in the default run order.
    # At 8x the batch the learning rates are 4x: with the default rates 2 epochs are only 116 steps (test AUC 0.779
    # over 3 seeds, below the peers' 0.796).
    "peer_config": common.peer_overrides("amazon_sr"),
    "peer_config_b32k": [*common.peer_overrides("amazon_sr"), "train.batch_size=32768", "train.lr=0.004",
                         "train.embedding_lr=0.2"],
}
COMPOSITE = ("single_domain",)  # one run per domain, combined
ANALYTIC = ("popularity",)  # no training
ALL_MODELS = list(VARIANTS) + list(COMPOSITE) + list(ANALYTIC)
# Default run order: the default model first, then the variants (the priority).
DEFAULT_ORDER = ["sr_foundation", "popularity", "tower_shared_bottom", "text_none", "fusion_mean", "reg_none",
                 "tower_mmoe", "tower_ple", "tower_star", "fusion_cls", "reg_mmd", "text_random", "text_llm",
                 "single_domain"]

# Best public multi-domain model per column (Shared-Bottom, MMoE, PLE, STAR, M2M, AdaSparse; emb 16, no text).
PEERS = {"overall": 0.796, "domains": {"games_rec": {"auc": 0.812, "cold_auc": 0.50},
                                       "sci_rec": {"auc": 0.699, "cold_auc": 0.65},
                                       "sci_search": {"auc": 0.648, "cold_auc": 0.59}}}


# ------------------------------------------------------------------------------------------------------ running
def _run(cmd: List[str], log_path: Path, timeout: Optional[float]) -> None:
    """Run a job, its output appended to the run's log; a failure raises with the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, cwd=common.REPO, env=common.env_for_children(), stdout=fh, stderr=subprocess.STDOUT,
                            timeout=timeout).returncode
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {rc}; see {log_path}\n{tail}")


def train_and_evaluate(data: str, run_dir: Path, overrides: Sequence[str], nproc: int,
                       timeout: Optional[float] = None) -> Dict[str, Any]:
    """pretrain (torchrun) -> evaluate on test with predictions. Returns the evaluate job's metrics JSON."""
    spec_file = str(common.SPEC_FILES[data])
    sets: List[str] = []
    for o in [*common.data_overrides(data), *overrides, f"train.output_dir={run_dir / 'train'}"]:
        sets += ["--set", o]
    log_path = run_dir / "log.txt"
    if (run_dir / "train").exists():
        # An unfinished earlier attempt: start over rather than resume, since the model code may have changed
        # since (its checkpoints would not load); a run is minutes, and finished runs are never redone.
        import shutil

        log.info("%s: discarding an unfinished earlier attempt", run_dir)
        shutil.rmtree(run_dir / "train")
    t0 = time.time()
    _run([common.PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
          "jobs/pretrain.py", "--spec", spec_file, *sets], log_path, timeout)
    t1 = time.time()
    _run([common.PYTHON, "jobs/evaluate.py", "--spec", spec_file, *sets, "--checkpoint", str(run_dir / "train"),
          "--split", "test", "--out", str(run_dir / "eval.json"), "--save-predictions",
          str(run_dir / "test_pred.npy")], log_path, timeout)
    metrics = json.loads((run_dir / "eval.json").read_text())
    summary_path = run_dir / "train" / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    metrics["train_s"], metrics["eval_s"] = t1 - t0, time.time() - t1
    metrics["best_epoch"] = summary.get("best_epoch")
    metrics["overrides"] = list(overrides)
    return metrics


def popularity_scores(spec) -> np.ndarray:
    """log(1 + train impressions of the row's item) for every test row, in file order."""
    import pyarrow.parquet as pq

    from recsys.data.paths import split_path

    item = next(f.column for f in spec.features if f.kind == "id" and f.side == "item")
    train = pq.read_table(split_path(spec, "train"), columns=[item])[item].to_numpy(zero_copy_only=False)
    test = pq.read_table(split_path(spec, "test"), columns=[item])[item].to_numpy(zero_copy_only=False)
    keys, counts = np.unique(train, return_counts=True)
    pos = np.clip(np.searchsorted(keys, test), 0, len(keys) - 1)
    found = keys[pos] == test
    return np.log1p(np.where(found, counts[pos], 0)).astype(np.float64)


def run_overrides(model: str, seed: int, base: Sequence[str]) -> List[str]:
    if model == "popularity":
        return list(base)
    return [*base, *VARIANTS.get(model, []), f"train.seed={seed}"]


def fingerprint(data: str, model: str, seed: int, base: Sequence[str]) -> str:
    """Digest of the resolved spec a (model, seed) run trains with: a finished run counts only while the spec
    (the YAML default or the variant's overrides) is unchanged. Where files live is left out (spec_hash
    paths=False), so runs stay valid in another checkout, a clone or a worktree."""
    return _fingerprint_of(data, run_overrides(model, seed, base))


def _fingerprint_of(data: str, overrides: Sequence[str]) -> str:
    from recsys.spec.loader import spec_hash

    return spec_hash(common.load(data, overrides), paths=False)


def recorded_fingerprint(run_dir: Path, data: str, metrics: Dict[str, Any]) -> Optional[str]:
    """The fingerprint a finished run was made with: the one it recorded, else (runs recorded before the
    fingerprint left paths out, or none at all) the digest of the resolved spec its training wrote
    (train/spec.resolved.yaml). None when neither exists."""
    if metrics.get("spec_fingerprint"):
        return metrics["spec_fingerprint"]
    resolved = run_dir / "train" / "spec.resolved.yaml"
    if not resolved.exists():
        return None
    from recsys.spec.loader import load_spec, spec_hash

    return spec_hash(load_spec(resolved), paths=False)


def _is_current(metrics_file: Path, data: str, base: Optional[Sequence[str]]) -> bool:
    if base is None:
        return True
    m = json.loads(metrics_file.read_text())
    return recorded_fingerprint(metrics_file.parent, data, m) == fingerprint(data, m["model"], m["seed"], base)


def _move_to_stale(run: Path, model_dir: Path, label: str) -> Path:
    """Move a run made with another spec to <model_dir>/stale/<label>-<time> (kept, not deleted); returns where."""
    import shutil

    stale = model_dir / "stale" / f"{label}-{time.strftime('%Y%m%d%H%M%S')}"
    stale.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run), str(stale))
    return stale


def run_one(data: str, model: str, seed: int, base: Sequence[str], nproc: int, runs: Path,
            timeout: Optional[float]) -> Path:
    """Run (or skip, when finished with the same spec) one (model, seed); returns its metrics file. A finished run
    of an older spec is moved to <model>/stale/ (kept, not deleted) and run again."""
    run_dir = runs / data / model / f"seed{seed}"
    out = run_dir / "metrics.json"
    fp = fingerprint(data, model, seed, base)
    if out.exists():
        finished = json.loads(out.read_text())
        old = recorded_fingerprint(run_dir, data, finished)
        if old == fp:
            if "spec_fingerprint" not in finished:  # verified from the run's own resolved spec: record it
                common.write_json(out, {**finished, "spec_fingerprint": fp})
            log.info("skip %s/%s/seed%d (finished)", data, model, seed)
            return out
        stale = _move_to_stale(run_dir, runs / data / model, f"seed{seed}-{old or 'unhashed'}")
        log.warning("%s/%s/seed%d was run with another spec (%s, now %s): moved to %s, running again", data, model,
                    seed, old, fp, stale)
    log.info("run %s/%s/seed%d", data, model, seed)
    from recsys.train.evaluation import metrics_from_scores

    if model == "popularity":
        spec = common.load(data, base)
        scores = popularity_scores(spec)
        metrics = metrics_from_scores(spec, "test", scores)
        run_dir.mkdir(parents=True, exist_ok=True)
        np.save(run_dir / "test_pred.npy", scores.astype(np.float32))
    elif model == "single_domain":
        spec = common.load(data, base)
        combined: Optional[np.ndarray] = None
        parts = {}
        for d in spec.domains:
            sub = run_dir / d.name
            sub_overrides = [*base, f"train.seed={seed}", f"model.single_domain={d.name}"]
            if (sub / "eval.json").exists() and \
                    recorded_fingerprint(sub, data, {}) != _fingerprint_of(data, sub_overrides):
                stale = _move_to_stale(sub, run_dir.parent, f"seed{seed}-{d.name}")
                log.warning("%s was trained with another spec: moved to %s", sub, stale)
            if not (sub / "eval.json").exists():
                parts[d.name] = train_and_evaluate(data, sub, sub_overrides, nproc, timeout)
            pred = np.load(sub / "test_pred.npy").astype(np.float64)
            combined = pred if combined is None else np.where(np.isnan(combined), pred, combined)
        metrics = metrics_from_scores(spec, "test", combined)
        metrics["note"] = "each domain's test rows scored by the model trained on that domain alone"
    else:
        metrics = train_and_evaluate(data, run_dir, run_overrides(model, seed, base), nproc, timeout)
    # the commit the run was made at: the fingerprint covers the spec, not the code, so the report lists the
    # commits its runs come from and a reader sees a table that mixes code versions
    metrics.update(model=model, seed=seed, data=data, load_avg_1min=common.load_average(), spec_fingerprint=fp,
                   commit=common.git_commit())
    common.write_json(out, metrics)
    log.info("%s/%s/seed%d: test overall AUC %.4f", data, model, seed, metrics["overall"]["auc"])
    return out


# ---------------------------------------------------------------------------------------------------- reporting
def _mean_std(values: List[float]) -> Dict[str, float]:
    v = np.array([x for x in values if x is not None and x == x], dtype=np.float64)
    if not len(v):
        return {"mean": float("nan"), "std": None}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None}  # no spread from 1 seed


def aggregate(data: str, runs: Path, models: Sequence[str],
              base: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Finished runs -> {"models": {NAME: {"overall": {...}, "domains": {DOMAIN: {...}}, "seeds": [...]}}}.
    With `base` (the overrides every run got) only runs of the current spec count (see fingerprint)."""
    out: Dict[str, Any] = {}
    for model in models:
        files = sorted((runs / data / model).glob("seed*/metrics.json"))
        stale = [f for f in files if not _is_current(f, data, base)]
        if stale:
            log.warning("%s/%s: %d finished run(s) of an older spec left out: %s", data, model, len(stale),
                        ", ".join(f.parent.name for f in stale))
        files = [f for f in files if f not in stale]
        if not files:
            continue
        ms = [json.loads(f.read_text()) for f in files]
        ov = _mean_std([m["overall"]["auc"] for m in ms])
        entry: Dict[str, Any] = {
            "seeds": [m["seed"] for m in ms],
            "commits": [m.get("commit", "unrecorded") for m in ms],
            "overall": {"auc": ov["mean"], "auc_std": ov["std"],
                        "gauc": _mean_std([m["overall"]["gauc"] for m in ms])["mean"],
                        "logloss": _mean_std([m["overall"]["logloss"] for m in ms])["mean"],
                        "cold_auc": _mean_std([m["overall"].get("cold_auc") for m in ms])["mean"]},
            "domains": {},
        }
        for d in ms[0]["domains"]:
            block = {}
            for k in ("auc", "gauc", "logloss", "cold_auc"):
                s = _mean_std([m["domains"][d].get(k) for m in ms])
                block[k], block[f"{k}_std"] = s["mean"], s["std"]
            entry["domains"][d] = block
        if "train_s" in ms[0]:
            entry["train_s_mean"] = _mean_std([m.get("train_s") for m in ms])["mean"]
        out[model] = entry
    return out


def run_commits(models: Dict[str, Any]) -> str:
    """`abc1234` (39 runs), ...: the commits the table's runs were made at, most runs first."""
    from collections import Counter

    counts = Counter(c for e in models.values() for c in e.get("commits", []))
    return ", ".join(f"`{c[:7] if c != 'unrecorded' else c}{'+dirty' if c.endswith('+dirty') else ''}` ({n} runs)"
                     for c, n in counts.most_common()) or "none"


def _fmt(m: float, s: Optional[float] = None) -> str:
    if m is None or m != m:
        return "n/a"
    return f"{m:.4f}" if s is None or s != s else f"{m:.4f} ± {s:.4f}"


def render_markdown(report: Dict[str, Any]) -> str:
    models = report["models"]
    domains = list(next(iter(models.values()))["domains"]) if models else []
    header = ["model", "seeds", "overall AUC"] + [f"{d} AUC" for d in domains] + [f"{d} cold AUC" for d in domains] \
        + [f"{d} GAUC" for d in domains] + [f"{d} logloss" for d in domains]
    rows = []
    for name, e in models.items():
        dm = e["domains"]
        rows.append([name, len(e["seeds"]), _fmt(e["overall"]["auc"], e["overall"]["auc_std"])]
                    + [_fmt(dm[d]["auc"], dm[d]["auc_std"]) for d in domains]
                    + [_fmt(dm[d]["cold_auc"], dm[d]["cold_auc_std"]) for d in domains]
                    + [_fmt(dm[d]["gauc"]) for d in domains] + [_fmt(dm[d]["logloss"]) for d in domains])
    ref = report.get("reference")
    if ref:
        rd = ref["domains"]
        rows.append([f"peers (public, best of 6)", "-", _fmt(ref["overall"])]
                    + [_fmt(rd.get(d, {}).get("auc")) for d in domains]
                    + [_fmt(rd.get(d, {}).get("cold_auc")) for d in domains]
                    + ["-"] * (2 * len(domains)))
    m = report["machine"]
    made_at = run_commits(models)
    head = (f"# {report['data']}: test AUC by model and domain\n\nData `{report['data']}`, split: train on train, "
            f"best epoch on valid, metrics on **test**. Seeds asked {report['seeds']} (column `seeds` = finished). "
            f"{report['settings']}. Machine: {m['nproc']} x {m['cpu_model']}, commit `{m['commit']}`, "
            f"{m['date']}; runs made at commit(s) {made_at}. mean ± sample std over seeds (no ± with one seed)."
            f"\n\n")
    text = head + common.markdown_table(header, rows) + "\n"
    pred = report.get("predictions")
    if pred:
        text += (f"\nDefault model's test predictions (seed {pred['seed']}, logits, float32): `{pred['file']}`.")
        if "independent_scorer" in pred:
            text += (f" Independent scorer (shared/tools/score_amazon_sr.py): overall AUC "
                     f"{pred['independent_scorer']['overall']['auc']:.4f}, difference to ours "
                     f"{pred['overall_auc_delta_vs_ours']:+.1e}.")
        text += "\n"
    if report["data"] == "amazon_sr":
        text += ("\nPeers: public numbers, best of Shared-Bottom, MMoE, PLE, STAR, M2M, AdaSparse per column "
                 "(embedding dim 16, no text). `popularity` scores log(1 + train impressions of the item); its "
                 "logloss treats that as a logit and is not meaningful.\n")
    return text


def plot(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    if not models:
        return
    cols = ["overall"] + list(next(iter(models.values()))["domains"])
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(models) * len(cols) / 3), 4.5))
    width = 0.8 / len(models)
    for i, (name, e) in enumerate(models.items()):
        vals = [e["overall"]["auc"]] + [e["domains"][d]["auc"] for d in cols[1:]]
        errs = [e["overall"]["auc_std"] or 0.0] + [e["domains"][d]["auc_std"] or 0.0 for d in cols[1:]]
        # tab20: up to 20 distinct colours (the default cycle repeats after 10 models)
        ax.bar(np.arange(len(cols)) + i * width, vals, width, yerr=errs, label=name, capsize=2,
               color=plt.get_cmap("tab20")(i % 20))
    ref = report.get("reference")
    if ref:
        for j, c in enumerate(cols):
            v = ref["overall"] if c == "overall" else ref["domains"].get(c, {}).get("auc")
            if v:
                ax.hlines(v, j - 0.05, j + 0.85, colors="k", linestyles="dashed",
                          label="best public peer" if j == 0 else None)
    ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2)
    ax.set_xticklabels(cols)
    ax.set_ylabel("test AUC")
    ax.set_ylim(0.45, 1.0)
    ax.set_title(f"{report['data']} test AUC (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SCORER = common.SHARED.parent / "tools" / "score_amazon_sr.py"


def export_predictions(runs: Path, results: Path, seeds: Sequence[int],
                       base: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    """Copy the default model's test predictions (first finished seed) to the results folder and score them with
    the independent scorer, so the published AUC can be checked without trusting this code."""
    import shutil

    for seed in seeds:
        src = runs / "amazon_sr" / "sr_foundation" / f"seed{seed}" / "test_pred.npy"
        if not (src.exists() and src.with_name("metrics.json").exists()
                and _is_current(src.with_name("metrics.json"), "amazon_sr", base)):
            continue
        dst = results / "amazon_sr_sr_foundation_test.npy"
        results.mkdir(parents=True, exist_ok=True)
        np.save(dst, np.load(src).astype(np.float32))
        out: Dict[str, Any] = {"file": str(dst.relative_to(common.REPO)) if dst.is_relative_to(common.REPO)
                               else str(dst), "seed": seed, "dtype": "float32", "kind": "logits"}
        if SCORER.exists():
            with tempfile.TemporaryDirectory() as tmp:
                js = Path(tmp) / "score.json"
                p = subprocess.run([common.PYTHON, str(SCORER), str(dst), "--json", str(js)], capture_output=True,
                                   text=True, timeout=600)
                if p.returncode == 0 and js.exists():
                    scored = json.loads(js.read_text())
                    ours = json.loads(src.with_name("metrics.json").read_text())
                    out["independent_scorer"] = scored
                    out["overall_auc_delta_vs_ours"] = scored["overall"]["auc"] - ours["overall"]["auc"]
                else:
                    out["independent_scorer_error"] = (p.stdout + p.stderr)[-500:]
        return out
    return None


def write_report(data: str, runs: Path, results: Path, seeds: Sequence[int], settings: str,
                 base: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    report = {"data": data, "split": "test", "seeds": list(seeds), "settings": settings,
              "commit": common.git_commit(), "machine": common.machine(),
              "models": aggregate(data, runs, ALL_MODELS, base)}
    if data == "amazon_sr":
        report["reference"] = PEERS
        report["predictions"] = export_predictions(runs, results, seeds, base)
    stem = f"{data}_auc"
    common.write_json(results / f"{stem}.json", report)
    (results / f"{stem}.md").write_text(render_markdown(report))
    plot(report, results / f"{stem}.png")
    return report


# --------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=None, choices=list(common.SPEC_FILES))
    ap.add_argument("--models", nargs="+", default=None, choices=ALL_MODELS)
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=None, help="train.max_steps (cap per epoch)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks per training run")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra spec override for every run")
    ap.add_argument("--quick", action="store_true", help="movielens, 1 seed, sr_foundation + popularity + "
                    "shared_bottom, 1 epoch of at most 30 steps")
    ap.add_argument("--runs-dir", type=Path, default=RUNS)
    ap.add_argument("--results-dir", type=Path, default=common.RESULTS)
    ap.add_argument("--report-only", action="store_true", help="only rebuild the result files from finished runs")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per job before it is killed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.quick:
        datas = args.data or ["movielens"]
        models = args.models or ["sr_foundation", "popularity", "tower_shared_bottom"]
        seeds = args.seeds or [1]
        epochs, max_steps = 1, args.max_steps or 30
    else:
        datas = args.data or ["amazon_sr", "movielens"]
        models = args.models or DEFAULT_ORDER
        seeds = args.seeds or [1, 2, 3]
        epochs, max_steps = args.epochs, args.max_steps
    base = [f"train.epochs={epochs}", *([f"train.max_steps={max_steps}"] if max_steps else []), *args.extra]
    settings = (f"{epochs} epoch(s)" + (f", at most {max_steps} steps each" if max_steps else "")
                + f", {args.nproc} rank(s)" + (f", overrides {args.extra}" if args.extra else ""))
    failures = 0
    for data in datas:
        why = common.data_available(data)
        if why:
            print(f"skip {data}: {why}")
            continue
        if not args.report_only:
            from recsys.data.prepare import prepare
            from recsys.text.pipeline import encode_text_tables

            spec = common.load(data)
            prepare(spec)  # no-op when prepared
            # The runs' text vectors (every variant shares the default's text tables); a no-op when cached. A fresh
            # machine failed every llm run here before.
            encode_text_tables(spec, progress=False)
            # seed-major: every model gets its first seed before any model gets its second
            for seed in seeds:
                for model in models:
                    try:
                        run_one(data, model, seed, base, args.nproc, args.runs_dir, args.timeout)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        failures += 1
                        log.error("%s/%s/seed%d failed: %s", data, model, seed, e)
                    write_report(data, args.runs_dir, args.results_dir, seeds, settings, base)
        report = write_report(data, args.runs_dir, args.results_dir, seeds, settings, base)
        print(render_markdown(report))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
