"""Frozen text tables: projected once and stored, reused, verified, quantised within the stated tolerance, and
kept in the pretrained projection by a fine-tune."""
from __future__ import annotations

import json

import numpy as np
import pytest

from recsys.errors import DataError
from recsys.text import encode_text_tables, text_table_vectors
from recsys.text.frozen import (fit_projection, frozen_root, frozen_text_tables, planned_text_rows,
                                project_vectors)

from textfeat_helpers import make_spec, spec_dict, write_text_table

ITEMS = ["red pla filament", "3d printer filament spool", None, "racing video game", "lab glove box",
         "nitrile gloves large", "microscope cable kit", "blue racing game"]
QUERIES = ["lab gloves", "microscope", "red filament"]
# fp16 keeps 11 significant bits: a component of a unit vector (|x| <= 1) is off by at most 2^-12 after rounding
FP16_COMPONENT_TOLERANCE = 2.0 ** -12


@pytest.fixture
def spec(tmp_path, tiny_bert):
    write_text_table(tmp_path / "prepared", "items", [f"i{i}" for i in range(len(ITEMS))], ITEMS)
    write_text_table(tmp_path / "prepared", "queries", QUERIES, QUERIES)
    s = make_spec(tmp_path, str(tiny_bert))
    encode_text_tables(s, progress=False)
    return s


def _fp32_reference(spec, name, projection):
    rows = project_vectors(text_table_vectors(spec, name), projection)
    rows[0] = 0.0
    return rows


def test_fp16_table_stays_within_the_stated_tolerance(spec):
    frozen = frozen_text_tables(spec)
    assert spec.text.dtype == "fp16"
    for name, stored in frozen.tables.items():
        assert stored.dtype == np.float16 and stored.shape[1] == frozen.dim
        ref = _fp32_reference(spec, name, frozen.projection)
        err = np.abs(stored.astype(np.float32) - ref).max()
        assert err <= FP16_COMPONENT_TOLERANCE, (name, err)
        assert not stored[0].any()  # row 0: no text
        # what the model computes from them: cosines between rows
        cos16 = stored.astype(np.float32)[1:] @ stored.astype(np.float32)[1:].T
        assert np.abs(cos16 - ref[1:] @ ref[1:].T).max() < 1e-3


def test_fp32_tables_are_the_projection_itself(tmp_path, tiny_bert):
    write_text_table(tmp_path / "prepared", "items", [f"i{i}" for i in range(len(ITEMS))], ITEMS)
    write_text_table(tmp_path / "prepared", "queries", QUERIES, QUERIES)
    d = spec_dict(tmp_path, str(tiny_bert))
    d["text"]["dtype"] = "fp32"
    from recsys.spec.config import Spec

    s = Spec.model_validate(d)
    encode_text_tables(s, progress=False)
    frozen = frozen_text_tables(s)
    np.testing.assert_array_equal(frozen.tables["items"], _fp32_reference(s, "items", frozen.projection))


def test_projection_is_fitted_once_and_tables_are_reused(spec):
    first = frozen_text_tables(spec)
    calls = []

    def no_vectors(*args):
        calls.append(args)
        raise AssertionError("a second build must not read raw vectors")

    again = frozen_text_tables(spec, raw_vectors=no_vectors)
    assert not calls and again.projection.id == first.projection.id
    assert again.hashes == first.hashes
    # the projection is the principal components of all tables' rows, as the model used to compute per build
    raw = {n: text_table_vectors(spec, n) for n in spec.used_text_tables()}
    refit = fit_projection(raw, spec.text.reduce_dim)
    np.testing.assert_allclose(np.abs(refit.basis), np.abs(first.projection.basis), atol=1e-5)
    assert first.dim == min(spec.text.reduce_dim, sum(len(t) - 1 for t in raw.values()) - 1, 32)


def test_a_modified_stored_table_is_refused(spec):
    frozen_text_tables(spec)
    stored = sorted((frozen_root(spec) / "tables").rglob("*.npy"))[0]
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch"):
        frozen_text_tables(spec)


def test_a_fine_tune_keeps_the_pretrained_projection(spec, tmp_path, tiny_bert):
    """New texts (a fine-tune's larger catalogue) are projected with the given projection: texts both specs hold
    get the same rows, bit for bit."""
    pretrained = frozen_text_tables(spec)
    more = ITEMS + ["green spool of filament", "slow racing game"]
    other = tmp_path / "finetune"
    write_text_table(other / "prepared", "items", [f"i{i}" for i in range(len(more))], more)
    write_text_table(other / "prepared", "queries", QUERIES, QUERIES)
    d = spec_dict(other, str(tiny_bert))
    d["text"]["cache_dir"] = spec.text.cache_dir
    from recsys.spec.config import Spec

    ft = Spec.model_validate(d)
    encode_text_tables(ft, progress=False)
    own = frozen_text_tables(ft)  # fitted on the fine-tune's texts: another basis
    assert own.projection.id != pretrained.projection.id
    kept = frozen_text_tables(ft, projection=pretrained.projection)
    assert kept.projection.id == pretrained.projection.id
    n = len(ITEMS) + 1
    np.testing.assert_array_equal(kept.tables["items"][:n], pretrained.tables["items"])
    assert kept.tables["items"].shape[0] == len(more) + 1


def test_planned_rows_come_from_the_prepared_table_or_num_rows(spec, tmp_path, tiny_bert):
    assert planned_text_rows(spec) == {"items": len(ITEMS) + 1, "queries": len(QUERIES) + 1}
    d = spec_dict(tmp_path / "nowhere", str(tiny_bert))
    from recsys.spec.config import Spec

    with pytest.raises(DataError, match="num_rows"):
        planned_text_rows(Spec.model_validate(d))
    d["text"]["tables"][0]["num_rows"] = 1000
    d["text"]["tables"][1]["num_rows"] = 10
    assert planned_text_rows(Spec.model_validate(d)) == {"items": 1001, "queries": 11}


def test_the_fit_is_recorded_with_the_tables_it_was_fitted_on(spec):
    frozen = frozen_text_tables(spec)
    fits = list((frozen_root(spec) / "fits").glob("*.json"))
    assert len(fits) == 1
    record = json.loads(fits[0].read_text())
    assert record["id"] == frozen.projection.id and set(record["tables"]) == {"items", "queries"}
