"""A plain-PyTorch stand-in for TorchRec's EmbeddingBagCollection, so the very same recsys model code can be timed
without TorchRec (the throughput benchmark's reference implementation).

`PlainEBC(configs)` takes the same `EmbeddingBagConfig`s the model builds, holds one `nn.EmbeddingBag` per table
(features that share a table -- e.g. `item_id` and the 20 history positions -- read the same bag in ONE call) and
maps a KeyedJaggedTensor to a KeyedTensor, like `EmbeddingBagCollection.forward`. Gradients are sparse, so
`torch.optim.Adagrad` (or SparseAdam) updates only the rows a batch touched and DDP all-reduces sparse tensors.

`build_plain_task(spec)` returns the recsys `TrainTask` around an `SRFoundationModel` built on it, plus the two
torch.optim optimisers (sparse Adagrad for the tables, Adam for the dense part) the reference trains with.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


class PlainEBC(nn.Module):
    def __init__(self, configs: List[EmbeddingBagConfig], sparse: bool = True):
        super().__init__()
        self.configs = list(configs)
        self.embedding_bags = nn.ModuleDict()
        for c in self.configs:
            mode = "mean" if c.pooling == PoolingType.MEAN else "sum"
            bag = nn.EmbeddingBag(c.num_embeddings, c.embedding_dim, mode=mode, sparse=sparse,
                                  include_last_offset=True)
            with torch.no_grad():
                if c.init_fn is not None:
                    c.init_fn(bag.weight)
                else:  # TorchRec's default table init
                    bound = math.sqrt(1.0 / c.num_embeddings)
                    bag.weight.uniform_(-bound, bound)
            self.embedding_bags[c.name] = bag
        self.feature_names: List[str] = [f for c in self.configs for f in c.feature_names]
        self.dims: Dict[str, int] = {f: c.embedding_dim for c in self.configs for f in c.feature_names}

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        keys = features.keys()
        where = {k: i for i, k in enumerate(keys)}
        batch = features.stride()
        values = features.values()
        lengths = features.lengths().view(len(keys), batch)
        key_offsets = features.offset_per_key()
        blocks: List[torch.Tensor] = []
        for c in self.configs:
            idx = [where[f] for f in c.feature_names]
            if idx == list(range(idx[0], idx[-1] + 1)):  # the table's keys are adjacent in the KJT: no copy
                vals = values[key_offsets[idx[0]]:key_offsets[idx[-1] + 1]]
                lens = lengths[idx[0]:idx[-1] + 1].reshape(-1)
            else:
                vals = torch.cat([values[key_offsets[i]:key_offsets[i + 1]] for i in idx])
                lens = lengths[idx].reshape(-1)
            offsets = torch.zeros(lens.numel() + 1, dtype=torch.long, device=vals.device)
            torch.cumsum(lens, 0, out=offsets[1:])
            out = self.embedding_bags[c.name](vals.long(), offsets)  # [n_features * B, D], feature-major
            # -> [B, n_features * D] in one reshape: slicing `out` per feature instead costs a full-size zero fill
            # per feature in backward (slice backward), which made this reference ~40% slower
            blocks.append(out.view(len(idx), batch, c.embedding_dim).transpose(0, 1).reshape(batch, -1))
        # configs hold their features in `self.feature_names` order, so the blocks line up with the keys
        names = self.feature_names
        return KeyedTensor(keys=names, length_per_key=[self.dims[f] for f in names],
                           values=torch.cat(blocks, dim=1), key_dim=1)


def build_plain_task(spec, embedding_optimizer: str = "adagrad") -> Tuple[nn.Module, List[torch.optim.Optimizer]]:
    """(TrainTask on the plain EBC, [table optimiser, dense optimiser]) for `spec`'s prepared data."""
    from recsys.models.build import spec_table_rows, text_tables_for, text_tokens_for
    from recsys.models.model import SRFoundationModel, TrainTask

    model = SRFoundationModel(spec, spec_table_rows(spec), text_tables_for(spec), ebc_factory=PlainEBC,
                              text_tokens=text_tokens_for(spec))
    task = TrainTask(model, spec)
    tables = list(model.l0.ebc.parameters())
    table_ids = {id(p) for p in tables}
    dense = [p for p in task.parameters() if id(p) not in table_ids and p.requires_grad]
    if embedding_optimizer == "sparse_adam":
        sparse_opt: torch.optim.Optimizer = torch.optim.SparseAdam(tables, lr=spec.train.embedding_lr)
    else:
        sparse_opt = torch.optim.Adagrad(tables, lr=spec.train.embedding_lr)
    dense_opt = torch.optim.Adam(dense, lr=spec.train.lr, weight_decay=spec.train.weight_decay, fused=True)
    return task, [sparse_opt, dense_opt]
