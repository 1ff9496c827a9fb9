"""Crash-safe checkpoints through torch.distributed.checkpoint.

Layout: `<output_dir>/checkpoints/step_<N>/` holds the DCP shards of {"model", "optim"} plus `manifest.json`
(step, epoch, the resolved spec and its hash, loader position, RNG state, metrics, and the byte size and sha256 of
every file written). A checkpoint is written into `step_<N>.tmp` and renamed only when every rank has finished and
the manifest is complete, so a crash mid-save leaves the previous checkpoint untouched; `latest_good` skips
anything truncated, damaged (digest mismatch) or half-written.

Trust: every file is checked against the manifest's digests before anything reads it, and `.metadata` (a pickle)
is then read by a restricted unpickler (`recsys.train.safe_dcp`), so a checkpoint cannot run code. The digests
detect damage; they cannot tell who wrote the folder (whoever can write the shards can write the manifest too).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from recsys.errors import CheckpointError
from recsys.fileio import sha256_file
from recsys.train import safe_dcp

log = logging.getLogger("recsys.train.checkpoint")
MANIFEST = "manifest.json"
_NAME = re.compile(r"step_\d+$")  # finished checkpoints; `.tmp` (half-written) and `.bad` (set aside) are not


FORMAT = 2  # 1: sizes only; 2: sizes and sha256 digests


def _file_sizes(folder: Path) -> Dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def _file_digests(folder: Path) -> Dict[str, Dict[str, Any]]:
    return {name: {"bytes": size, "sha256": sha256_file(folder / name)} for name, size in _file_sizes(folder).items()}


# verify() runs several times per load (latest_good, resume, load): a file whose size and mtime are unchanged since
# its digest matched is not hashed again in this process
_verified: Dict[str, tuple] = {}


def save(root: Path, step: int, model: torch.nn.Module, optimizer: Any, meta: Dict[str, Any], keep: int,
         protect: Optional[Path] = None, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Collective: every rank calls it. Returns the final folder. `extra`: more named state dicts to write beside
    "model" and "optim" (the training weights under a weight average: recsys/train/weight_average.py)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = root / f"step_{step:09d}"
    tmp = root / f"step_{step:09d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier()
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict(), **(extra or {})},
             checkpoint_id=str(tmp))
    _barrier()
    if rank == 0:
        manifest = dict(meta, step=step, files=_file_digests(tmp), format=FORMAT)
        with open(tmp / (MANIFEST + ".part"), "w") as f:
            json.dump(manifest, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp / (MANIFEST + ".part"), tmp / MANIFEST)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep, protect)
    _barrier()
    return final


def _prune(root: Path, keep: int, protect: Optional[Path]) -> None:
    done = sorted(list_checkpoints(root))
    for p in done[:-keep]:
        if protect is not None and p.resolve() == protect.resolve():
            continue
        shutil.rmtree(p, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def read_manifest(folder: Path) -> Dict[str, Any]:
    """The manifest of `folder` as a dict, or CheckpointError naming what is wrong with it."""
    mf = folder / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(mf.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{mf}: unreadable manifest (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mf}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise CheckpointError(f"{mf}: not a checkpoint manifest (expected a JSON object with a 'files' object)")
    return manifest


def verify(folder: Path) -> Dict[str, Any]:
    """The manifest of a complete, undamaged checkpoint, or CheckpointError saying what is wrong: a missing or
    unreadable manifest, a missing, truncated or changed file (sha256 digest), a file the manifest does not list."""
    manifest = read_manifest(folder)
    files = manifest.get("files", {})
    if ".metadata" not in files:
        raise CheckpointError(f"{folder / MANIFEST}: lists no .metadata file")
    for name, entry in files.items():
        size, digest = (entry.get("bytes"), entry.get("sha256")) if isinstance(entry, dict) else (entry, None)
        p = folder / name
        if not safe_dcp.plain_file_name(name):
            raise CheckpointError(f"{folder / MANIFEST}: file name {name!r} is not a plain file name")
        if not p.is_file():
            raise CheckpointError(f"{folder}: missing file {name}")
        st = p.stat()
        if st.st_size != size:
            what = "truncated" if isinstance(size, int) and st.st_size < size else "changed size"
            raise CheckpointError(f"{p}: {what} ({st.st_size} of {size} bytes)")
        if digest is None:
            continue  # format 1: sizes only (warned below)
        stamp = (st.st_size, st.st_mtime_ns, digest)
        if _verified.get(str(p)) == stamp:
            continue
        if sha256_file(p) != digest:
            raise CheckpointError(f"{p}: damaged (sha256 differs from the manifest's; the file changed after the "
                                  f"save)")
        _verified[str(p)] = stamp
    if manifest.get("format", 1) < FORMAT:
        log.warning("%s: written before checkpoints had digests (format %s): only file sizes were checked", folder,
                    manifest.get("format", 1))
    return manifest


def list_checkpoints(root: Path) -> List[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir() and _NAME.match(p.name)), reverse=True)


def latest_good(root: Path) -> Optional[Path]:
    """Newest checkpoint that verifies; broken ones are reported and skipped."""
    for p in list_checkpoints(root):
        try:
            verify(p)
            return p
        except CheckpointError as e:
            log.warning("skipping bad checkpoint: %s", e)
    return None


def set_aside_newer(root: Path, chosen: Path) -> List[Path]:
    """Rename every checkpoint newer than `chosen` (the ones `latest_good` skipped as broken) to `<name>.bad`, so
    the resumed run neither counts them when pruning nor mistakes them for its own later checkpoints."""
    moved: List[Path] = []
    for p in list_checkpoints(root):
        if p.name > chosen.name:
            bad = p.with_name(p.name + ".bad")
            if bad.exists():
                shutil.rmtree(bad)
            os.replace(p, bad)
            log.warning("set aside %s as %s (resuming from the older %s)", p.name, bad.name, chosen.name)
            moved.append(bad)
    return moved


# Spec keys a resume may change without being asked: how often to log/save/keep, how far to train, where files
# live (a moved run folder or data folder). Anything else continues the run with other settings than it started.
RESUME_MAY_CHANGE = ("description", "train.epochs", "train.log_every_steps", "train.checkpoint_every_steps",
                     "train.keep_checkpoints", "train.loader_workers", "train.live_metrics_window",
                     "train.eval_batch_size", "data.raw_dir",
                     "data.prepared_dir", "text.cache_dir", "train.output_dir", "text.encoder.batch_size",
                     "text.encoder.device")


def table_shapes(spec: Any, rows: Dict[str, int]) -> Dict[str, List[int]]:
    """table -> [rows, dim], as manifests record them and `check_resumable` compares them."""
    dims = {t.name: t.dim for t in spec.tables}
    return {name: [int(n), int(dims.get(name, -1))] for name, n in rows.items()}


def check_resumable(folder: Path, manifest: Dict[str, Any], *, tables: Dict[str, List[int]], world_size: int,
                    batch_size: int, seed: int, spec_values: Optional[Dict[str, Any]] = None,
                    allow_spec_change: bool = False) -> None:
    """CheckpointError naming the first difference that makes `folder` unable to continue this run: table shapes
    (another spec), or world size / global batch size / seed (the saved loader position counts batches of one
    rank's stream, which depends on all three); then, unless `allow_spec_change`, every other spec value that
    differs from the one the checkpoint was trained with (`spec_values`: `resolved_values` of this run's spec)."""
    saved = manifest.get("tables")
    if saved is not None:
        for name in sorted(set(saved) | set(tables)):
            if name not in saved or name not in tables:
                where = "checkpoint" if name not in saved else "spec"
                raise CheckpointError(f"{folder}: table {name!r} is missing from the {where}; this checkpoint was "
                                      f"written by a different spec")
            (r0, d0), (r1, d1) = saved[name], tables[name]
            if (r0, d0) != (r1, d1):
                raise CheckpointError(f"{folder}: table {name!r} is {r0} rows x dim {d0} in the checkpoint but "
                                      f"{r1} x {d1} in this spec; it was written by a different spec (use a new "
                                      f"train.output_dir, or jobs/finetune.py to transfer weights)")
    for key, mine in (("world_size", world_size), ("batch_size", batch_size), ("seed", seed)):
        if key in manifest and manifest[key] != mine:
            raise CheckpointError(f"{folder}: saved with {key}={manifest[key]}, this run has {key}={mine}; an "
                                  f"exact resume needs the same value (or start a new train.output_dir)")
    saved_spec = manifest.get("spec")
    if spec_values is None or allow_spec_change:
        return
    if not isinstance(saved_spec, dict):
        log.warning("%s: written before manifests held the spec; cannot check that --resume uses the same one",
                    folder)
        return
    from recsys.spec.loader import spec_differences

    diff = spec_differences(saved_spec, spec_values, ignore=RESUME_MAY_CHANGE)
    if diff:
        more = f" (+{len(diff) - 5} more)" if len(diff) > 5 else ""
        raise CheckpointError(f"{folder}: this spec differs from the one the run was trained with: "
                              f"{'; '.join(diff[:5])}{more}; pass --allow-spec-change to continue the run with "
                              f"these settings, or use a new train.output_dir")


def resolve(path: Path) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder (-> its newest good checkpoint)."""
    path = Path(path)
    if (path / MANIFEST).exists() or path.name.startswith("step_"):
        verify(path)
        return path
    for root in (path / "checkpoints", path):
        found = latest_good(root)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: no complete checkpoint found")


def best_or_latest(path: Path) -> Path:
    """A run folder's best checkpoint (by valid metric, from train_summary.json), else `resolve(path)`.

    The summary names the best checkpoint relative to the run folder (older runs wrote an absolute path: only its
    `step_<N>` name is used), so a copied or moved run folder reads its own checkpoint, never the original's."""
    path = Path(path)
    summary = path / "train_summary.json"
    if summary.is_file():
        try:
            best = json.loads(summary.read_bytes().decode("utf-8")).get("best_checkpoint")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{summary}: unreadable run summary ({type(e).__name__})") from None
        if best:
            mine = path / "checkpoints" / Path(str(best)).name
            if mine.is_dir():
                verify(mine)  # the best one damaged is an error, not a silent switch to another checkpoint
                return mine
            log.warning("%s: its best checkpoint %s is gone; using the newest good one", summary, mine.name)
    return resolve(path)


def best_relative(ckpt: Optional[str]) -> Optional[str]:
    """How a run folder's files name one of its checkpoints: relative to the run folder."""
    if not ckpt:
        return ckpt
    return str(Path("checkpoints") / Path(ckpt).name)


def _metadata(folder: Path):
    manifest = read_manifest(folder)
    return safe_dcp.read_metadata(folder, allowed_files=manifest.get("files", {}).keys())


def saved_keys(folder: Path) -> set:
    """Flattened state-dict keys a DCP checkpoint holds (e.g. `optim.state.<param>.exp_avg`)."""
    return set(_metadata(folder).state_dict_metadata)


def _check_model_shapes(folder: Path, model_state: Dict[str, Any]) -> None:
    """CheckpointError naming the first model tensors whose saved global shape differs from this model's, or that
    one side lacks -- before DCP, whose own failure comes with per-rank tracebacks in the log."""
    saved = _metadata(folder).state_dict_metadata
    problems: List[str] = []
    for name, value in model_state.items():
        meta = saved.get(f"model.{name}")
        shape = getattr(meta, "size", None)
        if meta is None:
            problems.append(f"{name} is not in the checkpoint")
        elif shape is not None and hasattr(value, "size") and tuple(value.size()) != tuple(shape):
            problems.append(f"{name} is {list(shape)} in the checkpoint but {list(value.size())} in this model")
    extra = sorted(k[len("model."):] for k in saved if k.startswith("model.") and k[len("model."):] not in model_state)
    problems += [f"{k} is in the checkpoint but not in this model" for k in extra]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{folder}: does not match this model: {'; '.join(problems[:3])}{more}; it was written "
                              f"by a different spec")


def load(folder: Path, model: torch.nn.Module, optimizer: Optional[Any] = None,
         extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Collective. Loads weights (and the optimiser state when given) in place; returns the manifest. `extra`: named
    state dicts `save` wrote beside them, loaded in place into the tensors given."""
    manifest = verify(folder)
    state: Dict[str, Any] = {"model": model.state_dict()}
    _check_model_shapes(folder, state["model"])
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    state.update(extra or {})  # one its checkpoint lacks fails below as a CheckpointError naming the key
    try:
        safe_dcp.load(state, folder, allowed_files=manifest["files"].keys())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # per-rank tracebacks wrapped in a BaseException
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: does not match this model ({first[:300]})") from None
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    return manifest
