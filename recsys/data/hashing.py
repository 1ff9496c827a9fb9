"""Stable string hashing for `index: hash` tables and GAUC user keys.

FNV-1a 64-bit over the UTF-8 bytes followed by the splitmix64 finaliser (so `mod num_buckets` uses well-mixed low
bits). Pure numpy, vectorised over the strings (the loop runs over byte positions, not rows) and applied to the
*unique* values of a chunk, so it is identical across processes, platforms and Python's hash seed.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _mix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def hash64(strings: pa.Array) -> np.ndarray:
    """uint64 hash of every string (null hashes like '')."""
    arr = pc.cast(strings, pa.large_string()) if not pa.types.is_large_string(strings.type) else strings
    arr = pc.fill_null(arr, "")
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + n + 1]
    data_buf = arr.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max(initial=0))):
            live = np.nonzero(lengths > j)[0]
            h[live] = (h[live] ^ data[starts[live] + j].astype(np.uint64)) * _FNV_PRIME
        return _mix(h)


def hash_buckets(strings: pa.Array, num_buckets: int) -> np.ndarray:
    """int64 row in [1, num_buckets) per string; empty or null -> 0 (the reserved missing row)."""
    h = hash64(strings)
    rows = (h % np.uint64(num_buckets - 1)).astype(np.int64) + 1
    empty = np.asarray(pc.fill_null(pc.equal(pc.utf8_length(pc.cast(strings, pa.large_string())), 0), True))
    rows[empty] = 0
    return rows


def hash_user_keys(strings: pa.Array) -> np.ndarray:
    """Non-negative int64 per user (63-bit hash), distinct across users for GAUC grouping."""
    return (hash64(strings) >> np.uint64(1)).astype(np.int64)
