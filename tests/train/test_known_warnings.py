"""The warnings recsys.logs filters are harmless: each test here triggers one and shows why it may be ignored.

fbgemm's CPU `dense_embedding_codegen_lookup_function` (the kernel TorchRec runs for a `data_parallel` table) warns
"an autograd kernel was not registered ... may lead to silently incorrect behavior" on every backward. The op is
registered on the CPU key and builds its own autograd node, so the gradient is fbgemm's own backward; this test
compares forward and weight gradient with torch.nn.functional.embedding_bag on the same weights and indices."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from recsys.logs import KNOWN_HARMLESS_WARNINGS


def _dense_tbe(specs):
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (DenseTableBatchedEmbeddingBagsCodegen,
                                                                        PoolingMode)
    return DenseTableBatchedEmbeddingBagsCodegen(specs, pooling_mode=PoolingMode.MEAN, use_cpu=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_fbgemm_dense_lookup_gradient_is_correct_despite_its_warning(seed):
    torch.manual_seed(seed)
    specs = [(50, 8), (7, 4)]  # (rows, dim) of two tables, one feature each
    tbe = _dense_tbe(specs)
    with torch.no_grad():
        tbe.weights.copy_(torch.randn_like(tbe.weights))
    batch = 6
    lengths = torch.randint(0, 4, (len(specs) * batch,))  # empty bags included
    indices = torch.cat([torch.randint(0, rows, (int(lengths[f * batch:(f + 1) * batch].sum()),))
                         for f, (rows, _) in enumerate(specs)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tbe(indices, offsets)
        upstream = torch.randn_like(out)
        (out * upstream).sum().backward()
    fbgemm_grad = tbe.weights.grad.clone()

    # reference: the same weights as plain tensors through embedding_bag (mean), per table
    weights = [w.detach().clone().requires_grad_(True) for w in tbe.split_embedding_weights()]
    outs, col, pos = [], 0, 0
    for f, ((rows, dim), w) in enumerate(zip(specs, weights)):
        n = int(lengths[f * batch:(f + 1) * batch].sum())
        feat_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths[f * batch:(f + 1) * batch].cumsum(0)])
        outs.append(torch.nn.functional.embedding_bag(indices[pos:pos + n], w, feat_offsets[:-1], mode="mean"))
        pos += n
    ref = torch.cat(outs, dim=1)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out.detach(), ref.detach())
    torch.testing.assert_close(fbgemm_grad, torch.cat([w.grad.reshape(-1) for w in weights]))
    assert fbgemm_grad.abs().sum() > 0  # a gradient that is zero everywhere would pass trivially

    # the warning it raises is exactly the one recsys.logs filters (if fbgemm renames the op or fixes the
    # registration, this fails and the filter is reviewed)
    messages = [str(w.message) for w in caught]
    pattern, category = KNOWN_HARMLESS_WARNINGS[0]
    hits = [w for w in caught if re.match(pattern, str(w.message)) and issubclass(w.category, category)]
    assert hits, messages


def test_the_filter_hides_only_that_message():
    from recsys.logs import silence_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        warnings.warn("fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered to "
                      "the Autograd key(s) but we are trying to backprop through it.", UserWarning)
        warnings.warn("fbgemm::some_other_op: an autograd kernel was not registered", UserWarning)
    assert [str(w.message) for w in caught] == ["fbgemm::some_other_op: an autograd kernel was not registered"]
