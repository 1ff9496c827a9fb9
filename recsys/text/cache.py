"""On-disk cache of text vectors, so each distinct text is encoded once per encoder configuration.

Layout of one cache folder (one per `CacheKey`: model identity + backend + pooling + max_length + normalize):

    manifest.json                 key, dim, count and the list of parts (file names, row counts, sha256)
    part-<digest>.vectors.npy     float32 [rows, dim] of one part, opened memory-mapped
    part-<digest>.keys.npy        |S20 [rows], sha1 of each row's text (utf-8)
    .lock                         flock held by every writer for the whole of its write

A part is immutable and named by the digest of the text hashes it holds, so the same texts written by a resumed or
a differently sharded run land in the same file. The manifest lists parts sorted by name and carries nothing
else that depends on timing (no generation counter, no dates): the folder's content is a function of which parts
exist, which is what lets an encode run killed at any point and rerun end bit-for-bit where an uninterrupted run
ends. Adding a part writes it (temp file + rename) and then atomically replaces the manifest (the commit point):
readers see either the old or the new set of parts, never a mix, and since every writer holds the lock, a temp
file seen while holding it belongs to a dead writer and is removed.

Format 1 (one `vectors-<gen>.npy`/`keys-<gen>.npy` pair) is still read, as a single part; the next append rewrites
the manifest as format 2 and keeps those two files as they are.

Anything that does not add up (other key, wrong size, checksum mismatch, index/matrix length mismatch) raises
`DataError` - a cache is never silently trusted or silently rebuilt, because stale vectors would quietly poison a
model.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from recsys.errors import DataError
from recsys.fileio import sha256_file, write_text_atomic

log = logging.getLogger("recsys.text.cache")

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HASH_BYTES = 20  # sha1
# The reference numerics (PyTorch fp32). Keys of this backend leave it out of their dict, so caches written before
# the backend was part of the key keep their folder and stay valid.
REFERENCE_BACKEND = "torch"


def text_hash(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    return np.array([text_hash(t) for t in texts], dtype=f"S{HASH_BYTES}")


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes the vector of a given text."""

    model_identity: str
    pooling: str
    max_length: int
    normalize: bool
    backend: str = REFERENCE_BACKEND  # how the model is run (recsys.text.backends): other numerics, other vectors

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.backend == REFERENCE_BACKEND:
            del d["backend"]
        return d

    def folder_name(self) -> str:
        digest = hashlib.sha1(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:12]
        norm = "norm" if self.normalize else "raw"
        backend = "" if self.backend == REFERENCE_BACKEND else f"-{self.backend}"
        return f"{self.model_identity[:12]}{backend}-{self.pooling}-{self.max_length}-{norm}-{digest}"


@dataclass
class Part:
    vectors_file: str
    keys_file: str
    count: int
    vectors_sha256: str
    keys_sha256: str


@dataclass
class Manifest:
    format_version: int
    key: dict
    dim: int
    count: int
    parts: List[Part] = field(default_factory=list)


def _manifest_from_json(raw: dict) -> Manifest:
    """Format 2 as written; format 1 (one generation of two files) becomes a one-part manifest."""
    raw = dict(raw)
    if raw.get("format_version") == 1:
        part = Part(vectors_file=raw["vectors_file"], keys_file=raw["keys_file"], count=raw["count"],
                    vectors_sha256=raw["vectors_sha256"], keys_sha256=raw["keys_sha256"])
        return Manifest(format_version=1, key=raw["key"], dim=raw["dim"], count=raw["count"], parts=[part])
    parts = [Part(**p) for p in raw.pop("parts")]
    return Manifest(parts=parts, **raw)


