"""benchmarks/serving.py --quick runs end to end on the tiny bundle: real server, HTTP clients, JSON/markdown/PNG
with the machine and commit (timings are measured there, never asserted here)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from serving_helpers import REPO

pytestmark = pytest.mark.slow


def test_serving_benchmark_quick(ml_model, serving_env, tmp_path):
    out = tmp_path / "serving_quick"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serving.py"), "--bundle", str(ml_model["bundle"]),
                          "--rows", str(ml_model["test"]), "--candidates", "20", "--quick", "--out", str(out)],
                         capture_output=True, text=True, env=serving_env, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["clients"] for r in report["http"]] == [1, 2]
    assert all(r["errors"] == 0 and r["n"] >= 10 and r["p99_ms"] >= r["p50_ms"] > 0 for r in report["http"])
    assert report["batch_rate_R"] > 0 and report["machine"]["commit"] and report["machine"]["cpu_capability"]
    assert set(report["goals"]) == {"p99 at 1 client", "saturated candidates/s", "p99 at 8 clients"}
    assert "| goal |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
