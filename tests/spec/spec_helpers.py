"""Helpers for spec tests: the repo layout and invalid variants of tests/fixtures/specs/minimal.yaml."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import pytest

from recsys.errors import SpecError
from recsys.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "tests" / "fixtures" / "specs"
MINIMAL = SPECS / "minimal.yaml"


def variant(tmp_path: Path, edits: Sequence[Tuple[str, str]], name: str = "variant.yaml") -> Path:
    """minimal.yaml with each (old, new) text edit applied exactly once, written to tmp_path/name."""
    text = MINIMAL.read_text()
    for old, new in edits:
        assert text.count(old) >= 1, f"edit target not in minimal.yaml: {old!r}"
        text = text.replace(old, new, 1)
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(path: Path, marker: str, occurrence: int = 0) -> int:
    """1-based line of the `occurrence`-th line containing `marker`."""
    hits = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if marker in line]
    assert len(hits) > occurrence, f"{marker!r} not found {occurrence + 1} times in {path}"
    return hits[occurrence]


def spec_errors(path: Path, overrides: Sequence[str] = ()) -> List[str]:
    """The lines of the SpecError raised by loading `path` (fails the test when it loads)."""
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return str(info.value).splitlines()
