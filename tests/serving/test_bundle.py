"""Bundle export, verification and batch scoring (issue 13 items 1-3, 6): parity with evaluate, quantised tables'
AUC cost, a tampered bundle refused, a bundle scored with no prepared folder or text cache present."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys.metrics import auc
from serving_helpers import run_job

pytestmark = pytest.mark.slow


def _scores(path):
    return pq.read_table(path)["logit"].to_numpy(zero_copy_only=False)


def test_bundle_is_self_describing(ml_model):
    m = json.loads((ml_model["bundle"] / "manifest.json").read_text())
    assert m["format"] == 1 and m["quantize"] == "none"
    assert set(m["files"]) >= {"spec.yaml", "weights.safetensors", "text.safetensors", "schema/schema.json",
                               "catalogue/movies.parquet"}
    assert len(m["spec_fingerprint"]) == 16 and len(m["schema_sha256"]) == 64
    assert m["training_commit"] != "unrecorded"
    ckpt = json.loads(next((ml_model["run"] / "checkpoints").glob("step_*/manifest.json")).read_text())
    assert ckpt["schema_sha256"] == m["schema_sha256"]  # the checkpoint recorded the schema it was trained on
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in ml_model["bundle"].rglob("*"))  # nothing to unpickle


def test_score_equals_evaluate_without_prepared_folder(ml_model, serving_env, tmp_path):
    """jobs/score.py on the test split = jobs/evaluate.py --save-predictions, with the prepared folder moved away."""
    test = tmp_path / "test.parquet"
    shutil.copyfile(ml_model["test"], test)
    moved = ml_model["prepared"].with_name("prepared_moved_away")
    env = dict(serving_env, HOME=str(tmp_path))  # no text cache or model folder of this user either
    ml_model["prepared"].rename(moved)
    try:
        res = run_job("score.py", "--bundle", str(ml_model["bundle"]), "--input", str(test), "--out",
                      str(tmp_path / "s.parquet"), "--no-progress", env=env)
    finally:
        moved.rename(ml_model["prepared"])
    assert res.returncode == 0, res.stderr[-3000:]
    want = np.load(ml_model["preds"])
    got = _scores(tmp_path / "s.parquet")
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.nanmax(np.abs(got - want)) <= 1e-5
    keys = pq.read_table(tmp_path / "s.parquet", columns=["user_id", "item_id"])
    src = pq.read_table(test, columns=["user_id", "item_id"])
    assert keys.equals(src)  # row order and keys kept


@pytest.mark.parametrize("kind,tolerance", [("fp16", 0.002), ("int8", 0.01)])
def test_quantised_tables_cost_little_auc(ml_model, serving_env, tmp_path, kind, tolerance):
    out = tmp_path / kind
    res = run_job("export.py", *ml_model["common"], "--checkpoint", str(ml_model["run"]), "--out", str(out),
                  "--quantize", kind, env=serving_env)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["quantize"] == kind and m["table_bytes"]["bundle"] < m["table_bytes"]["float32"]
    res = run_job("score.py", "--bundle", str(out), "--input", str(ml_model["test"]), "--out",
                  str(tmp_path / "q.parquet"), "--no-progress", env=serving_env)
    assert res.returncode == 0, res.stderr[-3000:]
    labels = pq.read_table(ml_model["test"], columns=["label"])["label"].to_numpy()
    fp32, quant = np.load(ml_model["preds"]), _scores(tmp_path / "q.parquet")
    assert np.nanmax(np.abs(quant - fp32)) > 0  # the tables really are quantised
    assert abs(auc(labels, quant) - auc(labels, fp32)) <= tolerance


def test_tampered_bundle_is_refused_naming_the_file(ml_model, serving_env, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(ml_model["bundle"], bad)
    w = bad / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    res = run_job("score.py", "--bundle", str(bad), "--input", str(ml_model["test"]), "--out",
                  str(tmp_path / "s.parquet"), env=serving_env)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "weights.safetensors" in lines[0] and "sha256" in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    res = run_job("serve.py", "--bundle", str(bad), "--port", "1", env=serving_env)
    assert res.returncode == 2 and "weights.safetensors" in res.stderr
