"""benchmarks/text_path.py: the steady-state rate leaves the warm-up steps out, and the report's ratios are
each version's over old's medians (synthetic launch records; the real launches need two prepared trees)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import text_path  # noqa: E402


def test_steady_rate_leaves_out_warmup_steps():
    # 5 slow warm-up steps (1 s each), then 10 steps of 0.1 s: the steady rate is batch / 0.1 s
    times = [float(i) for i in range(6)] + [5.0 + 0.1 * i for i in range(1, 11)]
    cpu = [2.0 * t for t in times]  # two busy threads: 0.2 s of CPU per 0.1 s step
    rec = {"step_times": times, "global_batch": 4096, "loader_times": [0.01] * len(times), "cpu_times": cpu}
    s = text_path._steady(rec, warmup=5)
    assert s["steps_timed"] == 10
    assert s["samples_per_s"] == pytest.approx(40960, rel=1e-9)
    assert s["median_step_s"] == pytest.approx(0.1)
    assert s["loader_s_per_step"] == pytest.approx(0.01)
    assert s["cpu_s_per_step"] == pytest.approx(0.2)


def _launch(tag, nproc, sps, rss, text, cpu=None):
    return {"tag": tag, "nproc": nproc, "samples_per_s": sps, "samples_per_s_job_log": sps,
            "samples_per_s_median_step": 2 * sps, "cpu_ms_per_step": cpu,
            "load_before": 1.0, "load_after": 2.0,
            "per_rank": [{"rank": r, "peak_rss_mb": rss, "text_path_bytes": text} for r in range(nproc)]}


def test_report_ratios_are_each_version_over_old_medians():
    mib = 2 ** 20
    runs = [_launch("old_1r_0", 1, 100.0, 1000.0, 74 * mib, 400.0), _launch("new_1r_0", 1, 50.0, 900.0, 5 * mib, 300.0),
            _launch("old_1r_1", 1, 300.0, 1000.0, 74 * mib, 200.0), _launch("new_1r_1", 1, 150.0, 900.0, 5 * mib, 100.0),
            _launch("old_1r_2", 1, 200.0, 1000.0, 74 * mib, 300.0), _launch("new_1r_2", 1, 10.0, 900.0, 5 * mib, 150.0),
            _launch("base_1r_0", 1, 20.0, 950.0, 5 * mib)]
    meta = {"machine": {"cpu_model": "cpu", "cores": 2, "torch": "t", "cpu_capability": "c", "date": "d"},
            "old_commit": "o", "new_commit": "n", "steps": 10, "warmup": 2, "rounds": 3, "global_batch": 4096}
    md = text_path.report(runs, meta)
    # medians: samples/s 50 / 200, median-step rate 100 / 400, CPU 150 / 300; base: one launch, no CPU figure
    assert "| 1 | new | 0.25x | 0.25x | 0.50x | 0.90x | 74.0 -> 5.0 MiB |" in md
    assert "| 1 | base | 0.10x | 0.10x | - | 0.95x | 74.0 -> 5.0 MiB |" in md
    assert "overridden" not in md
    with_override = text_path.report(runs, dict(meta, overrides=["text.mode=none"]))
    assert "Overrides for both versions: `text.mode=none`" in with_override


def test_old_spec_goes_to_the_old_tree_only_and_is_named_in_the_report(tmp_path):
    args = text_path.parser().parse_args(["--old-tree", str(tmp_path), "--old-spec", "feature_specs/old_no_user.yaml",
                                   "--set", "model.regularizer=none"])
    old = text_path.job_command(tmp_path / "old", "old_2r_0", args, tmp_path / "run")
    new = text_path.job_command(tmp_path / "new", "new_2r_0", args, tmp_path / "run")
    assert old[old.index("--spec") + 1] == "feature_specs/old_no_user.yaml"
    assert new[new.index("--spec") + 1] == text_path.DEFAULT_SPEC
    assert old[-2:] == new[-2:] == ["--set", "model.regularizer=none"]
    runs = [_launch("old_1r_0", 1, 100.0, 1000.0, 2 ** 20), _launch("new_1r_0", 1, 110.0, 900.0, 2 ** 20)]
    meta = {"machine": {"cpu_model": "cpu", "cores": 2, "torch": "t", "cpu_capability": "c", "date": "d"},
            "old_commit": "o", "new_commit": "n", "steps": 10, "warmup": 2, "rounds": 1, "global_batch": 4096,
            "old_spec": "feature_specs/old_no_user.yaml"}
    md = text_path.report(runs, meta)
    assert md.startswith("# Text path: dense buffers (old) vs frozen text tables (new), amazon-sr, same features")
    assert "Old tree's spec: `feature_specs/old_no_user.yaml`" in md
    assert "same features" not in text_path.report(runs, dict(meta, old_spec=text_path.DEFAULT_SPEC))
