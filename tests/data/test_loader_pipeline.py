"""The loader's torchdata.nodes pipeline: background mapping threads and prefetching change when batches are made,
never which: the sequence is the same for any worker count, a resume from a batch count continues it exactly,
and a consumer that stops early leaves no thread behind."""
from __future__ import annotations

import threading

import pytest
import torch

from recsys.data.loader import BatchLoader


def _ids(batches):
    return [b.row_id.clone() for b in batches]


@pytest.mark.parametrize("eval_mode", [False, True])
def test_same_batches_for_any_worker_count(ml_spec, eval_mode):
    make = lambda **kw: BatchLoader(ml_spec, "train", 3000, rank=1, world_size=2, seed=5,  # noqa: E731
                                    eval_mode=eval_mode, **kw)
    ref = list(make(workers=0))
    assert len(ref) == len(make()) > 2
    for kw in (dict(workers=1, prefetch=True), dict(workers=1), dict(workers=3, prefetch=False)):
        got = list(make(**kw))
        assert len(got) == len(ref)
        for a, b in zip(ref, got):
            assert torch.equal(a.row_id, b.row_id) and torch.equal(a.sparse.values(), b.sparse.values())
            assert torch.equal(a.dense, b.dense) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("workers, background", [(0, False), (1, True), (2, True)])
def test_blocks_are_mapped_off_the_consumer_thread_with_workers(ml_spec, workers, background):
    """workers=1 maps in the Prefetcher's own thread (no ParallelMapper), 2+ in a ParallelMapper's threads; 0 in the
    consumer's thread."""
    loader = BatchLoader(ml_spec, "train", 3000, seed=1, workers=workers)
    seen = set()
    inner = loader._map_block
    loader._map_block = lambda item: (seen.add(threading.get_ident()), inner(item))[1]
    assert sum(b.size for b in loader) == loader.rows_per_rank
    assert (threading.get_ident() not in seen) == background and seen


def test_resume_from_a_batch_count_continues_exactly(ml_spec):
    loader = BatchLoader(ml_spec, "train", 1000, seed=1, workers=2, prefetch=True)
    loader.set_epoch(3)
    full = _ids(loader)
    for k in (1, 20, len(full) - 1):
        loader.load_state_dict(dict(loader.state_dict(), epoch=3, batches_yielded=k))
        rest = _ids(loader)
        assert len(rest) == len(full) - k and all(torch.equal(a, b) for a, b in zip(full[k:], rest))


@pytest.mark.parametrize("workers", [1, 2])
def test_stopping_early_leaves_no_threads(ml_spec, workers):
    before = threading.active_count()
    loader = BatchLoader(ml_spec, "train", 500, seed=1, workers=workers, prefetch=True)
    for _ in range(3):
        it = iter(loader)
        next(it)
        it.close()  # what a consumer that stops at train.max_steps does
    for t in threading.enumerate():
        if t is not threading.current_thread() and t.daemon:
            t.join(timeout=5)
    assert threading.active_count() <= before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_on_cuda(ml_spec):
    batch = next(iter(BatchLoader(ml_spec, "train", 256, workers=1, prefetch=True, pin_memory=True)))
    assert batch.dense.is_pinned() and batch.sparse.values().is_pinned() and batch.labels.is_pinned()
