"""Read a `feature_specs/*.yaml` file into a validated `Spec`, with errors that name file, line and key path.

Steps: parse YAML keeping the line of every key path (from the composed node tree, so flow and block styles,
anchors and comments all report true lines) -> expand `${VAR:-default}` in strings -> apply `--set a.b=value`
overrides -> validate with pydantic -> run the cross-reference checks. Every problem becomes one line
`<file>:<line> <key.path>: <message>` (or `<file> [--set a.b=v] <key.path>: <message>` when an override put the
value there); all problems of a file are raised together as one `SpecError`.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import yaml
from pydantic import BaseModel, ValidationError

from recsys.errors import SpecError
from recsys.spec.config import Spec, check_references

Loc = Tuple[Union[str, int], ...]

__all__ = ["load_spec", "resolve_path", "job_command", "raise_spec_issue", "resolved_values", "spec_differences", "spec_source", "project_root", "dump_resolved", "spec_hash",
           "check_domains_have_rows", "SpecIssue"]


# ------------------------------------------------------------------------------------------------------ issues
@dataclass(frozen=True)
class SpecIssue:
    """One problem of a spec: where it is and what is wrong."""

    file: str
    loc: Loc
    message: str
    line: Optional[int] = None  # 1-based line of the offending key (None when an override supplied it)
    override: Optional[str] = None  # the `--set` argument that supplied the value

    def __str__(self) -> str:
        where = self.file
        if self.override is not None:
            where += f" [--set {self.override}]"
        elif self.line is not None:
            where += f":{self.line}"
        path = ".".join(str(p) for p in self.loc)
        return f"{where} {path}: {self.message}" if path else f"{where}: {self.message}"


def _raise(issues: List[SpecIssue]) -> None:
    if not issues:
        return
    ordered = sorted(dict.fromkeys(issues), key=lambda i: (i.override is not None, i.line or 0))
    err = SpecError("\n".join(str(i) for i in ordered))
    err.issues = tuple(ordered)  # structured view for callers and tests
    raise err


class _Origins:
    """Maps a key path to where its value came from: a file line or a `--set` override."""

    def __init__(self, file: str, lines: Dict[Loc, int], overrides: Optional[Dict[Loc, str]] = None):
        self.file = file
        self.lines = lines
        self.overrides = dict(overrides or {})

    def issue(self, loc: Loc, message: str) -> SpecIssue:
        # An override replaces everything below its path, so its file lines are stale: the longest overridden
        # prefix of `loc` names where the value came from.
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.overrides:
                return SpecIssue(self.file, loc, message, override=self.overrides[loc[:n]])
        if loc not in self.lines:
            # A key the file never had but an override created on its way down (--set nosuch.x=1 -> `nosuch`).
            created = [arg for path, arg in self.overrides.items() if path[:len(loc)] == loc]
            if created:
                return SpecIssue(self.file, loc, message, override=created[-1])
        # Missing keys have no line of their own: report the nearest ancestor that exists (their parent).
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return SpecIssue(self.file, loc, message, line=self.lines[loc[:n]])
        return SpecIssue(self.file, loc, message, line=1)


# ------------------------------------------------------------------------------------------------ YAML + lines
def _duplicate_keys(root: yaml.Node, file: str) -> List[SpecIssue]:
    """Keys written twice in one mapping (PyYAML silently keeps the last); merge keys (<<) may be overridden."""
    issues: List[SpecIssue] = []
    seen_nodes: set = set()

    def walk(n: yaml.Node, loc: Loc) -> None:
        if id(n) in seen_nodes:  # aliases share nodes; anchored trees are checked once
            return
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first_line: Dict[str, int] = {}
            for k_node, v_node in n.value:
                if not isinstance(k_node, yaml.ScalarNode) or k_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = k_node.value, k_node.start_mark.line + 1
                if key in first_line:
                    issues.append(SpecIssue(file, (*loc, key), f"duplicate key '{key}' (first at line "
                                                                f"{first_line[key]})", line=line))
                else:
                    first_line[key] = line
                walk(v_node, (*loc, key))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*loc, i))

    walk(root, ())
    return issues


# A spec has a few hundred nodes; anchors and aliases may repeat parts of it, but a tree that expands past this
# is an alias bomb (8 levels of 10 aliases: 10^8 nodes from 3 KB), refused before it is built.
MAX_EXPANDED_NODES = 100_000


def _check_expansion(root: yaml.Node, file: str) -> None:
    """SpecError when the document, with every alias expanded, would have more than MAX_EXPANDED_NODES nodes.
    Counted on the composed graph (aliases share one node), memoised per node: linear in the file's size."""
    size: Dict[int, int] = {}
    active: set = set()

    def count(n: yaml.Node, depth: int) -> int:
        key = id(n)
        if key in size:
            return size[key]
        if depth > 200:
            raise SpecError(f"{file}:{n.start_mark.line + 1}: invalid YAML: nested more than 200 levels deep")
        if key in active:
            raise SpecError(f"{file}:{n.start_mark.line + 1}: invalid YAML: an alias refers to the node that contains "
                            f"it (a recursive structure)")
        active.add(key)
        total = 1
        if isinstance(n, yaml.MappingNode):
            total += sum(count(k, depth + 1) + count(v, depth + 1) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total += sum(count(v, depth + 1) for v in n.value)
        active.discard(key)
        size[key] = total
        if total > MAX_EXPANDED_NODES:
            raise SpecError(f"{file}:{n.start_mark.line + 1}: invalid YAML: aliases expand this node to more than "
                            f"{MAX_EXPANDED_NODES:,} values (an alias bomb?); write the values out instead")
        return total

    count(root, 0)


def _compose(text: str, file: str) -> Tuple[Any, Dict[Loc, int], List[SpecIssue]]:
    """Parse YAML into plain data plus the 1-based line of every key path; flags duplicate keys."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError(f"{file}:1: the spec is empty")
        _check_expansion(node, file)  # before anything walks the tree with its aliases expanded
        duplicates = _duplicate_keys(node, file)  # before construction rewrites merge keys in place
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{file}{line}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{file}: invalid YAML: {e}") from None
    finally:
        loader.dispose()

    lines: Dict[Loc, int] = {(): node.start_mark.line + 1}
    issues = duplicates

    def walk(n: yaml.Node, value: Any, loc: Loc) -> None:
        if isinstance(n, yaml.MappingNode) and isinstance(value, dict):
            # Construction flattened merge keys (<<: *anchor) into n.value ahead of the explicit keys, so the
            # last occurrence of a key is the one that took effect: its line wins.
            for k_node, v_node in n.value:
                if not isinstance(k_node, yaml.ScalarNode):
                    continue
                match = next((k for k in value if str(k) == k_node.value), None)
                if match is None:
                    continue
                lines[(*loc, match)] = k_node.start_mark.line + 1
                walk(v_node, value[match], (*loc, match))
        elif isinstance(n, yaml.SequenceNode) and isinstance(value, list):
            for i, (item_node, item) in enumerate(zip(n.value, value)):
                lines[(*loc, i)] = item_node.start_mark.line + 1
                walk(item_node, item, (*loc, i))

    walk(node, data, ())
    return data, lines, issues


# ------------------------------------------------------------------------------------------------ env variables
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, loc: Loc, origins: _Origins, issues: List[SpecIssue]) -> Any:
    """`${VAR}` / `${VAR:-default}` in every string value (default used when VAR is unset or empty)."""
    if isinstance(value, dict):
        return {k: _expand_env(v, (*loc, k), origins, issues) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, (*loc, i), origins, issues) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        got = os.environ.get(var)
        if got:
            return got
        if default is not None:
            return default
        issues.append(origins.issue(loc, f"environment variable {var} is not set (write ${{{var}:-default}} to "
                                         f"give a default)"))
        return m.group(0)

    return _ENV.sub(sub, value)


# ---------------------------------------------------------------------------------------------------- overrides
def _parse_override(arg: str, file: str) -> Tuple[List[str], Any]:
    key, sep, raw = arg.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p for p in parts):
        raise SpecError(f"{file} [--set {arg}]: expected key.path=value, e.g. model.fusion=mean")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{file} [--set {arg}]: value is not valid YAML: {problem}") from None
    return parts, value


def _apply_override(data: dict, arg: str, file: str) -> Loc:
    """Set one `a.b.c=value` in place; returns the key path it set (list items addressed by index or name)."""
    parts, value = _parse_override(arg, file)
    node: Any = data
    loc: List[Union[str, int]] = []
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(map(str, loc)) or "the spec root"
        if isinstance(node, list):
            if part.isdigit():
                idx = int(part)
                if idx >= len(node):
                    raise SpecError(f"{file} [--set {arg}]: {here} has {len(node)} items, no index {idx}")
            else:
                names = [x.get("name") for x in node if isinstance(x, dict)]
                if part not in names:
                    raise SpecError(f"{file} [--set {arg}]: {here} has no item named '{part}' "
                                    f"(names: {', '.join(map(str, names)) or 'none'})")
                idx = names.index(part)
            loc.append(idx)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            # A key absent from the file is created (e.g. train.max_steps=5 where the file uses the default);
            # keys the schema does not know are then reported by validation as "unknown key", naming this --set.
            loc.append(part)
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise SpecError(f"{file} [--set {arg}]: {here} is a value ({node!r}), it has no key '{part}'")
    return tuple(loc)


# ------------------------------------------------------------------------------------------- pydantic → message
def _quoted_list(expected: str) -> str:
    items = re.findall(r"'((?:[^'\\]|\\.)*)'", expected)
    return "|".join(items) if items else expected


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unwrap(tp: Any, data: Any) -> Any:
    """Strip Optional/List/Dict/Annotated/discriminated Union down to the model class that holds `data`."""
    while True:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            tp = args[0]
        elif origin is Union or (origin is not None and getattr(origin, "__name__", "") == "UnionType"):
            members = [a for a in args if a is not type(None)]
            kind = data.get("kind") if isinstance(data, dict) else None
            hit = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)
                   and "kind" in m.model_fields and kind in typing.get_args(m.model_fields["kind"].annotation)]
            if hit:
                return hit[0]
            if len(members) != 1:
                return None
            tp = members[0]
        else:
            return tp


def _model_at(loc: Loc, data: Any) -> Optional[type]:
    """The pydantic model class validating the mapping at `loc` (None when it cannot be told)."""
    tp: Any = Spec
    value = data
    for part in loc:
        tp = _unwrap(tp, value)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        else:
            origin = typing.get_origin(tp)
            args = typing.get_args(tp)
            if origin in (list, List) and args:
                tp = args[0]
            elif origin in (dict, Dict) and len(args) == 2:
                tp = args[1]
            else:
                return None
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = None
    tp = _unwrap(tp, value)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


_TYPE_WORDS = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false", "bool_type":
    "true or false", "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
    "model_type": "a mapping", "model_attributes_type": "a mapping",
}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _strip_tags(loc: Sequence[Any], data: Any) -> Loc:
    """Drop the discriminator tags pydantic inserts into union locations (features.3.sparse.table -> features.3.table)."""
    out: List[Any] = []
    value = data
    for part in loc:
        if isinstance(value, dict) and part not in value and value.get("kind") == part:
            continue
        if part == "[key]":  # pydantic's marker for a bad mapping key (a split name): the key's path names it
            continue
        out.append(part)
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = None
    return tuple(out)


def _message(err: Dict[str, Any], loc: Loc, data: Any) -> Tuple[Loc, str]:
    """A human message for one pydantic error, and the key path it should point at."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        key = loc[-1]
        msg = f"unknown key '{key}'"
        model = _model_at(loc[:-1], data)
        if model is not None:
            close = difflib.get_close_matches(str(key), list(model.model_fields), n=1)
            msg += f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(model.model_fields)}"
        return loc, msg
    if kind == "missing":
        return loc, f"missing required key '{loc[-1]}'"
    if kind == "union_tag_invalid":
        return (*loc, "kind"), (f"unknown kind '{ctx.get('tag')}'; expected one of "
                                f"{_quoted_list(str(ctx.get('expected_tags', '')))}")
    if kind == "union_tag_not_found":
        return loc, f"missing required key 'kind' ({_quoted_list(str(ctx.get('expected_tags', ''))) or 'a kind'})"
    if kind == "literal_error":
        return loc, f"expected one of {_quoted_list(str(ctx.get('expected', '')))}, got {_got(value)}"
    if kind == "string_pattern_mismatch":
        return loc, (f"{_got(value)} is not a valid name (letters, digits and _, not starting with a digit)"
                     if ctx.get("pattern", "").startswith("^[A-Za-z_]") else
                     f"{_got(value)} does not match {ctx.get('pattern')}")
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return loc, f"must be {op} {ctx.get(key)}, got {_got(value)}"
    if kind == "too_short":
        return loc, f"needs at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
    if kind in _TYPE_WORDS:
        return loc, f"expected {_TYPE_WORDS[kind]}, got {_got(value)}"
    if kind in ("value_error", "assertion_error"):
        return loc, str(ctx.get("error", err["msg"]))
    return loc, f"{err['msg'][:1].lower()}{err['msg'][1:]}, got {_got(value)}"


