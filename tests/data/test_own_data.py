"""Bring your own data: the parquet example, jobs/init_spec.py's starting spec, dense `bucketize`, the
`bucket(column, N)` row filter and the prediction file -- the README walk-through, run as a test."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.dim=8", "model.hidden=[16,8]", "text.random_buckets=4096", "text.random_dim=8",
        "text.random_max_tokens=8", "train.batch_size=256", "train.eval_batch_size=4096", "train.epochs=1",
        "train.max_steps=4"]


def _job(script: str, *args: str, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    from recsys.datasets.example_parquet import write

    out = tmp_path_factory.mktemp("own") / "data"
    write(out, users=40)
    return out


@pytest.fixture(scope="module")
def spec_file(example) -> Path:
    from recsys.spec.scaffold import render

    folder = example.parent / "feature_specs"
    folder.mkdir()
    path = folder / "own.yaml"
    path.write_text(render(example, name="own", text_mode="random"))
    return path


def test_init_spec_guesses_each_column(spec_file):
    from recsys.spec.loader import load_spec

    spec = load_spec(spec_file)
    kinds = {f.column: (f.kind, getattr(f, "transform", None)) for f in spec.features}
    assert kinds["user_id"] == ("id", None) and kinds["item_id"] == ("id", None)
    assert kinds["genres"] == ("sparse", None)
    assert kinds["recent_items"] == ("sequence", None)
    assert kinds["title"] == ("text", None)
    assert kinds["release_year"] == ("dense", "bucketize")
    assert spec.data.adapter == "parquet" and spec.data.domain_column == "surface"
    assert spec.data.label_column == "clicked" and spec.data.slice_columns == ["new_item"]
    assert [d.name for d in spec.domains] == ["comedy_feed", "drama_feed", "other_feed"]
    seq = next(f for f in spec.features if f.kind == "sequence")
    assert seq.target == "item_id" and seq.table == "item_id"
    text = spec_file.read_text()
    assert "# age/year-like" in text and "bucket(user_id, 100) < 10" in text  # guesses say why; few-shot shown


@pytest.mark.parametrize("mode", ["llm", "hybrid"])
def test_init_spec_writes_the_text_mode_asked_for(example, tmp_path, mode):
    from recsys.spec.loader import load_spec
    from recsys.spec.scaffold import render

    path = tmp_path / "own.yaml"
    path.write_text(render(example, name="own", text_mode=mode))
    spec = load_spec(path)
    assert spec.text.mode == mode and [t.name for t in spec.text.tables] == ["title"]
    assert spec.text.random_dim == (16 if mode == "hybrid" else 64)


def test_init_spec_bad_input_is_one_line(example, tmp_path):
    proc = _job("init_spec.py", "--data", str(example), "--domain-column", "nope")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --domain-column 'nope': no such column")
    proc = _job("init_spec.py", "--data", str(tmp_path))
    assert proc.returncode == 2 and "train.parquet: missing" in proc.stderr and "Traceback" not in proc.stderr


def test_bucket_rows():
    from recsys.data.mapping import bucket_rows

    got = bucket_rows(np.array([np.nan, 10.0, 18.0, 20.0, 70.0, np.inf]), [18.0, 25.0, 65.0])
    assert got.tolist() == [0, 1, 2, 2, 4, 0]  # 0 = missing; v == boundary goes to the upper bucket


def test_bucketize_needs_increasing_boundaries_and_a_table():
    from pydantic import ValidationError

    from recsys.spec.config import DenseFeature

    base = dict(kind="dense", name="age", column="age", side="user", transform="bucketize")
    with pytest.raises(ValidationError, match="boundaries"):
        DenseFeature(**base, table="age")
    with pytest.raises(ValidationError, match="increase strictly"):
        DenseFeature(**base, table="age", boundaries=[30, 20])
    with pytest.raises(ValidationError, match="for transform 'bucketize'"):
        DenseFeature(kind="dense", name="x", column="x", side="user", boundaries=[1.0])


def test_bucket_row_filter_keeps_whole_users(spec_file):
    from recsys.data.loader import row_filter_values
    from recsys.data.paths import split_path
    from recsys.spec.loader import load_spec

    spec = load_spec(spec_file)
    path = split_path(spec, "train")
    vals, op, num = row_filter_values(path, "bucket(user_id, 4) < 1")
    users = pq.read_table(path, columns=["user_id"])["user_id"].to_numpy()
    kept = set(users[vals < 1].tolist())
    assert 0 < len(kept) < len(set(users.tolist()))
    assert not kept & set(users[vals >= 1].tolist())  # a user is kept with all rows or not at all


@pytest.mark.slow
def test_walkthrough_prepares_trains_and_predicts(spec_file, example, tmp_path, child_env):
    """The README's steps on the example: prepare, pretrain (few-shot filter, bucketized year), evaluate with a
    held-out domain -> predictions in file order, NaN for the ignored domain."""
    held_out = ["--set", "domains=[{name: comedy_feed, kind: rec}, {name: drama_feed, kind: rec}]",
                "--set", "data.ignore_domains=[other_feed]"]
    sets = sum((["--set", s] for s in TINY), []) + held_out
    proc = _job("prepare_data.py", "--spec", str(spec_file), *held_out, env=child_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    proc = _job("pretrain.py", "--spec", str(spec_file), *sets, "--set", f"train.output_dir={run}",
                "--set", "data.row_filter=bucket(user_id, 10) < 5", env=child_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "release_year_bucket" in proc.stdout + proc.stderr  # the plan table lists the bucket table
    preds = tmp_path / "p.npy"
    proc = _job("evaluate.py", "--spec", str(spec_file), *sets, "--checkpoint", str(run), "--split", "test",
                "--save-predictions", str(preds), env=child_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = np.load(preds)
    surface = np.array(pq.read_table(example / "test.parquet", columns=["surface"])["surface"].to_pylist())
    assert scores.shape == surface.shape and scores.dtype == np.float32  # one logit per row, file order
    assert np.isnan(scores[surface == "other_feed"]).all() and (surface == "other_feed").any()
    assert np.isfinite(scores[surface != "other_feed"]).all()


def test_declared_ranges_hold_on_the_example(spec_file, tmp_path):
    """The example's spec has what MovieLens lacks (bucketized dense, side-table features): the store's declared
    ranges (FeatureMapper.value_bounds) hold for every mapped integer array of it too."""
    from bounds_check import assert_bounds_hold

    from recsys.data.prepare import prepare
    from recsys.spec.loader import load_spec

    spec = load_spec(spec_file, [f"data.prepared_dir={tmp_path / 'prepared'}"])
    prepare(spec)
    kinds = {f.kind + ("/bucketized" if getattr(f, "bucketized", False) else "") for f in spec.features}
    assert {"dense/bucketized", "sparse", "id"} <= kinds, kinds
    assert assert_bounds_hold(spec) > 100
