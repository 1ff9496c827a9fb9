"""TextEncoder: pooling, padding and batching must not change what a text maps to."""
from __future__ import annotations

import numpy as np
import pytest

from recsys.errors import DataError
from recsys.text.encoder import TextEncoder

TEXTS = ["red pla filament", "3d printer filament spool for printers", "racing video game", "a",
         "nitrile lab gloves box large", "the blue cable", "microscope", "fast racing games with red and blue"]


def test_pooling_modes_differ_and_normalize(tiny_bert):
    mean = TextEncoder(tiny_bert, pooling="mean", normalize=True, device="cpu").encode(TEXTS)
    cls = TextEncoder(tiny_bert, pooling="cls", normalize=True, device="cpu").encode(TEXTS)
    raw = TextEncoder(tiny_bert, pooling="mean", normalize=False, device="cpu").encode(TEXTS)
    assert mean.shape == cls.shape == (len(TEXTS), 32) and mean.dtype == np.float32
    assert not np.allclose(mean, cls, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(mean, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), mean, atol=1e-5)


def test_mean_pooling_ignores_padding(tiny_bert):
    enc = TextEncoder(tiny_bert, pooling="mean", normalize=False, batch_size=8, device="cpu")
    short, long = "red", "3d printer filament spool for printers with red and blue and green"
    alone = enc.encode([short])  # no padding at all
    padded = enc.encode([short, long])  # `short` padded to the long text's length in the same batch
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-5)
    # Manual reference: mean of the unpadded token states.
    import torch

    ids = enc.tokenizer([short], return_tensors="pt")
    with torch.no_grad():
        hidden = enc.model(**ids).last_hidden_state[0]
    np.testing.assert_allclose(alone[0], hidden.mean(0).numpy(), atol=1e-5)


def test_order_and_batch_size_independent(tiny_bert):
    a = TextEncoder(tiny_bert, batch_size=3, device="cpu")
    b = TextEncoder(tiny_bert, batch_size=1, device="cpu")
    base = a.encode(TEXTS)
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = a.encode([TEXTS[i] for i in perm])
    np.testing.assert_allclose(shuffled, base[perm], atol=1e-5)
    np.testing.assert_allclose(b.encode(TEXTS), base, atol=1e-5)
    assert a.counters.forward_calls == 2 * 3 and b.counters.forward_calls == len(TEXTS)


def test_truncation_to_max_length(tiny_bert):
    enc = TextEncoder(tiny_bert, max_length=4, device="cpu")
    long = "red blue green fast slow lab glove"
    np.testing.assert_allclose(enc.encode([long])[0], enc.encode(["red blue"])[0], atol=1e-5)


def test_bad_folder_and_device(tmp_path, tiny_bert):
    with pytest.raises(DataError):
        TextEncoder(tmp_path, device="cpu")
    with pytest.raises(DataError, match="max_position_embeddings"):
        TextEncoder(tiny_bert, max_length=65, device="cpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="CUDA"):
            TextEncoder(tiny_bert, device="cuda")
