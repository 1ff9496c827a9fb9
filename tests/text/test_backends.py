"""Encoder backends: ONNX Runtime fp32 matches PyTorch, int8 stays within the stated cosine, each backend has its
own cache entries, derived model files are verified before use; the benchmark's --quick mode runs end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recsys.errors import DataError
from recsys.text import cache_key, encode_text_tables, text_table_vectors
from recsys.text.encoder import TextEncoder

from textfeat_helpers import WORDS, make_spec, write_text_table

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("onnxruntime")


def _texts(n=40):
    # every width from 1 word to 30: the exported graph must handle all of them like torch does
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 30)) for i in range(n)]


@pytest.fixture(scope="module")
def encoders(tiny_bert, tmp_path_factory):
    derived = tmp_path_factory.mktemp("derived")
    return {b: TextEncoder(tiny_bert, max_length=32, batch_size=8, device="cpu", backend=b, derived_root=derived,
                           identity="t" * 64) for b in ("torch", "onnx", "onnx-int8", "torch-int8")}


def test_onnx_matches_torch_and_int8_stays_close(encoders):
    texts = _texts()
    vecs = {b: e.encode(texts) for b, e in encoders.items()}
    np.testing.assert_allclose(vecs["onnx"], vecs["torch"], atol=1e-5)
    for backend in ("onnx-int8", "torch-int8"):
        cos = np.sum(vecs[backend] * vecs["torch"], axis=1)
        assert cos.min() >= 0.99, (backend, cos.min())
        assert not np.array_equal(vecs[backend], vecs["torch"])  # it did run in int8


def test_derived_model_is_verified(tiny_bert, tmp_path):
    derived = tmp_path / "derived"
    TextEncoder(tiny_bert, max_length=32, device="cpu", backend="onnx", derived_root=derived, identity="u" * 64)
    model = next(derived.glob("*/model.onnx"))
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(DataError, match="checksum"):
        TextEncoder(tiny_bert, max_length=32, device="cpu", backend="onnx", derived_root=derived, identity="u" * 64)


def test_each_backend_has_its_own_cache_entries(tmp_path, tiny_bert):
    write_text_table(tmp_path / "prepared", "items", ["a", "b"], ["red pla filament", "racing video game"])
    write_text_table(tmp_path / "prepared", "queries", ["q"], ["lab gloves"])
    ref = make_spec(tmp_path, str(tiny_bert))
    int8 = make_spec(tmp_path, str(tiny_bert), encoder={"backend": "onnx-int8"})
    assert cache_key(ref).folder_name() != cache_key(int8).folder_name()
    encode_text_tables(ref, progress=False)
    with pytest.raises(DataError, match="encode_text.py"):
        text_table_vectors(int8, "items")  # the reference's vectors are not the int8 encoder's
    assert encode_text_tables(int8, progress=False)["items"]["new"] == 2
    cos = np.sum(text_table_vectors(int8, "items")[1:] * text_table_vectors(ref, "items")[1:], axis=1)
    assert cos.min() >= 0.99


def test_unknown_backend_is_a_spec_error(tmp_path, tiny_bert):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="backend"):
        make_spec(tmp_path, str(tiny_bert), encoder={"backend": "tensorrt"})


@pytest.mark.slow
def test_benchmark_quick_mode(tmp_path, tiny_bert):
    out = tmp_path / "text_encode_quick.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "text_encode.py"), "--quick", "--n", "24",
                          "--model", str(tiny_bert), "--out", str(out)], capture_output=True, text=True,
                         timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    names = [r["backend"] for r in result["rows"]]
    assert "torch" in names and "onnx-int8" in names
    assert all(r["texts_per_s"] > 0 and r["cosine_min"] >= 0.99 for r in result["rows"])
    assert result["machine"]["capability"] and result["machine"]["commit"]
    assert out.with_suffix(".png").stat().st_size > 0 and "| encoder |" in out.with_suffix(".md").read_text()


def test_torch_bf16_is_close_where_native_and_refused_where_emulated(tiny_bert, monkeypatch):
    from recsys.models import precision

    monkeypatch.setattr(precision, "bf16_native", lambda device: (True, "test: native"))
    texts = _texts()
    ref = TextEncoder(tiny_bert, max_length=32, batch_size=8, device="cpu", backend="torch").encode(texts)
    bf16 = TextEncoder(tiny_bert, max_length=32, batch_size=8, device="cpu", backend="torch-bf16")
    assert next(bf16.model.parameters()).dtype.is_floating_point and str(next(bf16.model.parameters()).dtype) == \
        "torch.bfloat16"
    vecs = bf16.encode(texts)
    assert vecs.dtype == np.float32 and not np.array_equal(vecs, ref)  # it did run in bf16
    assert np.sum(vecs * ref, axis=1).min() >= 0.99
    monkeypatch.setattr(precision, "bf16_native", lambda device: (False, "CPU X has no AVX512-BF16/AMX"))
    with pytest.raises(DataError, match="torch-bf16 needs native bf16 .CPU X"):
        TextEncoder(tiny_bert, max_length=32, device="cpu", backend="torch-bf16")
