"""--set overrides and ${VAR:-default} expansion."""
from __future__ import annotations

from pathlib import Path

import pytest

from recsys.spec import load_spec

from spec_helpers import MINIMAL, spec_errors, variant


def test_override_by_index_and_by_name():
    spec = load_spec(MINIMAL, ["features.3.max_values=4", "domains.d_search.loss_weight=2",
                               "tables.item.dim=32", "text.tables.item_texts.key=asin"])
    assert spec.features[3].max_values == 4
    assert spec.domains[1].loss_weight == 2.0 and spec.domains[0].loss_weight == 1.0
    assert spec.table("item").dim == 32
    assert spec.text.tables[0].key == "asin"


def test_override_values_are_yaml():
    spec = load_spec(MINIMAL, ["model.hidden=[32, 16]", "train.shuffle=false", "data.row_filter=user_bucket < 10",
                               "train.lr=3e-4", "model.single_domain=d_rec"])
    assert spec.model.hidden == [32, 16] and spec.train.shuffle is False
    assert spec.data.row_filter == "user_bucket < 10" and spec.train.lr == pytest.approx(3e-4)
    assert spec.model.single_domain == "d_rec"


def test_override_creates_keys_the_file_leaves_default():
    spec = load_spec(MINIMAL, ["train.max_steps=5", "text.encoder.pooling=cls"])
    assert spec.train.max_steps == 5 and spec.text.encoder.pooling == "cls"


def test_later_override_wins_and_replaces_whole_items():
    spec = load_spec(MINIMAL, ["model.dim=4", "model.dim=12", "domains.1={name: d_s2, kind: search}"])
    assert spec.model.dim == 12 and spec.domains[1].name == "d_s2"


@pytest.mark.parametrize("arg, message", [
    ("domains.d_nope.loss_weight=2", "[--set domains.d_nope.loss_weight=2]: domains has no item named 'd_nope' "
                                     "(names: d_rec, d_search)"),
    ("features.9.table=x", "[--set features.9.table=x]: features has 5 items, no index 9"),
    ("model.dim.width=3", "[--set model.dim.width=3]: model.dim is a value (8), it has no key 'width'"),
    ("model.fusionn=mean", "[--set model.fusionn=mean] model.fusionn: unknown key 'fusionn'; did you mean 'fusion'?"),
    ("nosuchsection.x=1", "[--set nosuchsection.x=1] nosuchsection: unknown key 'nosuchsection'"),
    ("model.dim", "[--set model.dim]: expected key.path=value"),
    ("model..dim=3", "[--set model..dim=3]: expected key.path=value"),
    ("model.hidden=[1,", "[--set model.hidden=[1,]: value is not valid YAML"),
])
def test_bad_override_path_names_the_override(arg: str, message: str):
    errors = spec_errors(MINIMAL, [arg])
    assert len(errors) == 1 and errors[0].startswith(f"{MINIMAL} {message}"), errors


@pytest.mark.parametrize("arg, key, message", [
    ("train.epochs=abc", "train.epochs", "expected an integer, got 'abc'"),
    ("model.fusion=gate", "model.fusion", "expected one of domain|mean|cls, got 'gate'"),
    ("model.hidden=7", "model.hidden", "expected a list, got 7"),
    ("tables.cat.dim=-1", "tables.2.dim", "must be > 0, got -1"),
    ("features.0.table=nope", "features.0.table", "unknown table 'nope'"),  # cross-reference check
    ("features.3={kind: sparse, name: c}", "features.3.column", "missing required key 'column'"),
])
def test_bad_override_value_names_the_override(arg: str, key: str, message: str):
    errors = spec_errors(MINIMAL, [arg])
    assert any(e.startswith(f"{MINIMAL} [--set {arg}] {key}: {message}") for e in errors), errors


def test_file_errors_and_override_errors_together(tmp_path: Path):
    path = variant(tmp_path, [("  epochs: 1", "  epochs: x")])
    errors = spec_errors(path, ["model.fusion=gate"])
    assert len(errors) == 2
    assert errors[0].startswith(f"{path}:") and "train.epochs" in errors[0]
    assert errors[1].startswith(f"{path} [--set model.fusion=gate] model.fusion")


def test_override_shadows_file_error(tmp_path: Path):
    # the file's bad value is replaced, so it is no error at all
    path = variant(tmp_path, [("  fusion: domain", "  fusion: gate")])
    assert load_spec(path, ["model.fusion=mean"]).model.fusion == "mean"


def test_env_default_used_when_unset(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RECSYS_TEST_RAW", raising=False)
    assert load_spec(MINIMAL).data.raw_dir == "raw"
    monkeypatch.setenv("RECSYS_TEST_RAW", "")  # empty counts as unset, like the shell's :-
    assert load_spec(MINIMAL).data.raw_dir == "raw"


def test_env_value_used_when_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("RECSYS_TEST_RAW", "/data/raw")
    assert load_spec(MINIMAL).data.raw_dir == "/data/raw"
    monkeypatch.setenv("RECSYS_TEST_DIR", "x")
    path = variant(tmp_path, [("  prepared_dir: prepared", "  prepared_dir: cache/${RECSYS_TEST_DIR}/p-${RECSYS_TEST_DIR}")])
    assert load_spec(path).data.prepared_dir == "cache/x/p-x"


def test_env_in_override_value(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RECSYS_TEST_OUT", "/runs/a")
    assert load_spec(MINIMAL, ["train.output_dir=${RECSYS_TEST_OUT}/b"]).train.output_dir == "/runs/a/b"
    monkeypatch.delenv("RECSYS_TEST_OUT")
    errors = spec_errors(MINIMAL, ["train.output_dir=${RECSYS_TEST_OUT}"])
    assert errors == [f"{MINIMAL} [--set train.output_dir=${{RECSYS_TEST_OUT}}] train.output_dir: environment "
                      "variable RECSYS_TEST_OUT is not set (write ${RECSYS_TEST_OUT:-default} to give a default)"]
