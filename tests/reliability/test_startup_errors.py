"""A start-up error under torchrun is shown once per host and never lost (recsys.startup_errors).

The workers here are real processes running `recsys.cli.run_main` with torchrun's worker environment; the test
process hosts the key-value store as torchrun's agent does. The ordering that used to lose the error is forced
deterministically: the quiet rank fails at once and the first rank only after it is told to, so a quiet rank that
exits early (and would get the first rank killed by torchrun before it prints) shows up as a test failure."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]

# A worker: fails with `message` once the file `go` exists (the test controls when the first rank fails).
WORKER = r"""
import os, sys, time
from pathlib import Path
from recsys.cli import run_main
from recsys.errors import RecsysError

def main():
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.02)
    raise RecsysError(sys.argv[1])

run_main(main)
"""


@pytest.fixture()
def agent_store():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=60))
    yield store


def _worker(store, local_rank: int, message: str, go: Path, agent_store_flag: str = "True") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK")}
    env.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), GROUP_RANK="0", WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
               TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_USE_AGENT_STORE=agent_store_flag,
               PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", WORKER, message, str(go)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen):
    out, err = proc.communicate(timeout=120)
    return proc.returncode, [line for line in err.splitlines() if line.startswith("error:")]


def test_quiet_rank_waits_for_the_first_rank_and_the_error_is_printed_once(agent_store, tmp_path):
    quiet = _worker(agent_store, 1, "model.dim: must be > 0", tmp_path / "go1")
    (tmp_path / "go1").touch()  # the quiet rank fails first ...
    with pytest.raises(subprocess.TimeoutExpired):
        quiet.wait(timeout=3)  # ... and does not exit before the first rank has printed
    first = _worker(agent_store, 0, "model.dim: must be > 0", tmp_path / "go0")
    (tmp_path / "go0").touch()
    assert _finish(first) == (2, ["error: model.dim: must be > 0"])
    assert _finish(quiet) == (2, [])


def test_an_error_only_the_quiet_rank_met_is_printed_by_it(agent_store, tmp_path):
    quiet = _worker(agent_store, 1, "shard 1: cannot read part-1.parquet", tmp_path / "go")
    first = _worker(agent_store, 0, "model.dim: must be > 0", tmp_path / "go")
    (tmp_path / "go").touch()
    assert _finish(first) == (2, ["error: model.dim: must be > 0"])
    assert _finish(quiet) == (2, ["error: shard 1: cannot read part-1.parquet"])


def test_a_first_rank_past_start_up_lets_the_quiet_rank_print(agent_store, monkeypatch):
    from recsys import startup_errors

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent_store.port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(startup_errors, "_published", False)
    startup_errors.publish_outcome("")  # what init_distributed does on the first rank
    startup_errors.publish_outcome("a later call does not overwrite the record")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert startup_errors.shown_by_first_rank("model.dim: must be > 0") is False
    assert agent_store.get("recsys/startup/0/0") == b""


def test_without_the_agent_store_every_rank_prints(agent_store, tmp_path):
    procs = [_worker(agent_store, r, "model.dim: must be > 0", tmp_path / "go", agent_store_flag="False")
             for r in (1, 0)]
    (tmp_path / "go").touch()
    assert [_finish(p) for p in procs] == [(2, ["error: model.dim: must be > 0"])] * 2
