"""Names the loader and the model agree on: the KJT key order and which table each key reads."""
from __future__ import annotations

from typing import Dict, List

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
    keys: List[str] = []
    for f in spec.features:
        if f.kind in ("id", "sparse") or is_bucketized(f):
            keys.append(f.name)
    for f in spec.features:
        if f.kind == "sequence":
            keys.extend(sequence_kjt_keys(f))
    return keys


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
    keys: List[str] = []
    for f in spec.features:
        if f.kind == "text":
            keys.extend(sequence_keys(f.name, f.max_len) if f.sequence else [f.name])
    return keys


def context_features(spec: Spec) -> List[str]:
    """Features read from a ranking request's context (user and query side, not from a side table): every candidate
    of one request has the same values of them, so serving looks them up once per request (`RequestGroups`)."""
    return [f.name for f in spec.features if f.side != "item" and getattr(f, "source", None) is None]


def active_domains(spec: Spec) -> List[str]:
    """Domains trained and evaluated: all, or only `model.single_domain`."""
    if spec.model.single_domain:
        return [spec.model.single_domain]
    return [d.name for d in spec.domains]