def _validate(data: Any, origins: _Origins) -> Tuple[Optional[Spec], List[SpecIssue]]:
    if not isinstance(data, dict):
        return None, [origins.issue((), f"the spec must be a mapping of sections, got {type(data).__name__}")]
    try:
        return Spec.model_validate(data, context={"defer_references": True}), []
    except ValidationError as e:
        issues = []
        for err in e.errors(include_url=False):
            loc, msg = _message(err, _strip_tags(err["loc"], data), data)
            issues.append(origins.issue(loc, msg))
        return None, issues


# ---------------------------------------------------------------------------------------------------- public API
def load_spec(path: Union[str, os.PathLike], overrides: Iterable[str] = ()) -> Spec:
    """Load, expand, override and validate one spec file; raises `SpecError` listing every problem found.

    Schema problems (types, unknown/missing keys, enums) are all reported together; cross-reference problems
    (a feature naming an unknown table, ...) are checked once the schema is valid, and also reported together.
    """
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{file}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{file}: cannot read spec: {e}") from None

    data, lines, issues = _compose(text, file)
    origins = _Origins(file, lines)
    data = _expand_env(data, (), origins, issues)
    for arg in overrides:
        if not isinstance(data, dict):
            break
        loc = _apply_override(data, arg, file)
        origins.overrides[loc] = arg
        # expand env in the override value too (quoted ${...} survives the shell)
        parent: Any = data
        for part in loc[:-1]:
            parent = parent[part]
        parent[loc[-1]] = _expand_env(parent[loc[-1]], loc, origins, issues)
    spec, schema_issues = _validate(data, origins)
    issues += schema_issues
    _raise(issues)
    assert spec is not None
    _raise([origins.issue(loc, msg) for loc, msg in check_references(spec)])

    spec._source_path = str(Path(file).resolve())
    spec._key_lines = dict(lines)
    spec._override_origin = dict(origins.overrides)
    return spec


