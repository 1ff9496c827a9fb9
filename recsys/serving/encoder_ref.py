"""The bundle's reference to its text encoder, and the encoder it names, checked by content before use.

A bundle does not copy the encoder's weights (90 MB for MiniLM); it names them: the installed package and its
version (or a local folder), the content identity of the model folder (weights + config + tokenizer) and the
weights' sha256. Serving resolves the reference only when it first meets a text the catalogue lacks, and refuses
an encoder whose content differs: its vectors would not be the ones the model was trained with.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

from recsys.errors import RecsysError
from recsys.spec.config import Spec

log = logging.getLogger("recsys.serving.encoder")


def serving_models_root() -> Path:
    """Where serving extracts `package:` encoders: $RECSYS_MODELS_DIR, else ~/.cache/recsys/models."""
    return Path(os.environ.get("RECSYS_MODELS_DIR") or Path.home() / ".cache" / "recsys" / "models")


def encoder_reference(spec: Spec) -> Optional[Dict[str, Any]]:
    """What serving needs to re-create the spec's text encoder (None unless text mode llm or hybrid)."""
    if not spec.text.frozen:
        return None
    from recsys.fileio import sha256_file
    from recsys.text.model_source import PACKAGE_DISTRIBUTIONS, PACKAGE_PREFIX, model_identity, \
        weight_files
    from recsys.text.pipeline import model_dir
    from recsys.text.paths import model_location

    folder = model_dir(spec)
    enc = spec.text.encoder
    ref: Dict[str, Any] = {"model": model_location(spec), "identity": model_identity(folder),
                           "weights_sha256": {p.name: sha256_file(p) for p in weight_files(folder)},
                           "pooling": enc.pooling, "max_length": enc.max_length, "normalize": enc.normalize}
    if enc.model.startswith(PACKAGE_PREFIX):
        package = enc.model[len(PACKAGE_PREFIX):]
        dist = PACKAGE_DISTRIBUTIONS.get(package, package.replace("_", "-"))
        ref["package"] = package
        ref["distribution"] = dist
        try:
            ref["version"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            ref["version"] = None
    return ref


def load_referenced_encoder(ref: Dict[str, Any], enc_spec, device: str = "cpu"):
    """The TextEncoder a bundle names (`enc_spec`: its spec's text.encoder section: pooling, length, backend), after
    its content matched the recorded identity."""
    from recsys.text.encoder import load_encoder
    from recsys.text.model_source import PACKAGE_PREFIX, model_identity, resolve_model_dir

    root = serving_models_root()
    folder = resolve_model_dir(ref["model"], root, root / "identity_memo.json")
    got = model_identity(folder)
    if got != ref["identity"]:
        where = f"package {ref.get('distribution')}=={ref.get('version')}" if ref["model"].startswith(
            PACKAGE_PREFIX) else str(folder)
        raise RecsysError(f"text encoder {folder}: content {got[:12]} differs from the bundle's {ref['identity'][:12]}"
                          f"; install {where}")
    log.info("text encoder for new texts: %s (%s)", folder, got[:12])
    return load_encoder(folder, enc_spec, device=device, derived_root=root / "derived", identity=got)
