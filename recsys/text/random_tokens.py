"""Text as hashed word tokens (text.mode `random`): the no-LLM baseline.

Each text becomes up to `max_tokens` lowercase word tokens, each hashed stably (blake2b, independent of Python's
per-process hash seed) into buckets 1..num_buckets-1 of a trainable table; 0 is padding.
"""
from __future__ import annotations

import hashlib
import re
from typing import Dict, Optional, Sequence

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: Optional[str]) -> list:
    return _WORD.findall(text.lower()) if text else []


def token_bucket(token: str, num_buckets: int) -> int:
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (num_buckets - 1)


def token_id_matrix(texts: Sequence[Optional[str]], num_buckets: int, max_tokens: int) -> np.ndarray:
    """int64 [len(texts) + 1, max_tokens]; row 0 (no text) and padding are 0, row i+1 holds texts[i]."""
    if num_buckets < 2:
        raise ValueError("num_buckets must be >= 2 (bucket 0 is padding)")
    out = np.zeros((len(texts) + 1, max_tokens), dtype=np.int64)
    memo: Dict[str, int] = {}
    for i, text in enumerate(texts, start=1):
        for j, tok in enumerate(words(text)[:max_tokens]):
            bucket = memo.get(tok)
            if bucket is None:
                bucket = memo[tok] = token_bucket(tok, num_buckets)
            out[i, j] = bucket
    return out
