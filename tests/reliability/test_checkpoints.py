"""Checkpoints: truncated, damaged (sha256) or half-written ones are detected and skipped (resume falls back to the
newest good one, with a warning), one written by a different spec is refused with a clear CheckpointError, and a
hostile `.metadata` pickle is refused without running it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest

from recsys.errors import CheckpointError
from recsys.train import checkpoint

from reliability_helpers import SPEC, assert_clean_error, job, small_overrides

ONE_EPOCH = {"train.epochs": 1, "train.max_steps": 6, "train.checkpoint_every_steps": 2}


# ---------------------------------------------------------------------------------------------- unit (no training)
def _fake(root: Path, step: int, payload: bytes = b"x" * 100) -> Path:
    d = root / f"step_{step:09d}"
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(payload)
    (d / ".metadata").write_bytes(b"meta")
    (d / checkpoint.MANIFEST).write_text(json.dumps({"step": step, "files": checkpoint._file_sizes(d)}))
    return d


def test_truncated_and_unfinished_checkpoints_are_skipped(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    good = _fake(root, 10)
    truncated = _fake(root, 20)
    with open(truncated / "__0_0.distcp", "r+b") as f:
        f.truncate(40)
    unfinished = _fake(root, 30)
    (unfinished / checkpoint.MANIFEST).unlink()
    (root / "step_000000040.tmp").mkdir()  # a save that died before its rename
    with caplog.at_level(logging.WARNING, logger="recsys.train.checkpoint"):
        assert checkpoint.latest_good(root) == good
    assert "no manifest.json" in caplog.text and "truncated (40 of 100 bytes)" in caplog.text
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.verify(truncated)
    moved = checkpoint.set_aside_newer(root, good)
    assert sorted(p.name for p in moved) == ["step_000000020.bad", "step_000000030.bad"]
    assert checkpoint.list_checkpoints(root) == [good]


def test_check_resumable_names_the_difference(tmp_path):
    manifest = {"tables": {"item": [100, 8], "user": [10, 4]}, "world_size": 2, "batch_size": 256, "seed": 1}
    ok = dict(tables={"item": [100, 8], "user": [10, 4]}, world_size=2, batch_size=256, seed=1)
    checkpoint.check_resumable(tmp_path, manifest, **ok)
    with pytest.raises(CheckpointError, match=r"table 'item' is 100 rows x dim 8 in the checkpoint but 100 x 16"):
        checkpoint.check_resumable(tmp_path, manifest, **dict(ok, tables={"item": [100, 16], "user": [10, 4]}))
    with pytest.raises(CheckpointError, match="table 'genre' is missing from the checkpoint"):
        checkpoint.check_resumable(tmp_path, manifest, **dict(ok, tables={**ok["tables"], "genre": [5, 4]}))
    with pytest.raises(CheckpointError, match="world_size=2, this run has world_size=4"):
        checkpoint.check_resumable(tmp_path, manifest, **dict(ok, world_size=4))


# ------------------------------------------------------------------------------------------ end to end (1 rank)
@pytest.fixture(scope="module")
def finished_run(ml_prepared, tmp_path_factory) -> Path:
    """A 6-step run with checkpoints at steps 2, 4 and 6 (6 = end of the epoch)."""
    out = tmp_path_factory.mktemp("rel_ckpt") / "run"
    proc = job("pretrain.py", ["--spec", str(SPEC), *small_overrides(ml_prepared, out, **ONE_EPOCH)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == [
        "step_000000006", "step_000000004", "step_000000002"]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


def test_resume_falls_back_past_a_truncated_shard(ml_prepared, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    newest = out / "checkpoints" / "step_000000006"
    shard = max((p for p in newest.glob("*.distcp")), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    proc = job("pretrain.py", ["--spec", str(SPEC), *small_overrides(ml_prepared, out, **ONE_EPOCH), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping bad checkpoint" in proc.stderr and "truncated" in proc.stderr
    assert "resumed from " + str(out / "checkpoints" / "step_000000004") in proc.stderr
    assert (out / "checkpoints" / "step_000000006.bad").is_dir()  # set aside, kept for a post-mortem
    checkpoint.verify(newest)  # and rewritten whole by the resumed run
    # the resumed epoch ends with the metrics the original run had
    assert json.loads((out / "train_summary.json").read_text())["history"] == \
        json.loads((finished_run / "train_summary.json").read_text())["history"]


@pytest.mark.parametrize("override, flags, needles", [
    ("tables.item.dim=16", [], ["table 'item' is", "dim 32 in the checkpoint", "x 16 in this spec", "different spec"]),
    # another model width is first a changed spec value; told to go on anyway, the shapes still cannot load
    ("model.dim=16", [], ["differs from the one the run was trained with: model.dim (8 -> 16)"]),
    ("model.dim=16", ["--allow-spec-change"], ["does not match this model", "l0.proj", "[8] in the checkpoint but [16]"]),
])
def test_checkpoint_of_another_spec_is_refused(ml_prepared, finished_run, tmp_path, override, flags, needles):
    out = _copy(finished_run, tmp_path)
    proc = job("pretrain.py", ["--spec", str(SPEC), *small_overrides(ml_prepared, out, **ONE_EPOCH),
                               "--set", override, "--resume", *flags])
    assert_clean_error(proc, str(out / "checkpoints" / "step_000000006"), *needles)


def test_existing_checkpoints_need_resume(ml_prepared, finished_run):
    proc = job("pretrain.py", ["--spec", str(SPEC), *small_overrides(ml_prepared, finished_run, **ONE_EPOCH)])
    assert_clean_error(proc, "already holds checkpoints", "--resume")


# ------------------------------------------------------------------------ trust and damage (issue 15 items 1, 4, 5, 9)
def _attacker_rewrites(ckpt: Path, name: str, data: bytes) -> None:
    """Replace one file and make the manifest agree (whoever writes a checkpoint can write its manifest too)."""
    (ckpt / name).write_bytes(data)
    mf = ckpt / checkpoint.MANIFEST
    manifest = json.loads(mf.read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    mf.write_text(json.dumps(manifest))


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _eval_args(ml_prepared, out: Path, ckpt: Path):
    return ["--spec", str(SPEC), *small_overrides(ml_prepared, out, **ONE_EPOCH), "--checkpoint", str(ckpt),
            "--split", "valid"]


def test_hostile_metadata_pickle_is_not_run(ml_prepared, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    ckpt = out / "checkpoints" / "step_000000006"
    marker = tmp_path / "pwned"
    _attacker_rewrites(ckpt, ".metadata", pickle.dumps(_RunsCode(marker)))
    checkpoint.verify(ckpt)  # the digests agree: they detect damage, not authorship
    with pytest.raises(CheckpointError, match="refusing to load posix.system"):
        checkpoint.saved_keys(ckpt)
    assert not marker.exists()
    proc = job("evaluate.py", _eval_args(ml_prepared, out, ckpt))
    assert_clean_error(proc, str(ckpt / ".metadata"), "unreadable checkpoint metadata", "refusing to load")
    assert not marker.exists()


@pytest.mark.parametrize("junk, needle", [
    (b"\x80\x04junk" * 50, "unreadable checkpoint metadata"),
    (pickle.dumps({"not": "metadata"}), r"not checkpoint metadata \(holds a dict\)"),
])
def test_junk_metadata_is_one_line(finished_run, tmp_path, junk, needle):
    out = _copy(finished_run, tmp_path)
    ckpt = out / "checkpoints" / "step_000000006"
    _attacker_rewrites(ckpt, ".metadata", junk)
    with pytest.raises(CheckpointError, match=needle):
        checkpoint.saved_keys(ckpt)


def test_metadata_may_not_point_outside_the_checkpoint(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    ckpt = out / "checkpoints" / "step_000000006"
    meta = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file: safe to unpickle here
    for info in meta.storage_data.values():
        info.relative_path = "../../../../etc/passwd"
    _attacker_rewrites(ckpt, ".metadata", pickle.dumps(meta))
    with pytest.raises(CheckpointError, match="refers to data file '../../../../etc/passwd'"):
        checkpoint.saved_keys(ckpt)


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b"[1, 2, 3]", "not a checkpoint manifest"),
    (b'{"files": 7}', "not a checkpoint manifest"),
    (b"{", "unreadable manifest"),
])
def test_bad_manifest_is_a_checkpoint_error(finished_run, tmp_path, content, needle):
    out = _copy(finished_run, tmp_path)
    ckpt = out / "checkpoints" / "step_000000006"
    (ckpt / checkpoint.MANIFEST).write_bytes(content)
    with pytest.raises(CheckpointError, match=needle):
        checkpoint.verify(ckpt)
    assert checkpoint.latest_good(out / "checkpoints") == out / "checkpoints" / "step_000000004"


def _damage_table_rows(ckpt: Path) -> Path:
    """4,000 bytes of float 0.5 written into the middle of the largest shard: same size, other values."""
    import numpy as np

    shard = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.seek(size // 2)
        f.write(np.full(1000, 0.5, dtype=np.float32).tobytes())
    assert shard.stat().st_size == size
    return shard


def test_same_size_damage_is_detected_and_resume_falls_back(ml_prepared, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    newest = out / "checkpoints" / "step_000000006"
    shard = _damage_table_rows(newest)
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.verify(newest)
    proc = job("pretrain.py", ["--spec", str(SPEC), *small_overrides(ml_prepared, out, **ONE_EPOCH), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping bad checkpoint" in proc.stderr and f"{shard}: damaged" in proc.stderr
    assert "resumed from " + str(out / "checkpoints" / "step_000000004") in proc.stderr
    assert json.loads((out / "train_summary.json").read_text())["history"] == \
        json.loads((finished_run / "train_summary.json").read_text())["history"]


def test_evaluating_a_damaged_checkpoint_is_one_line(ml_prepared, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    ckpt = out / "checkpoints" / "step_000000006"
    shard = _damage_table_rows(ckpt)
    proc = job("evaluate.py", _eval_args(ml_prepared, out, out))  # the run folder: its best checkpoint
    assert_clean_error(proc, str(shard), "damaged")


def test_moved_run_folder_evaluates_its_own_checkpoint(finished_run, tmp_path):
    summary = json.loads((finished_run / "train_summary.json").read_text())
    assert summary["best_checkpoint"] == "checkpoints/step_000000006"  # relative to the run folder
    moved = _copy(finished_run, tmp_path)
    assert checkpoint.best_or_latest(moved) == moved / "checkpoints" / "step_000000006"
    # a summary written before paths were relative: only the step name counts, inside the folder given
    (moved / "train_summary.json").write_text(json.dumps(dict(summary, best_checkpoint=str(
        finished_run / "checkpoints" / "step_000000004"))))
    assert checkpoint.best_or_latest(moved) == moved / "checkpoints" / "step_000000004"


# ------------------------------------------------------------------------------- run folder (issue 15 items 6, 7)
def test_resume_with_a_changed_spec_names_the_keys(ml_prepared, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    before = (out / "spec.resolved.yaml").read_text()
    proc = job("pretrain.py", ["--spec", str(SPEC), *small_overrides(ml_prepared, out, **ONE_EPOCH),
                               "--set", "train.lr=0.05", "--set", "model.dropout=0.1", "--resume"])
    assert_clean_error(proc, str(out / "checkpoints" / "step_000000006"), "differs from the one the run was trained",
                       "model.dropout (0.0 -> 0.1)", "train.lr (0.001 -> 0.05)", "--allow-spec-change")
    assert (out / "spec.resolved.yaml").read_text() == before  # the refused run left the run's spec alone


def test_check_resumable_spec_values(finished_run):
    ckpt = finished_run / "checkpoints" / "step_000000006"
    manifest = checkpoint.verify(ckpt)
    same = dict(tables=manifest["tables"], world_size=1, batch_size=256, seed=manifest["seed"])

    # harmless changes (how long to train, where files live, how often to save) pass without the flag
    checkpoint.check_resumable(ckpt, manifest, **same, spec_values=_changed(manifest, ("train", "epochs"), 5))
    checkpoint.check_resumable(ckpt, manifest, **same,
                               spec_values=_changed(manifest, ("data", "prepared_dir"), "/elsewhere"))
    changed = _changed(manifest, ("train", "lr_decay"), 0.5)
    with pytest.raises(CheckpointError, match=r"train\.lr_decay \(1\.0 -> 0\.5\)"):
        checkpoint.check_resumable(ckpt, manifest, **same, spec_values=changed)
    checkpoint.check_resumable(ckpt, manifest, **same, spec_values=changed, allow_spec_change=True)


def _changed(manifest, loc, value):
    import copy

    values = copy.deepcopy(manifest["spec"])
    values[loc[0]][loc[1]] = value
    return values


def test_a_second_training_into_a_held_run_folder_is_refused(ml_prepared, tmp_path):
    import socket

    from recsys.train.run_lock import RunFolderLock

    out = tmp_path / "run"
    with RunFolderLock(out):
        proc = job("pretrain.py", ["--spec", str(SPEC), *small_overrides(ml_prepared, out, **ONE_EPOCH)])
        assert_clean_error(proc, f"train.output_dir {out} is in use by another training",
                           f"pid {os.getpid()} on {socket.gethostname()}")
    assert not (out / "checkpoints").exists()
    # released: the lock file stays, but holds nobody
    with RunFolderLock(out):
        pass


def test_dry_run_with_resume_checks_the_checkpoint(ml_prepared, finished_run, tmp_path):
    from recsys.spec.loader import load_spec
    from recsys.train.dry_run import dry_run

    out = _copy(finished_run, tmp_path)
    sets = small_overrides(ml_prepared, out, **ONE_EPOCH)[1::2]
    _damage_table_rows(out / "checkpoints" / "step_000000006")
    report = dry_run(load_spec(SPEC, sets), device="cpu", resume=True)
    assert f"resume: {out / 'checkpoints' / 'step_000000004'} OK" in report  # the damaged newest is skipped
    with pytest.raises(CheckpointError, match=r"train\.lr \(0\.001 -> 0\.05\)"):
        dry_run(load_spec(SPEC, [*sets, "train.lr=0.05"]), device="cpu", resume=True)
