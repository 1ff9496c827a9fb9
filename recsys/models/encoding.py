"""L0, User-Query-Item encoding: every feature becomes an aspect vector of its side (user, query or item).

Aspects per side (a side without features of an aspect simply lacks it):
- `id`:     id features of the side; for the user also each behaviour sequence, read as target attention of the
            candidate item over the history plus a mean-pooled history (both from the shared item table), or with
            `pooling: mean` only the mean, pooled inside the EmbeddingBagCollection (one lookup output per sample).
- `sparse`: sparse categorical and dense features of the side.
- `text`:   frozen LLM vectors (or hashed-token embeddings in text mode `random`) of the side's texts; a text history
            is pooled by attention on its cosine with the candidate's text and by its mean. The LLM vectors live in
            frozen TorchRec tables (TextEmbeddingBagCollection), sharded by the planner like the id tables.
Each aspect is projected to `model.dim`. Besides the aspects L0 emits a few scalar *interactions* (text cosines of
candidate vs query and vs history, attention logits, the train counts and history matches of `statistics`) that L2
feeds straight to its heads: they carry cold-start items, whose id embedding has never been trained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.data.batch import Batch
from recsys.data.features import context_features, kjt_keys, sequence_keys, table_of_key, text_kjt_keys
from recsys.models.attention import grouped_target_attention, target_attention
from recsys.models.fx import fx_tracing
from recsys.models.precision import dense_autocast
from recsys.spec.config import Spec, TextFeature

if TYPE_CHECKING:
    from recsys.text.frozen import TextProjection

SIDES = ("user", "query", "item")
ASPECTS = ("id", "sparse", "text")
HYBRID_SCALE = 1.0 / math.sqrt(2.0)  # text mode hybrid: [LLM vector, token vector] of unit norm (see _with_tokens)


@dataclass
class Encoded:
    """What L0 hands to L1/L2."""

    aspects: Dict[str, torch.Tensor]  # side -> [B, n_aspects(side), dim]
    interactions: torch.Tensor  # [B, n_interactions]


class TextEmbeddingBagCollection(EmbeddingBagCollection):
    """The frozen text tables (mode llm): an EmbeddingBagCollection of its own type, so DistributedModelParallel
    shards it with the frozen-text sharder (no optimiser state, fp16 all-to-all; recsys.train.sharding) while the
    planner places its tables like any other. Weights come from `recsys.text.frozen`, never from training: the
    encoder detaches its output, so no gradient reaches it."""


class TextProjectionBuffers(nn.Module):
    """The projection the frozen text tables were written with (`recsys.text.frozen.TextProjection`), as
    persistent buffers: checkpoints and bundles carry it, a fine-tune projects its new texts with it and serving
    projects texts that arrive later. The model itself never applies it: the tables hold projected rows."""

    def __init__(self, projection: "TextProjection"):
        super().__init__()
        self.register_buffer("center", torch.from_numpy(np.array(projection.center, dtype=np.float32)))
        basis = projection.basis if projection.basis is not None else np.zeros((projection.width, 0), np.float32)
        self.register_buffer("basis", torch.from_numpy(np.array(basis, dtype=np.float32)))

    def to_projection(self) -> "TextProjection":
        return projection_from_buffers(self.center, self.basis)


def projection_from_buffers(center: torch.Tensor, basis: torch.Tensor) -> "TextProjection":
    """The TextProjection held by TextProjectionBuffers' tensors (a basis of width 0 = no projection)."""
    from recsys.text.frozen import TextProjection

    b = basis.detach().cpu().numpy()
    return TextProjection(center=center.detach().cpu().numpy(), basis=b if b.shape[1] else None)


def _data_dependent_shapes_cheap(t: torch.Tensor) -> bool:
    """Whether ops whose output size depends on the values of `t` (torch.unique, boolean-mask indexing) are cheap
    here: on a CPU tensor, outside fx tracing. On GPU they wait for the device to report the size. fx_tracing()
    first: under the train pipeline's fx trace `t` is a Proxy, whose device cannot be branched on."""
    return not fx_tracing() and t.device.type == "cpu"


