"""The one batch type that flows from the loader into the model (and through TrainPipelineSparseDist)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from recsys.data.features import sequence_keys


@dataclass
class RequestGroups:
    """Rows that share one context: the candidates of one ranking request (serving), each request's rows contiguous
    and the requests in order. The context features (`recsys.data.features.context_features`: user id, histories,
    query) are the same in every row of a request, so their KJT keys (id and text) carry values only in each
    request's first row and the model reads them from there: a 100-candidate request looks its 20-item histories up
    once, not 100 times, and attends over each history with one [candidates, D] x [D, L] product
    (`recsys.models.attention.grouped_target_attention`). Everything else in the batch (dense, `text` rows,
    `seq_lengths`, labels, domain) stays per row."""

    owner: torch.Tensor  # [B] int64: the request of each row
    first: torch.Tensor  # [R] int64: the first row of each request (where its context features are)
    source: torch.Tensor  # [B] int64: first[owner], the row each row reads its context from
    pos: torch.Tensor  # [B] int64: the row's position inside its request
    size: int  # rows of the largest request
    uniform: bool  # every request has `size` rows, so [B, ...] is [R, size, ...] as it is

    @staticmethod
    def from_owner(owner: Sequence[int]) -> "RequestGroups":
        o = np.asarray(owner, dtype=np.int64)
        # starting at 0 and stepping by 0 or 1, no request number is skipped: every count below is positive
        if len(o) == 0 or o[0] != 0 or np.any(np.diff(o) < 0) or np.any(np.diff(o) > 1):
            raise ValueError("owner must number the requests 0, 1, ... with each request's rows contiguous")
        counts = np.bincount(o)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        pos = np.arange(len(o), dtype=np.int64) - first[o]
        t = torch.from_numpy
        return RequestGroups(owner=t(o), first=t(first), source=t(first[o]), pos=t(pos), size=int(counts.max()),
                             uniform=bool((counts == counts[0]).all()))

    @property
    def first_mask(self) -> np.ndarray:
        """[B] bool: the rows that hold their request's context."""
        m = np.zeros(len(self.owner), dtype=bool)
        m[self.first.numpy()] = True
        return m

    def to(self, device: torch.device, non_blocking: bool = False) -> "RequestGroups":
        mv = lambda t: t.to(device=device, non_blocking=non_blocking)  # noqa: E731
        return RequestGroups(owner=mv(self.owner), first=mv(self.first), source=mv(self.source), pos=mv(self.pos),
                             size=self.size, uniform=self.uniform)


@dataclass
class Batch(Pipelineable):
    """A batch of impressions.

    sparse:   KJT, keys = id and sparse feature names plus `<seq>@<i>` per sequence position, values = table rows
              (already mapped: 0 = unseen/missing id). Key order is fixed by `recsys.data.features.kjt_keys(spec)`.
    dense:    [B, n_dense] float32, columns in spec order of dense features (already transformed), then two per
              train count (`statistics.counts`: log1p count, unknown flag) and history match (`statistics.matches`:
              log1p matches, unknown flag; recsys.data.statistics).
    text:     text feature name -> int64 rows into its text table (0 = no text): [B] or [B, max_len] for sequences.
    seq_lengths: sequence feature name -> [B] int64 number of valid positions.
    labels:   [B] float32 in {0, 1}.
    domain:   [B] int64 index into spec.domains.
    row_id:   [B] int64 global row number in the split file (for predictions in file order and quarantine).
    text_ids: KJT of the same text rows for the frozen text tables (mode llm): one key per scalar text feature and
              per history position (`recsys.data.features.text_kjt_keys`), one value each. Built from `text` when
              not given, so every producer of batches (loader, serving, benchmarks) feeds the same lookup path.
    groups:   serving only (None in training and batch scoring): rows that share a context, whose context features
              are in the KJTs once per group (`RequestGroups`).
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    text: Dict[str, torch.Tensor]
    seq_lengths: Dict[str, torch.Tensor]
    labels: torch.Tensor
    domain: torch.Tensor
    row_id: torch.Tensor
    user: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # user key for GAUC
    text_ids: Optional[KeyedJaggedTensor] = None
    groups: Optional[RequestGroups] = None

    def __post_init__(self) -> None:
        # grouped rows (serving) read the text tables per request and need no per-row text KJT
        if self.text_ids is None and self.text and self.groups is None:
            self.text_ids = text_rows_kjt(self.text)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        mv = lambda t: t.to(device=device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            dense=mv(self.dense),
            text={k: mv(v) for k, v in self.text.items()},
            seq_lengths={k: mv(v) for k, v in self.seq_lengths.items()},
            labels=mv(self.labels),
            domain=mv(self.domain),
            row_id=mv(self.row_id),
            user=mv(self.user),
            text_ids=self.text_ids.to(device=device, non_blocking=non_blocking) if self.text_ids is not None else None,
            groups=self.groups.to(device, non_blocking) if self.groups is not None else None,
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)
        if self.text_ids is not None:
            self.text_ids.record_stream(stream)
        for t in [self.dense, self.labels, self.domain, self.row_id, self.user, *self.text.values(),
                  *self.seq_lengths.values()]:
            t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            sparse=self.sparse.pin_memory(),
            dense=self.dense.pin_memory(),
            text={k: v.pin_memory() for k, v in self.text.items()},
            seq_lengths={k: v.pin_memory() for k, v in self.seq_lengths.items()},
            labels=self.labels.pin_memory(),
            domain=self.domain.pin_memory(),
            row_id=self.row_id.pin_memory(),
            user=self.user.pin_memory(),
            text_ids=self.text_ids.pin_memory() if self.text_ids is not None else None,
            groups=self.groups,
        )

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def text_rows_kjt(text: Dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    """Text rows ([B] per scalar feature, [B, L] per history) -> KJT with one single-valued key per feature or
    history position (`recsys.data.features.sequence_keys`), key-major."""
    keys = []
    for name, rows in text.items():
        keys.extend([name] if rows.dim() == 1 else sequence_keys(name, rows.shape[1]))
    if not text:
        flat = torch.empty(0, dtype=torch.long)
        return KeyedJaggedTensor(keys=keys, values=flat, lengths=torch.ones_like(flat))
    if all(rows.device.type == "cpu" for rows in text.values()):
        # numpy, in the calling thread: torch splits a CPU copy of more than 32k values over its intra-op threads,
        # and while another process holds the other core each such region waits for it. On the 2-core benchmark
        # machine torch.cat + ones_like here took 18 ms a MovieLens batch (4096 rows x 32 text rows), ~70% of a
        # loader epoch; numpy does the same copies in well under 1 ms.
        parts = [r.numpy() if r.dim() == 1 else r.numpy().T.reshape(-1) for r in text.values()]
        flat_np = np.concatenate(parts).astype(np.int64, copy=False)
        return KeyedJaggedTensor(keys=keys, values=torch.from_numpy(flat_np),
                                 lengths=torch.from_numpy(np.ones(len(flat_np), dtype=np.int64)))
    values = [rows if rows.dim() == 1 else rows.t().reshape(-1) for rows in text.values()]
    flat = torch.cat(values).long()
    return KeyedJaggedTensor(keys=keys, values=flat, lengths=torch.ones_like(flat))
