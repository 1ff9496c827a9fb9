"""Mode random / hybrid's hashed-token text vectors: each distinct text row of a batch is pooled once on CPU (a batch
repeats its texts), with the vectors and gradients of pooling every copy; its bags are packed without their padding,
with the vectors and gradients of the padded bags."""
from __future__ import annotations

import numpy as np
import torch

from recsys.models.encoding import TokenTextLookup


def _lookup(seed: int = 0) -> TokenTextLookup:
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, 50, size=(30, 6))
    token_ids[0] = 0  # row 0: no text
    token_ids[5, 3:] = 0  # a shorter text (0 = padding token)
    torch.manual_seed(seed)
    return TokenTextLookup(token_ids, random_buckets=50, random_dim=8)


def _every_copy(lookup: TokenTextLookup, rows: torch.Tensor) -> torch.Tensor:
    return lookup._pool(rows.reshape(-1)).reshape(rows.shape + (lookup.dim,))


def test_repeated_rows_are_pooled_once_with_the_same_vectors_and_gradients(monkeypatch):
    lookup = _lookup()
    rows = torch.tensor([[3, 5, 3, 0], [7, 3, 5, 29]])  # repeats, the no-text row, two rows in order
    pooled = []
    real_pool = lookup._pool
    monkeypatch.setattr(lookup, "_pool", lambda r: pooled.append(r.numel()) or real_pool(r))
    got = lookup(rows)
    assert pooled == [5], "each distinct row (3, 5, 0, 7, 29) pooled once"
    monkeypatch.setattr(lookup, "_pool", real_pool)
    want = _every_copy(lookup, rows)
    assert got.shape == (2, 4, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.count_nonzero(got[0, 3]) == 0  # row 0 stays zero

    weights = torch.randn(got.shape)
    (got * weights).sum().backward()
    grad_dedup = lookup.tokens.weight.grad.clone()
    lookup.tokens.weight.grad = None
    (_every_copy(lookup, rows) * weights).sum().backward()
    torch.testing.assert_close(grad_dedup, lookup.tokens.weight.grad)  # summation order differs: close, not equal
    assert torch.count_nonzero(grad_dedup) > 0


def test_packed_bags_have_the_vectors_and_gradients_of_the_padded_bags():
    lookup = _lookup(seed=1)
    rows = torch.tensor([5, 0, 12, 7, 5])  # a short text, the no-text row, a repeat
    got = lookup._pool(rows)
    weights = torch.randn(got.shape)
    (got * weights).sum().backward()
    grad_packed = lookup.tokens.weight.grad.clone()
    lookup.tokens.weight.grad = None
    padded = torch.nn.functional.normalize(lookup.tokens(lookup.token_ids[rows]), dim=-1) * (rows.unsqueeze(1) > 0)
    torch.testing.assert_close(got, padded, rtol=0, atol=1e-6)
    assert torch.count_nonzero(got[1]) == 0
    (padded * weights).sum().backward()
    torch.testing.assert_close(grad_packed, lookup.tokens.weight.grad)
    assert torch.count_nonzero(lookup.tokens.weight.grad[0]) == 0, "the padding token gets no gradient"
