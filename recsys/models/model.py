"""The S&R foundation model, assembled from a spec. Its children are exactly `l0`, `l1`, `l2`, so every parameter
name starts with its level and fine-tuning can freeze by prefix."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.data.batch import Batch
from recsys.models.encoding import SIDES, TextEmbeddingBagCollection, UserQueryItemEncoder
from recsys.models.fusion import AspectGatingFusion
from recsys.models.precision import dense_autocast
from recsys.models.regularizers import divergence
from recsys.models.tables import embedding_bag_configs, text_table_configs, text_table_name
from recsys.models.towers import DomainHeads, build_tower
from recsys.spec.config import Spec

if TYPE_CHECKING:
    from recsys.text.frozen import TextProjection


class DomainAdaptiveMultiTask(nn.Module):
    """L2: feature crosses of the fused sides -> tower (domain adaptive layer or a baseline) -> per-domain heads."""

    def __init__(self, spec: Spec, sides: List[str], num_interactions: int):
        super().__init__()
        m = spec.model
        self.sides = sides
        self.num_domains = len(spec.domains)
        dim = m.dim
        self.crosses = [s for s in sides if s != "item"] if "item" in sides else []
        in_dim = dim * (len(sides) + len(self.crosses)) + num_interactions
        self.tower = build_tower(m.tower, in_dim, m.hidden, self.num_domains, m.num_experts, m.num_specific_experts,
                                 m.dropout, m.domain_adaptive)
        self.heads = DomainHeads(m.hidden[-1], num_interactions, self.num_domains)
        self.regularizer = m.regularizer

    def forward(self, fused: Dict[str, torch.Tensor], interactions: torch.Tensor, domain: torch.Tensor):
        parts = [fused[s] for s in self.sides] + [fused[s] * fused["item"] for s in self.crosses] + [interactions]
        h, z = self.tower(torch.cat(parts, dim=1), domain)
        logits = self.heads(h, interactions, domain)
        # over the global batch (one collective when distributed), so 1 and N ranks train the same objective
        reg = (divergence(self.regularizer, z, domain, self.num_domains, across_ranks=True) if self.training
               else logits.new_zeros(()))
        return logits, reg, z


def load_text_weights(text_ebc: nn.Module, text_tables: Dict[str, np.ndarray]) -> None:
    """Copy frozen text rows into an unsharded text EBC (a sharded one: recsys.train.frozen_text)."""
    with torch.no_grad():
        for name, rows in text_tables.items():
            weight = text_ebc.embedding_bags[text_table_name(name)].weight
            weight.copy_(torch.from_numpy(np.array(rows)).to(weight.device))


@dataclass
class ModelOutput:
    logits: torch.Tensor
    regularizer: torch.Tensor
    z: torch.Tensor  # L2's representation in the dtype it was computed in (bf16 under bf16 autocast)

    @property
    def representation(self) -> torch.Tensor:
        """z as float32. Cast when read, not in forward: a training step never reads it, and under bf16 autocast
        the cast was a pass over [B, hidden] every step."""
        return self.z.float()


class SRFoundationModel(nn.Module):
    def __init__(self, spec: Spec, table_rows: Dict[str, int], text_tables: Dict[str, np.ndarray],
                 device: Optional[torch.device] = None,
                 ebc_factory: Optional[Callable[[List[EmbeddingBagConfig]], nn.Module]] = None,
                 text_projection: Optional["TextProjection"] = None,
                 text_tokens: Optional[Dict[str, np.ndarray]] = None):
        """`text_tables`: modes llm and hybrid, the frozen text tables' rows (`recsys.text.frozen.FrozenText.tables`),
        copied into the text EBC unless it is on the meta device (then `fill_text_tables` fills the sharded copy);
        mode random, the hashed token ids. `text_tokens`: mode hybrid, the hashed token ids of the same tables.
        `text_projection`: the projection they were written with, kept as buffers for checkpoints and bundles.
        `ebc_factory` (configs -> module with the EmbeddingBagCollection interface: KJT in, KeyedTensor out)
        swaps TorchRec's EBC for another implementation, e.g. the plain-PyTorch reference of
        benchmarks/plain_reference.py; None keeps TorchRec's."""
        super().__init__()
        device = device or torch.device("meta")
        configs = embedding_bag_configs(spec, table_rows)
        ebc = ebc_factory(configs) if ebc_factory is not None else EmbeddingBagCollection(tables=configs, device=device)
        text_ebc = None
        if spec.text.frozen and text_tables:
            dims = {int(t.shape[1]) for t in text_tables.values()}
            if len(dims) != 1:
                raise ValueError(f"frozen text tables of different widths {sorted(dims)}: one projection makes them")
            text_configs = text_table_configs(spec, {n: int(t.shape[0]) for n, t in text_tables.items()},
                                              dims.pop())
            text_ebc = (ebc_factory(text_configs) if ebc_factory is not None
                        else TextEmbeddingBagCollection(tables=text_configs, device=device))
            if any(p.device.type != "meta" for p in text_ebc.parameters()):
                load_text_weights(text_ebc, text_tables)
        self.l0 = UserQueryItemEncoder(spec, ebc, text_tables, text_ebc, text_projection, text_tokens)
        sides = [s for s in SIDES if s in self.l0.aspect_names]
        self.l1 = AspectGatingFusion(spec.model.fusion, {s: self.l0.aspect_names[s] for s in sides},
                                     len(spec.domains), spec.model.dim)
        self.l2 = DomainAdaptiveMultiTask(spec, sides, self.l0.num_interactions)
        self.precision = spec.train.precision

    def forward(self, batch: Batch) -> ModelOutput:
        enc = self.l0(batch)
        # bf16 is a training-speed setting; evaluation and scoring run fp32 so that evaluate, a bundle's score and
        # the online service give the same numbers on every machine (auto picks bf16 only on some CPUs).
        with dense_autocast(self.precision, self.l2.heads.b, training=self.training):
            logits, reg, z = self.dense(enc.aspects, enc.interactions, batch.domain)
        return ModelOutput(logits.float(), reg.float(), z)

    def dense(self, aspects: Dict[str, torch.Tensor], interactions: torch.Tensor, domain: torch.Tensor):
        """L1 then L2: the part `train.compile` compiles as one graph (recsys/models/compiled.py)."""
        fused = self.l1(aspects, domain)
        return self.l2(fused, interactions, domain)


class TrainTask(nn.Module):
    """Wraps the model with its loss in the shape TrainPipelineSparseDist expects: forward(batch) ->
    (loss, (loss, logits, labels, domain, regularizer)).

    The loss is the sample-weighted BCE (weight = the domain's loss_weight) averaged over the local batch, plus
    reg_weight x divergence. Averaging per sample (not per domain) keeps 1 and N ranks on the same objective; the
    divergence is computed over the global batch for the same reason (recsys/models/regularizers.py)."""

    def __init__(self, model: SRFoundationModel, spec: Spec):
        super().__init__()
        self.model = model
        self.register_buffer("domain_weight", torch.tensor([d.loss_weight for d in spec.domains],
                                                           dtype=torch.float32), persistent=False)
        self.reg_weight = spec.model.reg_weight if spec.model.regularizer != "none" else 0.0

    def forward(self, batch: Batch):
        out = self.model(batch)
        bce = nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels, reduction="none")
        loss = (bce * self.domain_weight[batch.domain]).mean() + self.reg_weight * out.regularizer
        return loss, (loss.detach(), out.logits.detach(), batch.labels, batch.domain, out.regularizer.detach())
