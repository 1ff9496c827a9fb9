"""The mapped-row store of train-mode loaders: later epochs gather rows mapped in an earlier one, and every batch is
the batch that mapping the rows again would give (ranks, resume mid-epoch, id dropout, a consumer that edits its
batches); a loader whose mapped rows do not fit, and every eval-mode loader, maps every epoch."""
from __future__ import annotations

import pytest
import torch

from recsys.data import loader as loader_mod
from recsys.data.loader import BatchLoader


def _same(a, b) -> None:
    assert a.sparse.keys() == b.sparse.keys()
    assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())
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


def _gathers(loader: BatchLoader) -> list:
    """Counts, per block, whether it came from the store (True) or was mapped (False)."""
    seen = []
    inner = loader._store.gather

    def gather(real):
        out = inner(real)
        seen.append(out is not None)
        return out

    loader._store.gather = gather
    return seen


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 1), (3, 2)])
def test_later_epochs_are_gathered_and_equal_mapping_again(ml_spec, world_size, workers):
    for rank in range(world_size):
        kw = dict(spec=ml_spec, split="train", batch_size=2500, rank=rank, world_size=world_size, seed=4)
        stored = BatchLoader(workers=workers, prefetch=workers > 0, **kw)
        ref = _unstored(**kw)
        seen = _gathers(stored)
        for epoch in range(4):
            stored.set_epoch(epoch)
            ref.set_epoch(epoch)
            got, want = list(stored), list(ref)
            assert len(got) == len(want) == len(stored)
            for a, b in zip(got, want):
                _same(a, b)
        assert not seen[0] and any(seen), "the first block is mapped, later epochs gather"


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
    seen = _gathers(loader)
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert sum(b.size for b in loader) == loader.rows_per_rank
    assert seen and not any(seen) and loader._store.arrays is None


def test_eval_loaders_keep_no_store(ml_spec):
    assert BatchLoader(ml_spec, "valid", 512)._store is None
    assert BatchLoader(ml_spec, "train", 512, shuffle=False, eval_mode=True)._store is None