class VectorCache:
    """Vectors of texts for one `CacheKey`, stored under `root / key.folder_name()`."""

    def __init__(self, root: Path, key: CacheKey, verify: bool = True) -> None:
        self.key = key
        self.folder = Path(root) / key.folder_name()
        self.verify = verify
        self.manifest: Optional[Manifest] = None
        self._parts: List[np.ndarray] = []  # memory-mapped float32 [rows, dim], one per manifest part
        self._offsets = np.zeros(1, dtype=np.int64)  # row where each part starts, plus the total
        self._index: Dict[bytes, int] = {}
        self._verified: set = set()
        self._load()

    # ------------------------------------------------------------------------------------------------- reading
    @property
    def count(self) -> int:
        return 0 if self.manifest is None else self.manifest.count

    @property
    def dim(self) -> Optional[int]:
        return None if self.manifest is None else self.manifest.dim

    @property
    def part_files(self) -> List[str]:
        """Every file the manifest names (the cache's content besides manifest.json)."""
        if self.manifest is None:
            return []
        return [name for p in self.manifest.parts for name in (p.vectors_file, p.keys_file)]

    def _fail(self, what: str) -> DataError:
        return DataError(f"text vector cache {self.folder}: {what}; delete that folder and rerun "
                         f"`python jobs/encode_text.py --spec <spec>`")

    def _read_manifest(self) -> Optional[Manifest]:
        path = self.folder / "manifest.json"
        if not path.is_file():
            return None
        try:
            manifest = _manifest_from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise self._fail(f"unreadable manifest.json ({exc!r})") from None
        if manifest.format_version not in READABLE_VERSIONS:
            raise self._fail(f"format version {manifest.format_version}, expected one of {READABLE_VERSIONS}")
        if manifest.key != self.key.as_dict():
            # Same folder, different encoder/config: the folder was copied or renamed by hand.
            raise self._fail(f"made by another encoder/config ({manifest.key}), not {self.key.as_dict()}")
        if sum(p.count for p in manifest.parts) != manifest.count:
            raise self._fail(f"parts hold {sum(p.count for p in manifest.parts)} rows, manifest says "
                             f"{manifest.count} (index/matrix mismatch)")
        return manifest

    def _load_part(self, part: Part, dim: int):
        vec_path, key_path = self.folder / part.vectors_file, self.folder / part.keys_file
        for path in (vec_path, key_path):
            if not path.is_file():
                raise self._fail(f"{path.name} named by manifest.json is missing")
        try:
            vectors = np.load(vec_path, mmap_mode="r")
            keys = np.load(key_path)
        except (ValueError, OSError) as exc:  # numpy refuses files shorter than their header says
            raise self._fail(f"truncated or corrupt matrix ({exc})") from None
        if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape != (part.count, dim):
            raise self._fail(f"matrix {vec_path.name} is {vectors.dtype}{list(vectors.shape)}, manifest says "
                             f"float32[{part.count}, {dim}]")
        if keys.dtype != np.dtype(f"S{HASH_BYTES}") or keys.shape != (part.count,):
            raise self._fail(f"index {key_path.name} holds {keys.shape[0] if keys.ndim else 0} entries for "
                             f"{part.count} vectors (index/matrix mismatch)")
        # Parts are immutable and named by content, so one check per process is enough (an append re-reads the
        # manifest and would otherwise re-hash every part each time).
        if self.verify and (part.vectors_file, part.vectors_sha256, part.keys_sha256) not in self._verified:
            if sha256_file(vec_path) != part.vectors_sha256:
                raise self._fail(f"{vec_path.name} checksum mismatch (modified or truncated)")
            if sha256_file(key_path) != part.keys_sha256:
                raise self._fail(f"{key_path.name} checksum mismatch (modified or truncated)")
            self._verified.add((part.vectors_file, part.vectors_sha256, part.keys_sha256))
        return vectors, keys

    def _load(self) -> None:
        manifest = self._read_manifest()
        self.manifest, self._parts, self._offsets, self._index = None, [], np.zeros(1, dtype=np.int64), {}
        if manifest is None:
            return
        parts, index, offsets = [], {}, [0]
        for part in manifest.parts:
            vectors, keys = self._load_part(part, manifest.dim)
            start = offsets[-1]
            for i, k in enumerate(keys.tolist()):
                if index.setdefault(bytes(k), start + i) != start + i:
                    raise self._fail("index holds duplicate text hashes")
            parts.append(vectors)
            offsets.append(start + part.count)
        self.manifest, self._parts, self._offsets, self._index = manifest, parts, np.array(offsets), index

    def lookup(self, hashes: Sequence[bytes]) -> np.ndarray:
        """Cache row of each hash, -1 where the text was never encoded."""
        get = self._index.get
        return np.fromiter((get(bytes(h), -1) for h in hashes), dtype=np.int64, count=len(hashes))

    def missing(self, hashes: Sequence[bytes]) -> List[int]:
        """Positions of `hashes` not in the cache (each distinct hash reported once, first occurrence)."""
        seen = set()
        out = []
        for i, h in enumerate(hashes):
            h = bytes(h)
            if h not in self._index and h not in seen:
                seen.add(h)
                out.append(i)
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), dim] of cache rows (as returned by `lookup`, all >= 0)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim or 0), dtype=np.float32)
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        for p, vectors in enumerate(self._parts):
            sel = np.nonzero(which == p)[0]
            if len(sel):
                out[sel] = vectors[rows[sel] - self._offsets[p]]
        return out

    def gather(self, hashes: Sequence[bytes]) -> np.ndarray:
        """float32 [len(hashes), dim]; every hash must be cached."""
        rows = self.lookup(hashes)
        if (rows < 0).any():
            raise self._fail(f"{int((rows < 0).sum())} requested texts are not cached")
        return self.take(rows)

    # ------------------------------------------------------------------------------------------------- writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _save_array(self, name: str, array: np.ndarray) -> str:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha256_file(self.folder / name)

    def _remove_leftovers(self) -> None:
        """Delete files no manifest names (temp or part files of a writer killed mid-write). Called with the lock
        held: every writer holds it while writing, so nothing here belongs to a live one."""
        keep = {"manifest.json", ".lock", *self.part_files}
        for path in self.folder.iterdir():
            if path.is_file() and path.name not in keep:
                path.unlink(missing_ok=True)

    def append(self, hashes: Sequence[bytes], vectors: np.ndarray) -> int:
        """Add vectors for texts not cached yet (others are ignored) as one new part; returns rows added."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(hashes):
            raise ValueError(f"append: {len(hashes)} hashes for vectors of shape {vectors.shape}")
        with self._locked():
            self._load()  # another process may have appended since we opened
            self._remove_leftovers()
            if self.manifest is not None and vectors.shape[1] != self.manifest.dim:
                raise self._fail(f"new vectors have dim {vectors.shape[1]}, cache has {self.manifest.dim}")
            fresh = self.missing(hashes)
            if not fresh:
                return 0
            keys = np.array([bytes(hashes[i]) for i in fresh], dtype=f"S{HASH_BYTES}")
            digest = hashlib.sha1(keys.tobytes()).hexdigest()[:20]
            part = Part(vectors_file=f"part-{digest}.vectors.npy", keys_file=f"part-{digest}.keys.npy",
                        count=len(fresh), vectors_sha256="", keys_sha256="")
            part.vectors_sha256 = self._save_array(part.vectors_file, np.ascontiguousarray(vectors[fresh]))
            part.keys_sha256 = self._save_array(part.keys_file, keys)
            old = self.manifest
            parts = sorted((old.parts if old else []) + [part], key=lambda p: p.vectors_file)
            manifest = Manifest(format_version=FORMAT_VERSION, key=self.key.as_dict(), dim=int(vectors.shape[1]),
                                count=sum(p.count for p in parts), parts=parts)
            # The manifest swap is the commit point.
            write_text_atomic(self.folder / "manifest.json", json.dumps(asdict(manifest), indent=1))
            self._load()
            log.debug("cache %s: +%d vectors (now %d in %d parts)", self.folder.name, len(fresh), self.count,
                      len(parts))
            return len(fresh)
