"""Warm-start a (possibly larger) model from a pretrained checkpoint: the fine-tuning path.

The checkpoint is read through torch.distributed.checkpoint into a plain, unsharded copy of the *pretraining*
model (DCP reshards on load), built from the `spec.resolved.yaml` saved in its run folder. Every tensor of the new
model is then filled from it:
- same name and shape: copied as is (tables, towers, projections);
- per-domain tensors (domain embeddings, heads, STAR/MMoE/PLE per-domain blocks), whose first dimension is
  blocks of rows per domain: rows are matched by domain *name*, so a spec may add, drop or reorder domains. A new
  domain starts from the mean of the pretrained domains of the same kind (search or rec), else of all domains —
  a sensible zero-shot start rather than noise;
- the frozen text tables are not copied: the new model's were written from the text cache for the new spec's texts
  (which may be more than the pretraining's) in the *pretrained* projection (`pretrained_text_projection`, passed
  to the Trainer), so a text keeps the vector the pretrained layers learnt on;
- anything else keeps its fresh initialisation and is reported.
Sharded embedding tables receive, on each rank, exactly the slice of rows/columns that rank holds.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from recsys.errors import CheckpointError
from recsys.models.build import build_model
from recsys.models.model import TrainTask
from recsys.spec.config import Spec
from recsys.spec.loader import load_spec
from recsys.train import checkpoint, safe_dcp
from recsys.train.frozen_text import is_text_table_key

log = logging.getLogger("recsys.train.transfer")


def pretrained_spec(ckpt: Path, manifest: Optional[Dict] = None) -> Spec:
    """The spec a checkpoint was trained with: the resolved spec its manifest holds, else (checkpoints written
    before manifests held it) its run folder's `spec.resolved.yaml`."""
    saved = (manifest or {}).get("spec")
    if isinstance(saved, dict):
        try:
            return Spec.model_validate(saved)
        except ValueError as e:
            raise CheckpointError(f"{ckpt / checkpoint.MANIFEST}: its spec does not validate "
                                  f"({str(e).splitlines()[0][:200]})") from None
    resolved = ckpt.parent.parent / "spec.resolved.yaml"
    if not resolved.is_file():
        raise CheckpointError(f"{ckpt}: no spec.resolved.yaml in its run folder {ckpt.parent.parent}")
    return load_spec(resolved)


def load_pretrained_state(ckpt: Path) -> Tuple[Spec, Dict[str, torch.Tensor]]:
    """Full (unsharded) tensors of a checkpoint's model, keyed like the TrainTask state dict."""
    manifest = checkpoint.verify(ckpt)
    old_spec = pretrained_spec(ckpt, manifest)
    old = TrainTask(build_model(old_spec, torch.device("cpu")), old_spec)
    state = {"model": old.state_dict()}
    try:
        safe_dcp.load(state, ckpt, allowed_files=manifest["files"].keys())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        msg = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt}: cannot be read with its own spec ({msg})") from None
    return old_spec, state["model"]


def pretrained_text_projection(old_state: Dict[str, torch.Tensor]):
    """The text projection a pretrained model's frozen tables were written with (None: no LLM text)."""
    from recsys.models.encoding import projection_from_buffers

    center, basis = old_state.get("model.l0.text_projection.center"), old_state.get("model.l0.text_projection.basis")
    if center is None or basis is None:
        return None
    return projection_from_buffers(center, basis)


def rows_pretraining_updated(old_spec: Spec, rows: Dict[str, int]) -> Dict[str, np.ndarray]:
    """Table -> bool per row: looked up by at least one training row of the pretraining (its domains, held-out
    domains, row filter and prepared data). A row no training row looks up never got a gradient, so it still
    holds its random initialisation; freezing it would serve noise (see EmbeddingEncoder.freeze_tables)."""
    from recsys.data.features import table_of_key
    from recsys.data.loader import BatchLoader

    seen = {t: np.zeros(n, dtype=bool) for t, n in rows.items()}
    key_table = table_of_key(old_spec)
    loader = BatchLoader(old_spec, "train", batch_size=65536, shuffle=False, eval_mode=True)
    for batch in loader:
        for key, jt in batch.sparse.to_dict().items():
            table = key_table.get(key)
            if table in seen:
                v = jt.values().numpy()
                seen[table][v[v < len(seen[table])]] = True
    return seen


