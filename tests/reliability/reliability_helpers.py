"""Shared pieces of the reliability tests: small-run overrides and job launchers (subprocesses, so exit codes,
stderr and hard kills are the real ones)."""
from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Sequence

from recsys.train.dist import GLOO_EXIT_ABORT

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


def _descendants(pid: int) -> List[int]:
    """Every process below `pid` (torchrun starts its workers in their own sessions, so a process-group kill
    of the launcher would leave them running)."""
    children: Dict[int, List[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker at once, as `kill -9` of the whole job would."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)




def torchrun(args: Sequence[str], log: Path, timeout: float = 240, max_restarts: int = 0,
             **env_extra: str) -> subprocess.CompletedProcess:
    """A 2-rank torchrun; stdout+stderr go to `log` (kept for post-mortems). On timeout the whole tree is killed.

    A gloo worker used to abort in C++ at exit (GLOO_EXIT_ABORT; see recsys.train.dist.exit_process), never with
    a Python error; such a launch is repeated once. A fresh run restarts from an empty output folder; a `--resume` run
    simply resumes again (resume is exact from any checkpoint). Any other failure is returned as it is."""
    res = _torchrun_once(args, log, timeout, max_restarts, **env_extra)
    if res.returncode != 0 and GLOO_EXIT_ABORT in res.stderr:
        # jobs now exit without interpreter finalisation (recsys.train.dist.exit_process), which removed the known
        # cause; a recurrence is retried but reported, so it does not go unseen
        warnings.warn(f"gloo abort at exit recurred ({log}); launch repeated once")
        if "--resume" not in args:
            out = next((a.split("=", 1)[1] for a in args if a.startswith("train.output_dir=")), None)
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)
        res = _torchrun_once(args, log.with_name(log.stem + ".retry" + log.suffix), timeout, max_restarts,
                             **env_extra)
    return res


def _torchrun_once(args: Sequence[str], log: Path, timeout: float, max_restarts: int,
                   **env_extra: str) -> subprocess.CompletedProcess:
    with open(log, "w") as fh:
        proc = subprocess.Popen(torchrun_cmd(args, max_restarts=max_restarts), cwd=REPO, env=env(**env_extra),
                                stdout=fh, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise AssertionError(f"torchrun timed out after {timeout}s; log: {log}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", log.read_text(errors="replace"))


def kill_when(args: Sequence[str], ready: Path, log: Path, timeout: float = 180) -> None:
    """Start a 2-rank torchrun, wait until `ready` exists, then SIGKILL launcher and workers."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(torchrun_cmd(args), cwd=REPO, env=env(), stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not ready.exists():
                if proc.poll() is not None:
                    raise AssertionError(f"run ended (rc {proc.returncode}) before {ready} appeared; log: {log}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{ready} did not appear within {timeout}s; log: {log}")
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                kill_tree(proc)


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

