"""Frozen text tables: the LLM vectors of each text table, projected to `text.reduce_dim`, unit-normalised and
stored in `text.dtype`, ready to be loaded into a TorchRec embedding table (`recsys.models.tables`).

Why project once, here: the model only ever reads projected vectors, so computing the projection in every model
build (an SVD over every text, then a projected fp32 copy next to the raw one on every rank) cost memory and time
that grows with the catalogue. Here the projection is fitted once per set of pretraining tables, the projected
tables are written once, and a model build reads them memory-mapped (a sharded table reads only its own rows).

Why keep the fitted projection: a fine-tune whose tables gained texts must place them in the *pretrained* basis
(the model's weights were learnt there). The projection is part of the model (persistent buffers
`l0.text_projection.*`, so checkpoints and bundles carry it), and `frozen_text_tables(spec, projection=...)`
projects a new spec's tables with a given one.

Layout under `<text.cache_dir>/frozen/<encoder cache key>/` (content-addressed, verified on load):

    projections/<id>.npz           center [width], basis [width, k] (float32); id = sha256 of those bytes
    fits/<fit key>.json            which projection a set of tables (their contents + reduce_dim) was fitted to
    tables/<id>/<content>-<dtype>.npy     one projected table; <content> = sha256 of its rows' text hashes
    tables/<id>/<content>-<dtype>.json    its shape, dtype and sha256

`project_vectors` is the one function that turns raw encoder vectors into table rows: serving uses it for texts
that arrive after the tables were written (cold items).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

import numpy as np

from recsys.errors import DataError
from recsys.fileio import sha256_file, write_bytes_atomic
from recsys.spec.config import Spec

log = logging.getLogger("recsys.text.frozen")

STORAGE_DTYPES = {"fp32": np.float32, "fp16": np.float16}
NO_TEXT_HASH = b"\0" * 20  # stands for a row without text in a table's content hash


@dataclass(frozen=True)
class TextProjection:
    """x -> (x - center) @ basis, then unit norm. `basis` None keeps the encoder's width (normalise only)."""

    center: np.ndarray  # float32 [width]
    basis: Optional[np.ndarray]  # float32 [width, k]
    id: str = field(init=False, default="")

    def __post_init__(self) -> None:
        h = hashlib.sha256()
        for a in (self.center, self.basis if self.basis is not None else np.zeros(0, np.float32)):
            a = np.ascontiguousarray(a, dtype=np.float32)
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        object.__setattr__(self, "id", h.hexdigest()[:24])

    @property
    def width(self) -> int:
        return int(self.center.shape[0])

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1]) if self.basis is not None else self.width


def project_vectors(raw: np.ndarray, projection: TextProjection) -> np.ndarray:
    """Raw encoder vectors [n, width] -> table rows [n, dim] float32, unit norm (what the text table stores, before
    the storage cast). The text-rows -> vectors seam: the tables are built with it, and so are texts added later."""
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 2 or raw.shape[1] != projection.width:
        raise DataError(f"text vectors of shape {list(raw.shape)} do not fit a projection of width "
                        f"{projection.width}")
    v = raw - projection.center if projection.basis is not None else raw
    if projection.basis is not None:
        v = v @ projection.basis
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.maximum(norm, 1e-12)).astype(np.float32)


def fit_projection(tables: Dict[str, np.ndarray], k: int) -> TextProjection:
    """Top-k principal components of the rows of every table together (row 0, "no text", left out).

    One basis for all tables keeps cosines between tables (query vs item text) meaningful; 64 components instead
    of 384 make the [batch, 20, dim] history gathers and their matmuls 6x cheaper while keeping the cosine
    structure. k is capped by the rows available; k = 0 or k >= width keeps the encoder's width."""
    import torch

    raw = torch.cat([torch.from_numpy(np.ascontiguousarray(t[1:], dtype=np.float32)) for t in tables.values()])
    width = int(raw.shape[1])
    k = min(k, int(raw.shape[0]) - 1, width)
    if not 0 < k < width:
        return TextProjection(center=np.zeros(width, np.float32), basis=None)
    center = raw.mean(0)
    _, _, vh = torch.linalg.svd(raw - center, full_matrices=False)
    basis = vh[:k].T.contiguous()
    basis = basis * torch.sign(basis[basis.abs().argmax(0), torch.arange(k)])  # fix SVD's sign freedom
    return TextProjection(center=center.numpy().astype(np.float32), basis=basis.numpy().astype(np.float32))


