"""Spec-level text features: encode every text table once, then serve aligned matrices to the model side."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from recsys.errors import DataError, SpecError
from recsys.spec.config import Spec, TextTableSpec
from recsys.text import paths
from recsys.text.cache import CacheKey, VectorCache, text_hashes
from recsys.text.backends import backend_identity
from recsys.text.model_source import hidden_size, model_identity, resolve_model_dir
from recsys.text.random_tokens import token_id_matrix
from recsys.spec.loader import job_command
from recsys.text.tables import TextTable, has_text, read_text_table

log = logging.getLogger("recsys.text")

IDENTITY_MEMO = "model_identity_memo.json"


def _encode_hint(spec: Spec) -> str:
    return job_command(spec, "encode_text.py")  # with the user's --set overrides (they may move the data)


def _prepare_hint(spec: Spec) -> str:
    return job_command(spec, "prepare_data.py")


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
                    normalize=enc.normalize, backend=backend_identity(enc.backend))


def _texts_to_encode(table: TextTable) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """(texts with content, their positions in the table, their hashes)."""
    positions = np.array([i for i, t in enumerate(table.texts) if has_text(t)], dtype=np.int64)
    texts = [table.texts[i] for i in positions]
    return texts, positions, text_hashes(texts)


@dataclass
class Chunk:
    """A unit of encoding work: texts encoded together (in the same batches) and stored as one cache part."""

    table: str
    texts: List[str]
    hashes: List[bytes]
    fresh: List[int]  # positions in `texts` not cached when the run started


def plan_chunks(spec: Spec, tables: Dict[str, TextTable], cache: VectorCache, chunk_size: int
                ) -> Tuple[List[Chunk], Dict[str, dict]]:
    """Cut every text of the spec into chunks that depend on the texts alone, never on what is cached.

    Each table's distinct texts (minus those of an earlier table of the spec) are ordered by text hash and cut
    every `chunk_size`. A chunk with a text missing from the cache is encoded whole, so a text is always batched
    with the same neighbours: a run killed at any point and rerun, or run on another number of ranks, computes every
    vector exactly as one uninterrupted run does (with dynamically quantised backends the batch's range even
    changes the numbers). Hash order spreads long and short texts evenly over chunks, and so over ranks.
    Returns the chunks still to encode and per-table counts."""
    chunks: List[Chunk] = []
    counts: Dict[str, dict] = {}
    earlier: set = set()
    for table_spec in spec.text.tables:
        table = tables[table_spec.name]
        texts, _, hashes = _texts_to_encode(table)
        first: Dict[bytes, str] = {}
        for text, h in zip(texts, hashes.tolist()):
            first.setdefault(bytes(h), text)
        mine = sorted(h for h in first if h not in earlier)
        earlier.update(first)
        cached_rows = cache.lookup(list(first))
        new = int((cached_rows < 0).sum())
        counts[table_spec.name] = {"texts": table.n_rows, "with_text": len(texts), "unique": len(first),
                                   "new": new, "cached": len(first) - new}
        for lo in range(0, len(mine), chunk_size):
            part = mine[lo: lo + chunk_size]
            fresh = [i for i, row in enumerate(cache.lookup(part)) if row < 0]
            if fresh:
                chunks.append(Chunk(table_spec.name, [first[h] for h in part], part, fresh))
    return chunks, counts


def encode_text_tables(spec: Spec, device: Optional[str] = None, progress: bool = True, rank: int = 0,
                       world_size: int = 1) -> Dict[str, dict]:
    """Encode every text table of the spec into the cache (only chunks holding a text not cached yet are run).

    With `world_size` > 1 this process encodes every `world_size`-th chunk starting at `rank` (the other ranks
    do the rest, each writing its own cache parts); the counts texts/with_text/unique/new/cached are the whole
    spec's, encoded/forward_calls/encode_seconds/seconds this rank's. `encoded` counts every text run through the
    model, `new` those the cache lacked (a chunk is encoded whole, see `plan_chunks`). The model is loaded only
    when some text is missing, so a fully cached re-run never touches torch.
    """
    if not spec.text.frozen:
        log.info("text.mode is %s: nothing to encode", spec.text.mode)
        return {}
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    enc_spec = spec.text.encoder
    start = time.perf_counter()
    # Read every table before touching the model: a missing table fails in milliseconds, not after extraction.
    tables = {t.name: _read_table(spec, t.name) for t in spec.text.tables}
    folder = model_dir(spec)
    key = cache_key(spec, folder)
    cache = VectorCache(paths.cache_root(spec), key)
    chunks, stats = plan_chunks(spec, tables, cache, enc_spec.chunk_size)
    mine = chunks[rank::world_size]
    for s in stats.values():
        s.update(encoded=0, forward_calls=0, encode_seconds=0.0, seconds=0.0)
    if mine:
        from recsys.text.encoder import load_encoder

        encoder = load_encoder(folder, enc_spec, device, derived_root=paths.models_root(spec) / "onnx",
                               identity=key.model_identity)
        log.info("text encoder %s (%s, %s, dim %d) on %s: %d of %d chunks to encode on this rank", folder.name,
                 key.model_identity[:12], encoder.backend, encoder.dim, encoder.device, len(mine), len(chunks))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            shard = f" (rank {rank}/{world_size})" if world_size > 1 else ""
            bar = tqdm(total=sum(len(c.texts) for c in mine), desc=f"encode{shard}", unit="text",
                       dynamic_ncols=True, smoothing=0.05)
        try:
            for chunk in mine:
                calls, secs = encoder.counters.forward_calls, encoder.counters.seconds
                vectors = encoder.encode(chunk.texts, bar=bar)
                cache.append([chunk.hashes[i] for i in chunk.fresh], vectors[chunk.fresh])
                s = stats[chunk.table]
                s["encoded"] += len(chunk.texts)
                s["forward_calls"] += encoder.counters.forward_calls - calls
                s["encode_seconds"] += encoder.counters.seconds - secs
        finally:
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - start
    for name, s in stats.items():
        s["seconds"] = seconds
        s["texts_per_s"] = s["encoded"] / s["encode_seconds"] if s["encode_seconds"] > 0 else 0.0
        log.info("text table %s: %d rows, %d new, %d cached", name, s["texts"], s["new"], s["cached"])
    return stats


def check_complete(spec: Spec) -> None:
    """Raise unless every text of the spec is in the cache (rank 0 calls it after all ranks finished)."""
    for table_spec in spec.text.tables:
        text_table_vectors(spec, table_spec.name)


def text_table_vectors(spec: Spec, table_name: str) -> np.ndarray:
    """float32 [n_rows + 1, dim]: row r = vector of the text table's row r; row 0 and rows without text are 0."""
    if not spec.text.frozen:
        raise SpecError(f"text.mode is '{spec.text.mode}': text vectors exist only in modes llm and hybrid")
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
    out[positions + 1] = cache.take(rows)
    return out


def text_table_token_ids(spec: Spec, table_name: str) -> np.ndarray:
    """int64 [n_rows + 1, text.random_max_tokens]: hashed word tokens per row (modes random, hybrid); 0 = padding/no
    text."""
    table = _read_table(spec, table_name)
    return token_id_matrix(table.texts, spec.text.random_buckets, spec.text.random_max_tokens)


def text_dim(spec: Spec) -> int:
    """Width of the text vectors before projection: encoder hidden size (llm; hybrid: its frozen LLM part),
    random_dim (random), 0 (none)."""
    if spec.text.mode == "none":
        return 0
    if spec.text.mode == "random":
        return spec.text.random_dim
    return hidden_size(model_dir(spec))
