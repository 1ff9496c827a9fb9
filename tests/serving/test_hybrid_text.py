"""Text mode hybrid in serving: a bundle carries both halves of every text (frozen LLM rows and token ids), the
scoring model built from it scores like the trained model, and a text met at serve time gets both halves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ML = Path(__file__).resolve().parents[2] / "feature_specs" / "movielens.yaml"


def test_hybrid_bundle_scores_like_the_model_and_takes_new_texts(llm_overrides, tmp_path):
    from recsys.data.loader import BatchLoader
    from recsys.data.resolved import schema_for
    from recsys.models.build import build_model, text_token_tables_for
    from recsys.serving.bundle import TOKENS_PREFIX, Bundle
    from recsys.serving.export import split_text_tables
    from recsys.serving.ranker import build_scoring_model
    from recsys.spec.loader import load_spec
    from recsys.text import text_table_vectors

    from recsys.serving.encoder_ref import encoder_reference

    spec = load_spec(ML, llm_overrides("text.mode=hybrid"))
    assert encoder_reference(spec) is not None, "a hybrid bundle must name its encoder: new texts need LLM vectors"
    torch.manual_seed(0)
    model = build_model(spec, torch.device("cpu")).eval()
    with torch.no_grad():  # token rows away from their initial values, as after training
        for m in model.l0.text_lookup.values():
            m.tokens.weight.add_(torch.randn_like(m.tokens.weight))
    state = dict(model.state_dict())
    text = split_text_tables(spec, state)
    tables = spec.used_text_tables()
    assert set(text) == set(tables) | {TOKENS_PREFIX + t for t in tables}
    bundle = Bundle(folder=tmp_path, manifest={}, spec=spec, schema=schema_for(spec), catalogue={},
                    text_tables={k: v.numpy() for k, v in text.items()}, weights=state)
    spare = 3
    scoring, base_rows = build_scoring_model(bundle, spare_text_rows=spare)
    assert base_rows == {t: text[t].shape[0] for t in tables}

    batch = next(iter(BatchLoader(spec, "test", batch_size=256)))
    with torch.no_grad():
        torch.testing.assert_close(scoring(batch).logits, model(batch).logits, atol=1e-5, rtol=0)

    # a new text in a spare row: the frozen half projected from its raw LLM vector, the token half its token ids;
    # written as a copy of an existing text, both halves must equal that text's
    table = tables[0]
    row, new = 1, base_rows[table]
    raw = text_table_vectors(spec, table)[row:row + 1]
    tokens = text_token_tables_for(spec)[table][row:row + 1]
    l0 = scoring.l0
    l0.set_text_rows(table, torch.tensor([new]), (raw, tokens))
    frozen = l0._stored_text_rows(table)
    torch.testing.assert_close(frozen[new], frozen[row], atol=2e-3, rtol=0)  # fp16-stored rows vs a fresh fp32 one
    lookup = l0.text_lookup[f"table_{table}"]
    assert torch.equal(lookup.token_ids[new], lookup.token_ids[row])
    vec = l0._with_tokens(frozen[[row, new]].float(), lookup(torch.tensor([row, new])))
    torch.testing.assert_close(vec[1], vec[0], atol=2e-3, rtol=0)
