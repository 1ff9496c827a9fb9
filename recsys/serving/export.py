"""Checkpoint -> bundle (see recsys.serving.bundle for the layout).

The checkpoint is read into an unsharded model in this one process: torch.distributed.checkpoint reshards on load,
so a checkpoint written by any number of ranks gives the same weights. The bundle then holds the weights as
safetensors (embedding tables optionally in TorchRec's int8/fp16 layout), the resolved schema the model was trained
on (refused when the checkpoint recorded another one), the catalogue's feature columns, the text tables the model
reads, and a reference to the text encoder for texts the catalogue lacks.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict

import pyarrow.parquet as pq
import torch

from recsys.data import paths, schema as row_schema
from recsys.data.resolved import check_checkpoint_schema, schema_for
from recsys.errors import RecsysError
from recsys.serving import bundle as B
from recsys.serving.quantize import QUANTIZE_CHOICES, quantize_tables, table_bytes
from recsys.spec.config import Spec

log = logging.getLogger("recsys.serving.export")


def load_checkpoint_unsharded(spec: Spec, checkpoint_path: Path):
    """(SRFoundationModel on CPU holding the checkpoint's weights, checkpoint folder, its manifest)."""
    from recsys.models.build import build_model, spec_table_rows
    from recsys.models.model import TrainTask
    from recsys.train import checkpoint

    chosen = checkpoint.best_or_latest(Path(checkpoint_path))
    manifest = checkpoint.verify(chosen)
    check_checkpoint_schema(schema_for(spec), manifest.get("schema_sha256"), str(chosen))
    task = TrainTask(build_model(spec, torch.device("cpu"), spec_table_rows(spec)), spec)
    checkpoint.load(chosen, task)
    task.eval()
    return task.model, chosen, manifest


def split_text_tables(spec: Spec, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The text tables the model reads, taken out of `state`: modes llm and hybrid, the frozen (projected) rows held
    by the text EBC; mode random, the hashed token ids (a non-persistent buffer, read for the spec); mode hybrid
    also the token ids, under `B.TOKENS_PREFIX + <table>`."""
    out: Dict[str, torch.Tensor] = {}
    if spec.text.frozen:
        from recsys.models.tables import text_table_name

        out.update({name: state.pop(f"l0.text_ebc.embedding_bags.{text_table_name(name)}.weight")
                    for name in spec.used_text_tables()})
    if spec.text.tokens:
        from recsys.models.build import text_token_tables_for

        prefix = B.TOKENS_PREFIX if spec.text.frozen else ""
        out.update({prefix + k: torch.from_numpy(v) for k, v in text_token_tables_for(spec).items()})
    return out


def catalogue_columns(spec: Spec, side_table: str):
    st = next(s for s in spec.data.side_tables if s.name == side_table)
    cols = [st.key] + [f.column for f in spec.features if getattr(f, "source", None) == side_table]
    return list(dict.fromkeys(cols))


def export_bundle(spec: Spec, checkpoint_path: Path, out: Path, quantize: str = "none",
                  force: bool = False) -> Dict[str, Any]:
    """Write the bundle folder `out`; returns its manifest."""
    from recsys.serving.encoder_ref import encoder_reference
    from recsys.spec.loader import dump_resolved, load_spec, spec_hash

    if quantize not in QUANTIZE_CHOICES:
        raise RecsysError(f"--quantize: expected one of {'|'.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise RecsysError(f"--out {out}: exists and is not empty (use --force to replace it)")
    t0 = time.perf_counter()
    model, chosen, ck_manifest = load_checkpoint_unsharded(spec, checkpoint_path)
    float_bytes = table_bytes(model.state_dict())
    model.l0.ebc = quantize_tables(model.l0.ebc, quantize)
    state = dict(model.state_dict())
    text = split_text_tables(spec, state)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # the spec as trained; serving runs the dense layers in fp32 (quantisation only touches the tables)
    (tmp / B.SPEC_FILE).write_text(dump_resolved(spec))
    served = load_spec(tmp / B.SPEC_FILE, ["train.precision=fp32"])
    (tmp / B.SPEC_FILE).write_text(dump_resolved(served))
    resolved = schema_for(spec)
    resolved.copy_to(tmp / B.SCHEMA_DIR)
    (tmp / B.CATALOGUE_DIR).mkdir()
    for st in spec.data.side_tables:
        if any(getattr(f, "source", None) == st.name for f in spec.features):
            p = paths.side_table_path(spec, st.name)
            row_schema.check_file(p, row_schema.side_columns(spec, st.name))
            pq.write_table(pq.read_table(p, columns=catalogue_columns(spec, st.name)),
                           tmp / B.CATALOGUE_DIR / f"{st.name}.parquet", compression="zstd")
    if text:
        B.save_tensors(tmp / B.TEXT_FILE, text)
    B.save_tensors(tmp / B.WEIGHTS_FILE, state)
    manifest = {
        "format": B.FORMAT, "name": spec.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spec_fingerprint": spec_hash(spec, paths=False), "schema_sha256": resolved.sha256,
        "training_commit": ck_manifest.get("commit", "unrecorded"),
        "recsys_version": ck_manifest.get("recsys_version"),
        "checkpoint": {"name": chosen.name, "step": ck_manifest.get("step"), "world_size": ck_manifest.get("world_size"),
                       "valid_metric": ck_manifest.get("best_metric")},
        "quantize": quantize, "precision": "fp32",
        "table_bytes": {"float32": float_bytes, "bundle": table_bytes(state)},
        "encoder": encoder_reference(spec),
        "files": B.list_files(tmp),
    }
    (tmp / B.MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("bundle %s: %.1f MB, tables %.1f MB (%s), from %s in %.1fs", out, size / 1e6,
             manifest["table_bytes"]["bundle"] / 1e6, quantize, chosen, time.perf_counter() - t0)
    return manifest
