"""Dataset adapters, selected by `spec.data.adapter`. Each module exposes `prepare_rows(spec) -> None` (make the
canonical split files and side tables available, building them if the adapter derives them) and
`validate(spec) -> None` (schema checks; `DataError` naming file and column)."""
from __future__ import annotations

from types import ModuleType

from recsys.spec.config import Spec


def get_adapter(spec: Spec) -> ModuleType:
    name = spec.data.adapter
    if name == "movielens":
        from recsys.data.adapters import movielens as mod
    elif name == "amazon_sr":
        from recsys.data.adapters import amazon_sr as mod
    else:
        from recsys.data.adapters import parquet as mod
    return mod
