"""Bad specs and arguments of jobs/pretrain.py: one `error:` line naming file/line/key (or argument), exit 2, no
traceback; `--dry-run` validates spec, prepared data, schemas and the sharding plan without training."""
from __future__ import annotations

from pathlib import Path

import pytest

from reliability_helpers import SPEC, assert_clean_error, error_lines, job, small_overrides


def _spec_variant(tmp_path: Path, old: str, new: str) -> Path:
    text = SPEC.read_text()
    assert old in text
    p = tmp_path / "variant.yaml"
    p.write_text(text.replace(old, new, 1))
    return p


def test_invalid_value_names_file_line_and_key(tmp_path):
    bad = _spec_variant(tmp_path, "model:\n  dim: 32", "model:\n  dim: -3")
    line = bad.read_text().splitlines().index("  dim: -3") + 1
    proc = job("pretrain.py", ["--spec", str(bad), "--dry-run"])
    msg = assert_clean_error(proc, f"{bad}:{line}", "model.dim")
    assert len(error_lines(proc.stderr)) == 1, msg


def test_unknown_key_in_spec_file(tmp_path):
    bad = _spec_variant(tmp_path, "  batch_size: 1024", "  batch_sise: 1024")
    assert_clean_error(job("pretrain.py", ["--spec", str(bad)]), str(bad), "train.batch_sise", "batch_size")


@pytest.mark.parametrize("override, needles", [
    ("train.bogus=1", ["--set train.bogus=1", "unknown key 'bogus'"]),
    ("train.epochs=abc", ["--set train.epochs=abc", "train.epochs", "integer"]),
    ("tables.nosuch.dim=4", ["tables.nosuch"]),
])
def test_bad_override_names_argument_and_key(override, needles):
    assert_clean_error(job("pretrain.py", ["--spec", str(SPEC), "--set", override]), *needles)


def test_missing_spec_file():
    assert_clean_error(job("pretrain.py", ["--spec", "no/such/spec.yaml"]), "no/such/spec.yaml", "not found")


def test_bad_command_line_argument():
    proc = job("pretrain.py", ["--spec", str(SPEC), "--device", "tpu"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--device" in proc.stderr and "tpu" in proc.stderr


def test_dry_run_without_prepare_names_the_command(tmp_path):
    proc = job("pretrain.py", ["--spec", str(SPEC), "--set", f"data.prepared_dir={tmp_path / 'never'}",
                               "--set", "text.mode=none", "--dry-run"])
    # the hint repeats the user's --set overrides: without them it would prepare another folder
    assert_clean_error(proc, "prepared data missing", str(tmp_path / "never" / "train.parquet"),
                       f"run `python jobs/prepare_data.py --spec feature_specs/movielens.yaml --set "
                       f"data.prepared_dir={tmp_path / 'never'} --set text.mode=none` first")


def test_dry_run_validates_without_training(ml_prepared, tmp_path):
    out = tmp_path / "run"
    proc = job("pretrain.py", ["--spec", str(SPEC), *small_overrides(ml_prepared, out), "--dry-run"],
               WORLD_SIZE="2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for needle in ("spec movielens: OK", "prepared data in", "data train:", "side table movies:",
                   "sharding plan for 2 cpu rank(s):", "\n  item "):
        assert needle in proc.stdout, proc.stdout
    # a short report, not the planner's hundreds of lines (those come back with --verbose)
    assert len((proc.stdout + proc.stderr).splitlines()) < 25, proc.stdout + proc.stderr
    assert not (out / "checkpoints").exists()  # nothing trained, nothing written


def test_dry_run_names_missing_column(ml_prepared, tmp_path):
    """A split file without a column the spec reads is reported by the dry run, column named."""
    import pyarrow.parquet as pq

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("train", "valid", "test"):
        t = pq.read_table(ml_prepared / f"{name}.parquet")
        if name == "valid":
            t = t.drop(["hist_item_ids"])
        pq.write_table(t, raw / f"{name}.parquet")
    pq.write_table(pq.read_table(ml_prepared / "movies.parquet"), raw / "movies.parquet")
    proc = job("pretrain.py", ["--spec", str(SPEC), *small_overrides(ml_prepared, tmp_path / "run"),
                               "--set", "data.adapter=parquet", "--set", f"data.raw_dir={raw}", "--dry-run"])
    assert_clean_error(proc, str(raw / "valid.parquet"), "missing column 'hist_item_ids'")


# ------------------------------------------------ what training would trip on, caught first (issue 15 items 9-11)
def test_batch_smaller_than_ranks_is_one_line_in_dry_run(ml_prepared, tmp_path):
    proc = job("pretrain.py", ["--spec", str(SPEC), *small_overrides(ml_prepared, tmp_path / "run"),
                               "--set", "train.batch_size=1", "--dry-run"], WORLD_SIZE="2")
    msg = assert_clean_error(proc, "[--set train.batch_size=1] train.batch_size: 1 is smaller than the number of "
                                   "ranks (2)")
    assert len(error_lines(proc.stderr)) == 1, msg


def _dry(ml_prepared, tmp_path, *sets, world_size=1):
    from recsys.spec.loader import load_spec
    from recsys.train.dry_run import dry_run

    args = small_overrides(ml_prepared, tmp_path / "run") + [x for s in sets for x in ("--set", s)]
    return dry_run(load_spec(SPEC, args[1::2]), world_size=world_size, device="cpu")


@pytest.mark.parametrize("sets, error, needles", [
    # a misspelled domain value selects no rows (trained to NaN metrics before)
    (["domains.ml_drama.value=ml_dramma"], "SpecError",
     ["domains.2.value: domain 'ml_drama' has no rows in split 'train' (domain == 'ml_dramma')"]),
    # a row filter that keeps nothing: an empty train split
    (["data.row_filter=user_bucket < 0"], "DataError", ["train.parquet: the train split has no rows after data.row_filter"]),
    # the planner's "insufficient storage" now names the key that caused it
    (["train.batch_size=1000000000000"], "SpecError",
     ["no sharding plan", "train.batch_size=1,000,000,000,000 gives 1,000,000,000,000 rows per rank"]),
])
def test_dry_run_catches_what_training_would_trip_on(ml_prepared, tmp_path, sets, error, needles):
    from recsys.errors import RecsysError

    with pytest.raises(RecsysError) as info:
        _dry(ml_prepared, tmp_path, *sets)
    assert type(info.value).__name__ == error
    for n in needles:
        assert n in str(info.value), str(info.value)


def test_dry_run_reports_rows_per_domain(ml_prepared, tmp_path):
    report = _dry(ml_prepared, tmp_path, world_size=2)
    assert "train rows per domain: ml_action=" in report and "ml_tag_search=" in report


@pytest.mark.slow
def test_bad_spec_under_torchrun_is_printed_once(tmp_path):
    from reliability_helpers import torchrun

    proc = torchrun(["--spec", str(SPEC), "--set", "model.dim=-3"], tmp_path / "torchrun.log")
    assert proc.returncode == 1  # torchrun's own code for a failed worker; the workers exit 2
    assert "failed (exitcode: 2)" in proc.stderr
    lines = error_lines(proc.stderr)
    assert lines == [f"error: {SPEC} [--set model.dim=-3] model.dim: must be > 0, got -3"], proc.stderr[-3000:]
