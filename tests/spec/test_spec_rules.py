"""One invalid spec per validation rule: the error names file, line and key path."""
from __future__ import annotations

from pathlib import Path

import pytest

from recsys.errors import SpecError
from recsys.spec import check_domains_have_rows, load_spec

from spec_helpers import SPECS, line_of, spec_errors, variant

TEXT_BLOCK = "text:\n  mode: random\n  tables:\n    - name: item_texts\n      source: items\n      key: item_id\n      text: title\n"

# id: (edits, (marker, occurrence) of the expected line, key path, message fragment)
CASES = {
    # --- schema
    "enum": ([("  fusion: domain", "  fusion: gate")], ("fusion:", 0), "model.fusion",
             "expected one of domain|mean|cls, got 'gate'"),
    "unknown_kind": ([("  - kind: sparse", "  - kind: sparsee")], ("kind: sparsee", 0), "features.3.kind",
                     "unknown kind 'sparsee'; expected one of id|sparse|sequence|dense|text"),
    "unknown_key_root": ([("name: minimal\n", "name: minimal\nnmae: x\n")], ("nmae:", 0), "nmae",
                         "unknown key 'nmae'; did you mean 'name'?"),
    "unknown_key_list_item": ([("      join_on: item_id\n", "      join_on: item_id\n      colour: red\n")],
                              ("colour:", 0), "data.side_tables.0.colour", "unknown key 'colour'"),
    "unknown_key_in_union_member": ([("    target: item_id\n", "    target: item_id\n    max_lenn: 3\n")],
                                    ("max_lenn", 0), "features.2.max_lenn", "did you mean 'max_len'?"),
    "unknown_key_depth3": ([("  mode: random\n", "  mode: random\n  encoder:\n    modle: x\n")], ("modle:", 0),
                           "text.encoder.modle", "did you mean 'model'?"),
    "missing_key_in_item": ([("    column: user_id\n", "")], ("  - kind: id", 0), "features.0.column",
                            "missing required key 'column'"),
    "missing_key_in_section": ([("  prepared_dir: prepared\n", "")], ("data:", 0), "data.prepared_dir",
                               "missing required key 'prepared_dir'"),
    "missing_kind": ([("  - kind: sparse\n    name: cats", "  - name: cats")], ("  - name: cats", 0), "features.3",
                     "missing required key 'kind'"),
    "bad_type": ([("  epochs: 1", "  epochs: lots")], ("epochs:", 0), "train.epochs",
                 "expected an integer, got 'lots'"),
    "bound": ([("    dim: 4", "    dim: 0")], ("dim: 0", 0), "tables.2.dim", "must be > 0, got 0"),
    "name_pattern": ([("  - name: d_rec", "  - name: d-rec")], ("d-rec", 0), "domains.0.name",
                     "'d-rec' is not a valid name"),
    "no_domains": ([("  - name: d_rec\n    kind: rec\n  - name: d_search\n    kind: search\n", ""),
                    ("domains:\n", "domains: []\n")], ("domains:", 0), "domains", "needs at least 1 item(s), got 0"),
    "hash_needs_buckets": ([("  - name: cat\n    dim: 4\n", "  - name: cat\n    dim: 4\n    index: hash\n")],
                           ("  - name: cat", 0), "tables.2", "index 'hash' needs num_buckets"),
    "duplicate_yaml_key": ([("  epochs: 1\n", "  epochs: 1\n  epochs: 2\n")], ("epochs:", 1), "train.epochs",
                           "duplicate key 'epochs'"),
    "env_unset": ([("${RECSYS_TEST_RAW:-raw}", "${RECSYS_TEST_SURELY_UNSET_VAR}")], ("raw_dir:", 0),
                  "data.raw_dir", "environment variable RECSYS_TEST_SURELY_UNSET_VAR is not set"),
    # --- cross references
    "dup_feature": ([("    name: hist\n", "    name: item_id\n")], ("name: item_id", 1), "features.2.name",
                    "duplicate feature name 'item_id' (first at features.1)"),
    "dup_table": ([("  - name: cat\n    dim: 4", "  - name: cat\n    dim: 4\n  - name: item\n    dim: 2")],
                  ("  - name: item", 2), "tables.3.name", "duplicate table name 'item'"),
    "dup_domain": ([("  - name: d_search", "  - name: d_rec")], ("name: d_rec", 1), "domains.1.name",
                   "duplicate domain name 'd_rec'"),
    "dup_domain_value": ([("    kind: search\n", "    kind: search\n    value: d_rec\n")], ("value: d_rec", 0),
                         "domains.1.value", "already selects domain 'd_rec'"),
    "dup_side_table": ([("      join_on: item_id\n", "      join_on: item_id\n    - {name: items, path: b.parquet, "
                                                      "key: k, join_on: k}\n")], ("b.parquet", 0),
                       "data.side_tables.1.name", "duplicate side table name 'items'"),
    "side_table_named_rows": ([("    - name: items\n", "    - name: rows\n"), ("    source: items\n", "    source: rows\n"),
                               ("      source: items\n", "      source: rows\n")],
                              ("- name: rows", 0), "data.side_tables.0.name", "'rows' is reserved"),
    "pad_suffix_reserved": ([("    name: cats\n", "    name: cats__update_pad\n")], ("name: cats__update_pad", 0),
                            "features.3.name", "may not end with '__update_pad' (reserved)"),
    "dup_text_table": ([("      text: title\n", "      text: title\n    - {name: item_texts, source: rows, key: q}\n")],
                       ("source: rows", 0), "text.tables.1.name", "duplicate text table name 'item_texts'"),
    "unknown_table": ([("    table: cat", "    table: kat")], ("table: kat", 0), "features.3.table",
                      "unknown table 'kat'; expected one of user|item|cat"),
    "unknown_source": ([("    source: items\n    separator", "    source: itemz\n    separator")], ("source: itemz", 0),
                       "features.3.source", "unknown side table 'itemz'; expected one of items"),
    "unknown_text_table": ([("text_table: item_texts", "text_table: texts")], ("text_table: texts", 0),
                           "features.4.text_table", "unknown text table 'texts'; expected one of item_texts"),
    "text_table_source": ([("      source: items\n      key", "      source: catalogue\n      key")],
                          ("source: catalogue", 0), "text.tables.0.source", "expected 'rows' or a side table: items"),
    "text_table_needs_text_column": ([("      text: title\n", "")], ("    - name: item_texts", 0), "text.tables.0",
                                     "name its text column"),
    "text_needs_tables": ([(TEXT_BLOCK, "text:\n  mode: llm\n")], ("text_table:", 0), "features.4.text_table",
                          "text feature needs text.tables when text.mode is 'llm'"),
    "sequence_target_unknown": ([("target: item_id", "target: nope")], ("target: nope", 0), "features.2.target",
                                "unknown target feature 'nope'"),
    "sequence_target_other_table": ([("target: item_id", "target: user_id")], ("target: user_id", 0),
                                    "features.2.target", "must share table 'item'"),
    "single_domain": ([("  fusion: domain\n", "  fusion: domain\n  single_domain: d_nope\n")],
                      ("single_domain", 0), "model.single_domain", "unknown domain 'd_nope'; expected one of d_rec|d_search"),
    "table_kind_mix": ([("    table: cat", "    table: item")], ("table: item", 2), "features.3.table",
                       "would mix tokens split from 'category' with the raw ids of features.1 'item_id'"),
    "sharding_key": ([("    item: [row_wise]", "    itme: [row_wise]")], ("itme:", 0), "train.sharding_constraints.itme",
                     "unknown table 'itme'"),
    "sharding_value": ([("    item: [row_wise]", "    item: [diagonal]")], ("item: [diagonal]", 0),
                       "train.sharding_constraints.item.0", "expected one of table_wise|column_wise"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_spec_names_file_line_and_key(case: str, tmp_path: Path):
    edits, (marker, occurrence), key, fragment = CASES[case]
    path = variant(tmp_path, edits, name=f"bad_{case}.yaml")
    errors = spec_errors(path)
    where = f"{path}:{line_of(path, marker, occurrence)} {key}: "
    hits = [e for e in errors if e.startswith(where)]
    assert hits, f"no error starting with {where!r} in:\n" + "\n".join(errors)
    assert fragment in hits[0]


def test_brief_example_format_exactly(tmp_path: Path):
    path = variant(tmp_path, [("  fusion: domain", "  fusion: gate")])
    assert spec_errors(path) == [
        f"{path}:{line_of(path, 'fusion:')} model.fusion: expected one of domain|mean|cls, got 'gate'"]


def test_text_features_allowed_without_tables_when_text_off(tmp_path: Path):
    spec = load_spec(variant(tmp_path, [(TEXT_BLOCK, "text:\n  mode: none\n")]))
    assert spec.text.mode == "none" and not spec.text.tables


def test_all_schema_errors_reported_together():
    path = SPECS / "bad_many.yaml"
    errors = spec_errors(path)
    expected = [
        (7, "data.colour: unknown key 'colour'"),
        (12, "features.1.kind: unknown kind 'widget'"),
        (14, "tables.0.dim: must be > 0"),
        (16, "model.fusion: expected one of domain|mean|cls, got 'gate'"),
        (18, "train.epochs: expected an integer, got 'many'"),
    ]
    assert len(errors) == len(expected), errors
    for line, (want_line, text) in zip(errors, expected):  # one per line, in file order
        assert line.startswith(f"{path}:{want_line} {text}"), line


def test_all_reference_errors_reported_together():
    path = SPECS / "bad_references.yaml"
    errors = spec_errors(path)
    assert errors == [
        f"{path}:10 features.0.table: unknown table 'usr'; expected one of user|item",
        f"{path}:11 features.1.source: unknown side table 'catalogue'; expected one of (none declared) "
        "(data.side_tables)",
        f"{path}:18 model.single_domain: unknown domain 'd_nope'; expected one of d_rec",
    ]


def test_yaml_syntax_error_has_line():
    path = SPECS / "bad_yaml_syntax.yaml"
    errors = spec_errors(path)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:5: invalid YAML"), errors


def test_missing_and_empty_files(tmp_path: Path):
    assert spec_errors(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: spec file not found"]
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert "empty" in spec_errors(tmp_path / "empty.yaml")[0]
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "must be a mapping" in spec_errors(tmp_path / "list.yaml")[0]


def test_error_is_structured(tmp_path: Path):
    path = variant(tmp_path, [("    table: cat", "    table: kat")])
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (issue,) = info.value.issues
    assert issue.loc == ("features", 3, "table") and issue.line == line_of(path, "table: kat")


def test_check_domains_have_rows(tmp_path: Path):
    path = variant(tmp_path, [])
    spec = load_spec(path)
    check_domains_have_rows(spec, {"d_rec": 3, "d_search": 1})
    with pytest.raises(SpecError) as info:
        check_domains_have_rows(spec, {"d_rec": 3, "d_search": 0}, split="valid")
    msg = str(info.value)
    assert msg == (f"{path}:{line_of(path, 'name: d_search')} domains.1.name: domain 'd_search' has no rows "
                   "in split 'valid' (domain == 'd_search')")
    assert "d_rec" not in msg
    # a domain excluded by model.single_domain needs no rows; the error then names the --set that chose it
    check_domains_have_rows(load_spec(path, ["model.single_domain=d_rec"]), {"d_rec": 3})
    with pytest.raises(SpecError, match=r"\[--set domains\.0=\{name: d_x, kind: rec\}\] domains\.0\.name: "
                                        r"domain 'd_x' has no rows"):
        check_domains_have_rows(load_spec(path, ["domains.0={name: d_x, kind: rec}"]), {"d_search": 2})


def test_anchors_and_merge_keys(tmp_path: Path):
    # a merged key overridden explicitly is no duplicate; errors point at the key that took effect
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "name: anchors\n"
        "data: {adapter: parquet, raw_dir: r, prepared_dir: p}\n"
        "domains:\n"
        "  - &dom {name: d1, kind: rec}\n"
        "  - <<: *dom\n"
        "    name: d2\n"
        "    kind: serch\n"
        "features:\n"
        "  - {kind: id, name: u, column: u, side: user, table: t}\n"
        "tables: [{name: t, dim: 4}]\n")
    assert spec_errors(path) == [f"{path}:7 domains.1.kind: expected one of search|rec, got 'serch'"]
    path.write_text(path.read_text().replace("kind: serch", "kind: search"))
    spec = load_spec(path)
    assert [d.name for d in spec.domains] == ["d1", "d2"] and spec.domains[1].kind == "search"


# ------------------------------------------------------------------------------- hostile specs (issue 15, items 2-3)
def _bomb(levels: int, fan: int = 10) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_quickly(tmp_path: Path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(8) + "name: x\n")  # ~10^9 values once expanded, ~1 KB on disk
    t0 = time.monotonic()
    errors = spec_errors(path)
    assert time.monotonic() - t0 < 5  # refused before expansion (the unbounded version ran for minutes)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:") and "alias" in errors[0], errors


def test_modest_aliases_still_load(tmp_path: Path):
    # a few shared blocks stay well below the bound
    path = variant(tmp_path, [("  - name: d_rec\n    kind: rec\n", "  - &d {name: d_rec, kind: rec}\n")])
    assert load_spec(path).domains[0].name == "d_rec"


def test_recursive_alias_is_refused(tmp_path: Path):
    path = tmp_path / "loop.yaml"
    path.write_text("name: &n [1, *n]\n")
    errors = spec_errors(path)
    assert len(errors) == 1 and "recursive" in errors[0], errors


@pytest.mark.parametrize("edit, key, fragment", [
    # names that become paths must be plain names (a split `../../x` wrote outside the prepared folder)
    (("  prepared_dir: prepared\n", "  prepared_dir: prepared\n  splits: {train: t.parquet, ../../../evil: e.parquet}\n"),
     "data.splits.../../../evil", "'../../../evil' is not a valid name"),
    (("  - name: item\n    dim: 8", "  - name: ../item\n    dim: 8"), "tables.1.name", "is not a valid name"),
    (("    - name: item_texts\n", "    - name: /tmp/x\n"), "text.tables.0.name", "is not a valid name"),
    (("  - name: d_rec\n", "  - name: d/rec\n"), "domains.0.name", "is not a valid name"),
    # model.hidden: [] and [0] crashed the towers (IndexError / ZeroDivisionError)
    (("  dim: 8\n  fusion", "  dim: 8\n  hidden: []\n  fusion"), "model.hidden", "needs at least 1 item"),
    (("  dim: 8\n  fusion", "  dim: 8\n  hidden: [16, 0]\n  fusion"), "model.hidden.1", "must be > 0, got 0"),
    # a domain both declared and ignored kept its rows silently
    (("  prepared_dir: prepared\n", "  prepared_dir: prepared\n  ignore_domains: [d_search]\n"),
     "data.ignore_domains.0", "domain 'd_search' is declared (domains.1) and ignored"),
])
def test_hostile_values_are_refused_at_load(tmp_path: Path, edit, key, fragment):
    path = variant(tmp_path, [edit])
    errors = spec_errors(path)
    hits = [e for e in errors if f" {key}: " in e]
    assert hits and fragment in hits[0], errors
    assert hits[0].startswith(f"{path}:")
