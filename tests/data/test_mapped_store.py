"""The mapped-row store of train-mode loaders: later epochs gather rows mapped in an earlier one, and every batch is
the batch that mapping the rows again would give (ranks, resume mid-epoch, id dropout, a consumer that edits its
batches); a loader whose mapped rows do not fit, and every eval-mode loader, maps every epoch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.data import loader as loader_mod
from recsys.data.loader import BatchLoader

from bounds_check import assert_bounds_hold


def _same(a, b) -> None:
    assert a.sparse.keys() == b.sparse.keys()
    for x, y in ((a.sparse.values(), b.sparse.values()), (a.sparse.lengths(), b.sparse.lengths())):
        assert x.dtype == y.dtype == torch.int64 and torch.equal(x, y)
    for f in ("dense", "labels", "domain", "row_id", "user"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f
    for group in ("text", "seq_lengths"):
        x, y = getattr(a, group), getattr(b, group)
        assert x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)
    assert torch.equal(a.text_ids.values(), b.text_ids.values())


def _unstored(**kw) -> BatchLoader:
    ref = BatchLoader(**kw)
    ref._store = None  # maps every block, as a loader without the store does
    return ref


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 1), (3, 2)])
def test_later_epochs_are_gathered_and_equal_mapping_again(ml_spec, world_size, workers):
    for rank in range(world_size):
        kw = dict(spec=ml_spec, split="train", batch_size=2500, rank=rank, world_size=world_size, seed=4)
        stored = BatchLoader(workers=workers, prefetch=workers > 0, **kw)
        ref = _unstored(**kw)
        store = stored._store
        for epoch in range(4):
            stored.set_epoch(epoch)
            ref.set_epoch(epoch)
            got, want = list(stored), list(ref)
            assert len(got) == len(want) == len(stored)
            for a, b in zip(got, want):
                _same(a, b)
            # each epoch's rows not stored yet are mapped (in file order) before its first block, and every
            # block is gathered from the store
            assert store.rows_gathered == (epoch + 1) * stored.rows_per_rank
            if epoch == 0:
                assert store.rows_mapped == stored.rows_per_rank
        # every row is mapped once: later epochs map only rows this rank had not read before
        assert store.rows_mapped == store.used <= stored.num_rows


def test_resume_mid_epoch_from_the_store(ml_spec):
    kw = dict(spec=ml_spec, split="train", batch_size=1000, seed=2)
    loader = BatchLoader(**kw)
    list(loader)  # epoch 0 fills the store
    loader.set_epoch(1)
    ref = _unstored(**kw)
    ref.set_epoch(1)
    want = list(ref)
    loader.load_state_dict(dict(loader.state_dict(), epoch=1, batches_yielded=17))
    got = list(loader)
    assert len(got) == len(want) - 17
    for a, b in zip(got, want[17:]):
        _same(a, b)


def test_id_dropout_and_edited_batches_leave_the_store_unchanged(ml_spec):
    spec = ml_spec.model_copy(deep=True)
    for t in spec.tables:
        t.id_dropout = 0.3
    kw = dict(spec=spec, split="train", batch_size=4000, seed=6)
    loader, ref = BatchLoader(**kw), _unstored(**kw)
    for epoch in range(3):
        loader.set_epoch(epoch)
        ref.set_epoch(epoch)
        for a, b in zip(loader, ref):
            _same(a, b)
            a.sparse.values().zero_()  # a consumer that works in place on its batch
            a.dense.add_(1.0)
            for v in a.text.values():
                v.zero_()


def test_rows_that_do_not_fit_are_mapped_every_epoch(ml_spec, monkeypatch):
    monkeypatch.setattr(loader_mod, "STORE_BYTES", 1 << 20)  # MovieLens' mapped train rows are ~64 MB
    loader = BatchLoader(ml_spec, "train", 4096, seed=1)
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert sum(b.size for b in loader) == loader.rows_per_rank
    store = loader._store
    # the store's first piece (DECIDE_ROWS) was mapped to learn the size, then every block maps itself
    assert store.rows_gathered == 0 and store.arrays is None
    assert store.rows_mapped == 2 * loader.rows_per_rank + loader_mod.DECIDE_ROWS


def test_eval_loaders_keep_no_store(ml_spec):
    assert BatchLoader(ml_spec, "valid", 512)._store is None
    assert BatchLoader(ml_spec, "train", 512, shuffle=False, eval_mode=True)._store is None


def test_epochs_with_some_rows_stored_map_only_the_rest(ml_spec):
    """On 2 ranks an epoch's rows change with the chunk order: a later epoch mixes rows read before and rows new to
    this rank; only the new ones are mapped, and the batches are those of mapping every row."""
    kw = dict(spec=ml_spec, split="train", batch_size=3000, rank=1, world_size=2, seed=3)
    loader, ref = BatchLoader(**kw), _unstored(**kw)
    store = loader._store
    list(loader)
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        ref.set_epoch(epoch)
        gathered, mapped = store.rows_gathered, store.rows_mapped
        for a, b in zip(loader, ref):
            _same(a, b)
        assert store.rows_gathered - gathered == loader.rows_per_rank
        if epoch == 1:
            assert 0 < store.rows_mapped - mapped < loader.rows_per_rank, "a mixed epoch maps only its new rows"


def test_store_types_come_from_declared_ranges_not_values():
    bounds = {"ids": (0, 300), "signed": (-1, 2)}
    store = loader_mod._MappedStore(rows_total=70000, capacity=8, bounds=bounds)
    first = {"ids": np.array([[1, 2], [3, 0]], dtype=np.int64), "x": np.array([0.5, 1.5], dtype=np.float32),
             "hash": np.array([-(1 << 62), 1 << 62], dtype=np.int64), "signed": np.array([-1, 2], dtype=np.int64)}
    calls = []

    def mapped(rows):  # the mapping, called only for rows the store lacks
        calls.append(rows.tolist())
        return {"row_id": rows.astype(np.int64),
                **{k: v[: len(rows)] for k, v in (later if rows[0] >= 5 else first).items()}}

    later = {"ids": np.array([[300, 299], [4, 5]], dtype=np.int64), "x": np.array([2.5, 3.5], dtype=np.float32),
             "hash": np.array([7, 8], dtype=np.int64), "signed": np.array([0, 1], dtype=np.int64)}
    store.read(np.array([2, 3]), mapped)
    # ids fit 2 bytes by their range (not 1 by the first values), row ids by the split's 70,000 rows
    types = {k: v.dtype for k, v in store.arrays.items()}
    assert types == {"ids": np.uint16, "x": np.float32, "hash": np.int64, "signed": np.int8, "row_id": np.uint32}
    got = store.read(np.array([5, 3, 6]), mapped)  # row 3 stored, rows 5 and 6 mapped
    assert calls == [[2, 3], [5, 6]]
    want = {"ids": [[300, 299], [3, 0], [4, 5]], "x": [2.5, 1.5, 3.5], "hash": [7, 1 << 62, 8], "signed": [0, 2, 1]}
    for k, v in want.items():
        assert got[k].tolist() == v, k
    again = store.read(np.array([6, 2, 5, 3]), mapped)
    assert calls == [[2, 3], [5, 6]], "all stored: nothing mapped"
    assert again["ids"].tolist() == [[4, 5], [1, 2], [300, 299], [3, 0]]
    assert again["hash"].tolist() == [8, -(1 << 62), 7, 1 << 62] and again["signed"].tolist() == [1, -1, 0, 2]
    assert {k: v.dtype for k, v in again.items()} == types  # gathered in the stored types: assemble widens


def test_side_table_arrays_are_rebuilt_from_the_stored_side_row():
    """Arrays read from a side table are not stored: the store keeps each row's side-table row and gathers them
    from the side table's own arrays (narrowed by their ranges), giving the mapped values back."""
    brands = np.array([[3, 4], [5, 0], [0, 0]], dtype=np.int64)  # side rows 0, 1 and the no-match row 2
    store = loader_mod._MappedStore(rows_total=6, capacity=6, bounds={"side/items": (0, 2), "sp/brand": (0, 5)},
                                    derived={"sp/brand": ("side/items", brands)})
    mapped = {"side/items": np.array([1, 2, 0]), "sp/brand": brands[[1, 2, 0]], "x": np.array([1., 2., 3.])}
    store.put(np.array([4, 0, 2]), mapped)
    assert set(store.arrays) == {"side/items", "x"}, "the side table's array is not stored"
    got = store.read(np.array([2, 4]), lambda rows: pytest.fail("every row is stored"))
    assert got["sp/brand"].tolist() == [[3, 4], [5, 0]] and got["side/items"].tolist() == [0, 1]
    assert got["sp/brand"].dtype == np.uint8


