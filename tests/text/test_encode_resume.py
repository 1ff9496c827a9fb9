"""jobs/encode_text.py as real processes: killed with SIGKILL half-way and rerun, it ends with the same cache,
bit for bit, as an uninterrupted run; two torchrun ranks write the same cache as one process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from textfeat_helpers import WORDS, spec_dict, write_text_table

ROOT = Path(__file__).resolve().parents[2]
N_ITEMS, N_QUERIES, CHUNK = 240, 60, 4


def _texts(n: int, seed: int) -> list:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) + f" {i}" for i in range(n)]


def _spec(tmp: Path, tiny_bert: Path, name: str) -> Path:
    write_text_table(tmp / "prepared", "items", [f"i{i}" for i in range(N_ITEMS)], _texts(N_ITEMS, 0))
    queries = _texts(N_QUERIES, 1)
    write_text_table(tmp / "prepared", "queries", queries, queries)
    doc = spec_dict(tmp, str(tiny_bert), encoder={"chunk_size": CHUNK})
    doc["text"]["cache_dir"] = str(tmp / name)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _job(spec: Path, *launcher: str) -> list:
    return [*(launcher or (sys.executable,)), str(ROOT / "jobs" / "encode_text.py"), "--spec", str(spec),
            "--no-progress"]


def _folder_bytes(cache_root: Path) -> dict:
    """name -> bytes of every file of every key folder (the lock file is empty and holds no data)."""
    out = {}
    for path in sorted(cache_root.glob("*-norm-*/*")):
        if path.name != ".lock":
            out[f"{path.parent.name}/{path.name}"] = path.read_bytes()
    return out


def _parts(cache_root: Path) -> int:
    manifests = list(cache_root.glob("*-norm-*/manifest.json"))
    if not manifests:
        return 0
    return len(json.loads(manifests[0].read_text())["parts"])  # replaced atomically: never half-written


def test_killed_run_resumes_to_the_same_cache(tmp_path, tiny_bert):
    total_chunks = (N_ITEMS + N_QUERIES) // CHUNK
    whole = _spec(tmp_path, tiny_bert, "whole")
    done = subprocess.run(_job(whole), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reference = _folder_bytes(tmp_path / "whole")
    assert len(reference) == 1 + 2 * total_chunks  # manifest + one part (2 files) per chunk

    killed = _spec(tmp_path, tiny_bert, "killed")
    proc = subprocess.Popen(_job(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while _parts(tmp_path / "killed") < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    committed = _parts(tmp_path / "killed")
    assert 3 <= committed < total_chunks, f"kill landed after {committed} of {total_chunks} chunks"
    rerun = subprocess.run(_job(killed), env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed = _folder_bytes(tmp_path / "killed")
    assert resumed.keys() == reference.keys()
    assert all(resumed[name] == reference[name] for name in reference)
    # the rerun encoded only the chunks the killed run had not committed
    lines = {line.split()[0]: line.split() for line in rerun.stdout.splitlines()[2:]}
    assert int(lines["items"][4]) + int(lines["queries"][4]) == (total_chunks - committed) * CHUNK


@pytest.mark.slow
def test_two_torchrun_ranks_write_the_same_cache(tmp_path, tiny_bert):
    one = _spec(tmp_path, tiny_bert, "one")
    assert subprocess.run(_job(one), env=_env(), capture_output=True, timeout=300).returncode == 0
    two = _spec(tmp_path, tiny_bert, "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.run(_job(two, *torchrun), env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[2].split()[:5] == ["items", str(N_ITEMS), str(N_ITEMS), "0", str(N_ITEMS)]
    assert _folder_bytes(tmp_path / "two") == _folder_bytes(tmp_path / "one")
