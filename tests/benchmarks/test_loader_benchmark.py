"""benchmarks/loader.py --quick runs both loaders (the one before torchdata.nodes, from git, and the current one)
and writes its table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_loader_benchmark_quick(tmp_path, child_env):
    if subprocess.run(["git", "cat-file", "-e", "85c6487^{commit}"], cwd=REPO).returncode != 0:
        pytest.skip("the baseline commit is not in this clone's history")
    out = tmp_path / "loader.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loader.py"), "--quick", "--out", str(out)],
                       cwd=REPO, env=child_env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(out.with_name("loader_quick.json").read_text())["results"]
    assert {r["impl"] for r in res} == {"85c6487", "current"}
    rows = {r["rows"] for r in res if r["instances"] == 1}
    assert len(rows) == 1  # both loaders yield every kept row once per epoch
    assert "torchdata.nodes (current)" in out.with_name("loader_quick.md").read_text()