def spec_source(spec: Spec) -> Optional[Path]:
    """The absolute path of the file `spec` was loaded from (None for specs built in code)."""
    return Path(spec._source_path) if spec._source_path else None


def project_root(spec: Spec) -> Path:
    """Folder that relative paths in `spec` are relative to: the parent of a `feature_specs/` folder holding the
    spec, else the spec's own folder; the working directory for specs built in code."""
    src = spec_source(spec)
    if src is None:
        return Path.cwd()
    folder = src.parent
    return folder.parent if folder.name == "feature_specs" else folder


def resolve_path(spec: Spec, p: Union[str, os.PathLike]) -> Path:
    """Absolute path for a path written in `spec` (`~` expanded; absolute paths returned as they are)."""
    path = Path(os.path.expanduser(os.fspath(p)))
    return path if path.is_absolute() else (project_root(spec) / path).resolve()


def _display_name(path: str) -> str:
    """The spec file as a user would type it: relative to the working directory when below it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if rel.startswith("..") else rel


def _error_for(spec: Spec, loc: Loc, message: str) -> SpecIssue:
    file = _display_name(spec._source_path) if spec._source_path else "<spec>"
    return _Origins(file, spec._key_lines, spec._override_origin).issue(loc, message)


def job_command(spec: Spec, script: str) -> str:
    """The command line that runs `jobs/<script>` on this spec as it was loaded: its file and every `--set`, so a
    hint like "run encode_text.py first" acts on the same settings (prepared folder, text model, ...)."""
    import shlex

    file = _display_name(spec._source_path) if spec._source_path else f"feature_specs/{spec.name}.yaml"
    parts = ["python", f"jobs/{script}", "--spec", shlex.quote(file)]
    for arg in spec._override_origin.values():
        parts += ["--set", shlex.quote(arg)]
    return " ".join(parts)


def raise_spec_issue(spec: Spec, loc: Loc, message: str) -> None:
    """Raise SpecError for one problem found after loading, with the file line (or --set) of `loc`."""
    _raise([_error_for(spec, loc, message)])


def check_domains_have_rows(spec: Spec, domain_counts: Dict[str, int], split: str = "train") -> None:
    """Raise `SpecError` for every active domain without rows in `split`.

    `domain_counts` maps a value of `data.domain_column` to its row count, as read from the data (a domain's value
    is its `value`, else its name); domains excluded by `model.single_domain` are not required to have rows.
    """
    issues = []
    for i, d in enumerate(spec.domains):
        if spec.model.single_domain is not None and d.name != spec.model.single_domain:
            continue
        if domain_counts.get(d.match_value, 0) <= 0:
            issues.append(_error_for(spec, ("domains", i, "value" if d.value is not None else "name"), f"domain '{d.name}' has no rows in split "
                                     f"'{split}' ({spec.data.domain_column} == '{d.match_value}')"))
    _raise(issues)


# Paths the spec's own sections hold; made absolute when a spec is saved away from its project.
_PATH_FIELDS: Tuple[Loc, ...] = (("data", "raw_dir"), ("data", "prepared_dir"), ("text", "cache_dir"),
                                 ("train", "output_dir"))


def _resolved_dict(spec: Spec) -> Dict[str, Any]:
    out = spec.model_dump(mode="json")
    for section, key in _PATH_FIELDS:
        out[section][key] = str(resolve_path(spec, out[section][key]))
    return out


def resolved_values(spec: Spec) -> Dict[str, Any]:
    """The validated spec as plain JSON-able data, project paths absolute (what `dump_resolved` writes)."""
    return _resolved_dict(spec)


def dump_resolved(spec: Spec) -> str:
    """YAML of the validated (overridden, env-expanded, defaults filled) spec, saved beside checkpoints.

    Project paths (data.raw_dir, data.prepared_dir, text.cache_dir, train.output_dir) are written absolute so the
    dump loads to the same job wherever it is stored; `load_spec` reads it back unchanged.
    """
    head = [f"# resolved spec '{spec.name}' (hash {spec_hash(spec)})"]
    if spec._source_path:
        head.append(f"# source: {spec._source_path}")
    for arg in spec._override_origin.values():
        head.append(f"# --set {arg}")
    body = yaml.safe_dump(_resolved_dict(spec), sort_keys=False, allow_unicode=True, width=120)
    return "\n".join(head) + "\n" + body


def spec_hash(spec: Spec, sections: Optional[Iterable[str]] = None, paths: bool = True) -> str:
    """Stable 16-hex-digit digest of the resolved spec, or of only the given top-level `sections`
    (e.g. ("features", "tables", "model") to compare model structure); equal for a spec and its dump.
    `paths=False` leaves out where files live (data.raw_dir, data.prepared_dir, text.cache_dir,
    train.output_dir, all resolved absolute): a digest of what is trained, equal in any checkout or clone."""
    data = _resolved_dict(spec)
    if not paths:
        for section, key in _PATH_FIELDS:
            data[section].pop(key, None)
    if sections is not None:
        wanted = list(sections)
        unknown = [s for s in wanted if s not in data]
        if unknown:
            raise SpecError(f"spec_hash: unknown section(s) {', '.join(unknown)}; expected some of {', '.join(data)}")
        data = {s: data[s] for s in wanted}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _flatten(value: Any, prefix: str, out: Dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and all(isinstance(x, dict) and "name" in x for x in value):
        for x in value:  # named items (domains, features, tables): addressed by name, as --set does
            _flatten(x, f"{prefix}.{x['name']}", out)
    else:
        out[prefix] = value


def spec_differences(old: Dict[str, Any], new: Dict[str, Any], ignore: Iterable[str] = ()) -> List[str]:
    """`key.path (old -> new)` for every value that differs between two `resolved_values` dicts, in key order;
    keys in `ignore` (or below them) are left out."""
    a: Dict[str, Any] = {}
    b: Dict[str, Any] = {}
    _flatten(old, "", a)
    _flatten(new, "", b)
    skip = tuple(ignore)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == s or key.startswith(s + ".") for s in skip):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key} ({_got(a.get(key, '<absent>'))} -> {_got(b.get(key, '<absent>'))})")
    return out
