"""Smaller faults of issue 15 item 12: prediction files land where asked, JSON outputs hold no bare NaN, and
missing side-table numbers are filled in the open (counted and logged)."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.errors import RecsysError

from reliability_helpers import SPEC, small_overrides


def _spec(prepared, tmp_path, *extra):
    from recsys.spec.loader import load_spec

    return load_spec(SPEC, [*small_overrides(prepared, tmp_path / "run")[1::2], *extra])


def test_save_predictions_writes_exactly_the_path_given(ml_prepared, tmp_path):
    from recsys.train.evaluation import publish

    spec = _spec(ml_prepared, tmp_path)
    n = pq.ParquetFile(ml_prepared / "valid.parquet").metadata.num_rows
    scores = np.linspace(-1, 1, n).astype(np.float32)
    target = tmp_path / "out" / "preds"  # no .npy: np.save on a path would have written preds.npy
    publish(spec, "valid", scores, source="test", out=tmp_path / "m.json", save_predictions=target)
    assert target.is_file() and not target.with_suffix(".npy").exists()
    np.testing.assert_array_equal(np.load(target), scores)
    (tmp_path / "folder").mkdir()
    with pytest.raises(RecsysError, match=r"--save-predictions .*folder: is a folder; give a file name"):
        publish(spec, "valid", scores, source="test", save_predictions=tmp_path / "folder")


def test_metrics_json_has_no_bare_nan(ml_prepared, tmp_path):
    from recsys.train.evaluation import json_safe, publish

    spec = _spec(ml_prepared, tmp_path)
    n = pq.ParquetFile(ml_prepared / "valid.parquet").metadata.num_rows
    scores = np.full(n, np.nan, dtype=np.float32)  # nothing scored: every AUC is NaN
    publish(spec, "valid", scores, source="test", out=tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["overall"]["auc"] is None
    assert json_safe({"a": [float("inf"), 1.0]}) == {"a": [None, 1.0]}


def test_non_finite_side_values_are_counted_and_logged(ml_prepared, tmp_path, caplog):
    from recsys.data.mapping import FeatureMapper

    prepared = tmp_path / "prepared"
    shutil.copytree(ml_prepared, prepared)
    movies = pq.read_table(prepared / "movies.parquet")
    year = movies["year"].to_numpy(zero_copy_only=False).astype(np.float64)
    year[:3] = [np.nan, np.inf, -np.inf]
    movies = movies.set_column(movies.schema.get_field_index("year"), "year", pa.array(year))
    pq.write_table(movies, prepared / "movies.parquet")
    spec = _spec(ml_prepared, tmp_path, f"data.prepared_dir={prepared}")
    with caplog.at_level(logging.WARNING, logger="recsys.data.mapping"):
        mapper = FeatureMapper(spec)
    assert mapper.side_filled == {"movies.year": 3}
    assert "3 of" in caplog.text and "'year'" in caplog.text and "filled with the train mean" in caplog.text
    assert np.isfinite(mapper.side_arrays["item_year"]).all()