@dataclass
class FrozenText:
    """What a model needs of its text tables: the projection and each table's stored rows [rows, dim]."""

    projection: TextProjection
    tables: Dict[str, np.ndarray]  # text table name -> rows (memory-mapped, storage dtype); row 0 = zeros
    hashes: Dict[str, str]  # text table name -> sha256 of its stored file

    @property
    def dim(self) -> int:
        return self.projection.dim


# ------------------------------------------------------------------------------------------------------ storage
def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One writer at a time (ranks of one job build the same tables; the second finds them written)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def save_projection(folder: Path, projection: TextProjection) -> Path:
    path = folder / "projections" / f"{projection.id}.npz"
    if not path.is_file():
        buf = io.BytesIO()
        arrays = {"center": projection.center}
        if projection.basis is not None:
            arrays["basis"] = projection.basis
        np.savez(buf, **arrays)
        write_bytes_atomic(path, buf.getvalue())
    return path


def load_projection(path: Path) -> TextProjection:
    """A stored projection, checked against its content address (the file name)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            projection = TextProjection(center=z["center"], basis=z["basis"] if "basis" in z.files else None)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: unreadable text projection ({exc}); delete it to refit") from None
    if projection.id != path.stem:
        raise DataError(f"{path}: content does not match its name (id {projection.id}); delete it to refit")
    return projection


def _save_table(path: Path, rows: np.ndarray) -> None:
    data = _npy_bytes(rows)
    write_bytes_atomic(path, data)
    meta = {"shape": list(rows.shape), "dtype": str(rows.dtype), "sha256": hashlib.sha256(data).hexdigest()}
    write_bytes_atomic(path.with_suffix(".json"), json.dumps(meta).encode())


def _load_table(path: Path) -> np.ndarray:
    """Memory-mapped rows of a stored table, after checking size, shape, dtype and checksum."""
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable frozen text table ({exc}); delete it and its .json to rebuild") from None
    if list(rows.shape) != meta.get("shape") or str(rows.dtype) != meta.get("dtype"):
        raise DataError(f"{path}: holds {rows.dtype}{list(rows.shape)}, its .json says {meta.get('dtype')}"
                        f"{meta.get('shape')}; delete both to rebuild")
    if sha256_file(path) != meta.get("sha256"):
        raise DataError(f"{path}: checksum mismatch (modified or truncated); delete it and its .json to rebuild")
    return rows


# ------------------------------------------------------------------------------------------------------- tables
def table_content_hash(spec: Spec, table_name: str) -> str:
    """sha256 of the table's rows in order (each row's text hash, zeros for no text): same texts in the same rows
    give the same projected table, whatever the prepared folder is called."""
    from recsys.text.cache import text_hash
    from recsys.text.pipeline import _read_table
    from recsys.text.tables import has_text

    h = hashlib.sha256()
    for text in _read_table(spec, table_name).texts:
        h.update(text_hash(text) if has_text(text) else NO_TEXT_HASH)
    return h.hexdigest()[:32]


def frozen_root(spec: Spec) -> Path:
    """`<text.cache_dir>/frozen/<encoder cache key folder>`: projections depend on the encoder's vectors."""
    from recsys.text import paths
    from recsys.text.pipeline import cache_key

    return paths.cache_root(spec) / "frozen" / cache_key(spec).folder_name()


