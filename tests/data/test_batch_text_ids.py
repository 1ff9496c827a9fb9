"""Batch.text_ids built from CPU text rows (numpy, in the calling thread) is the KJT the torch ops give: one key per
scalar feature and per history position, key-major values, one value per row and key."""
from __future__ import annotations

import torch

from recsys.data.batch import text_rows_kjt
from recsys.data.features import sequence_keys


def _reference(text):
    keys, values = [], []
    for name, rows in text.items():
        if rows.dim() == 1:
            keys.append(name)
            values.append(rows)
        else:
            keys.extend(sequence_keys(name, rows.shape[1]))
            values.append(rows.t().reshape(-1))
    flat = torch.cat(values).long()
    return keys, flat, torch.ones_like(flat)


def test_cpu_text_ids_equal_the_torch_construction():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.int64, torch.int32):
        text = {"item_text": torch.randint(0, 99, (7,), generator=g, dtype=dtype),
                "hist_text": torch.randint(0, 99, (7, 5), generator=g, dtype=dtype),
                "query_hist_text": torch.randint(0, 99, (7, 6), generator=g, dtype=dtype)[:, ::2]}  # strided
        kjt = text_rows_kjt(text)
        keys, values, lengths = _reference(text)
        assert kjt.keys() == keys and kjt.values().dtype == torch.long
        assert torch.equal(kjt.values(), values) and torch.equal(kjt.lengths(), lengths)
        text["item_text"][0] = -5  # the KJT holds its own copy of the rows
        assert kjt.values()[0] != -5
