"""recsys.cli: argument helpers, exit codes and error output of jobs."""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recsys.cli import add_spec_args, load_spec_from_args, setup_logging

from spec_helpers import MINIMAL, REPO, variant

JOB = textwrap.dedent("""
    import argparse, os, sys
    from recsys.cli import add_spec_args, load_spec_from_args, run_main

    def main(argv=None):
        parser = argparse.ArgumentParser()
        add_spec_args(parser)
        parser.add_argument("--interrupt", action="store_true")
        args = parser.parse_args(argv)
        if args.interrupt:
            raise KeyboardInterrupt
        spec = load_spec_from_args(args)
        print(spec.name, spec.model.fusion)
        return 0

    if __name__ == "__main__":
        run_main(main)
""")


def run_job(tmp_path: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {k: v for k, v in os.environ.items() if k != "RECSYS_DEBUG"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if debug:
        env["RECSYS_DEBUG"] = "1"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_good_spec_exits_zero(tmp_path: Path):
    out = run_job(tmp_path, "--spec", str(MINIMAL), "--set", "model.fusion=mean")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["minimal", "mean"]


def test_bad_spec_exits_2_without_traceback(tmp_path: Path):
    bad = variant(tmp_path, [("  fusion: domain", "  fusion: gate"), ("  epochs: 1", "  epochs: x")])
    out = run_job(tmp_path, "--spec", str(bad))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"error: {bad}:") for line in lines), out.stderr
    assert "model.fusion: expected one of domain|mean|cls, got 'gate'" in out.stderr


def test_bad_override_exits_2(tmp_path: Path):
    out = run_job(tmp_path, "--spec", str(MINIMAL), "--set", "domains.nope.kind=rec")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: {MINIMAL} [--set domains.nope.kind=rec]")


def test_missing_spec_argument_is_argparse_error(tmp_path: Path):
    out = run_job(tmp_path)
    assert out.returncode == 2 and "--spec" in out.stderr and "Traceback" not in out.stderr


def test_debug_reraises(tmp_path: Path):
    out = run_job(tmp_path, "--spec", str(tmp_path / "missing.yaml"), debug=True)
    assert out.returncode == 1 and "Traceback" in out.stderr and "SpecError" in out.stderr


def test_keyboard_interrupt_exits_130(tmp_path: Path):
    out = run_job(tmp_path, "--spec", str(MINIMAL), "--interrupt")
    assert out.returncode == 130 and "Traceback" not in out.stderr


def test_spec_args_in_process():
    parser = add_spec_args(argparse.ArgumentParser())
    args = parser.parse_args(["--spec", str(MINIMAL), "--set", "model.dim=4", "--set", "train.epochs=2"])
    assert args.overrides == ["model.dim=4", "train.epochs=2"]
    spec = load_spec_from_args(args)
    assert spec.model.dim == 4 and spec.train.epochs == 2


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("recsys").level)
    yield
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])
    logging.getLogger("recsys").setLevel(saved[2])


def test_setup_logging_levels_by_rank(restore_logging, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RECSYS_LOG_LEVEL", raising=False)
    setup_logging(rank=0)
    assert logging.getLogger("recsys.anything").getEffectiveLevel() == logging.INFO
    setup_logging(rank=1)
    assert logging.getLogger().handlers[0].level == logging.WARNING  # the console of other ranks
    setup_logging(rank=1, verbose=True)
    assert "[rank 1]" in logging.getLogger().handlers[0].formatter._fmt
    assert "%(name)s" in logging.getLogger().handlers[0].formatter._fmt
    setup_logging(rank=1, level="debug")
    assert logging.getLogger("recsys.anything").getEffectiveLevel() == logging.DEBUG
