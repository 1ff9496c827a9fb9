"""Shared pieces of the reliability tests: small-run overrides and job launchers (subprocesses, so exit codes,
stderr and hard kills are the real ones)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "feature_specs" / "movielens.yaml"
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def small_overrides(prepared: Path, out: Path, **extra) -> List[str]:
    """A MovieLens run that takes seconds: tiny model, no text, 12 steps per epoch, checkpoints every 5 steps."""
    sets = {"data.prepared_dir": str(prepared), "text.mode": "none", "model.dim": "8", "model.hidden": "[16]",
            "train.batch_size": "256", "train.epochs": "2", "train.max_steps": "12",
            "train.checkpoint_every_steps": "5", "train.keep_checkpoints": "3", "train.log_every_steps": "1000",
            "train.output_dir": str(out)}
    sets.update({k: str(v) for k, v in extra.items()})
    args: List[str] = []
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def env(**extra: str) -> Dict[str, str]:
    e = dict(os.environ)
    for k in ("RECSYS_DEBUG", "RECSYS_TEST_CRASH_AT_STEP", "TORCHELASTIC_RESTART_COUNT", "RANK", "WORLD_SIZE",
              "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(extra)
    return e


def job(script: str, args: Sequence[str], timeout: float = 180, **env_extra: str) -> subprocess.CompletedProcess:
    """One process (a 1-rank group)."""
    return subprocess.run([PYTHON, str(REPO / "jobs" / script), *args], cwd=REPO, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)


def torchrun_cmd(args: Sequence[str], nproc: int = 2, max_restarts: int = 0) -> List[str]:
    return [TORCHRUN, f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}", "--rdzv-backend=c10d",
            "--rdzv-endpoint=localhost:0", str(REPO / "jobs" / "pretrain.py"), *args]


def torchrun(args: Sequence[str], timeout: float = 240, max_restarts: int = 0,
             **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(args, max_restarts=max_restarts), cwd=REPO, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)


def kill_when(args: Sequence[str], ready: Path, timeout: float = 180) -> int:
    """Start a 2-rank torchrun in its own process group, wait until `ready` exists, then SIGKILL the whole group
    (agent and both workers, as `kill -9` of the job would). Returns how many checkpoints existed at the kill."""
    proc = subprocess.Popen(torchrun_cmd(args), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"run ended (rc {proc.returncode}) before {ready} appeared")
            if time.monotonic() > deadline:
                raise AssertionError(f"{ready} did not appear within {timeout}s")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return len(list(ready.parent.glob("step_*")))


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def error_lines(stderr: str) -> List[str]:
    # progress bars redraw with "\r" and leave no newline: an error line may follow one on the same line
    out: List[str] = []
    for ln in stderr.splitlines():
        i = ln.find("error: ")
        if i >= 0 and (i == 0 or ln[i - 1] in "\r]|"):
            out.append(ln[i:])
    return out


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, `error:` lines on stderr containing every needle, and no Python traceback."""
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    msg = "\n".join(error_lines(proc.stderr))
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg

