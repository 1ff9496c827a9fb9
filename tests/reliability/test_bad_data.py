"""Bad data through jobs/pretrain.py with adapter `parquet`: wrong column types stop the job before training
with the column named; bad rows are counted per reason, quarantined with file and row number, and skipped;
too many bad rows abort with the summary."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from reliability_helpers import SPEC, assert_clean_error, job, small_overrides

BAD_LABEL_ROWS = [3, 10, 11]
BAD_DOMAIN_ROWS = [5]


def _raw_copy(prepared: Path, dest: Path, edit_train) -> Path:
    """Canonical rows of the prepared MovieLens as a `parquet`-adapter raw folder, train edited by `edit_train`."""
    dest.mkdir()
    for name in ("valid", "test", "movies"):
        shutil.copy(prepared / f"{name}.parquet", dest / f"{name}.parquet")
    pq.write_table(edit_train(pq.read_table(prepared / "train.parquet")), dest / "train.parquet",
                   row_group_size=20_000)
    return dest


def _with_bad_rows(t: pa.Table) -> pa.Table:
    label = t["label"].to_numpy().copy()
    label[BAD_LABEL_ROWS] = 7
    domain = t["domain"].to_pylist()
    for r in BAD_DOMAIN_ROWS:
        domain[r] = "no_such_domain"
    t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(label, pa.int8()))
    return t.set_column(t.schema.get_field_index("domain"), "domain", pa.array(domain, pa.string()))


def _args(prepared: Path, tmp_path: Path, raw: Path, **extra) -> list:
    prep = tmp_path / "prepared"
    if not prep.exists():  # vocabularies and stats of the same rows; own copy so quarantine files stay ours
        shutil.copytree(prepared, prep, ignore=shutil.ignore_patterns("index", "quarantine"))
    return ["--spec", str(SPEC), *small_overrides(prep, tmp_path / "run", **{
        "data.adapter": "parquet", "data.raw_dir": str(raw), "train.epochs": 1, "train.max_steps": 2,
        "train.checkpoint_every_steps": 0, **extra})]


def _prepare_then(name: str, args: list):
    """`prepare_data.py` then job `name` with the same arguments, as a user runs them (the job reads the resolved
    schema that prepare writes for this spec); prepare's result where it already fails."""
    prepared = job("prepare_data.py", args)
    return prepared if prepared.returncode != 0 else job(name, args)


def test_bad_rows_are_quarantined_counted_and_skipped(ml_prepared, tmp_path):
    raw = _raw_copy(ml_prepared, tmp_path / "raw", _with_bad_rows)
    proc = _prepare_then("pretrain.py", _args(ml_prepared, tmp_path, raw))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped bad rows {'label_not_0_1': 3, 'unknown_domain': 1}" in proc.stderr  # per-reason counts
    q = tmp_path / "prepared" / "quarantine" / "train.jsonl"
    rows = [json.loads(ln) for ln in q.read_text().splitlines()]
    assert {(r["row"], r["reason"]) for r in rows} == (
        {(i, "label_not_0_1") for i in BAD_LABEL_ROWS} | {(i, "unknown_domain") for i in BAD_DOMAIN_ROWS})
    assert {r["file"] for r in rows} == {str(raw / "train.parquet")}
    assert (tmp_path / "run" / "train_summary.json").exists()  # training ran on the good rows


def test_too_many_bad_rows_abort_with_summary(ml_prepared, tmp_path):
    raw = _raw_copy(ml_prepared, tmp_path / "raw", _with_bad_rows)
    proc = _prepare_then("pretrain.py", _args(ml_prepared, tmp_path, raw, **{"data.max_bad_fraction": "0.00001"}))
    assert_clean_error(proc, str(raw / "train.parquet"), "4/", "label_not_0_1=3", "unknown_domain=1",
                       "data.max_bad_fraction=1e-05", "quarantine")
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))  # stopped before training


@pytest.mark.parametrize("edit, needles", [
    (lambda t: t.set_column(t.schema.get_field_index("label"), "label", pc.cast(t["label"], pa.string())),
     ["column 'label'", "type string", "integer or boolean"]),
    (lambda t: t.drop(["user_id"]), ["missing column 'user_id'"]),
])
def test_wrong_schema_stops_before_training(ml_prepared, tmp_path, edit, needles):
    raw = _raw_copy(ml_prepared, tmp_path / "raw", edit)
    proc = _prepare_then("pretrain.py", _args(ml_prepared, tmp_path, raw))
    assert_clean_error(proc, str(raw / "train.parquet"), *needles)
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))