def _domain_map(old: Spec, new: Spec) -> List[List[int]]:
    """For each new domain, the old domain rows to average (one row when the domain existed before)."""
    old_names = [d.name for d in old.domains]
    out = []
    for d in new.domains:
        if d.name in old_names:
            out.append([old_names.index(d.name)])
        else:
            same_kind = [i for i, o in enumerate(old.domains) if o.kind == d.kind]
            out.append(same_kind or list(range(len(old.domains))))
    return out


def _remap_domain_blocks(t: torch.Tensor, n_old: int, n_new: int, mapping: List[List[int]]) -> torch.Tensor:
    block = t.shape[0] // n_old
    parts = t.reshape(n_old, block, *t.shape[1:])
    rows = [parts[idx].mean(0) if len(idx) > 1 else parts[idx[0]] for idx in mapping]
    return torch.stack(rows).reshape(n_new * block, *t.shape[1:])


_PLE_SPECIFIC = re.compile(r"^(.*\.specific\.)(\d+)(\..*)$")


def transfer_into(dmp: torch.nn.Module, new_spec: Spec, old_spec: Spec, old_state: Dict[str, torch.Tensor]) -> Dict:
    """Fill `dmp` (the new, sharded model) from the old full state. Returns a report of what was done."""
    n_old, n_new = len(old_spec.domains), len(new_spec.domains)
    mapping = _domain_map(old_spec, new_spec)
    nsp = new_spec.model.num_specific_experts
    new_state = dmp.state_dict()
    report = {"copied": [], "domain_remapped": [], "fresh": [], "text_tables": []}
    for key, target in new_state.items():
        if is_text_table_key(key):
            report["text_tables"].append(key)
            continue
        src = old_state.get(key)
        m = _PLE_SPECIFIC.match(key)
        if m and n_old != n_new:  # PLE: expert i belongs to domain i // nsp
            i = int(m.group(2))
            d_new, j = divmod(i, nsp)
            src_i = mapping[d_new][0] * nsp + j
            src = old_state.get(f"{m.group(1)}{src_i}{m.group(3)}")
        if src is None:
            report["fresh"].append(key)
            continue
        full_shape = tuple(target.size()) if hasattr(target, "size") else tuple(target.shape)
        if tuple(src.shape) != full_shape:
            if (src.dim() >= 1 and src.shape[0] % n_old == 0 and n_old != n_new
                    and full_shape[0] == src.shape[0] // n_old * n_new and tuple(src.shape[1:]) == full_shape[1:]):
                src = _remap_domain_blocks(src, n_old, n_new, mapping)
                report["domain_remapped"].append(key)
            else:
                raise CheckpointError(f"{key}: pretrained shape {tuple(src.shape)} does not fit {full_shape}; "
                                      f"fine-tuning must keep the pretrained tables (same data.prepared_dir "
                                      f"vocabularies) and model sizes")
        else:
            report["copied"].append(key)
        _copy_into(target, src)
    dmp.load_state_dict(new_state)
    if report["fresh"]:
        log.info("fresh parameters (not in the checkpoint): %s", report["fresh"])
    log.info("transfer: %d copied, %d remapped by domain, %d fresh", len(report["copied"]),
             len(report["domain_remapped"]), len(report["fresh"]))
    return report


def _copy_into(target, full: torch.Tensor) -> None:
    """Copy a full tensor into a plain tensor or into this rank's shards of a ShardedTensor / DTensor."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad():
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                sl = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                shard.tensor.copy_(full[sl])
        elif hasattr(target, "to_local") and hasattr(target, "placements"):  # DTensor
            from torch.distributed.tensor import distribute_tensor

            target.to_local().copy_(distribute_tensor(full.to(target.device), target.device_mesh,
                                                      target.placements).to_local())
        else:
            target.copy_(full.to(target.device))