def test_a_value_outside_its_declared_range_is_refused():
    store = loader_mod._MappedStore(rows_total=10, capacity=4, bounds={"ids": (0, 255)})
    with pytest.raises(AssertionError, match="ids.*outside its declared range"):
        store.put(np.array([0, 1]), {"ids": np.array([3, 256], dtype=np.int64)})


def test_declared_ranges_hold_on_movielens(ml_spec):
    assert assert_bounds_hold(ml_spec) > 1000


def test_declared_ranges_hold_on_amazon_sr(amazon_spec):
    assert assert_bounds_hold(amazon_spec) > 100000



def test_side_rows_only_leaves_out_exactly_what_the_store_rebuilds(amazon_spec):
    """amazon-sr's brands and categories come from its items side table: mapped for the store they are left out,
    and rebuilt from the stored side rows they equal the full mapping, key for key."""
    kw = dict(spec=amazon_spec, split="train", batch_size=4096, seed=0)
    loader = BatchLoader(**kw)
    rows = np.arange(5000, dtype=np.int64)
    full = _unstored(**kw)._map_in_file_order(rows)
    lean = loader._map_in_file_order(rows)
    derived = loader.mapper.side_derived()
    assert set(derived) == {"sp/item_brand", "sp/item_brand#len", "sp/item_category", "sp/item_category#len"}
    assert set(full) - set(lean) == set(derived)
    for k, (row_key, table) in derived.items():
        np.testing.assert_array_equal(table[lean[row_key]], full[k], err_msg=k)


def test_fill_threads_follow_the_ranks_torch_threads_up_to_a_cap(monkeypatch):
    for threads, want in ((1, 1), (2, 2), (64, loader_mod.FILL_THREADS_MAX)):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=threads: n)
        assert loader_mod.fill_threads() == want