class TokenTextLookup(nn.Module):
    """Text mode `random` (the paper's no-LLM ablation): text rows -> trainable hashed-token embeddings mean-pooled
    per text, unit-normalised; row 0 (no text) stays zero."""

    def __init__(self, token_ids: np.ndarray, random_buckets: int, random_dim: int):
        super().__init__()
        self.register_buffer("token_ids", torch.from_numpy(np.ascontiguousarray(token_ids, dtype=np.int64)),
                             persistent=False)
        self.tokens = nn.EmbeddingBag(random_buckets, random_dim, mode="mean", padding_idx=0)
        nn.init.normal_(self.tokens.weight, std=0.05)
        self.dim = random_dim

    @torch.no_grad()
    def set_rows(self, rows: torch.Tensor, token_ids: np.ndarray) -> None:
        """Serving seam: hashed token ids of texts met at serve time into existing rows."""
        self.token_ids[rows] = torch.as_tensor(np.ascontiguousarray(token_ids, dtype=np.int64))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1)
        if not _data_dependent_shapes_cheap(flat):
            out = self._pool(flat)
        else:
            # Each distinct text row pooled once: a batch repeats its texts (amazon-sr, 4,096 samples: 8,822
            # distinct rows among the 81,920 history texts, 134 distinct queries), and pooling every copy (32
            # token lookups, their index sort and scatter in the backward) made mode hybrid's CPU step 5x mode
            # llm's. Same vectors per row; the copies' gradients are summed by the gather's backward. (On GPU the
            # lookups are cheap.)
            found = torch.unique(flat, return_inverse=True)
            out = self._pool(found[0]).index_select(0, found[1])
        return out.reshape(rows.shape + (self.dim,))  # no *-unpacking: the train pipeline fx-traces this

    def _pool(self, rows: torch.Tensor) -> torch.Tensor:
        """[n] text rows -> [n, dim] unit mean of their token vectors; row 0 (no text) stays zero."""
        ids = self.token_ids[rows]
        if not _data_dependent_shapes_cheap(ids):
            out = self.tokens(ids)
        else:
            # the bags packed without their padding: a text has ~7-11 tokens of its 32 slots on amazon-sr, and the
            # lookup and its backward (index sort, scatter into the table's gradient) go over every slot they are
            # given, padding included. Same means (padding_idx is left out of a bag's mean either way).
            real = ids > 0
            lengths = real.sum(1)
            out = self.tokens(ids[real], torch.cumsum(lengths, 0) - lengths)
        return nn.functional.normalize(out, dim=-1) * (rows.unsqueeze(1) > 0)


class PooledLayout:
    """How an EmbeddingBagCollection's pooled output [B, sum of widths] is cut into features, for the key order the
    EBC actually returned: a sharded EBC orders its output by sharding type and rank, not by the table configs, so
    the order is read at run time (and cached). Each key is a chunk; a sequence whose position keys sit side by side
    in order is ONE chunk that a view turns into [B, L, D] (no stack copy forward, no split + cat backward); a
    sequence whose positions are scattered stays per key and is stacked by `history`."""

    def __init__(self, keys: List[str], positions: Dict[str, List[str]]):
        self.keys = list(keys)  # every key the EBC must return
        self.positions = positions  # sequence name -> its position keys, in order
        # output key order -> (chunk names, chunk widths, chunks nobody reads: e.g. recsys.train.update_path's pads)
        self._cache: Dict[Tuple[str, ...], Tuple[List[str], List[int], List[str]]] = {}

    def layout(self, keys: List[str], lengths: List[int]) -> Tuple[List[str], List[int], List[str]]:
        cached = self._cache.get(tuple(keys))
        if cached is not None:
            return cached
        missing = [k for k in self.keys if k not in keys]
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
        read = set(self.keys) | set(self.positions)
        self._cache[tuple(keys)] = (names, sizes, [n for n in names if n not in read])
        return self._cache[tuple(keys)]

    def split(self, pooled, detach: bool = False) -> Dict[str, torch.Tensor]:
        """Feature (or whole contiguous sequence) name -> its pooled vectors."""
        if fx_tracing():
            # TorchRec's train pipeline fx-traces forward only to find the EBC's inputs (the traced graph is never
            # run); the key order is not known to a Proxy, so trace the plain per-key path
            d = pooled.to_dict()
            return {k: d[k] for k in self.keys}
        names, sizes, unread = self.layout(pooled.keys(), pooled.length_per_key())
        values = pooled.values().detach() if detach else pooled.values()
        chunks = dict(zip(names, torch.split(values, sizes, dim=1)))
        for n in unread:
            del chunks[n]
        return chunks

    def history(self, feats: Dict[str, torch.Tensor], name: str, max_len: int, dim: int) -> torch.Tensor:
        """[B, L, D] history of sequence `name`: a view of its chunk when the positions are side by side."""
        if name in feats:
            return feats[name].view(-1, max_len, dim)
        return torch.stack([feats[k] for k in self.positions[name]], dim=1)


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


