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
    assert all(isinstance(part, np.memmap) for part in reopened._parts)
    np.testing.assert_array_equal(reopened.gather(list(hashes[::-1])), vecs[::-1])
    more = text_hashes(["text 1", "brand new"])
    assert reopened.missing(list(more)) == [1]
    assert reopened.append(list(more), np.ones((2, 4), np.float32)) == 1
    assert VectorCache(tmp_path, KEY).count == 6
    # Parts are immutable: the first stays, the second holds only the new text; the folder holds nothing else.
    reopened = VectorCache(tmp_path, KEY)
    assert sorted(p.count for p in reopened.manifest.parts) == [1, 5]
    assert sorted(p.name for p in reopened.folder.iterdir()) == sorted(["manifest.json", ".lock",
                                                                         *reopened.part_files])
    np.testing.assert_array_equal(reopened.gather(list(more)), np.concatenate([vecs[1:2], np.ones((1, 4))]))


def test_leftovers_of_a_killed_writer_are_removed(tmp_path):
    cache, hashes, _ = _filled(tmp_path)
    (cache.folder / ".part-x.vectors.npy.123.tmp").write_bytes(b"half")  # what a kill -9 mid-write leaves
    (cache.folder / "part-orphan.vectors.npy").write_bytes(b"renamed, manifest never swapped")
    cache.append(list(text_hashes(["new"])), np.zeros((1, 4), np.float32))
    assert sorted(p.name for p in cache.folder.iterdir()) == sorted(["manifest.json", ".lock", *cache.part_files])


def test_format_1_folder_is_read_and_extended(tmp_path):
    """A cache written before parts existed (one vectors-<gen>/keys-<gen> pair) stays valid."""
    from recsys.text.model_source import sha256_file

    folder = tmp_path / KEY.folder_name()
    folder.mkdir()
    vecs = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.save(folder / "vectors-3.npy", vecs)
    np.save(folder / "keys-3.npy", text_hashes(["a", "b"]))
    (folder / "manifest.json").write_text(json.dumps({
        "format_version": 1, "key": {"model_identity": "a" * 64, "pooling": "mean", "max_length": 64,
                                     "normalize": True}, "dim": 4, "count": 2, "generation": 3,
        "vectors_file": "vectors-3.npy", "keys_file": "keys-3.npy",
        "vectors_sha256": sha256_file(folder / "vectors-3.npy"), "keys_sha256": sha256_file(folder / "keys-3.npy")}))
    cache = VectorCache(tmp_path, KEY)
    np.testing.assert_array_equal(cache.gather(list(text_hashes(["b", "a"]))), vecs[::-1])
    cache.append(list(text_hashes(["c"])), np.full((1, 4), 7, np.float32))
    again = VectorCache(tmp_path, KEY)
    assert again.manifest.format_version == 2 and again.count == 3 and "vectors-3.npy" in again.part_files
    np.testing.assert_array_equal(again.gather(list(text_hashes(["a", "c"]))), [vecs[0], [7, 7, 7, 7]])


def test_backend_is_part_of_the_key(tmp_path):
    cache, hashes, _ = _filled(tmp_path)
    int8 = CacheKey(model_identity="a" * 64, pooling="mean", max_length=64, normalize=True, backend="onnx-int8")
    assert int8.folder_name() != KEY.folder_name() and "onnx-int8" in int8.folder_name()
    assert VectorCache(tmp_path, int8).missing(list(hashes)) == list(range(5))
    # the reference backend keeps the folder name caches had before the backend was part of the key
    assert KEY.folder_name() == "aaaaaaaaaaaa-mean-64-norm-" + __import__("hashlib").sha1(json.dumps(
        {"model_identity": "a" * 64, "pooling": "mean", "max_length": 64, "normalize": True},
        sort_keys=True).encode()).hexdigest()[:12]


def test_other_config_rejected(tmp_path):
    cache, _, _ = _filled(tmp_path)
    other = CacheKey(model_identity="b" * 64, pooling="mean", max_length=64, normalize=True)
    # A cache folder copied to where another model's cache belongs is detected, not used.
    shutil.copytree(cache.folder, tmp_path / other.folder_name())
    with pytest.raises(DataError, match="another encoder"):
        VectorCache(tmp_path, other)


def test_truncated_matrix_detected(tmp_path):
    cache, _, _ = _filled(tmp_path)
    path = cache.folder / cache.manifest.parts[0].vectors_file
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(DataError, match="truncated|checksum|matrix"):
        VectorCache(tmp_path, KEY)
    with pytest.raises(DataError):
        VectorCache(tmp_path, KEY, verify=False)  # size check alone still catches it


def test_modified_matrix_detected_by_checksum(tmp_path):
    cache, _, vecs = _filled(tmp_path)
    path = cache.folder / cache.manifest.parts[0].vectors_file
    arr = np.load(path)
    arr[0, 0] += 1
    np.save(path, arr)
    with pytest.raises(DataError, match="checksum"):
        VectorCache(tmp_path, KEY)


def test_index_matrix_mismatch_detected(tmp_path):
    cache, _, _ = _filled(tmp_path)
    keys_path = cache.folder / cache.manifest.parts[0].keys_file
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
