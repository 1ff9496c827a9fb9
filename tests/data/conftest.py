from __future__ import annotations

import os
from pathlib import Path

import pytest

from recsys.spec.loader import load_spec

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def ml_spec(tmp_path_factory):
    """MovieLens spec prepared (once per session) into a temporary prepared_dir."""
    from recsys.data.prepare import prepare

    out = tmp_path_factory.mktemp("ml_prepared")
    spec = load_spec(REPO / "feature_specs" / "movielens.yaml", [f"data.prepared_dir={out}"])
    prepare(spec)
    return spec


@pytest.fixture(scope="session")
def amazon_spec(tmp_path_factory):
    bench = SHARED / "bench" / "amazon-sr"
    if not (bench / "train.parquet").exists():
        pytest.skip(f"amazon-sr bench not found at {bench} (set RECSYS_SHARED_DATA)")
    from recsys.data.prepare import prepare

    out = tmp_path_factory.mktemp("amazon_prepared")
    spec = load_spec(REPO / "feature_specs" / "amazon_sr.yaml", [f"data.raw_dir={bench}", f"data.prepared_dir={out}"])
    prepare(spec)
    return spec