def _cat1(parts: List[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts, dim=1), without the copy cat makes of a single tensor (most aspects have one part)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _stack1(parts: List[torch.Tensor]) -> torch.Tensor:
    """torch.stack(parts, dim=1), a view (no copy) for a side with a single aspect."""
    return parts[0].unsqueeze(1) if len(parts) == 1 else torch.stack(parts, dim=1)


def _key(table_name: str) -> str:
    """ModuleDict key of a text table (prefixed: a table named `items` would shadow ModuleDict.items)."""
    return f"table_{table_name}"


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of text vectors, which text_vectors returns with unit norm (or zero for "no text")."""
    return (a * b).sum(-1)


class UserQueryItemEncoder(nn.Module):
    def __init__(self, spec: Spec, ebc: EmbeddingBagCollection, text_tables: Dict[str, np.ndarray],
                 text_ebc: Optional[nn.Module] = None, text_projection: Optional["TextProjection"] = None,
                 text_tokens: Optional[Dict[str, np.ndarray]] = None):
        """`text_tables`: modes llm and hybrid, the frozen tables' rows [rows, dim] (`recsys.text.frozen`), read by
        `text_ebc` (built by the caller from `recsys.models.tables.text_table_configs`); mode random, token ids per
        row. `text_tokens`: mode hybrid, the token ids per row of the same tables."""
        super().__init__()
        self.spec = spec
        self.ebc = ebc
        # Frozen tables (fine-tuning): their pooled outputs are detached, so no gradient reaches the fused
        # embedding kernels and their in-backward optimiser never steps: the rows stay bit-identical.
        self.frozen_tables: frozenset = frozenset()
        self.fresh_rows: Dict[str, torch.Tensor] = {}
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
        # features read from a request's context: with grouped rows (serving) they are looked up once per request
        self.context = frozenset(context_features(spec))
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
        # the train counts' columns follow the dense features' in `batch.dense` (recsys.data.statistics): two per
        # count (log1p count, unknown flag), read as interactions, so that every domain's head weighs them itself
        # (read with the candidate's sparse aspect instead they cost games_rec what they gave search: valid mean
        # domain AUC 0.8645 against 0.8670 as interactions, 3 seeds, docs/search_quality.md)
        # (the same for statistics.matches, after the counts)
        self.count_columns = list(range(dense_i, dense_i + spec.statistics.columns))

        # text: frozen embedding tables (llm), trainable hashed tokens (random), or both side by side (hybrid)
        self.text_lookup = nn.ModuleDict()
        frozen = spec.text.frozen
        self.text_ebc = text_ebc if frozen else None
        self.text_projection = (TextProjectionBuffers(text_projection)
                                if frozen and text_projection is not None else None)
        self.frozen_text_dim = 0  # width of the frozen tables' rows
        if frozen and text_tables:
            self.frozen_text_dim = int(next(iter(text_tables.values())).shape[1])
            text_features = [f for f in spec.features if f.kind == "text"]
            self.text_layout = PooledLayout(text_kjt_keys(spec), {f.name: sequence_keys(f.name, f.max_len)
                                                                  for f in text_features if f.sequence})
        token_tables = text_tables if self.text_mode == "random" else (text_tokens or {})
        if self.text_mode == "hybrid" and text_tables and set(token_tables) != set(text_tables):
            raise ValueError(f"text mode hybrid: token ids for {sorted(token_tables)}, frozen rows for "
                             f"{sorted(text_tables)}; every text table needs both")
        for name, table in token_tables.items():
            self.text_lookup[_key(name)] = TokenTextLookup(table, spec.text.random_buckets, spec.text.random_dim)
        # width of one text vector: hybrid concatenates the frozen LLM row and the token vector
        self.text_dim = self.frozen_text_dim + (spec.text.random_dim if token_tables else 0)
        if self.text_mode != "none":
            for side in SIDES:
                w = sum(self.text_dim * (2 if f.sequence else 1) for f in self.text_feats[side])
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
        """Static facts the pooled-output layout is derived from (see PooledLayout)."""
        self.key_table: Dict[str, str] = dict(table_of_key(spec))  # KJT key -> table
        self.positions: Dict[str, List[str]] = {f.name: sequence_keys(f.name, f.max_len) for f in self.sequences}
        self.chunk_table: Dict[str, str] = {**self.key_table, **{f.name: f.table for f in self.sequences}}
        self.id_layout = PooledLayout(list(self.key_table), self.positions)
        # The EBC sum-pools every table (recsys.models.tables.embedding_bag_configs); the keys whose bags can hold
        # several values are made means here where their table pools by mean (sparse features), and a mean-pooled
        # history is always its mean. Ids, bucketized values and history positions hold at most one value, whose
        # sum is already its mean.
        mean_tables = {t.name for t in spec.tables if t.pooling == "mean"}
        self.kjt_key_order = kjt_keys(spec)  # the batch's key order (recsys.data.batch.Batch)
        self.mean_keys: List[str] = [f.name for f in spec.features
                                     if (f.kind == "sparse" and f.table in mean_tables)
                                     or (f.kind == "sequence" and f.pooling == "mean")]
        self._key_rows: Dict[Tuple[str, ...], List[int]] = {}

    def _pooled_features(self, pooled, kjt) -> Dict[str, torch.Tensor]:
        """Feature (or whole sequence) name -> its pooled vectors (`kjt`: the EBC's input); frozen tables' outputs
        detached, except the bags made only of rows pretraining never updated (see freeze_tables)."""
        feats = self.id_layout.split(pooled)
        if self.mean_keys:
            feats = self._bag_means(feats, kjt)
        if self.frozen_tables:
            feats = {n: (self._freeze_chunk(n, v, kjt) if self.chunk_table[n] in self.frozen_tables else v)
                     for n, v in feats.items()}
        return feats

    def _bag_means(self, feats: Dict[str, torch.Tensor], kjt) -> Dict[str, torch.Tensor]:
        """The sums of the multi-valued mean keys divided by their bag lengths (an empty bag stays zero)."""
        lengths = kjt.lengths()
        if fx_tracing():  # a Proxy has no key list; the traced graph only locates the EBC's inputs
            keys = self.kjt_key_order
        else:
            keys = kjt.keys()
        rows = self._key_rows.get(tuple(keys))
        if rows is None:
            where = {k: i for i, k in enumerate(keys)}
            rows = self._key_rows[tuple(keys)] = [where[k] for k in self.mean_keys]
        per_key = lengths.view(len(keys), -1)
        out = dict(feats)
        for name, row in zip(self.mean_keys, rows):
            v = feats[name]
            out[name] = v / per_key[row].clamp_min(1).unsqueeze(1).to(v.dtype)
        return out

    def _freeze_chunk(self, name: str, v: torch.Tensor, kjt) -> torch.Tensor:
        """A frozen table's chunk: detached, but bags whose rows are all fresh (never updated in pretraining) keep
        their gradient, so those rows train while every pretrained row stays exactly as it was."""
        fresh = self.fresh_rows.get(self.chunk_table[name])
        if fresh is None or kjt is None or fx_tracing():
            return v.detach()
        if fresh.device != v.device:
            fresh = self.fresh_rows[self.chunk_table[name]] = fresh.to(v.device)
        keys = self.positions.get(name, [name])
        masks = []
        for k in keys:
            jt = kjt[k]
            values, lengths = jt.values(), jt.lengths()
            bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=v.device), lengths)
            stale = torch.zeros(lengths.numel(), device=v.device).index_add_(0, bag, (~fresh[values]).float())
            masks.append((stale == 0) & (lengths > 0))
        mask = torch.stack(masks, dim=1).repeat_interleave(v.shape[1] // len(keys), dim=1)  # [B, width]
        return torch.where(mask, v, v.detach())

    def _history(self, feats: Dict[str, torch.Tensor], f) -> torch.Tensor:
        return self.id_layout.history(feats, f.name, f.max_len, self.table_dim[f.table])

    def text_vectors(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """Text rows -> vectors, per text feature: [B, dim], or [B, L, dim] for a history; unit norm, zero for "no
        text". Modes llm and hybrid read the frozen text tables through the text KJT (`batch.text_ids`), detached:
        nothing trains them. The one place text vectors come from, so a caller that must supply vectors for texts
        the tables lack (serving's cold texts) overrides this method."""
        feats = [f for side in SIDES for f in self.text_feats[side]]
        tokens = self.token_vectors(feats, batch.text)
        if not self.spec.text.frozen:
            return tokens
        chunks = self.text_layout.split(self.text_ebc(batch.text_ids), detach=True)
        out: Dict[str, torch.Tensor] = {}
        for f in feats:
            v = (self.text_layout.history(chunks, f.name, f.max_len, self.frozen_text_dim) if f.sequence
                 else chunks[f.name])
            # .float(): an unsharded fp16 table returns fp16 (the fused kernels return fp32)
            out[f.name] = self._with_tokens(v.float(), tokens.get(f.name))
        return out

    def token_vectors(self, feats: List[TextFeature], rows: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Modes random and hybrid: feature name -> the token vectors of its text rows `rows[name]` ([..., dim]);
        other modes: {}. The features that read one text table are pooled in one lookup, so a text that is both a
        candidate and in histories (amazon-sr: item_text and hist_text) is pooled once per batch, and each table's
        lookup and backward run once, not once per feature."""
        if not self.spec.text.tokens:
            return {}
        if fx_tracing():  # the traced graph only finds the EBCs' inputs (see PooledLayout.split): per feature
            return {f.name: self.text_lookup[_key(f.text_table)](rows[f.name]) for f in feats}
        by_table: Dict[str, List[TextFeature]] = {}
        for f in feats:
            by_table.setdefault(f.text_table, []).append(f)
        out: Dict[str, torch.Tensor] = {}
        for table, fs in by_table.items():
            parts = [rows[f.name] for f in fs]
            pooled = self.text_lookup[_key(table)](torch.cat([p.reshape(-1) for p in parts]))
            for f, p, v in zip(fs, parts, pooled.split([p.numel() for p in parts])):
                out[f.name] = v.view(p.shape + (pooled.shape[-1],))
        return out

    def _with_tokens(self, frozen: torch.Tensor, tokens: Optional[torch.Tensor]) -> torch.Tensor:
        """Mode hybrid: the frozen LLM vectors of some text rows and their token vectors side by side, scaled by
        1/sqrt(2): two unit vectors make one unit vector, whose cosine with another text's is the mean of the LLM
        cosine and the token cosine (an exact match still scores 1, so the interactions keep their meaning).
        Other modes (`tokens` None): the frozen vectors as they are."""
        if tokens is None:
            return frozen
        return torch.cat([frozen, tokens], dim=-1) * HYBRID_SCALE

    def grouped_text_vectors(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """`text_vectors` for grouped rows (`batch.groups`, serving): a context feature's vectors once per request
        ([R, dim] or [R, L, dim]), an item feature's per row. Mode llm reads the frozen rows straight from the
        tables (every text key holds one row, so a bag's sum is that row, bit for bit): no [B, 43 x dim] lookup
        output to zero-fill and write when 40 of its 43 vectors are the request's two histories (on amazon-sr that
        fill alone took ~0.4 ms of a 100-candidate request)."""
        groups = batch.groups
        feats = [f for side in SIDES for f in self.text_feats[side]]
        frozen = self.spec.text.frozen
        weights = self._text_weights() if frozen else None
        if frozen and weights is None:  # a text module whose rows cannot be read directly
            full = self.text_vectors(Batch(**{**batch.__dict__, "text_ids": None, "groups": None}))
            return {f.name: full[f.name].index_select(0, groups.first) if f.name in self.context else full[f.name]
                    for f in feats}
        rows = {f.name: batch.text[f.name].index_select(0, groups.first) if f.name in self.context
                else batch.text[f.name] for f in feats}
        tokens = self.token_vectors(feats, rows)
        if weights is None:  # mode random
            return tokens
        out: Dict[str, torch.Tensor] = {}
        for f in feats:
            v = weights[f.text_table].index_select(0, rows[f.name].reshape(-1)).view(*rows[f.name].shape, -1)
            out[f.name] = self._with_tokens(v, tokens.get(f.name))
        return out

    def _text_weights(self) -> Optional[Dict[str, torch.Tensor]]:
        """Text table name -> its fp32 rows [rows, dim] (views that share the tables' storage, so rows written by
        `set_text_rows` are seen), or None when the text module keeps them in another form (fp16, int8, sharded)."""
        cached = getattr(self, "_text_weight_views", None)
        if cached is not None and cached[0] is self.text_ebc:
            return cached[1]
        views: Optional[Dict[str, torch.Tensor]] = {}
        for t in self.spec.text.tables:
            w = self._stored_text_rows(t.name)
            if (w is None or w.dtype != torch.float32 or w.shape[1] != self.frozen_text_dim
                    or w.device.type == "meta"):
                views = None
                break
            views[t.name] = w.detach()
        self._text_weight_views = (self.text_ebc, views)
        return views

    def _stored_text_rows(self, table: str) -> Optional[torch.Tensor]:
        """The weight of frozen text table `table` as the text module stores it, with serving's fused fp32 tables
        (recsys.serving.quantize: fp32 rows kept as bytes) viewed as their [rows, dim] fp32 rows; None when the
        module holds no such plain table (sharded)."""
        from recsys.models.tables import text_table_name

        bags = getattr(self.text_ebc, "embedding_bags", None)
        if bags is None or text_table_name(table) not in bags:
            return None
        w = bags[text_table_name(table)].weight
        if w.dtype == torch.uint8 and w.shape[1] >= 4 * self.frozen_text_dim:
            w = w.view(torch.float32)[:, :self.frozen_text_dim]
        return w

    @torch.no_grad()
    def set_text_rows(self, table: str, rows: torch.Tensor, values) -> None:
        """Serving seam (recsys/serving/cold_text.py): texts met at serve time into existing rows of text table
        `table`: raw encoder vectors (mode llm; projected here exactly as the frozen tables were), hashed token
        ids (mode random), or the pair (raw encoder vectors, hashed token ids) (mode hybrid)."""
        if self.text_mode == "hybrid":
            vectors, token_ids = values
            self.text_lookup[_key(table)].set_rows(rows, token_ids)
            values = vectors
        elif self.text_mode == "random":
            self.text_lookup[_key(table)].set_rows(rows, values)
            return
        from recsys.text.frozen import project_vectors

        weight = self._stored_text_rows(table)
        if weight is None or not weight.is_floating_point():
            raise TypeError(f"text table {table!r}: its rows are not stored as plain floats here; cannot write them")
        projected = project_vectors(values, self.text_projection.to_projection())
        weight[rows] = torch.from_numpy(projected).to(weight.dtype)

    def freeze_tables(self, tables, fresh_rows: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Freeze whole tables by detaching their outputs. `fresh_rows` (table -> bool per row) names rows that
        pretraining never updated (e.g. users who appear only in a new domain): bags made only of such rows keep
        their gradient, so a fine-tune with `--freeze l0` still learns them instead of serving random rows."""
        self.frozen_tables = frozenset(tables)
        self.fresh_rows = {t: torch.as_tensor(m, dtype=torch.bool) for t, m in (fresh_rows or {}).items()
                           if t in self.frozen_tables}

    # ------------------------------------------------------------------------------------------------------------
    def _count_interactions(self) -> int:
        n = 2 * len(self.sequences)  # max and mean attention logit of the candidate over each id history
        n += len(self.count_columns)
        item_texts = [f for f in self.text_feats["item"] if not f.sequence]
        for side in SIDES:
            for f in self.text_feats[side]:
                if f.sequence and self.text_targets.get(f.name):
                    n += 2  # max / mean cosine of candidate text with the history texts
                elif not f.sequence and side != "item":
                    n += len(item_texts)  # cosine of candidate text with the query (or user) text
        return n

    def forward(self, batch: Batch) -> Encoded:
        feats = self._pooled_features(self.ebc(batch.sparse), batch.sparse)  # a KeyedTensor, one vector per key
        # serving: context features were looked up in each request's first row only (training never groups rows;
        # while the train pipeline fx-traces forward, `batch.groups` is a Proxy, not None)
        groups = None if fx_tracing() else batch.groups
        if groups is not None:  # every row reads them from there (histories stay once per request, below)
            feats = {n: v.index_select(0, groups.source) if n in self.context and n not in self.positions else v
                     for n, v in feats.items()}
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

        for f in self.mean_sequences:  # pooled inside the EBC, made a mean by _pooled_features
            add(f.side, "id", feats[f.name])

        for f in self.sequences:
            hist = self._history(feats, f)  # [B, L, D]
            lengths = batch.seq_lengths[f.name]
            mask = torch.arange(f.max_len, device=hist.device).unsqueeze(0) < lengths.unsqueeze(1)
            scale = 1.0 / math.sqrt(hist.shape[-1])
            shared = groups is not None and f.name in self.context
            if shared and f.target:  # the request's one history against each candidate: no per-row copy
                q = self.seq_query[f.name](feats[f.target])
                raw, attended, mean = grouped_target_attention(hist.index_select(0, groups.first), q, mask, scale,
                                                               groups)
            else:
                if shared:
                    hist = hist.index_select(0, groups.source)
                target = feats[f.target] if f.target else _masked_mean(hist, mask)
                q = self.seq_query[f.name](target)
                raw, attended, mean = target_attention(hist, q, mask, scale, fused=not fx_tracing())
            scores = raw * scale
            add(f.side, "id", attended)
            add(f.side, "id", mean)
            has = mask.any(1)
            interactions.append(torch.where(has, scores.masked_fill(~mask, -1e4).amax(1), torch.zeros_like(has,
                                                                                                  dtype=hist.dtype)))
            interactions.append((scores * mask).sum(1) / mask.sum(1).clamp_min(1))

        if self.text_mode != "none":
            # grouped rows: context features' vectors are once per request ([R, ...]), item features' per row
            vectors = self.text_vectors(batch) if groups is None else self.grouped_text_vectors(batch)
            item_texts = [f.name for f in self.text_feats["item"] if not f.sequence]
            for side in SIDES:
                for f in self.text_feats[side]:
                    v = vectors[f.name]
                    shared = groups is not None and f.name in self.context
                    if shared and not (f.sequence and self.text_targets.get(f.name)):
                        v = v.index_select(0, groups.owner)  # the request's vector in each of its rows
                    if not f.sequence:
                        add(side, "text", v)
                        if side != "item":
                            for it in item_texts:
                                interactions.append(_dot(v, vectors[it]))
                        continue
                    mask = batch.text[f.name] > 0
                    tgt = self.text_targets.get(f.name)
                    if tgt is not None:
                        if shared:  # the request's one text history against each candidate's text
                            cos, attended, mean = grouped_target_attention(v, vectors[tgt], mask,
                                                                           self.text_temperature, groups)
                        else:
                            cos, attended, mean = target_attention(v, vectors[tgt], mask, self.text_temperature,
                                                                   fused=not fx_tracing())  # cos [B, L]
                        add(side, "text", attended)
                        has = mask.any(1)
                        interactions.append(torch.where(has, cos.masked_fill(~mask, -2.0).amax(1),
                                                        torch.zeros_like(cos[:, 0])))
                        interactions.append((cos * mask).sum(1) / mask.sum(1).clamp_min(1))
                    else:  # no candidate text to attend with: max-pool instead
                        add(side, "text", v.masked_fill(~mask.unsqueeze(-1), 0.0).amax(1))
                        mean = _masked_mean(v, mask)
                    add(side, "text", mean)

        if self.count_columns:
            interactions.extend(batch.dense[:, self.count_columns].unbind(1))
        with dense_autocast(self.precision, self.text_temperature, training=self.training):
            aspects = self.project(parts)
        inter = torch.stack(interactions, dim=1) if interactions else batch.dense.new_zeros(batch.size, 0)
        return Encoded(aspects=aspects, interactions=inter)

    def project(self, parts: Dict[Tuple[str, str], List[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """(side, aspect) -> its vectors => side -> its aspects projected to `model.dim` and stacked [B, A, dim].
        One method so that `train.compile` compiles all projections as one graph (recsys/models/compiled.py)."""
        return {side: _stack1([self.proj[f"{side}_{a}"](_cat1(parts[(side, a)])) for a in names])
                for side, names in self.aspect_names.items()}
