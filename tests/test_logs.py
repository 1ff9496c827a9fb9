"""Console vs log file (recsys/logs.py): the default console keeps the few lines a person reads; the run's log
file keeps everything, including what was logged before the run folder was known; --verbose brings it back."""
from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from recsys.logs import CONSOLE, attach_log_file, setup_logging

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("recsys").level)
    yield
    for h in root.handlers:
        if h not in saved[1]:
            h.close()
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])
    logging.getLogger("recsys").setLevel(saved[2])
    logging.captureWarnings(False)


def test_console_shows_marked_lines_and_warnings_file_gets_everything(restore_logging, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.delenv("RECSYS_LOG_LEVEL", raising=False)
    setup_logging(rank=0)
    logging.getLogger("torchrec.distributed.planner").info("planner detail before the folder is known")
    logging.getLogger("recsys.data.loader").info("loader detail")
    logging.getLogger("recsys.train.loop").info("epoch 1/1 ...", extra=CONSOLE)
    logging.getLogger("recsys.data.loader").warning("3 bad rows quarantined")
    logging.getLogger("torchrec").warning("library warning")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("some deprecation", FutureWarning)
    path = attach_log_file(tmp_path / "run", job="pretrain")
    logging.getLogger("torchrec").info("after attach")
    err = capsys.readouterr().err
    assert err.splitlines() == ["epoch 1/1 ...", "3 bad rows quarantined"]
    assert path == tmp_path / "run" / "logs" / "pretrain.rank0.log"
    text = path.read_text()
    for needle in ("planner detail before the folder is known", "loader detail", "epoch 1/1", "library warning",
                   "FutureWarning: some deprecation", "after attach"):
        assert needle in text, text


def test_other_ranks_show_only_recsys_warnings(restore_logging, capsys, monkeypatch):
    monkeypatch.delenv("RECSYS_LOG_LEVEL", raising=False)
    setup_logging(rank=1)
    logging.getLogger("recsys.train.loop").info("epoch line", extra=CONSOLE)
    logging.getLogger("recsys.data.loader").warning("bad rows")
    assert capsys.readouterr().err.splitlines() == ["bad rows"]


def test_verbose_brings_everything_back(restore_logging, capsys, monkeypatch):
    monkeypatch.delenv("RECSYS_LOG_LEVEL", raising=False)
    setup_logging(rank=0, verbose=True)
    logging.getLogger("torchrec.distributed.planner").info("planner detail")
    err = capsys.readouterr().err
    assert "INFO torchrec.distributed.planner: planner detail" in err


def test_torch_loggers_are_routed(restore_logging, tmp_path, capsys, monkeypatch):
    """torch gives `torch` its own stderr handler; after setup its records follow the same rules."""
    import torch  # noqa: F401

    monkeypatch.delenv("RECSYS_LOG_LEVEL", raising=False)
    setup_logging(rank=0)
    logging.getLogger("torch.fx._symbolic_trace").warning("is_fx_tracing will return true ...")
    path = attach_log_file(tmp_path, job="t")
    assert capsys.readouterr().err == ""
    assert "is_fx_tracing" in path.read_text()


@pytest.mark.slow
def test_pretrain_console_is_short(tiny_overrides, tmp_path, child_env):
    """A whole (tiny) training run: plan table, one line per epoch, the final table -- and the rest in the log."""
    out = tmp_path / "run"
    args = [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--spec", str(REPO / "feature_specs" /
            "movielens.yaml"), *sum((["--set", o] for o in tiny_overrides(f"train.output_dir={out}",
                                                                          "train.epochs=2", "train.max_steps=3")), [])]
    res = subprocess.run(args, cwd=REPO, env=child_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    console = res.stdout + res.stderr
    lines = [ln for ln in console.splitlines() if ln.strip()]
    assert len(lines) < 30, console
    assert "sharding plan for 1 cpu rank(s)" in console and "table_wise" in console
    assert sum(ln.startswith("epoch ") and "valid mean_domain_auc" in ln for ln in lines) == 2, console
    assert "| overall |" in console and "best epoch" in console
    for noise in ("torchrec", "FutureWarning", "Successfully loaded", "autograd kernel"):
        assert noise not in console, console
    log = (out / "logs" / "pretrain.rank0.log").read_text()
    assert "torchrec.distributed" in log and "Successfully loaded" in log
    assert "autograd kernel was not registered" not in log  # filtered, not just moved (see test_known_warnings)
