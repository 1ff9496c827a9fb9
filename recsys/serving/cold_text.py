"""Texts the catalogue lacks, met at serve time: encoded once with the bundle's encoder and kept in a bounded cache.

Each text table the model reads gets `capacity` spare rows after its catalogue rows when the model is built. A new
text takes a spare row (the least recently used one when all are taken), is encoded (LLM vectors in text mode llm,
hashed tokens in mode random) and written into the model through its one serving seam,
`UserQueryItemEncoder.set_text_rows`. Texts seen again reuse their row without encoding. Not thread-safe: the
Ranker calls it under its lock.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from recsys.errors import RecsysError
from recsys.spec.config import Spec

log = logging.getLogger("recsys.serving.cold_text")


class ColdTextCache:
    def __init__(self, spec: Spec, model: torch.nn.Module, base_rows: Dict[str, int], capacity: int,
                 encoder_factory: Optional[Callable[[], Any]]):
        """`base_rows`: text table -> rows it has without the spare ones (row 0 included)."""
        self.spec = spec
        self.model = model
        self.capacity = int(capacity)
        self.base_rows = dict(base_rows)
        self._encoder_factory = encoder_factory
        self._encoder = None
        self._rows: Dict[str, "collections.OrderedDict[str, int]"] = {t: collections.OrderedDict() for t in base_rows}
        self._free: Dict[str, List[int]] = {t: list(range(n + self.capacity - 1, n - 1, -1)) for t, n in base_rows.items()}
        self.encoded = 0  # texts encoded so far (misses)
        self.hits = 0

    def _encode(self, texts: List[str]):
        """What `set_text_rows` writes for `texts`: LLM vectors (mode llm), token ids (random), both (hybrid)."""
        t = self.spec.text
        token_ids = None
        if t.tokens:
            from recsys.text.random_tokens import token_id_matrix

            token_ids = token_id_matrix(texts, t.random_buckets, t.random_max_tokens)[1:]
            if not t.frozen:
                return token_ids
        if self._encoder is None:
            if self._encoder_factory is None:
                raise RecsysError("this bundle names no text encoder; new texts cannot be encoded")
            self._encoder = self._encoder_factory()
        vectors = self._encoder.encode(texts)
        return (vectors, token_ids) if token_ids is not None else vectors

    def rows_for(self, table: str, texts: Sequence[str]) -> np.ndarray:
        """Model rows of `texts` in text table `table`, encoding the ones not cached (one encoder call)."""
        cache = self._rows[table]
        wanted = list(dict.fromkeys(texts))
        if len(wanted) > self.capacity:
            raise RecsysError(f"{len(wanted)} new texts for text table '{table}' in one call; the cache holds "
                              f"{self.capacity} (serve --cold-text-capacity)")
        wanted_set = set(wanted)
        new = [t for t in wanted if t not in cache]
        self.hits += len(wanted) - len(new)
        for t in wanted:
            if t in cache:
                cache.move_to_end(t)
        if new:
            free = self._free[table]
            rows: List[int] = []
            for _ in new:
                if free:
                    rows.append(free.pop())
                else:  # evict the least recently used text this call does not need (wanted ones were moved last)
                    old = next(k for k in cache if k not in wanted_set)
                    rows.append(cache.pop(old))
            self.model.l0.set_text_rows(table, torch.tensor(rows, dtype=torch.long), self._encode(new))
            for t, r in zip(new, rows):
                cache[t] = r
            self.encoded += len(new)
            log.debug("text table %s: %d new texts encoded", table, len(new))
        return np.array([cache[t] for t in texts], dtype=np.int64)
