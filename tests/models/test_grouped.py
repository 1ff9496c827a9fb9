"""Serving's grouped rows (`recsys.data.batch.RequestGroups`): the candidates of one request share its context, whose
features are looked up once per request and whose histories are attended once per request. Scores must equal those
of the same rows scored one by one (the path of training, evaluate and `Ranker.score_table`), for requests of
unequal sizes, in both text modes and with every table layout serving uses."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.batch import RequestGroups
from recsys.data.mapping import FeatureMapper, assemble
from recsys.models.attention import grouped_target_attention, target_attention
from recsys.models.build import build_model

ML_SPEC = Path(__file__).resolve().parents[2] / "feature_specs" / "movielens.yaml"
SIZES = [1, 7, 3, 12, 5, 1]  # candidates per request: unequal, with single-candidate requests at both ends


def test_grouped_attention_equals_attention_over_repeated_histories():
    g = torch.Generator().manual_seed(0)
    for sizes in (SIZES, [4, 4, 4]):  # padded groups and the uniform (no padding) layout
        groups = RequestGroups.from_owner(np.repeat(np.arange(len(sizes)), sizes))
        assert groups.uniform == (len(set(sizes)) == 1)
        hist = torch.randn(len(sizes), 6, 8, generator=g, dtype=torch.float64)
        query = torch.randn(sum(sizes), 8, generator=g, dtype=torch.float64)
        lengths = torch.tensor([0, 6, 2, 3, 6, 1][:len(sizes)])  # an empty history too
        mask = (torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1))[groups.owner]
        scale = torch.tensor(0.7, dtype=torch.float64)
        want = target_attention(hist[groups.owner], query, mask, scale, fused=False)
        got = grouped_target_attention(hist, query, mask, scale, groups)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_request_groups_refuse_rows_out_of_order():
    with pytest.raises(ValueError, match="contiguous"):
        RequestGroups.from_owner(np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="contiguous"):
        RequestGroups.from_owner(np.array([1, 1]))


def _requests_table(spec, n_requests: int):
    """Impression rows of `n_requests` requests: request k has the context (user, histories, query) of test row k and
    SIZES[k] candidates taken from other test rows of the same domain; and the owner of each row."""
    from recsys.serving.requests import request_columns

    context_cols = set(request_columns(spec).context) | {spec.data.domain_column}
    from recsys.data.paths import split_path

    test = pq.read_table(split_path(spec, "test")).slice(0, 2000)
    rows = test.to_pylist()
    out, owner, used = [], [], 0
    for k in range(n_requests):
        ctx = rows[k * 37]
        same = [r for r in rows[500:] if r[spec.data.domain_column] == ctx[spec.data.domain_column]]
        for r in same[used:used + SIZES[k]]:
            out.append({c: (ctx[c] if c in context_cols else v) for c, v in r.items()})
            owner.append(k)
        used += SIZES[k]
    return pa.Table.from_pylist(out, schema=test.schema), np.array(owner)


def _layouts(model, layout: str):
    from recsys.serving.quantize import quantize_tables

    if layout == "fused fp32":  # how the Ranker serves an unquantised bundle
        model.l0.ebc = quantize_tables(model.l0.ebc, "fp32")
        if model.l0.text_ebc is not None:
            model.l0.text_ebc = quantize_tables(model.l0.text_ebc, "fp32")
    elif layout == "int8 ids, fp16 text":  # quantised id tables; text rows not readable as fp32 (the fallback)
        model.l0.ebc = quantize_tables(model.l0.ebc, "int8")
        if model.l0.text_ebc is not None:
            model.l0.text_ebc = quantize_tables(model.l0.text_ebc, "fp16")
    return model


@pytest.mark.parametrize("layout", ["plain", "fused fp32", "int8 ids, fp16 text"])
@pytest.mark.parametrize("mode", ["random", "llm", "hybrid"])
def test_grouped_rows_score_like_rows_one_by_one(tiny_spec, llm_overrides, mode, layout):
    from recsys.spec.loader import load_spec

    spec = tiny_spec() if mode == "random" else load_spec(ML_SPEC, llm_overrides(f"text.mode={mode}"))
    torch.manual_seed(0)
    model = _layouts(build_model(spec, torch.device("cpu")), layout).eval()
    mapper = FeatureMapper(spec)
    table, owner = _requests_table(spec, len(SIZES))
    arrays = mapper.map(table, np.arange(table.num_rows, dtype=np.int64))
    assert arrays["seq/hist_items#len"].max() > 0, "the picked contexts hold no history"
    with torch.inference_mode():
        want = model(assemble(spec, arrays)).logits
        grouped = assemble(spec, arrays, owner)
        # the context features' ids are in each request's first row only: 6 histories, not one per candidate
        assert int(grouped.sparse["hist_items__pos0"].lengths().sum()) <= len(SIZES)
        got = model(grouped).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
