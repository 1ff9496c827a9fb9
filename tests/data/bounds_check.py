"""Shared check of `FeatureMapper.value_bounds` against mapped data (the store narrows by those ranges unread)."""
from __future__ import annotations

import numpy as np

UNBOUNDED = {"user", "row_id"}  # hashed user keys; the row ids' range is the loader's


def assert_bounds_hold(spec, split: str = "train") -> int:
    """Map every row of `split`: each integer array has a declared range (but UNBOUNDED) holding all its values.
    Returns the rows checked."""
    from recsys.data.loader import BatchLoader

    loader = BatchLoader(spec, split, 4096, shuffle=False, eval_mode=True)
    bounds = loader.mapper.value_bounds()
    rows = np.concatenate(loader.kept)  # every good row, in file order
    seen = 0
    for a in range(0, len(rows), 65536):
        arrays = loader._map_in_file_order(rows[a:a + 65536])
        for k, v in arrays.items():
            if v.dtype.kind not in "iu" or k in UNBOUNDED:
                continue
            assert k in bounds, f"{k}: no declared range"
            lo, hi = bounds[k]
            if v.size:
                assert lo <= int(v.min()) and int(v.max()) <= hi, (k, (lo, hi), (int(v.min()), int(v.max())))
        seen += len(arrays["row_id"])
    assert seen > 0
    return seen
