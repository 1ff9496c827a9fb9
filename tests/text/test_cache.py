"""VectorCache: append-only, content-addressed, and loud about anything that does not add up."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from recsys.errors import DataError
from recsys.text.cache import CacheKey, VectorCache, text_hashes

KEY = CacheKey(model_identity="a" * 64, pooling="mean", max_length=64, normalize=True)


def _filled(tmp_path, n=5, dim=4):
    cache = VectorCache(tmp_path, KEY)
    hashes = text_hashes([f"text {i}" for i in range(n)])
    vecs = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    assert cache.append(list(hashes), vecs) == n
    return cache, hashes, vecs


def test_roundtrip_and_append_only_new(tmp_path):
    cache, hashes, vecs = _filled(tmp_path)
    reopened = VectorCache(tmp_path, KEY)
    assert reopened.count == 5 and reopened.dim == 4
    assert isinstance(reopened.vectors, np.memmap)
    np.testing.assert_array_equal(reopened.gather(list(hashes[::-1])), vecs[::-1])
    more = text_hashes(["text 1", "brand new"])
    assert reopened.missing(list(more)) == [1]
    assert reopened.append(list(more), np.ones((2, 4), np.float32)) == 1
    assert VectorCache(tmp_path, KEY).count == 6
    # Old generation files are gone, the manifest names the new ones.
    names = sorted(p.name for p in reopened.folder.glob("*.npy"))
    assert names == ["keys-2.npy", "vectors-2.npy"]


def test_other_config_rejected(tmp_path):
    cache, _, _ = _filled(tmp_path)
    other = CacheKey(model_identity="b" * 64, pooling="mean", max_length=64, normalize=True)
    # A cache folder copied to where another model's cache belongs is detected, not used.
    shutil.copytree(cache.folder, tmp_path / other.folder_name())
    with pytest.raises(DataError, match="another encoder"):
        VectorCache(tmp_path, other)


def test_truncated_matrix_detected(tmp_path):
    cache, _, _ = _filled(tmp_path)
    path = cache.folder / cache.manifest.vectors_file
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(DataError, match="truncated|checksum|matrix"):
        VectorCache(tmp_path, KEY)
    with pytest.raises(DataError):
        VectorCache(tmp_path, KEY, verify=False)  # size check alone still catches it


def test_modified_matrix_detected_by_checksum(tmp_path):
    cache, _, vecs = _filled(tmp_path)
    path = cache.folder / cache.manifest.vectors_file
    arr = np.load(path)
    arr[0, 0] += 1
    np.save(path, arr)
    with pytest.raises(DataError, match="checksum"):
        VectorCache(tmp_path, KEY)


def test_index_matrix_mismatch_detected(tmp_path):
    cache, _, _ = _filled(tmp_path)
    keys_path = cache.folder / cache.manifest.keys_file
    np.save(keys_path, np.load(keys_path)[:-1])
    with pytest.raises(DataError, match="mismatch"):
        VectorCache(tmp_path, KEY, verify=False)
    manifest = json.loads((cache.folder / "manifest.json").read_text())
    manifest["count"] = 7
    (cache.folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError):
        VectorCache(tmp_path, KEY, verify=False)


def test_dim_change_rejected(tmp_path):
    cache, _, _ = _filled(tmp_path)
    with pytest.raises(DataError, match="dim"):
        cache.append(list(text_hashes(["x"])), np.zeros((1, 3), np.float32))
