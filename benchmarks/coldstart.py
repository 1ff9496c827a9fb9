#!/usr/bin/env python
"""The cold-start protocol (paper section "cold-start"): pretrain once without a domain, then serve it with 10% of
its users.

    python benchmarks/coldstart.py --data amazon_sr            # held-out domain sci_rec
    python benchmarks/coldstart.py --data movielens            # held-out domain ml_drama
    python benchmarks/coldstart.py --data movielens --quick    # minutes, smoke test
    python benchmarks/coldstart.py --data movielens_new_users  # the held-out domain's users are new users

`movielens_new_users`: pretraining sees only the users with bucket(user_id, 10) >= 5, the held-out domain is
fine-tuned on users with bucket(user_id, 10) < 1 -- every fine-tuning user is one pretraining never saw, so their
table rows were never updated. With --freeze l0,l1 those rows train anyway (jobs/finetune.py's default); the row
"untrained rows frozen too" (--freeze-untrained-rows) is the old behaviour, which leaves them random.

Steps (each a real job run as a subprocess, results cached under benchmarks/runs/coldstart/<data>/):
  pretrain   all domains but the held-out one (its rows are ignored via data.ignore_domains)
  (a) zero-shot          the pretrained model with the held-out domain added by the spec (head/domain embedding
                         initialised from the pretrained domains of the same kind), no training
  (b) fine-tune          from the pretrained model on the held-out domain's few-shot users (user_bucket < 10),
                         freezing l0,l1 / l0 / nothing
  (c) scratch            the same model and few-shot data, no pretraining
  (d) full-data scratch  the same model on all of the held-out domain's train rows (upper bound)
Every row: trained on train, epoch selected on valid, reported on test, with the cold-item slice.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

SETUPS = {
    "amazon_sr": dict(spec="feature_specs/amazon_sr.yaml", held_out="sci_rec", kind="rec",
                      few_shot="user_bucket < 10", pre_epochs=2, ft_epochs=6, ft_batch=1024),
    "movielens": dict(spec="feature_specs/movielens.yaml", held_out="ml_drama", kind="rec",
                      few_shot="user_bucket < 10", pre_epochs=4, ft_epochs=8, ft_batch=256),
    "movielens_new_users": dict(spec="feature_specs/movielens.yaml", held_out="ml_drama", kind="rec",
                                pre_filter="bucket(user_id, 10) >= 5", few_shot="bucket(user_id, 10) < 1",
                                pre_epochs=4, ft_epochs=8, ft_batch=256),
}


def domains_override(spec_path: str, drop: str) -> str:
    sys.path.insert(0, str(ROOT))
    from recsys.spec.loader import load_spec

    spec = load_spec(ROOT / spec_path)
    kept = [f"{{name: {d.name}, kind: {d.kind}, loss_weight: {d.loss_weight}"
            + (f", value: {d.value}" if d.value is not None else "") + "}"
            for d in spec.domains if d.name != drop]
    return "domains=[" + ", ".join(kept) + "]"


def run(cmd, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"failed ({rc}) after {time.time() - t0:.0f}s: {' '.join(map(str, cmd))}\n" + "\n".join(tail))
    print(f"  done in {time.time() - t0:.0f}s: {log.parent.name}", flush=True)


def set_args(sets) -> list:
    """`--set k=v` arguments of a job's command line."""
    return [a for s in sets for a in ("--set", s)]


def prepared(spec: str, sets, log: Path) -> None:
    """jobs/prepare_data.py then jobs/encode_text.py for the spec as a job will load it (the --set overrides decide
    its resolved schema); both skip everything already up to date."""
    for job in ("prepare_data.py", "encode_text.py"):
        run([PY, f"jobs/{job}", "--spec", spec, *set_args(sets)], log.with_name(f"{log.stem}_{job.split('.')[0]}.txt"))


