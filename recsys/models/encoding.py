"""L0, User-Query-Item encoding: every feature becomes an aspect vector of its side (user, query or item).

Aspects per side (a side without features of an aspect simply lacks it):
- `id`:     id features of the side; for the user also each behaviour sequence, read as target attention of the
            candidate item over the history plus a mean-pooled history (both from the shared item table), or with
            `pooling: mean` only the mean, pooled inside the EmbeddingBagCollection (one lookup output per sample).
- `sparse`: sparse categorical and dense features of the side.
- `text`:   frozen LLM vectors (or hashed-token embeddings in text mode `random`) of the side's texts; a text history
            is pooled by attention on its cosine with the candidate's text and by its mean.
Each aspect is projected to `model.dim`. Besides the aspects L0 emits a few scalar *interactions* (text cosines of
candidate vs query and vs history, attention logits) that L2 feeds straight to its heads: they carry cold-start
items, whose id embedding has never been trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.data.batch import Batch
from recsys.data.features import sequence_keys, table_of_key
from recsys.models.attention import target_attention
from recsys.models.precision import dense_autocast
from recsys.spec.config import Spec, TextFeature

SIDES = ("user", "query", "item")
ASPECTS = ("id", "sparse", "text")


@dataclass
class Encoded:
    """What L0 hands to L1/L2."""

    aspects: Dict[str, torch.Tensor]  # side -> [B, n_aspects(side), dim]
    interactions: torch.Tensor  # [B, n_interactions]


class TextBasis(nn.Module):
    """One principal-component basis shared by every text table of the model.

    With `reduce_dim` k > 0 the LLM vectors are projected on their top-k principal components: the history attention
    gathers [batch, 20, dim] text vectors every step, and 64 components instead of 384 make that gather and its
    matmuls 6x cheaper while keeping the cosine structure. One basis for all tables keeps cosines between tables
    (query vs item text) meaningful. It is fitted once on the pretraining tables and saved with the model
    (persistent buffers), so a fine-tuning run whose tables gained new texts projects them with the *pretrained*
    basis."""

    def __init__(self, tables: Dict[str, np.ndarray], k: int):
        super().__init__()
        raw = torch.cat([torch.from_numpy(np.ascontiguousarray(t[1:], dtype=np.float32)) for t in tables.values()])
        width = raw.shape[1]
        k = min(k, raw.shape[0] - 1, width)
        self.enabled = 0 < k < width
        if self.enabled:
            center = raw.mean(0)
            _, _, vh = torch.linalg.svd(raw - center, full_matrices=False)
            basis = vh[:k].T.contiguous()
            basis = basis * torch.sign(basis[basis.abs().argmax(0), torch.arange(k)])  # fix SVD's sign freedom
            self.register_buffer("center", center)
            self.register_buffer("basis", basis)
        self.dim = k if self.enabled else width

    def project(self, v: torch.Tensor) -> torch.Tensor:
        return (v - self.center) @ self.basis if self.enabled else v


class TextLookup(nn.Module):
    """Text rows -> vectors.

    `llm`: precomputed frozen LLM vectors, optionally projected by a shared TextBasis. The raw matrix is a
    non-persistent buffer rebuilt from the text cache (a checkpoint does not carry a copy of the LLM output). Rows
    are unit-normalised, so cosine similarity is one batched dot product; row 0 (no text) stays zero.
    `random`: trainable hashed-token embeddings mean-pooled per text (the paper's no-LLM ablation).
    """

    def __init__(self, mode: str, table: np.ndarray, random_buckets: int = 0, random_dim: int = 0,
                 basis: Optional[TextBasis] = None):
        super().__init__()
        self.mode = mode
        if mode == "llm":
            self.register_buffer("raw", torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32)),
                                 persistent=False)
            self.register_buffer("vectors", torch.empty(0), persistent=False)
            self.dim = basis.dim if basis is not None else int(table.shape[1])
            self.rebuild(basis)
        else:  # random: `table` holds token ids [rows, T], 0 = padding
            self.register_buffer("token_ids", torch.from_numpy(np.ascontiguousarray(table, dtype=np.int64)),
                                 persistent=False)
            self.tokens = nn.EmbeddingBag(random_buckets, random_dim, mode="mean", padding_idx=0)
            nn.init.normal_(self.tokens.weight, std=0.05)
            self.dim = random_dim

    @torch.no_grad()
    def rebuild(self, basis: Optional[TextBasis]) -> None:
        """Recompute the lookup matrix from the raw vectors and the (possibly just loaded) basis."""
        if self.mode != "llm":
            return
        v = basis.project(self.raw) if basis is not None else self.raw
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        v[0] = 0.0
        self.vectors = v.contiguous()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.mode == "llm":
            # index_select, not vectors[rows]: advanced indexing is 3x slower for a [2048, 20] history on CPU
            return self.vectors.index_select(0, rows.reshape(-1)).view(rows.shape + (self.dim,))
        flat = rows.reshape(-1)
        out = self.tokens(self.token_ids[flat])
        out = nn.functional.normalize(out, dim=-1) * (flat.unsqueeze(1) > 0)  # row 0 (no text) stays zero
        return out.reshape(rows.shape + (self.dim,))  # no *-unpacking: the train pipeline fx-traces this


def weighted_sum(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_a w[b, a] * x[b, a, :] for a FEW vectors per row (aspects, experts): broadcast multiply + sum, which
    beats a batched [1, A] @ [A, D] product for A <= 3 on CPU (and einsum's bmm of thousands of tiny matrices)."""
    return (w.unsqueeze(-1) * x).sum(1)


def batched_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [B, A, D], y [B, D] -> [B, A] dot products for a few vectors per row (see weighted_sum)."""
    return (x * y.unsqueeze(1)).sum(-1)


def sequence_pool(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [B, K, L] @ x [B, L, D] -> [B, K, D]: K weighted sums over a sequence. A batched product reads x once and,
    unlike multiply + sum, materialises no [B, L, D] temporary in forward or backward; for the [2048, 20, 64]
    history pooling it is 2.4x faster on one CPU core, forward + backward."""
    return torch.bmm(w, x)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], mask [B, L] bool -> [B, D]; zero where the mask is empty."""
    m = mask.to(x.dtype)
    return sequence_pool((m / m.sum(1, keepdim=True).clamp_min(1.0)).unsqueeze(1), x).squeeze(1)


def _key(table_name: str) -> str:
    """ModuleDict key of a text table (prefixed: a table named `items` would shadow ModuleDict.items)."""
    return f"table_{table_name}"


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of text vectors, which TextLookup returns with unit norm (or zero for "no text")."""
    return (a * b).sum(-1)


