"""Shared fixtures of the model / training / fine-tuning tests: the shipped MovieLens prepared once per session into
a temporary folder, and tiny-model overrides so a training step costs milliseconds, not seconds."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List

import pytest

REPO = Path(__file__).resolve().parents[1]
ML_SPEC = REPO / "feature_specs" / "movielens.yaml"

# Small everything: 8-wide aspects and tables, 5-step histories, hashed-token text (no LLM needed).
TINY = ["model.dim=8", "model.hidden=[16,8]", "tables.user.dim=8", "tables.item.dim=8", "tables.genre.dim=4",
        "tables.query.dim=4", "features.hist_items.max_len=5", "features.hist_text.max_len=5", "text.mode=random",
        "text.random_buckets=4096", "text.random_dim=8", "text.random_max_tokens=8", "train.batch_size=256",
        "train.eval_batch_size=4096", "train.epochs=1", "train.max_steps=10", "train.log_every_steps=1"]


@pytest.fixture(scope="session")
def ml_prepared(tmp_path_factory) -> Path:
    from recsys.data.prepare import prepare
    from recsys.spec.loader import load_spec

    out = tmp_path_factory.mktemp("ml_prepared")
    prepare(load_spec(ML_SPEC, [f"data.prepared_dir={out}"]))
    return out


@pytest.fixture(scope="session")
def tiny_overrides(ml_prepared) -> Callable[..., List[str]]:
    """`--set` strings for the tiny MovieLens model (later overrides win)."""
    def make(*extra: str) -> List[str]:
        return [f"data.prepared_dir={ml_prepared}", *TINY, *extra]
    return make


@pytest.fixture(scope="session")
def tiny_spec(tiny_overrides):
    from recsys.spec.loader import load_spec

    return lambda *extra: load_spec(ML_SPEC, tiny_overrides(*extra))


@pytest.fixture
def child_env() -> dict:
    """Environment for a child job: no torch.distributed variables left by an in-process 1-rank group."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    """A tiny BERT (2 layers, width 32, MovieLens title words) saved as a local model folder: `text.encoder.model`
    for tests of the default `text.mode: llm` path (see tests/tiny_llm.py)."""
    from tiny_llm import build_tiny_bert, movielens_words

    return build_tiny_bert(tmp_path_factory.mktemp("tiny_llm"), seed=0, words=movielens_words())


@pytest.fixture(scope="session")
def llm_overrides(tiny_overrides, tiny_llm, tmp_path_factory) -> Callable[..., List[str]]:
    """`--set` strings of the tiny MovieLens model on the default text path: `text.mode=llm` with `tiny_llm`, its
    own vector cache (encoded once per session, on first use) and a 16-wide text basis (later overrides win)."""
    from recsys.spec.loader import load_spec
    from recsys.text.pipeline import encode_text_tables

    cache = tmp_path_factory.mktemp("llm_cache")
    sets = ["text.mode=llm", f"text.encoder.model={tiny_llm}", "text.encoder.device=cpu",
            "text.encoder.max_length=16", f"text.cache_dir={cache}", "text.reduce_dim=16"]
    encode_text_tables(load_spec(ML_SPEC, tiny_overrides(*sets)), device="cpu", progress=False)

    def make(*extra: str) -> List[str]:
        return tiny_overrides(*sets, *extra)
    return make
