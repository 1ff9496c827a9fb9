"""Plumbing shared by the benchmarks: repository paths, the spec files, machine facts every result must state
(cpu model, core count, commit, load average at measurement time) and result writers.

Not part of the `recsys` package: benchmarks are scripts that drive the package and its jobs from outside."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "benchmarks" / "runs"  # per-run outputs and logs (not committed)
PYTHON = sys.executable
SHARED = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))
AMAZON_RAW = SHARED / "bench" / "amazon-sr"

SPEC_FILES = {"amazon_sr": REPO / "feature_specs" / "amazon_sr.yaml",
              "movielens": REPO / "feature_specs" / "movielens.yaml"}


def data_overrides(data: str) -> List[str]:
    """`--set` strings that point a spec at this machine's data (the amazon-sr bench files live outside the repo)."""
    return [f"data.raw_dir={AMAZON_RAW}"] if data == "amazon_sr" else []


def data_available(data: str) -> Optional[str]:
    """None when the data set can be used, else why not (one line)."""
    if data == "amazon_sr" and not AMAZON_RAW.exists():
        return f"{AMAZON_RAW} not found (set RECSYS_SHARED_DATA)"
    return None


def load(data: str, overrides: Sequence[str] = ()):
    from recsys.spec.loader import load_spec

    return load_spec(SPEC_FILES[data], [*data_overrides(data), *overrides])


def load_average() -> float:
    """1-minute load average: throughput measured while other jobs run is noisy, so every figure carries it."""
    return float(os.getloadavg()[0])


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """lscpu's model name (see recsys.hardware)."""
    from recsys import hardware

    return hardware.cpu_info().model


def machine() -> Dict[str, Any]:
    """What every result states: CPU model (lscpu), torch's CPU capability, bf16 support, cores, commit, load."""
    import torch

    from recsys import hardware

    cpu = hardware.cpu_info()
    return {"cpu_model": cpu.model, "cpu_capability": cpu.capability, "bf16_native": cpu.bf16_native,
            "cpu_flags": sorted(cpu.flags), "cores": cpu.cores, "nproc": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_avg_1min": load_average()}


def shown_path(path: Path) -> str:
    """A path as a committed report shows it: relative to the checkout or to the shared data folder when inside
    them (a report names no one's machine layout), else as given."""
    p = Path(path).resolve()
    for base, label in ((REPO, ""), (SHARED.resolve(), "../shared/data/")):
        try:
            return label + str(p.relative_to(base))
        except ValueError:
            continue
    return str(path)


def write_json(path: Path, obj: Any) -> None:
    """Write atomically: a reader (or a re-run that skips finished work) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def env_for_children() -> Dict[str, str]:
    """Environment of the jobs the benchmarks launch: the repo importable, one intra-op thread budget per core."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("RECSYS_SHARED_DATA", str(SHARED))
    return env


# The public peers' configuration: our model at the size Scenario-Wise-Rec trains its peers on amazon-sr (embeddings
# 16 wide, the history mean-pooled: one pooled lookup, no target attention; a shared-bottom tower one 128-wide
# layer deep, the width of SharedBottom's bottom and of EPNet's first MLP layer; no text). Table widths are set only
# for the tables the data's spec has. Until 2026-12-01 the tower kept the default spec's 256-128, three times
# EPNet's tower FLOPs: a speed comparison at unequal model size. Since amazon_sr.yaml dropped its user id embedding
# (a quality choice made on valid, docs/search_quality.md) the peers' configuration has none either, while the peers
# embed the user id: docs/cpu_speed.md gives the goal ratio with and without it. Nor does it read the train counts
# (`statistics.counts`), which the peers have no equivalent of, nor keep a weight average (`train.ema_decay`, which the
# peers do not; on this model's few dense weights it would cost next to nothing).
_PEER_TABLES = ("item", "brand", "category", "query")
_PEER_MODEL = ["model.dim=16", "features.hist_items.pooling=mean", "model.tower=shared_bottom", "model.hidden=[128]",
               "text.mode=none", "statistics.counts=[]", "train.ema_decay=null"]


def peer_overrides(data: str) -> List[str]:
    tables = [f"tables.{t}.dim=16" for t in _PEER_TABLES] if data == "amazon_sr" else []
    return [*tables, *_PEER_MODEL]
