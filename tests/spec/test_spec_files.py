"""Every shipped spec loads, and the helpers around a loaded spec (paths, dump, hash) behave."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from recsys.spec import (Spec, dump_resolved, load_spec, project_root, resolve_path, spec_hash, spec_source)

from spec_helpers import MINIMAL, REPO, variant

SHIPPED = sorted((REPO / "feature_specs").glob("*.yaml"))


def test_there_are_shipped_specs():
    assert {p.name for p in SHIPPED} >= {"amazon_sr.yaml", "movielens.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_spec_loads(path: Path):
    spec = load_spec(path)
    assert spec.features and spec.tables and spec.domains
    assert spec_source(spec) == path.resolve()
    # shipped specs live in feature_specs/, so their relative paths are relative to the repo root
    assert project_root(spec) == REPO


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_dump_resolved_round_trips(path: Path, tmp_path: Path):
    spec = load_spec(path, ["train.epochs=7"])
    text = dump_resolved(spec)
    assert "--set train.epochs=7" in text  # the header records the overrides
    saved = tmp_path / "elsewhere" / "spec.yaml"  # e.g. beside a checkpoint, far from the project
    saved.parent.mkdir()
    saved.write_text(text)
    again = load_spec(saved)
    assert again.train.epochs == 7
    assert resolve_path(again, again.data.raw_dir) == resolve_path(spec, spec.data.raw_dir)
    assert spec_hash(again) == spec_hash(spec)
    assert again.model_dump(exclude={"data", "text", "train"}) == spec.model_dump(exclude={"data", "text", "train"})


def test_spec_hash_tracks_content_and_sections():
    base = load_spec(MINIMAL)
    assert spec_hash(base) == spec_hash(load_spec(MINIMAL))
    changed = load_spec(MINIMAL, ["train.epochs=2"])
    assert spec_hash(changed) != spec_hash(base)
    # a training-only change leaves the model-structure hash alone
    sections = ("features", "tables", "model", "domains")
    assert spec_hash(changed, sections) == spec_hash(base, sections)
    assert spec_hash(load_spec(MINIMAL, ["model.dim=16"]), sections) != spec_hash(base, sections)
    assert len(spec_hash(base)) == 16


def test_spec_hash_without_paths_is_the_same_in_any_checkout(tmp_path):
    """Where the data, caches and outputs live is not what is trained: with paths=False two checkouts (absolute
    paths differ) agree, and a real change still shows."""
    here = load_spec(MINIMAL)
    elsewhere = load_spec(MINIMAL, [f"data.prepared_dir={tmp_path / 'prep'}", f"text.cache_dir={tmp_path / 'tc'}",
                                    f"train.output_dir={tmp_path / 'out'}", f"data.raw_dir={tmp_path / 'raw'}"])
    assert spec_hash(elsewhere) != spec_hash(here)
    assert spec_hash(elsewhere, paths=False) == spec_hash(here, paths=False)
    assert spec_hash(load_spec(MINIMAL, ["model.dim=16"]), paths=False) != spec_hash(here, paths=False)


def test_resolve_path_outside_feature_specs(tmp_path: Path):
    path = variant(tmp_path, [])
    spec = load_spec(path)
    assert project_root(spec) == tmp_path
    assert resolve_path(spec, "prepared") == tmp_path / "prepared"
    assert resolve_path(spec, "/abs/x") == Path("/abs/x")


def test_resolve_path_inside_feature_specs(tmp_path: Path):
    (tmp_path / "feature_specs").mkdir()
    path = tmp_path / "feature_specs" / "m.yaml"
    shutil.copy(MINIMAL, path)
    spec = load_spec(path)
    assert resolve_path(spec, spec.data.prepared_dir) == tmp_path / "prepared"


def test_spec_built_in_code_checks_references():
    import yaml
    data = yaml.safe_load(MINIMAL.read_text().replace("${RECSYS_TEST_RAW:-raw}", "raw"))
    spec = Spec.model_validate(data)
    assert spec_source(spec) is None and project_root(spec) == Path.cwd()
    data["features"][0]["table"] = "nope"
    with pytest.raises(ValidationError, match=r"features\.0\.table: unknown table 'nope'"):
        Spec.model_validate(data)
