"""A model bundle: one folder that holds everything scoring needs, verified before anything in it is used.

Layout (every file listed in `manifest.json` with its sha256):
    manifest.json             format, spec fingerprint, schema hash, training commit, checkpoint, quantisation,
                              text encoder reference, files -> sha256
    spec.yaml                 the resolved spec the model was trained with (precision set for serving)
    schema/                   the resolved schema: schema.json, vocab/*.parquet, text_tables/*.parquet
    catalogue/<side>.parquet  the side tables' feature columns (item features of the catalogue)
    text.safetensors          text tables the model reads: LLM vectors (mode llm) or hashed token ids (random);
                              mode hybrid: both, the token ids under `tokens/<table>`
    weights.safetensors       the model's weights, unsharded (int8/fp16 embedding tables in TorchRec's layout)

Loading never unpickles: JSON, YAML (safe loader), parquet and safetensors only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.data.resolved import ResolvedSchema, load_schema
from recsys.fileio import sha256_file
from recsys.errors import RecsysError
from recsys.spec.config import Spec

FORMAT = 1
MANIFEST = "manifest.json"
SPEC_FILE = "spec.yaml"
SCHEMA_DIR = "schema"
CATALOGUE_DIR = "catalogue"
TEXT_FILE = "text.safetensors"
WEIGHTS_FILE = "weights.safetensors"
TOKENS_PREFIX = "tokens/"  # text.safetensors of a hybrid model: the token ids of text table T are `tokens/T`


class BundleError(RecsysError):
    """A bundle that is incomplete, altered or from an incompatible version."""


def read_manifest(folder: Path) -> Dict[str, Any]:
    mf = Path(folder) / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{mf}: missing; {folder} is not a bundle (make one with jobs/export.py)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{mf}: bundle format {got!r}, this code reads format {FORMAT}")
    return manifest


def verify(folder: Path) -> Dict[str, Any]:
    """The manifest, after every file it names matched its sha256 (BundleError naming the first that does not)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{folder / MANIFEST}: lists no files")
    for rel, digest in files.items():
        p = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise BundleError(f"{folder / MANIFEST}: file entry {rel!r} points outside the bundle")
        if not p.is_file():
            raise BundleError(f"{p}: missing from the bundle")
        got = sha256_file(p)
        if got != digest:
            raise BundleError(f"{p}: sha256 {got[:12]} does not match the manifest ({str(digest)[:12]}); the bundle "
                              f"was altered or damaged")
    return manifest


def list_files(folder: Path) -> Dict[str, str]:
    """Relative path -> sha256 of every file under `folder` except the manifest."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def save_tensors(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@dataclass
class Bundle:
    folder: Path
    manifest: Dict[str, Any]
    spec: Spec
    schema: ResolvedSchema
    catalogue: Dict[str, pa.Table]
    text_tables: Dict[str, np.ndarray]
    weights: Dict[str, torch.Tensor]
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def quantize(self) -> str:
        return self.manifest.get("quantize", "none")

    @property
    def bundle_hash(self) -> str:
        """sha256 of the manifest (which names every file's sha256): the bundle's identity."""
        return sha256_file(self.folder / MANIFEST)

    @property
    def encoder(self) -> Optional[Dict[str, Any]]:
        return self.manifest.get("encoder")


def load_bundle(folder: Path) -> Bundle:
    """Verify, then read every part of a bundle (nothing is unpickled)."""
    from recsys.spec.loader import load_spec

    folder = Path(folder)
    manifest = verify(folder)
    spec = load_spec(folder / SPEC_FILE)
    schema = load_schema(folder / SCHEMA_DIR)
    if schema.sha256 != manifest.get("schema_sha256"):
        raise BundleError(f"{folder / SCHEMA_DIR / 'schema.json'}: schema hash does not match the manifest")
    catalogue = {p.stem: pq.read_table(p) for p in sorted((folder / CATALOGUE_DIR).glob("*.parquet"))}
    text = {k: v.numpy() for k, v in load_tensors(folder / TEXT_FILE).items()} if (folder / TEXT_FILE).is_file() \
        else {}
    weights = load_tensors(folder / WEIGHTS_FILE)
    return Bundle(folder=folder, manifest=manifest, spec=spec, schema=schema, catalogue=catalogue, text_tables=text,
                  weights=weights)
