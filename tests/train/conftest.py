"""Fixtures of the training tests."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def group():
    """A 1-rank gloo group for DistributedModelParallel; the environment and thread count are restored after."""
    from recsys.train.dist import init_distributed, shutdown

    env, threads = dict(os.environ), torch.get_num_threads()
    ctx = init_distributed("cpu")
    yield ctx
    shutdown()
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)
