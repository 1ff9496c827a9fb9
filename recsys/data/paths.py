"""Where a spec's data files live: the one place that decides raw vs prepared locations.

`movielens` builds canonical rows into `prepared_dir`; `amazon_sr` and `parquet` read rows (and side tables) as
they are from `raw_dir`. Vocabularies, text tables, stats and quarantine files always live under `prepared_dir`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from recsys.errors import DataError
from recsys.spec.config import Spec

# The project root is the folder holding feature_specs/ (and recsys/): relative spec paths resolve against it.
REPO_ROOT = Path(__file__).resolve().parents[2]
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(path: str) -> str:
    """Expand `${VAR}` and `${VAR:-default}` (shell style) and `~`."""
    return os.path.expanduser(_VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), path))


def resolve(spec: Spec, path: str) -> Path:
    """Absolute path of a spec path. Prefers the spec loader's resolver (it knows the spec file's project)."""
    try:
        from recsys.spec.loader import resolve_path  # written by the spec engineer; optional here
    except ImportError:
        resolve_path = None
    if resolve_path is not None:
        try:
            return Path(resolve_path(spec, path))
        except TypeError:  # older/other signature: fall back to our own rule below
            pass
    p = Path(_expand(path))
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def raw_dir(spec: Spec) -> Path:
    return resolve(spec, spec.data.raw_dir)


def prepared_dir(spec: Spec) -> Path:
    return resolve(spec, spec.data.prepared_dir)


def rows_dir(spec: Spec) -> Path:
    """Folder of the canonical split files and side tables."""
    return prepared_dir(spec) if spec.data.adapter == "movielens" else raw_dir(spec)


def split_path(spec: Spec, split: str) -> Path:
    if split not in spec.data.splits:
        raise DataError(f"unknown split {split!r}; data.splits has {sorted(spec.data.splits)}")
    return rows_dir(spec) / spec.data.splits[split]


def side_table_path(spec: Spec, name: str) -> Path:
    st = next((s for s in spec.data.side_tables if s.name == name), None)
    if st is None:
        raise DataError(f"unknown side table {name!r}; data.side_tables has {[s.name for s in spec.data.side_tables]}")
    p = Path(_expand(st.path))
    return p if p.is_absolute() else rows_dir(spec) / p


def vocab_path(spec: Spec, table: str) -> Path:
    return prepared_dir(spec) / "vocab" / f"{table}.parquet"


def text_table_path(spec: Spec, name: str) -> Path:
    return prepared_dir(spec) / "text_tables" / f"{name}.parquet"


def counts_path(spec: Spec, table: str) -> Path:
    return prepared_dir(spec) / "statistics" / f"{table}.npz"


def stats_path(spec: Spec) -> Path:
    return prepared_dir(spec) / "stats.json"


def quarantine_path(spec: Spec, split: str) -> Path:
    return prepared_dir(spec) / "quarantine" / f"{split}.jsonl"
