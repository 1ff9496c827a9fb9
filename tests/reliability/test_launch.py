"""`python -m recsys.launch` (torchrun with its own noise removed): a bad spec is one line and exit 2 before any
worker starts; a worker's bad input is one line and exit 2; a crashed worker gives one line naming the rank and the
worker's own exit code; never the launcher's ChildFailedError traceback."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Sequence

import pytest

from reliability_helpers import PYTHON, REPO, SPEC, env, error_lines, small_overrides

from recsys.launch import worker_exit_to_launcher_code


def _launch(args: Sequence[str], nproc: int = 2, timeout: float = 240, **env_extra: str):
    cmd = [PYTHON, "-m", "recsys.launch", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
           "--rdzv-endpoint=localhost:0", str(REPO / "jobs" / "pretrain.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def _assert_no_launcher_noise(output: str) -> None:
    for noise in ("Traceback", "ChildFailedError", "OMP_NUM_THREADS", "failed (exitcode"):
        assert noise not in output, output[-3000:]


def test_bad_spec_is_one_line_before_any_worker_starts():
    proc = _launch(["--spec", str(SPEC), "--set", "model.dim=-3"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    _assert_no_launcher_noise(output)
    # the whole output is the one line: no worker printed anything, so none started
    assert output.strip().splitlines() == [f"error: {SPEC} [--set model.dim=-3] model.dim: must be > 0, got -3"]


def test_missing_spec_file_is_one_line():
    proc = _launch(["--spec", str(REPO / "feature_specs" / "no_such.yaml")])
    assert proc.returncode == 2, proc.stderr[-3000:]
    _assert_no_launcher_noise(proc.stderr)
    assert len(error_lines(proc.stderr)) == 1 and "no_such.yaml" in proc.stderr


@pytest.mark.slow
def test_bad_input_found_by_the_workers_is_one_line_and_exit_2(ml_prepared, tmp_path):
    # the spec loads; only a job on 2 ranks can tell that a global batch of 1 leaves a rank without rows
    proc = _launch(["--spec", str(SPEC), *small_overrides(ml_prepared, tmp_path / "run", **{"train.batch_size": 1})])
    assert proc.returncode == 2, proc.stderr[-3000:]
    _assert_no_launcher_noise(proc.stdout + proc.stderr)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "train.batch_size: 1 is smaller than the number of ranks (2)" in lines[0], lines


@pytest.mark.slow
def test_crashed_worker_is_one_line_with_its_exit_code(ml_prepared, tmp_path):
    # the testing hook makes every rank os._exit(1) after step 3: a crash, not bad input
    proc = _launch(["--spec", str(SPEC), *small_overrides(ml_prepared, tmp_path / "run")],
                   RECSYS_TEST_CRASH_AT_STEP="3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    _assert_no_launcher_noise(proc.stdout + proc.stderr)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "pretrain.py failed on rank" in lines[0] and "exit code 1" in lines[0], lines


def test_signal_exit_maps_to_shell_code():
    assert worker_exit_to_launcher_code(-9) == 137
    assert worker_exit_to_launcher_code(-15) == 143
    assert worker_exit_to_launcher_code(2) == 2
