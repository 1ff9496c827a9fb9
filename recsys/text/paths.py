"""Where text-side files live: the prepared text tables, the vector cache and the extracted models.

Relative paths in a spec resolve through `recsys.spec.loader.resolve_path` (the single rule for the whole
project). Until that module exists we fall back to its documented rule: relative to the project root, the folder
holding `feature_specs/`.
"""
from __future__ import annotations

import os
from pathlib import Path

from recsys.spec.config import Spec

# recsys/text/paths.py -> recsys/text -> recsys -> project root
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve(spec: Spec, path: str) -> Path:
    """Resolve a spec path (env vars expanded, relative -> project root) the way the spec loader does."""
    try:
        from recsys.spec.loader import resolve_path  # type: ignore[import-not-found]
    except ImportError:
        resolve_path = None
    if resolve_path is not None:
        return Path(resolve_path(spec, path))
    expanded = Path(os.path.expandvars(os.path.expanduser(path)))
    return expanded if expanded.is_absolute() else (PROJECT_ROOT / expanded)


def text_table_path(spec: Spec, table_name: str) -> Path:
    """`<prepared_dir>/text_tables/<name>.parquet`, written by jobs/prepare_data.py."""
    return resolve(spec, spec.data.prepared_dir) / "text_tables" / f"{table_name}.parquet"


def cache_root(spec: Spec) -> Path:
    """Root of the vector cache (`text.cache_dir`); one sub-folder per (model, pooling, max_length, normalize)."""
    return resolve(spec, spec.text.cache_dir)


def models_root(spec: Spec) -> Path:
    """Where `package:` models are extracted to (once), next to the vectors they produce."""
    return cache_root(spec) / "models"


def model_location(spec: Spec) -> str:
    """The encoder `model` value with local folder paths resolved; `package:` values pass through."""
    model = spec.text.encoder.model
    if model.startswith("package:"):
        return model
    return str(resolve(spec, model))
