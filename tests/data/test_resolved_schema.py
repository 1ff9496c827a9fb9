"""The resolved schema (issue 13): written once per spec by prepare, so a second spec prepared into the same folder
cannot change what the first spec's model means; a checkpoint trained on another schema is refused."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from recsys.data.mapping import FeatureMapper
from recsys.data.resolved import check_checkpoint_schema, load_schema, schema_for, schema_fingerprint
from recsys.errors import DataError
from recsys.models.build import spec_table_rows
from recsys.spec.loader import load_spec

ML = Path(__file__).resolve().parents[2] / "feature_specs" / "movielens.yaml"


def test_second_spec_in_same_prepared_folder_leaves_first_schema(ml_prepared, tmp_path):
    from recsys.data.prepare import prepare

    folder = tmp_path / "prepared"
    shutil.copytree(ml_prepared, folder)
    first = load_spec(ML, [f"data.prepared_dir={folder}"])
    # another spec: other dense transform (stats.json rewritten) and a pruned genre vocabulary (vocab file rewritten)
    second = load_spec(ML, [f"data.prepared_dir={folder}", "features.item_year.transform=log1p",
                            "tables.genre.min_count=2000"])
    before = schema_for(first)
    sha, stats, rows = before.sha256, before.dense_stats, spec_table_rows(first)
    assert schema_fingerprint(first) != schema_fingerprint(second)
    prepare(second)
    assert schema_for(second).table_rows["genre"] < rows["genre"]  # the shared files did change
    assert schema_for(second).dense_stats["item_year"] != stats["item_year"]
    after = load_schema(before.folder)  # read again from disk, every file re-verified
    assert after.sha256 == sha and after.dense_stats == stats and spec_table_rows(first) == rows
    assert FeatureMapper(first).dense_stats == stats


def test_schema_files_are_verified_and_checkpoints_checked(ml_prepared, tmp_path):
    spec = load_spec(ML, [f"data.prepared_dir={ml_prepared}"])
    schema = schema_for(spec)
    copy = tmp_path / "schema"
    schema.copy_to(copy)
    assert load_schema(copy).sha256 == schema.sha256
    (copy / "vocab" / "item.parquet").write_bytes(b"not the vocabulary")
    with pytest.raises(DataError, match="item.parquet: sha256 does not match"):
        load_schema(copy)
    check_checkpoint_schema(schema, schema.sha256, "ckpt")
    check_checkpoint_schema(schema, None, "ckpt")  # checkpoints from before the schema existed
    with pytest.raises(DataError, match="ckpt: trained with resolved schema"):
        check_checkpoint_schema(schema, "0" * 64, "ckpt")


def test_missing_schema_hint_repeats_the_users_overrides(ml_prepared):
    """The --set overrides decide the schema (here a vocabulary cut-off): the prepare command in the error must carry
    them, or running it prepares another schema and the job fails again."""
    spec = load_spec(ML, [f"data.prepared_dir={ml_prepared}", "tables.genre.min_count=777"])
    with pytest.raises(DataError, match=r"jobs/prepare_data.py --spec \S*movielens.yaml .*tables.genre.min_count=777"):
        schema_for(spec)