def torchrun(nproc: int):
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=sorted(SETUPS), default="movielens")
    ap.add_argument("--quick", action="store_true", help="few steps everywhere (smoke test)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seed", type=int, default=2023)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "runs" / "coldstart")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="spec override for every job of the protocol (e.g. text.mode=llm); needs --tag")
    ap.add_argument("--tag", help="names this variant's runs and results (coldstart_<data>_<tag>.*)")
    args = ap.parse_args()
    if args.extra and not args.tag:
        ap.error("--set needs --tag: the variant's results must not overwrite the default's")
    if args.tag and not args.tag.replace("_", "").isalnum():
        ap.error(f"--tag {args.tag!r}: letters, digits and _ only")
    cfg = SETUPS[args.data]
    spec, held = cfg["spec"], cfg["held_out"]
    variant = args.data + (f"_{args.tag}" if args.tag else "")
    base = args.out_dir / (variant + ("-quick" if args.quick else ""))
    common = [f"train.seed={args.seed}", *args.extra]
    if args.quick:
        common += ["train.max_steps=20"]
    pre_dir = base / "pretrain"
    pre_sets = common + [domains_override(spec, held), f"data.ignore_domains=[{held}]",
                         f"train.epochs={1 if args.quick else cfg['pre_epochs']}", f"train.output_dir={pre_dir}"]
    if cfg.get("pre_filter"):
        pre_sets.append(f"data.row_filter={cfg['pre_filter']}")
    few = [f"model.single_domain={held}", f"data.row_filter={cfg['few_shot']}",
           f"train.epochs={2 if args.quick else cfg['ft_epochs']}", f"train.batch_size={cfg['ft_batch']}"]
    variants = {
        "(a) zero-shot": (["--from", str(pre_dir), "--zero-shot", "--freeze", "none"], [f"model.single_domain={held}"]),
        "(b) fine-tune, freeze l0,l1": (["--from", str(pre_dir), "--freeze", "l0,l1"], few),
        "(b) fine-tune, freeze l0,l1, untrained rows frozen too": (["--from", str(pre_dir), "--freeze", "l0,l1",
                                                                    "--freeze-untrained-rows"], few),
        "(b) fine-tune, freeze l0": (["--from", str(pre_dir), "--freeze", "l0"], few),
        "(b) fine-tune, freeze none": (["--from", str(pre_dir), "--freeze", "none"], few),
        "(c) scratch, few-shot": (["--freeze", "none"], few),
        "(d) scratch, all rows": (["--freeze", "none"], [s for s in few if not s.startswith("data.row_filter")]),
    }
    print(f"cold-start protocol on {args.data}: held-out domain {held}, few-shot {cfg['few_shot']!r}", flush=True)
    if not (pre_dir / "train_summary.json").exists():
        prepared(spec, pre_sets, pre_dir / "log.txt")
        cmd = torchrun(args.nproc) + ["jobs/pretrain.py", "--spec", spec, "--resume", *set_args(pre_sets)]
        run(cmd, pre_dir / "log.txt")
    results = {}
    for name, (flags, sets) in variants.items():
        slug = name.split(")")[0].strip("(") + "_" + "_".join(name.split(")")[1].replace(",", "").split())
        out = base / slug
        metrics_file = out / "metrics.json"
        if not metrics_file.exists():
            prepared(spec, common + sets, out / "log.txt")
            cmd = torchrun(args.nproc) + ["jobs/finetune.py", "--spec", spec, "--out", str(metrics_file)] + flags \
                + set_args(common + sets + [f"train.output_dir={out}"])
            run(cmd, out / "log.txt")
        results[name] = json.loads(metrics_file.read_text())
    table = render(results, held, args.data, args.extra)
    print(table)
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    stem = f"coldstart_{variant}" + ("_quick" if args.quick else "")
    (dest / f"{stem}.md").write_text(table + "\n")
    summary = {"data": args.data, "held_out": held, "few_shot": cfg["few_shot"], "seed": args.seed,
               "quick": args.quick, "commit": _commit(), "split": "test", "overrides": args.extra,
               "rows": {k: v["domains"][held] for k, v in results.items()}}
    (dest / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    return 0


def render(results, held, data, overrides=()) -> str:
    f = lambda v: "n/a" if v is None or v != v else f"{v:.4f}"  # noqa: E731
    spec = f" Every job with `{' '.join('--set ' + o for o in overrides)}`." if overrides else ""
    lines = [f"Cold-start on {data}: domain `{held}` held out of pretraining; test split, epoch chosen on valid.{spec}",
             "",
             "| setting | AUC | GAUC | logloss | cold-item AUC |", "|---|---|---|---|---|"]
    for name, m in results.items():
        d = m["domains"][held]
        lines.append(f"| {name} | {f(d['auc'])} | {f(d['gauc'])} | {f(d['logloss'])} | {f(d.get('cold_auc'))} |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
