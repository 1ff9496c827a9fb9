"""Bundle export, verification and batch scoring (issue 13 items 1-3, 6): parity with evaluate, quantised tables'
AUC cost, a tampered bundle refused, a bundle scored with no prepared folder or text cache present."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
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


def test_requests_map_their_context_once_and_score_like_rows(ml_model):
    """`Ranker.score_requests` maps each request's context once (FeatureMapper.map_requests) and repeats the arrays:
    the arrays equal those of the table with the context repeated per candidate, and the scores equal
    `score_table` on the same impression rows."""
    from recsys.serving.ranker import Ranker

    ranker = Ranker.load(ml_model["bundle"], threads=1)
    spec, cols = ranker.spec, ranker.columns
    need = list(dict.fromkeys([spec.data.domain_column, *cols.context, *cols.candidate]))
    rows = pq.read_table(ml_model["test"], columns=need + [spec.data.label_column]).slice(0, 3000).to_pylist()
    dom_name = {d.match_value: d.name for d in spec.domains}
    groups = {}  # rows with the same domain and context form one request
    for i, r in enumerate(rows):
        ctx = tuple((c, repr(r[c])) for c in cols.context)
        groups.setdefault((r[spec.data.domain_column], ctx), []).append(i)
    picked = [g for g in groups.values() if len(g) > 1][:40] + [g for g in groups.values() if len(g) == 1][:5]
    assert len(picked) > 10
    requests = [ranker.parse({"domain": dom_name[rows[g[0]][spec.data.domain_column]],
                              "context": {c: rows[g[0]][c] for c in cols.context},
                              "candidates": [{c: rows[i][c] for c in cols.candidate} for i in g]}) for g in picked]
    order = [i for g in picked for i in g]
    repeated = pa.Table.from_pylist([rows[i] for i in order])

    context, candidates, owner, _ = ranker._request_tables(requests)
    once = ranker.mapper.map_requests(context, candidates, owner)
    full = ranker.mapper.map(repeated, np.arange(len(order), dtype=np.int64))
    assert once.keys() == full.keys()
    for key in full:
        if key != "labels":  # requests carry no labels
            assert np.array_equal(once[key], full[key]), key

    got = np.concatenate(ranker.score_requests(requests))
    want = ranker.score_table(repeated)
    assert np.nanmax(np.abs(got - want)) <= 1e-5
    assert ranker.rank([]) == []

    # a query text the bundle has never seen is encoded once for its request and reaches every candidate of it,
    # and only those: scored among other requests it scores as it does alone
    kinds = {d.name: d.kind for d in spec.domains}
    search = [k for k, r in enumerate(requests) if kinds[r.domain] == "search" and len(r.candidates) > 1]
    assert search, "the picked requests hold no search request"
    k = search[0]
    fresh = requests[k].model_copy(update={"context": requests[k].context.model_copy(
        update={"query": "a query no user ever typed"})})
    batch = requests[:k] + [fresh] + requests[k + 1:]
    alone = ranker.score_requests([fresh])[0]
    assert "a query no user ever typed" in ranker.cold_text._rows["queries"]  # encoded, not left at the no-text row
    together = ranker.score_requests(batch)
    assert np.allclose(together[k], alone, atol=1e-5)
    assert not np.allclose(alone, got[sum(len(r.candidates) for r in requests[:k]):][:len(alone)], atol=1e-4)
    for j in range(len(requests)):
        if j != k:
            assert np.allclose(together[j], ranker.score_requests([requests[j]])[0], atol=1e-5)
