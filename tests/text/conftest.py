"""Shared fixtures: a tiny random BERT saved to disk (no downloads)."""
from __future__ import annotations

from pathlib import Path

import pytest

from textfeat_helpers import build_tiny_bert


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), seed=0)


@pytest.fixture(scope="session")
def other_tiny_bert(tmp_path_factory) -> Path:
    """Same architecture and tokenizer, different weights: must never share vectors with `tiny_bert`."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert_b"), seed=1)
