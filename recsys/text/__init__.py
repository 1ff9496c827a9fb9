"""LLM text features: a frozen encoder, a content-addressed vector cache and spec-level helpers.

Public API (what the data and model side use):
    encode_text_tables(spec, device=None) -> dict      encode every text table (mode llm) into the cache
    text_table_vectors(spec, table_name) -> ndarray    float32 [n_rows+1, dim], row 0 = zeros
    text_table_token_ids(spec, table_name) -> ndarray  int64 [n_rows+1, random_max_tokens] (mode random)
    text_dim(spec) -> int                               llm: hidden size, random: random_dim, none: 0
torch/transformers are imported only when texts actually need encoding.
"""
from recsys.text.pipeline import (cache_key, encode_text_tables, model_dir, text_dim, text_table_token_ids,
                                  text_table_vectors)

__all__ = ["encode_text_tables", "text_table_vectors", "text_table_token_ids", "text_dim", "cache_key",
           "model_dir"]