def frozen_text_tables(spec: Spec, projection: Optional[TextProjection] = None,
                       raw_vectors: Optional[Callable[[Spec, str], np.ndarray]] = None) -> FrozenText:
    """The frozen tables of every text table a feature reads (mode llm), written on first use.

    `projection`: use this one (a fine-tune passes the pretrained model's); None: the projection fitted on this
    spec's tables (fitted and stored the first time). `raw_vectors(spec, table)`: float32 [rows + 1, width] LLM
    vectors, default the text vector cache (`recsys.text.text_table_vectors`)."""
    if not spec.text.frozen:
        raise DataError(f"text.mode is '{spec.text.mode}': frozen text tables exist only in modes llm and hybrid")
    if raw_vectors is None:
        from recsys.text import text_table_vectors as raw_vectors
    names = spec.used_text_tables()
    root = frozen_root(spec)
    contents = {n: table_content_hash(spec, n) for n in names}
    raw: Dict[str, np.ndarray] = {}

    def raw_of(name: str) -> np.ndarray:
        if name not in raw:
            raw[name] = raw_vectors(spec, name)
        return raw[name]

    with _locked(root):
        if projection is None:
            fit_key = hashlib.sha256(json.dumps({"reduce_dim": spec.text.reduce_dim, "tables": contents},
                                                sort_keys=True).encode()).hexdigest()[:32]
            pointer = root / "fits" / f"{fit_key}.json"
            if pointer.is_file():
                projection = load_projection(root / "projections" / f"{json.loads(pointer.read_text())['id']}.npz")
            else:
                projection = fit_projection({n: raw_of(n) for n in names}, spec.text.reduce_dim)
                save_projection(root, projection)
                write_bytes_atomic(pointer, json.dumps({"id": projection.id, "reduce_dim": spec.text.reduce_dim,
                                                   "tables": contents}, indent=1).encode())
                log.info("text projection %s fitted: width %d -> %d", projection.id, projection.width,
                         projection.dim)
        else:
            save_projection(root, projection)
        dtype = STORAGE_DTYPES[spec.text.dtype]
        tables: Dict[str, np.ndarray] = {}
        hashes: Dict[str, str] = {}
        for name in names:
            path = root / "tables" / projection.id / f"{contents[name]}-{spec.text.dtype}.npy"
            if not path.is_file():
                vectors = raw_of(name)
                if vectors.shape[1] != projection.width:
                    raise DataError(f"text table '{name}': vectors of width {vectors.shape[1]}, the projection "
                                    f"expects {projection.width} (a different encoder than the pretrained model's)")
                rows = project_vectors(vectors, projection)
                rows[0] = 0.0  # row 0: no text
                _save_table(path, rows.astype(dtype))
                log.info("frozen text table %s: %d rows x %d (%s) written", name, rows.shape[0], rows.shape[1],
                         spec.text.dtype)
            tables[name] = _load_table(path)
            hashes[name] = json.loads(path.with_suffix(".json").read_text())["sha256"]
    return FrozenText(projection=projection, tables=tables, hashes=hashes)


# ----------------------------------------------------------------------------------------------------- planning
def planned_text_rows(spec: Spec) -> Dict[str, int]:
    """Rows (+ row 0) of each frozen text table, without reading vectors: the prepared table's row count, else
    `text.tables[].num_rows` (a spec planned before its data exists, e.g. production_example)."""
    import pyarrow.parquet as pq

    from recsys.text import paths

    declared = {t.name: t.num_rows for t in spec.text.tables}
    out: Dict[str, int] = {}
    for name in spec.used_text_tables():
        path = paths.text_table_path(spec, name)
        if path.is_file():
            out[name] = pq.ParquetFile(path).metadata.num_rows + 1
        elif declared.get(name):
            out[name] = int(declared[name]) + 1
        else:
            raise DataError(f"text table '{name}': {path} not prepared and text.tables.{name}.num_rows not set; run "
                            f"jobs/prepare_data.py or declare num_rows to plan it")
    return out


def planned_text_dim(spec: Spec) -> int:
    """Width of the frozen text tables: `text.reduce_dim`, or the encoder's width when it is 0."""
    if spec.text.reduce_dim > 0:
        return spec.text.reduce_dim
    from recsys.text import text_dim

    return text_dim(spec)
