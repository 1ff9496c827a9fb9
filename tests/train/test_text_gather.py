"""The frozen text tables' CPU lookup (recsys.train.frozen_text.single_row_gather): the rows of one-row bags read
by index_select must equal fbgemm's TBE forward bit for bit, for both kernels the text sharder uses on CPU (fused:
table/column-wise; dense: data_parallel), fp16 and fp32 rows, mixed widths and tables whose keys interleave; a
batch with other bags must go to the kernel's own forward; and a trained model's text vectors are its stored rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ML_SPEC = Path(__file__).resolve().parents[2] / "feature_specs" / "movielens.yaml"
ROWS, DIMS = [50, 7, 30], [8, 16, 8]
FEATURE_TABLES = [0, 0, 1, 2, 0, 2]  # table 0's keys are not side by side: three runs of it
BATCH = 5


def _kernels(precision):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                         DenseTableBatchedEmbeddingBagsCodegen,
                                                                         SplitTableBatchedEmbeddingBagsCodegen)

    prec = SparseType.FP16 if precision == "fp16" else SparseType.FP32
    fused = SplitTableBatchedEmbeddingBagsCodegen(
        [(r, d, EmbeddingLocation.HOST, ComputeDevice.CPU) for r, d in zip(ROWS, DIMS)],
        feature_table_map=FEATURE_TABLES, weights_precision=prec, output_dtype=SparseType.FP32,
        optimizer=EmbOptimType.EXACT_SGD, learning_rate=0.0, pooling_mode=PoolingMode.SUM)
    dense = DenseTableBatchedEmbeddingBagsCodegen(list(zip(ROWS, DIMS)), feature_table_map=FEATURE_TABLES,
                                                  weights_precision=prec, pooling_mode=PoolingMode.SUM, use_cpu=True)
    g = torch.Generator().manual_seed(1)
    for tbe in (fused, dense):
        with torch.no_grad():
            for w in tbe.split_embedding_weights():
                w.copy_(torch.randn(w.shape, generator=g))
    return {"fused": fused, "dense": dense}


def _kjt(lengths):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(2)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    per_key = lengths.view(len(FEATURE_TABLES), BATCH).sum(1)
    values = torch.cat([torch.randint(0, ROWS[t], (int(n),), generator=g) for t, n in zip(FEATURE_TABLES, per_key)])
    return KeyedJaggedTensor(keys=[f"k{i}" for i in range(len(FEATURE_TABLES))], values=values, lengths=lengths)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("kind", ["fused", "dense"])
def test_single_row_gather_equals_the_tbe_forward(kind, precision):
    from recsys.train.frozen_text import single_row_gather

    tbe = _kernels(precision)[kind]
    kjt = _kjt([1] * (len(FEATURE_TABLES) * BATCH))
    with torch.no_grad():
        expected = tbe(kjt.values(), kjt.offsets())
    got = single_row_gather(tbe, kjt)
    assert got is not None and got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


def test_bags_of_other_sizes_are_left_to_the_kernel():
    from recsys.train.frozen_text import single_row_gather

    tbe = _kernels("fp16")["fused"]
    lengths = [1] * (len(FEATURE_TABLES) * BATCH)
    lengths[3], lengths[7] = 2, 0  # same number of values as one row per bag: the count alone cannot tell
    assert single_row_gather(tbe, _kjt(lengths)) is None


@pytest.mark.parametrize("replicated", [False, True], ids=["table_wise_fused", "data_parallel_dense"])
def test_a_sharded_models_text_vectors_are_its_stored_rows(llm_overrides, group, tmp_path, monkeypatch, replicated):
    from recsys.data.loader import BatchLoader
    from recsys.spec.loader import load_spec
    from recsys.train import sharding
    from recsys.train.frozen_text import SingleRowGatherKernel, single_row_gather
    from recsys.train.loop import Trainer

    extra = []
    if replicated:  # one rank: every table is table-wise unless this switch is off (see ONE_RANK_TABLE_WISE)
        monkeypatch.setattr(sharding, "ONE_RANK_TABLE_WISE", False)
        extra = ["train.sharding_constraints.text_movies=[data_parallel]",
                 "train.sharding_constraints.text_queries=[data_parallel]"]
    spec = load_spec(ML_SPEC, llm_overrides(f"train.output_dir={tmp_path}", *extra))
    trainer = Trainer(spec, group, for_training=False)
    kinds = {t.name: (t.sharding_type, t.compute_kernel) for t in trainer.plan.tables if t.name.startswith("text_")}
    assert kinds and all(k == (("data_parallel", "dense") if replicated else ("table_wise", "fused"))
                         for k in kinds.values()), kinds
    sharded = trainer.dmp.module.model.l0.text_ebc
    kernels = [e for lookup in sharded._lookups for e in getattr(lookup, "module", lookup)._emb_modules]
    assert kernels and all(isinstance(e, SingleRowGatherKernel) for e in kernels)

    batch = next(iter(BatchLoader(spec, "valid", batch_size=64, shuffle=False, seed=0)))
    trainer.dmp.eval()
    with torch.no_grad():
        got = trainer.model.l0.text_vectors(batch)
    for f in (f for f in spec.features if f.kind == "text"):
        rows = torch.from_numpy(np.asarray(trainer.text_tables[f.text_table], dtype=np.float32))
        assert torch.equal(got[f.name], rows[batch.text[f.name]]), f.name

    # and each kernel's gather is its own TBE forward on the KJT it receives
    calls = []
    original = single_row_gather

    def check(tbe, features):
        out = original(tbe, features)
        with torch.no_grad():
            calls.append(torch.equal(out, tbe(features.values().long(), features.offsets().long())))
        return out

    monkeypatch.setattr("recsys.train.frozen_text.single_row_gather", check)
    with torch.no_grad():
        trainer.model.l0.text_vectors(batch)
    assert calls and all(calls)
