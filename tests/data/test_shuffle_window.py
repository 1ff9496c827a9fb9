"""Shuffle windows: by default a window takes chunks while their row groups fit the loader's row-group cache (the
whole file when it fits), so a file sorted by domain is mixed over the epoch; a fixed chunk count stays possible."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys.data import loader as loader_mod
from recsys.data.loader import BatchLoader
from recsys.spec.loader import load_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_chunks(tmp_path_factory):
    """MovieLens with 8,192-row chunks: a dozen chunks over its two row groups."""
    from recsys.data.prepare import prepare

    out = tmp_path_factory.mktemp("ml_small_chunks")
    prepare(load_spec(REPO / "feature_specs" / "movielens.yaml", [f"data.prepared_dir={out}",
                                                                   "data.row_group_size=8192"]))
    return out


def _with(prepared, **train):
    return load_spec(REPO / "feature_specs" / "movielens.yaml", [
        f"data.prepared_dir={prepared}", "data.row_group_size=8192", *(f"train.{k}={v}" for k, v in train.items())])


def test_default_window_spans_the_file_when_its_row_groups_fit(small_chunks):
    loader = BatchLoader(_with(small_chunks), "train", 1000, seed=3)
    assert len(loader.chunks) > 8
    windows = loader._windows()
    assert len(windows) == 1 and len(windows[0]) == loader.rows_per_rank
    assert sorted(windows[0].tolist()) == sorted(np.concatenate(loader.kept).tolist())


def test_default_window_closes_before_outgrowing_the_cache(small_chunks, monkeypatch):
    loader = BatchLoader(_with(small_chunks), "train", 1000, seed=3)
    sizes = loader.reader.rg_bytes
    assert len(sizes) >= 2
    monkeypatch.setattr(loader_mod, "CACHE_BYTES", max(sizes))  # room for one row group at a time
    windows = loader._windows()
    assert len(windows) >= len(sizes)
    starts = loader.reader.rg_start
    for w in windows:  # every window reads one row group only
        assert len(np.unique(np.searchsorted(starts, w, side="right") - 1)) == 1
    assert sum(len(w) for w in windows) == loader.rows_per_rank


def test_a_fixed_chunk_count_still_sets_the_window(small_chunks):
    loader = BatchLoader(_with(small_chunks, shuffle_buffer_row_groups=3), "train", 1000, seed=3)
    windows = loader._windows()
    assert len(windows) == -(-len(loader.chunks) // 3)


def test_a_file_sorted_by_domain_is_mixed_over_the_epoch(amazon_spec):
    """amazon-sr's train file holds all games rows first: with the default window every tenth of the epoch carries
    the Scientific domains at their share of the file; 4-chunk windows fed them in bursts."""
    domains = pq.read_table(amazon_spec.data.raw_dir + "/train.parquet", columns=["domain"])["domain"]
    sci = np.asarray(domains.to_numpy(zero_copy_only=False) != "games_rec")
    share = sci.mean()

    def tenths(spec):
        order = BatchLoader(spec, "train", 4096, seed=1)._order()
        return np.array([sci[part].mean() for part in np.array_split(order, 10)])

    assert np.abs(tenths(amazon_spec) - share).max() < 0.01
    narrow = load_spec(amazon_spec._source_path, [f"data.raw_dir={amazon_spec.data.raw_dir}",
                                                  f"data.prepared_dir={amazon_spec.data.prepared_dir}",
                                                  "train.shuffle_buffer_row_groups=4"])
    assert np.abs(tenths(narrow) - share).max() > 0.05
