"""MovieLens adapter + prepare + loader on the shipped copy (small: runs in seconds)."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recsys.data import paths
from recsys.data.loader import BatchLoader
from recsys.data.prepare import prepare, table_num_rows
from data_decode import batch_rows, expected_row, lookup_tables


def test_prepared_files(ml_spec):
    for split in ("train", "valid", "test"):
        t = pq.read_table(paths.split_path(ml_spec, split))
        assert set(pc.unique(t["domain"]).to_pylist()) == {d.name for d in ml_spec.domains}
        assert set(pc.unique(t["label"]).to_pylist()) <= {0, 1}
        assert max(pc.list_value_length(t["hist_item_ids"]).to_pylist()) <= 20
        assert 0 <= pc.min(t["user_bucket"]).as_py() and pc.max(t["user_bucket"]).as_py() < 100
        search = t.filter(pc.equal(t["domain"], "ml_tag_search"))
        assert all(q for q in search["query"].to_pylist())  # search rows always carry the user's tag
        assert not any(q for q in t.filter(pc.not_equal(t["domain"], "ml_tag_search"))["query"].to_pylist())
        if split == "train":
            assert not any(t["cold_item"].to_pylist())
        else:
            assert any(t["cold_item"].to_pylist())  # chronological split leaves some unseen movies
    movies = pq.read_table(paths.side_table_path(ml_spec, "movies"))
    assert movies.num_rows == 9742 and not np.isnan(movies["year"].to_numpy()).any()
    assert movies["text"][0].as_py() == "Toy Story (1995). Adventure Animation Children Comedy Fantasy."
    # text table of a side table keeps every movie (cold ones too), rows 1..n
    tt = pq.read_table(paths.text_table_path(ml_spec, "movies"))
    assert tt["row"].to_pylist() == list(range(1, 9743))
    sizes = table_num_rows(ml_spec)
    assert sizes["user"] == 611 and 1 < sizes["genre"] <= 21 and sizes["item"] > 5000


def test_chronological_split_per_user(ml_spec):
    tr = pq.read_table(paths.split_path(ml_spec, "train"), columns=["user_id", "position"]).to_pydict()
    te = pq.read_table(paths.split_path(ml_spec, "test"), columns=["user_id", "position"]).to_pydict()
    last_train = {}
    for u, p in zip(tr["user_id"], tr["position"]):
        last_train[u] = max(p, last_train.get(u, -1))
    assert all(p >= last_train.get(u, -1) for u, p in zip(te["user_id"], te["position"]))


def test_prepare_is_idempotent(ml_spec):
    vocab = paths.vocab_path(ml_spec, "item")
    before = vocab.stat().st_mtime_ns
    prepare(ml_spec)
    assert vocab.stat().st_mtime_ns == before


@pytest.mark.parametrize("split", ["train", "test"])
def test_batches_equal_their_rows(ml_spec, split):
    tables = lookup_tables(ml_spec)
    rows = pq.read_table(paths.split_path(ml_spec, split)).to_pylist()
    side = {"movies": {r["item_id"]: r for r in pq.read_table(paths.side_table_path(ml_spec, "movies")).to_pylist()}}
    loader = BatchLoader(ml_spec, split, 997, shuffle=(split == "train"), seed=3)
    seen = 0
    for batch in loader:
        for got in batch_rows(ml_spec, batch):
            exp = expected_row(ml_spec, tables, rows[got["row_id"]], side)
            for k, v in exp.items():
                assert got[k] == v, (k, got["row_id"])
            seen += 1
            if seen > 3000:
                return


def test_unseen_ids_map_to_row_zero(ml_spec):
    loader = BatchLoader(ml_spec, "test", 4096, shuffle=False)
    t = pq.read_table(paths.split_path(ml_spec, "test"), columns=["cold_item"])
    cold = np.asarray(t["cold_item"])
    found = 0
    for batch in loader:
        item = batch.sparse["item_id"].values()
        rid = batch.row_id.numpy()
        assert (item[cold[rid]] == 0).all()
        found += int(cold[rid].sum())
    assert found > 0


def test_determinism_and_epochs(ml_spec):
    def order(seed, epoch=0):
        L = BatchLoader(ml_spec, "train", 1000, seed=seed)
        L.set_epoch(epoch)
        return np.concatenate([b.row_id.numpy() for b in L])

    a, b = order(1), order(1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, order(2))
    assert not np.array_equal(a, order(1, epoch=1))
    assert sorted(a.tolist()) == list(range(len(a)))  # one rank: every row once


@pytest.mark.parametrize("split", ["train", "valid"])
def test_two_ranks_cover_every_row_once(ml_spec, split):
    n = pq.ParquetFile(paths.split_path(ml_spec, split)).metadata.num_rows
    loaders = [BatchLoader(ml_spec, split, 512, rank=r, world_size=2, seed=5) for r in range(2)]
    ids = [np.concatenate([b.row_id.numpy() for b in L]) for L in loaders]
    counts = [sum(1 for _ in L) for L in loaders]
    assert counts[0] == counts[1] == len(loaders[0]) == len(loaders[1])
    real = [x[x >= 0] for x in ids]
    assert not set(real[0]) & set(real[1])
    union = np.concatenate(real)
    if split == "train":  # drops at most world_size-1 rows, never repeats
        assert len(ids[0]) == len(ids[1]) == n // 2 and len(set(union)) == len(union) >= n - 1
    else:  # eval mode: every real row exactly once, padding flagged with row_id -1
        assert sorted(union.tolist()) == list(range(n))
        assert len(ids[0]) == len(ids[1]) == math.ceil(n / 2)


def test_resume_mid_epoch(ml_spec):
    full = [b.row_id.numpy() for b in BatchLoader(ml_spec, "train", 700, seed=9)]
    L = BatchLoader(ml_spec, "train", 700, seed=9)
    it = iter(L)
    head = [next(it).row_id.numpy() for _ in range(5)]
    state = L.state_dict()
    L2 = BatchLoader(ml_spec, "train", 700, seed=9)
    L2.load_state_dict(state)
    rest = [b.row_id.numpy() for b in L2]
    got = head + rest
    assert len(got) == len(full) and all(np.array_equal(x, y) for x, y in zip(got, full))


def test_row_filter_and_single_domain(ml_spec):
    spec = ml_spec.model_copy(deep=True)
    spec.data.row_filter = "user_bucket < 10"
    spec.model.single_domain = "ml_comedy"
    t = pq.read_table(paths.split_path(spec, "train"), columns=["user_bucket", "domain"])
    want = int(((t["user_bucket"].to_numpy() < 10) & (np.asarray(t["domain"]) == "ml_comedy")).sum())
    L = BatchLoader(spec, "train", 256)
    doms = np.concatenate([b.domain.numpy() for b in L])
    assert len(doms) == want and set(doms.tolist()) == {spec.domain_index("ml_comedy")}
    # eval splits ignore the row filter
    assert BatchLoader(spec, "valid", 256).num_rows > 0


def test_drop_last_and_len(ml_spec):
    L = BatchLoader(ml_spec, "train", 1000, drop_last=True)
    sizes = [b.size for b in L]
    assert len(sizes) == len(L) and set(sizes) == {1000}


def test_query_history_is_the_users_earlier_picks_for_the_tag(ml_spec):
    """`query_hist_item_ids` of a search event = movies the same user tagged with the same tag strictly earlier
    (recomputed here from tags.csv), never one of the event's candidates, so it cannot name the label; rating rows
    carry none."""
    import pyarrow.csv as pacsv

    tags = pacsv.read_csv(paths.raw_dir(ml_spec) / "tags.csv").to_pydict()
    when, by_user_tag = {}, {}
    for u, m, tag, ts in zip(tags["userId"], tags["movieId"], tags["tag"], tags["timestamp"]):
        q = " ".join(tag.lower().split())
        when[(str(u), q, str(m))] = ts
        by_user_tag.setdefault((str(u), q), []).append((ts, int(m), str(m)))
    checked = 0
    for split in ("train", "test"):
        t = pq.read_table(paths.split_path(ml_spec, split), columns=["domain", "label", "user_id", "item_id",
                                                                     "query", "query_hist_item_ids"]).to_pydict()
        rows = list(zip(*t.values()))
        assert not any(h for d, *_, h in rows if d != "ml_tag_search")
        search = [r for r in rows if r[0] == "ml_tag_search"]
        for e in range(0, len(search), 5):  # an event = its positive, then its 4 negatives
            event = search[e:e + 5]
            _, label, user, item, query, hist = event[0]
            assert label == 1 and all(r[1] == 0 and r[2] == user and r[4] == query and r[5] == hist
                                      for r in event[1:])
            cands = {r[3] for r in event}
            t0 = when[(user, query, item)]
            earlier = sorted(x for x in by_user_tag[(user, query)] if x[0] < t0 and x[2] not in cands)
            assert hist == [m for *_, m in earlier][-10:]  # time order, ties by movie id
            checked += bool(hist)
    assert checked > 100  # the signal exists on a good share of events
