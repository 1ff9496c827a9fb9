"""A tiny MovieLens model trained, evaluated and exported once per session for the serving tests (real jobs in
subprocesses), in a prepared folder of its own (the tests move it away to prove a bundle does not need it)."""
from __future__ import annotations

import os
import shutil

import pytest
from serving_helpers import ML, REPO, run_job, sets

COUNTS = ("statistics.counts=[{name: item_buys, item: item_id}, "
          "{name: co_buys, item: item_id, history: hist_items, last: 5}]")
MATCHES = "statistics.matches=[{name: genre_matches, feature: item_genres, history: hist_items}]"


@pytest.fixture(scope="session")
def serving_env(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["RECSYS_MODELS_DIR"] = str(tmp_path_factory.mktemp("models"))
    return env


@pytest.fixture(scope="session")
def ml_model(ml_prepared, tiny_overrides, tmp_path_factory, serving_env):
    """{spec overrides, run folder, evaluate's test predictions, fp32 bundle} of a 20-step tiny MovieLens model."""
    tmp = tmp_path_factory.mktemp("serving")
    prepared = tmp / "prepared"
    shutil.copytree(ml_prepared, prepared)
    # with train counts (statistics.counts), which a bundle must carry and serving must compute as evaluation does,
    # and a history match (statistics.matches), which serving computes from the bundle's catalogue; trained with a
    # weight average (train.ema_decay), so the bundle must carry the average, not the last step's weights
    overrides = tiny_overrides(f"data.prepared_dir={prepared}", "train.max_steps=20", f"train.output_dir={tmp / 'run'}",
                               COUNTS, MATCHES, "train.ema_decay=0.9")
    common = ["--spec", str(ML), *sets(overrides)]
    res = run_job("prepare_data.py", *common, env=serving_env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_job("pretrain.py", *common, env=serving_env)
    assert res.returncode == 0, res.stderr[-3000:]
    preds = tmp / "eval_test.npy"
    res = run_job("evaluate.py", *common, "--checkpoint", str(tmp / "run"), "--split", "test",
                  "--save-predictions", str(preds), env=serving_env)
    assert res.returncode == 0, res.stderr[-3000:]
    bundle = tmp / "bundle"
    res = run_job("export.py", *common, "--checkpoint", str(tmp / "run"), "--out", str(bundle), env=serving_env)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"tmp": tmp, "prepared": prepared, "overrides": overrides, "common": common, "run": tmp / "run",
            "preds": preds, "bundle": bundle, "test": prepared / "test.parquet"}
