from __future__ import annotations

from pathlib import Path

import pytest

from reliability_helpers import SPEC


@pytest.fixture(scope="session")
def ml_prepared(tmp_path_factory) -> Path:
    """MovieLens prepared once per session (text.mode none) into a temporary folder."""
    from recsys.data.prepare import prepare
    from recsys.spec.loader import load_spec

    out = tmp_path_factory.mktemp("rel_ml_prepared")
    prepare(load_spec(SPEC, [f"data.prepared_dir={out}", "text.mode=none"]))
    return out
