"""Vectorised arrow -> numpy helpers shared by prepare and the loader (no per-row Python)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import collections

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ArrayLike = Union[pa.Array, pa.ChunkedArray]


def as_strings(arr: ArrayLike) -> ArrayLike:
    """Ids may be strings or integers (or dictionary-encoded): compare them as strings."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = pc.cast(arr, t.value_type) if not isinstance(arr, pa.ChunkedArray) or arr.num_chunks else arr
        t = arr.type
    if pa.types.is_string(t):
        return arr
    if pa.types.is_large_string(t) or pa.types.is_integer(t):
        return pc.cast(arr, pa.string())
    raise TypeError(f"cannot use {t} as an id")


def _chunks(arr: ArrayLike):
    return arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]


_DICT_CACHE: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def _per_dictionary(dictionary: pa.Array, held: tuple, fn) -> np.ndarray:
    """fn(dictionary), memoised: every slice/take of one decoded row group shares its dictionary, so it is
    mapped once per row group, not once per batch. The entry holds the dictionary and the `held` objects (the
    vocabulary, the function), so neither a buffer address nor an id in the key can be reused while cached."""
    buf = dictionary.buffers()[-1]
    key = (buf.address if buf is not None else 0, dictionary.offset, len(dictionary)) + tuple(
        id(h) if not isinstance(h, (int, str)) else h for h in held)
    hit = _DICT_CACHE.get(key)
    if hit is not None:
        _DICT_CACHE.move_to_end(key)
        return hit[1]
    out = fn(dictionary)
    _DICT_CACHE[key] = (dictionary, out, held)
    while len(_DICT_CACHE) > 256:
        _DICT_CACHE.popitem(last=False)
    return out


class KeyIndex:
    """Keys (a string array) with a hash index built once, for lookups of a few distinct values (serving).

    `pc.index_in` hashes its whole value set on every call: a 60k-key vocabulary costs milliseconds per call, far
    more than the ids of a request (whose context repeats once per candidate). Up to SMALL values are
    dictionary-encoded (vectorised) and only their distinct values go through a dict built on first use; larger
    lookups (the loader's row groups) keep using `pc.index_in` on the array."""

    SMALL = 1 << 17
    # up to this many values (a ranking request's candidates, a context's history) a plain dict lookup per value
    # beats dictionary-encoding first: 9 us instead of 44 us for 100 values, 1.5 us instead of 31 us for one
    TINY = 4096

    def __init__(self, keys: pa.Array):
        self.array = keys
        self._pos: Optional[dict] = None

    def __len__(self) -> int:
        return len(self.array)

    def positions(self, values: ArrayLike, missing: int) -> np.ndarray:
        if self._pos is None:
            self._pos = {k: i for i, k in enumerate(self.array.to_pylist())}
        get = self._pos.get
        if len(values) <= self.TINY:  # null values are None, which no key equals: `missing`
            vals = as_strings(values).to_pylist()
            return np.fromiter((get(v, missing) for v in vals), dtype=np.int64, count=len(vals))
        enc = pc.dictionary_encode(as_strings(values))
        chunks = enc.chunks if isinstance(enc, pa.ChunkedArray) else [enc]
        parts = []
        for ch in chunks:
            uniq = ch.dictionary.to_pylist()
            pos = np.fromiter((get(v, missing) for v in uniq), dtype=np.int64, count=len(uniq))
            parts.append(_through_indices(ch, pos, missing))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _through_indices(chunk: pa.DictionaryArray, pos: np.ndarray, missing: int) -> np.ndarray:
    """Per-row positions of a dictionary-encoded chunk from `pos`, the position of each dictionary value; null rows
    (and every row of an empty dictionary) get `missing`."""
    idx = chunk.indices.to_numpy(zero_copy_only=False) if chunk.null_count == 0 else \
        pc.fill_null(chunk.indices, -1).to_numpy(zero_copy_only=False)
    out = pos[np.maximum(idx, 0)] if len(pos) else np.full(len(idx), missing, dtype=np.int64)
    if chunk.null_count:
        out[idx < 0] = missing
    return out


def lookup(arr: ArrayLike, keys: Union[pa.Array, KeyIndex], missing: int = -1) -> np.ndarray:
    """int64 position of every value in `keys` (string array or KeyIndex), `missing` when absent or null.
    Dictionary-encoded chunks are looked up once per distinct value."""
    if isinstance(keys, KeyIndex):
        if len(arr) <= KeyIndex.SMALL and not pa.types.is_dictionary(arr.type):
            return keys.positions(arr, missing)
        keys = keys.array
    parts = []
    for ch in _chunks(arr):
        if pa.types.is_dictionary(ch.type):
            pos = _per_dictionary(ch.dictionary, ("lookup", keys, missing),
                                  lambda d: lookup(d, keys, missing))
            parts.append(_through_indices(ch, pos, missing))
        else:
            r = pc.index_in(as_strings(ch), value_set=keys)
            parts.append(pc.fill_null(r, missing).to_numpy(zero_copy_only=False).astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def apply_distinct(arr: ArrayLike, fn) -> np.ndarray:
    """Apply `fn(pa.Array of strings) -> np.ndarray` once per distinct value of dictionary chunks."""
    parts = []
    for ch in _chunks(arr):
        if pa.types.is_dictionary(ch.type):
            vals = _per_dictionary(ch.dictionary, ("fn", fn), lambda d: fn(as_strings(d)))
            idx = pc.fill_null(ch.indices, 0).to_numpy(zero_copy_only=False)
            out = vals[idx] if len(vals) else np.zeros(len(idx), dtype=vals.dtype)
            if ch.null_count:
                out[~np.asarray(ch.is_valid())] = fn(pa.array([None], pa.string()))[0]
            parts.append(out)
        else:
            parts.append(fn(as_strings(ch)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def list_parts(arr: ArrayLike) -> Tuple[pa.Array, np.ndarray]:
    """(flat values, int64 lengths per row) of a list column; null lists count as empty."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    lens = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return pc.list_flatten(arr), lens


class PadLayout:
    """Where each slot of a [n, width] padded array reads from in the flat values of jagged lengths `lens`: built
    once and shared by the features of one list column (amazon-sr pads its history three times: item rows and two
    text tables' rows), since building it costs twice the gather that applies it."""

    def __init__(self, lens: np.ndarray, width: int, keep_last: bool):
        n = len(lens)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        self.lens, self.total = lens, int(offsets[-1])
        self.kept = np.minimum(lens, width)
        start = offsets[:-1] + (lens - self.kept if keep_last else 0)
        cols = np.arange(width, dtype=np.int64)
        self.idx = start[:, None] + cols[None, :]
        # padding slots read one 0 appended after the values: one gather, no masking pass afterwards
        np.putmask(self.idx, cols[None, :] >= self.kept[:, None], self.total)

    def fits(self, lens: np.ndarray, width: int) -> bool:
        return self.idx.shape[1] == width and np.array_equal(self.lens, lens)


def pad(flat: np.ndarray, lens: np.ndarray, width: int, keep_last: bool,
        layout: Optional[PadLayout] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Jagged (flat, lens) -> ([n, width] left-aligned, 0-padded int64; kept lengths). keep_last keeps each row's
    newest `width` values (histories), otherwise its first `width` (multi-valued features). `layout`: a PadLayout
    of the same lens, width and keep_last, reused."""
    layout = layout if layout is not None else PadLayout(lens, width, keep_last)
    values = np.empty(layout.total + 1, dtype=np.int64)
    values[:-1] = flat
    values[-1] = 0
    return np.take(values, layout.idx), layout.kept
