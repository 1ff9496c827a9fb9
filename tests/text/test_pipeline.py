"""Spec-level API: encode once, re-encode only what is new, serve aligned matrices."""
from __future__ import annotations

import numpy as np
import pytest

from recsys.errors import DataError, SpecError
from recsys.text import encode_text_tables, text_dim, text_table_token_ids, text_table_vectors
from recsys.text.encoder import TextEncoder
from recsys.text.random_tokens import token_bucket

from textfeat_helpers import make_spec, write_text_table

ITEMS = ["red pla filament", "3d printer filament spool", None, "racing video game", "red pla filament", "  "]
QUERIES = ["lab gloves", "microscope"]


@pytest.fixture
def spec(tmp_path, tiny_bert):
    write_text_table(tmp_path / "prepared", "items", [f"i{i}" for i in range(len(ITEMS))], ITEMS)
    write_text_table(tmp_path / "prepared", "queries", QUERIES, QUERIES)
    return make_spec(tmp_path, str(tiny_bert))


def test_encode_then_vectors_aligned(spec, tiny_bert):
    stats = encode_text_tables(spec, progress=False)
    # 4 item texts with content, 3 distinct; queries 2.
    assert stats["items"]["texts"] == 6 and stats["items"]["new"] == 3 and stats["items"]["cached"] == 0
    assert stats["queries"]["new"] == 2
    vecs = text_table_vectors(spec, "items")
    assert vecs.shape == (7, 32) and vecs.dtype == np.float32
    ref = TextEncoder(tiny_bert, max_length=32, device="cpu").encode(["red pla filament", "3d printer filament spool",
                                                                      "racing video game"])
    assert not vecs[0].any() and not vecs[3].any() and not vecs[6].any()  # row 0, None text, blank text
    np.testing.assert_allclose(vecs[[1, 2, 4, 5]], ref[[0, 1, 2, 0]], atol=1e-5)
    assert text_dim(spec) == 32


def test_rows_follow_row_column_not_file_order(tmp_path, tiny_bert):
    write_text_table(tmp_path / "prepared", "items", ["b", "a"], ["racing video game", "microscope"], rows=[2, 1])
    write_text_table(tmp_path / "prepared", "queries", ["q"], ["q"])
    spec = make_spec(tmp_path, str(tiny_bert))
    encode_text_tables(spec, progress=False)
    vecs = text_table_vectors(spec, "items")
    ref = TextEncoder(tiny_bert, max_length=32, device="cpu").encode(["microscope", "racing video game"])
    np.testing.assert_allclose(vecs[1:], ref, atol=1e-5)


def test_rerun_encodes_nothing_and_new_text_only(spec, tmp_path):
    encode_text_tables(spec, progress=False)
    again = encode_text_tables(spec, progress=False)
    assert all(s["new"] == 0 and s["forward_calls"] == 0 for s in again.values())
    write_text_table(tmp_path / "prepared", "queries", QUERIES + ["blue cable"], QUERIES + ["blue cable"])
    third = encode_text_tables(spec, progress=False)
    assert third["queries"]["new"] == 1 and third["queries"]["cached"] == 2 and third["queries"]["forward_calls"] == 1
    assert third["items"]["new"] == 0
    assert text_table_vectors(spec, "queries").shape == (4, 32)


def test_missing_encoding_is_clear_error(spec, tmp_path, other_tiny_bert):
    with pytest.raises(DataError, match="encode_text.py"):
        text_table_vectors(spec, "items")
    encode_text_tables(spec, progress=False)
    # Switching the encoder (other weights, or other pooling) must not reuse the first model's vectors.
    with pytest.raises(DataError, match="encode_text.py"):
        text_table_vectors(make_spec(tmp_path, str(other_tiny_bert)), "items")
    with pytest.raises(DataError, match="encode_text.py"):
        text_table_vectors(make_spec(tmp_path, str(spec.text.encoder.model), encoder={"pooling": "cls"}), "items")


def test_missing_table_and_bad_rows(tmp_path, tiny_bert):
    spec = make_spec(tmp_path, str(tiny_bert))
    with pytest.raises(DataError, match="prepare_data"):
        encode_text_tables(spec, progress=False)
    with pytest.raises(SpecError):
        text_table_vectors(spec, "nope")
    write_text_table(tmp_path / "prepared", "items", ["a", "b"], ["x", "y"], rows=[0, 1])
    with pytest.raises(DataError, match="row"):
        text_table_token_ids(spec, "items")


def test_random_mode_token_ids(tmp_path, tiny_bert):
    write_text_table(tmp_path / "prepared", "items", ["a", "b", "c"], ["Red, RED! pla", None, "3D printer"])
    write_text_table(tmp_path / "prepared", "queries", ["q"], ["q"])
    spec = make_spec(tmp_path, str(tiny_bert), mode="random")
    spec.text.random_buckets, spec.text.random_max_tokens = 50, 2
    ids = text_table_token_ids(spec, "items")
    assert ids.shape == (4, 2) and ids.dtype == np.int64
    assert not ids[0].any() and not ids[2].any()
    assert ids[1, 0] == ids[1, 1] == token_bucket("red", 50)  # lowercased, punctuation split, truncated to 2
    assert ids[3].tolist() == [token_bucket("3d", 50), token_bucket("printer", 50)]
    assert ((ids >= 0) & (ids < 50)).all() and (ids[1:][ids[1:] != 0] >= 1).all()
    # Stable across calls and processes: a fixed hash, not Python's salted hash().
    assert token_bucket("printer", 100_000) == 1 + int.from_bytes(
        __import__("hashlib").blake2b(b"printer", digest_size=8).digest(), "little") % 99_999
    np.testing.assert_array_equal(ids, text_table_token_ids(spec, "items"))
    assert text_dim(spec) == spec.text.random_dim
    assert encode_text_tables(spec) == {}
    spec.text.mode = "none"
    assert text_dim(spec) == 0