class UserQueryItemEncoder(nn.Module):
    def __init__(self, spec: Spec, ebc: EmbeddingBagCollection, text_tables: Dict[str, np.ndarray]):
        super().__init__()
        self.spec = spec
        self.ebc = ebc
        # Frozen tables (fine-tuning): their pooled outputs are detached, so no gradient reaches the fused
        # embedding kernels and their in-backward optimiser never steps: the rows stay bit-identical.
        self.frozen_tables: frozenset = frozenset()
        dim = spec.model.dim
        table_dim = {t.name: t.dim for t in spec.tables}
        self.table_dim = table_dim
        self.text_mode = spec.text.mode
        self.precision = spec.train.precision

        self.id_feats: Dict[str, List[str]] = {s: [] for s in SIDES}
        self.sparse_feats: Dict[str, List[str]] = {s: [] for s in SIDES}
        self.dense_index: Dict[str, List[int]] = {s: [] for s in SIDES}
        self.sequences = [f for f in spec.features if f.kind == "sequence" and f.pooling == "attention"]
        self.mean_sequences = [f for f in spec.features if f.kind == "sequence" and f.pooling == "mean"]
        self.table_pooling = {t.name: t.pooling for t in spec.tables}
        self._index_keys(spec)
        self.text_feats: Dict[str, List[TextFeature]] = {s: [] for s in SIDES}
        widths: Dict[Tuple[str, str], int] = {}
        dense_i = 0
        for f in spec.features:
            if f.kind == "id":
                self.id_feats[f.side].append(f.name)
                widths[(f.side, "id")] = widths.get((f.side, "id"), 0) + table_dim[f.table]
            elif f.kind == "sparse":
                self.sparse_feats[f.side].append(f.name)
                widths[(f.side, "sparse")] = widths.get((f.side, "sparse"), 0) + table_dim[f.table]
            elif f.kind == "dense" and f.bucketized:  # a categorical id: looked up like a sparse feature
                self.sparse_feats[f.side].append(f.name)
                widths[(f.side, "sparse")] = widths.get((f.side, "sparse"), 0) + table_dim[f.table]
            elif f.kind == "dense":
                self.dense_index[f.side].append(dense_i)
                dense_i += 1
                widths[(f.side, "sparse")] = widths.get((f.side, "sparse"), 0) + 1
            elif f.kind == "sequence":
                # attention-pooled + mean-pooled history, or only the mean (pooling: mean)
                n_pooled = 2 if f.pooling == "attention" else 1
                widths[(f.side, "id")] = widths.get((f.side, "id"), 0) + n_pooled * table_dim[f.table]
            elif f.kind == "text" and self.text_mode != "none":
                self.text_feats[f.side].append(f)

        # text lookups, one per text table used
        self.text_lookup = nn.ModuleDict()
        self.text_basis = (TextBasis(text_tables, spec.text.reduce_dim)
                           if self.text_mode == "llm" and text_tables else None)
        if self.text_mode != "none":
            for name, table in text_tables.items():
                self.text_lookup[_key(name)] = TextLookup(self.text_mode, table, spec.text.random_buckets,
                                                          spec.text.random_dim, self.text_basis)
            # a loaded checkpoint brings its own basis: re-project the tables with it
            self.register_load_state_dict_post_hook(lambda module, _incompatible: module.refresh_text())
            for side in SIDES:
                w = 0
                for f in self.text_feats[side]:
                    w += self.text_lookup[_key(f.text_table)].dim * (2 if f.sequence else 1)
                if w:
                    widths[(side, "text")] = w

        # sequence attention: a bilinear map of the target (candidate) embedding, cheap enough for 20 positions
        self.seq_query = nn.ModuleDict()
        for f in self.sequences:
            d = table_dim[f.table]
            lin = nn.Linear(d, d, bias=False)
            nn.init.eye_(lin.weight)
            self.seq_query[f.name] = lin

        # the candidate's text feature for each text history (same text table, item side, scalar)
        self.text_targets: Dict[str, Optional[str]] = {}
        for side in SIDES:
            for f in self.text_feats[side]:
                if f.sequence:
                    tgt = next((g.name for g in self.text_feats["item"] if not g.sequence
                                and g.text_table == f.text_table), None)
                    self.text_targets[f.name] = tgt
        self.text_temperature = nn.Parameter(torch.tensor(10.0))

        self.aspect_names: Dict[str, List[str]] = {}
        self.proj = nn.ModuleDict()
        for side in SIDES:
            names = [a for a in ASPECTS if (side, a) in widths]
            if names:
                self.aspect_names[side] = names
            for a in names:
                self.proj[f"{side}_{a}"] = nn.Sequential(nn.Linear(widths[(side, a)], dim), nn.LayerNorm(dim))
        self.num_interactions = self._count_interactions()

    def _index_keys(self, spec: Spec) -> None:
        """Static facts the pooled-output layout is derived from (see _layout)."""
        self.key_table: Dict[str, str] = dict(table_of_key(spec))  # KJT key -> table
        self.positions: Dict[str, List[str]] = {f.name: sequence_keys(f.name, f.max_len) for f in self.sequences}
        self.chunk_table: Dict[str, str] = {**self.key_table, **{f.name: f.table for f in self.sequences}}
        self._layouts: Dict[Tuple[str, ...], Tuple[List[str], List[int]]] = {}

    def _layout(self, keys: List[str], lengths: List[int]) -> Tuple[List[str], List[int]]:
        """How the EBC's pooled output [B, sum of widths] is cut, for the key order the EBC actually returned: a
        sharded EBC orders its output by sharding type and rank, not by the table configs, so the order is read at
        run time (and cached). Each id/sparse key is a chunk; a sequence whose positions sit side by side in order is
        ONE chunk that a view turns into [B, L, D] (no stack copy forward, no split + cat backward); a sequence whose
        positions are scattered stays per key and is stacked."""
        cached = self._layouts.get(tuple(keys))
        if cached is not None:
            return cached
        missing = [k for k in self.key_table if k not in keys]
        if missing:
            raise RuntimeError(f"the embedding output lacks key(s) {missing} (it has {keys})")
        where = {k: i for i, k in enumerate(keys)}
        contiguous = {seq for seq, pos in self.positions.items()
                      if [where[k] for k in pos] == list(range(where[pos[0]], where[pos[0]] + len(pos)))}
        first_of = {pos[0]: seq for seq, pos in self.positions.items() if seq in contiguous}
        inside = {k for seq in contiguous for k in self.positions[seq][1:]}
        names: List[str] = []
        sizes: List[int] = []
        for k, n in zip(keys, lengths):
            if k in inside:
                sizes[-1] += n
            else:
                names.append(first_of.get(k, k))
                sizes.append(n)
        self._layouts[tuple(keys)] = (names, sizes)
        return names, sizes

    def _pooled_features(self, pooled) -> Dict[str, torch.Tensor]:
        """Feature (or whole sequence) name -> its pooled vectors; frozen tables' outputs detached."""
        if is_fx_tracing():
            # TorchRec's train pipeline fx-traces forward only to find the EBC's inputs (the traced graph is never
            # run); the key order is not known to a Proxy, so trace the plain per-key path
            d = pooled.to_dict()
            feats = {k: d[k] for k in self.key_table}
        else:
            names, sizes = self._layout(pooled.keys(), pooled.length_per_key())
            feats = dict(zip(names, torch.split(pooled.values(), sizes, dim=1)))
        if self.frozen_tables:
            feats = {n: (v.detach() if self.chunk_table[n] in self.frozen_tables else v) for n, v in feats.items()}
        return feats

    def _history(self, feats: Dict[str, torch.Tensor], f) -> torch.Tensor:
        """[B, L, D] history of sequence feature `f`: a view of its chunk when the positions are side by side."""
        if f.name in feats:
            return feats[f.name].view(-1, f.max_len, self.table_dim[f.table])
        return torch.stack([feats[k] for k in self.positions[f.name]], dim=1)

    def refresh_text(self) -> None:
        for lookup in self.text_lookup.values():
            lookup.rebuild(self.text_basis)

    def freeze_tables(self, tables) -> None:
        self.frozen_tables = frozenset(tables)

    # ------------------------------------------------------------------------------------------------------------
    def _count_interactions(self) -> int:
        n = 2 * len(self.sequences)  # max and mean attention logit of the candidate over each id history
        item_texts = [f for f in self.text_feats["item"] if not f.sequence]
        for side in SIDES:
            for f in self.text_feats[side]:
                if f.sequence and self.text_targets.get(f.name):
                    n += 2  # max / mean cosine of candidate text with the history texts
                elif not f.sequence and side != "item":
                    n += len(item_texts)  # cosine of candidate text with the query (or user) text
        return n

    def forward(self, batch: Batch) -> Encoded:
        feats = self._pooled_features(self.ebc(batch.sparse))  # the EBC gives a KeyedTensor, one vector per key
        parts: Dict[Tuple[str, str], List[torch.Tensor]] = {}
        interactions: List[torch.Tensor] = []

        def add(side: str, aspect: str, t: torch.Tensor) -> None:
            parts.setdefault((side, aspect), []).append(t)

        for side in SIDES:
            for name in self.id_feats[side]:
                add(side, "id", feats[name])
            for name in self.sparse_feats[side]:
                add(side, "sparse", feats[name])
            if self.dense_index[side]:
                add(side, "sparse", batch.dense[:, self.dense_index[side]])

        for f in self.mean_sequences:  # pooled inside the EBC: a sum-pooled table gives the sum, made a mean here
            pooled = feats[f.name]
            if self.table_pooling[f.table] == "sum":
                pooled = pooled / batch.seq_lengths[f.name].clamp_min(1).unsqueeze(1).to(pooled.dtype)
            add(f.side, "id", pooled)

        for f in self.sequences:
            hist = self._history(feats, f)  # [B, L, D]
            lengths = batch.seq_lengths[f.name]
            mask = torch.arange(f.max_len, device=hist.device).unsqueeze(0) < lengths.unsqueeze(1)
            target = feats[f.target] if f.target else _masked_mean(hist, mask)
            q = self.seq_query[f.name](target)
            scale = 1.0 / math.sqrt(hist.shape[-1])
            raw, attended, mean = target_attention(hist, q, mask, scale, fused=not is_fx_tracing())
            scores = raw * scale
            add(f.side, "id", attended)
            add(f.side, "id", mean)
            has = mask.any(1)
            interactions.append(torch.where(has, scores.masked_fill(~mask, -1e4).amax(1), torch.zeros_like(has,
                                                                                                  dtype=hist.dtype)))
            interactions.append((scores * mask).sum(1) / mask.sum(1).clamp_min(1))

        if self.text_mode != "none":
            vectors = {f.name: self.text_lookup[_key(f.text_table)](batch.text[f.name])
                       for side in SIDES for f in self.text_feats[side]}
            item_texts = [f.name for f in self.text_feats["item"] if not f.sequence]
            for side in SIDES:
                for f in self.text_feats[side]:
                    v = vectors[f.name]
                    if not f.sequence:
                        add(side, "text", v)
                        if side != "item":
                            for it in item_texts:
                                interactions.append(_dot(v, vectors[it]))
                        continue
                    mask = batch.text[f.name] > 0
                    tgt = self.text_targets.get(f.name)
                    if tgt is not None:
                        cos, attended, mean = target_attention(v, vectors[tgt], mask, self.text_temperature,
                                                               fused=not is_fx_tracing())  # cos [B, L]
                        add(side, "text", attended)
                        has = mask.any(1)
                        interactions.append(torch.where(has, cos.masked_fill(~mask, -2.0).amax(1),
                                                        torch.zeros_like(cos[:, 0])))
                        interactions.append((cos * mask).sum(1) / mask.sum(1).clamp_min(1))
                    else:  # no candidate text to attend with: max-pool instead
                        add(side, "text", v.masked_fill(~mask.unsqueeze(-1), 0.0).amax(1))
                        mean = _masked_mean(v, mask)
                    add(side, "text", mean)

        with dense_autocast(self.precision, self.text_temperature):
            aspects = {
                side: torch.stack([self.proj[f"{side}_{a}"](torch.cat(parts[(side, a)], dim=1)) for a in names],
                                  dim=1)
                for side, names in self.aspect_names.items()
            }
        inter = torch.stack(interactions, dim=1) if interactions else batch.dense.new_zeros(batch.size, 0)
        return Encoded(aspects=aspects, interactions=inter)
