"""Names the loader and the model agree on: the KJT key order and which table each key reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from recsys.spec.config import Spec


def sequence_keys(name: str, max_len: int) -> List[str]:
    """One single-valued KJT key per history position, so an EmbeddingBag returns per-position vectors.

    `__pos` and not `@`: TorchRec's CUDA sharded EBC treats `@` in a feature name specially (mean-pooling callback
    lookup fails with KeyError); feature names cannot contain `__pos` (see Spec validation)."""
    return [f"{name}__pos{i}" for i in range(max_len)]


def sequence_kjt_keys(f) -> List[str]:
    """The KJT keys of a sequence feature: one per position (attention pooling) or the feature's own name, holding
    the whole history (mean pooling, pooled inside the EmbeddingBagCollection)."""
    return [f.name] if f.pooling == "mean" else sequence_keys(f.name, f.max_len)


def is_bucketized(f) -> bool:
    """A dense feature turned into a categorical id (`transform: bucketize`): a single-valued KJT key."""
    return f.kind == "dense" and f.transform == "bucketize"


def kjt_keys(spec: Spec) -> List[str]:
    """KJT keys in batch order: id and sparse features in spec order, then each sequence's keys."""
    return [k for keys in sparse_key_blocks(spec).values() for k in keys]


def table_of_key(spec: Spec) -> Dict[str, str]:
    """KJT key -> embedding table name (sequence positions read their feature's table)."""
    out: Dict[str, str] = {}
    for f in spec.features:
        if f.kind in ("id", "sparse") or is_bucketized(f):
            out[f.name] = f.table
        elif f.kind == "sequence":
            for k in sequence_kjt_keys(f):
                out[k] = f.table
    return out


def text_kjt_keys(spec: Spec) -> List[str]:
    """Keys of the text-row KJT (mode llm), in spec order: a scalar text feature is one key, a text history one key
    per position. Each key holds exactly one row per sample (0 = no text / padding)."""
    return [k for keys in text_key_blocks(spec).values() for k in keys]


def context_features(spec: Spec) -> List[str]:
    """Features read from a ranking request's context (user and query side, not from a side table): every candidate
    of one request has the same values of them, so serving looks them up once per request (`RequestGroups`)."""
    return [f.name for f in spec.features if f.side != "item" and getattr(f, "source", None) is None]


def active_domains(spec: Spec) -> List[str]:
    """Domains trained and evaluated: all, or only `model.single_domain`."""
    if spec.model.single_domain:
        return [spec.model.single_domain]
    return [d.name for d in spec.domains]


def sparse_key_blocks(spec: Spec) -> Dict[str, List[str]]:
    """Feature -> its keys in the id KJT, in `kjt_keys` order (a sequence's keys are one block)."""
    blocks: Dict[str, List[str]] = {}
    for f in spec.features:
        if f.kind in ("id", "sparse") or is_bucketized(f):
            blocks[f.name] = [f.name]
    for f in spec.features:
        if f.kind == "sequence":
            blocks[f.name] = sequence_kjt_keys(f)
    return blocks


def text_key_blocks(spec: Spec) -> Dict[str, List[str]]:
    """Text feature -> its keys in the text KJT, in `text_kjt_keys` order."""
    return {f.name: sequence_keys(f.name, f.max_len) if f.sequence else [f.name]
            for f in spec.features if f.kind == "text"}


def block_order(keys: Sequence[str], blocks: Dict[str, List[str]]) -> Optional[List[str]]:
    """The names of `blocks` (feature -> its keys, in order) in the order `keys` lists them, when `keys` holds
    exactly the blocks' keys with each block's keys side by side and in order; None otherwise."""
    first = {ks[0]: name for name, ks in blocks.items() if ks}
    order: List[str] = []
    i = 0
    while i < len(keys):
        name = first.get(keys[i])
        if name is None or list(keys[i:i + len(blocks[name])]) != blocks[name]:
            return None
        order.append(name)
        i += len(blocks[name])
    return order if sorted(order) == sorted(n for n, ks in blocks.items() if ks) else None


@dataclass(frozen=True)
class KjtOrder:
    """The order in which a model's sharded embedding modules read the features of their KJTs: the id KJT's and
    the text KJT's features (`sparse_key_blocks` / `text_key_blocks` names), or None for the spec's own order.

    A sharded EmbeddingBagCollection groups its input features by sharding type, rank and table; a KJT whose keys
    come in another order is permuted at every step before its input distribution (fbgemm permute_2D_sparse_data:
    on amazon-sr ~0.8 ms per KJT a step on one process, two KJTs). Batches assembled in the order the sharded
    modules read need no permute: the loader builds each feature's values and lengths anyway and only concatenates
    them in this order (`recsys.train.sharding.pin_kjt_order` sets a model up for it and returns it)."""

    sparse: Optional[Tuple[str, ...]] = None
    text: Optional[Tuple[str, ...]] = None

    @staticmethod
    def from_keys(spec: Spec, sparse_keys: Optional[Sequence[str]],
                  text_keys: Optional[Sequence[str]]) -> "KjtOrder":
        """The feature orders behind key orders a sharded module reads; a key order that is not a reordering of
        whole features (e.g. a column-wise table reads its features once per shard) keeps the spec's order,
        which TorchRec then permutes."""
        sparse = block_order(sparse_keys, sparse_key_blocks(spec)) if sparse_keys else None
        text = block_order(text_keys, text_key_blocks(spec)) if text_keys else None
        return KjtOrder(tuple(sparse) if sparse else None, tuple(text) if text else None)
