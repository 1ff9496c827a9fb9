"""On-disk cache of text vectors, so each distinct text is encoded once per encoder configuration.

Layout of one cache folder (one per `CacheKey`, i.e. model identity + pooling + max_length + normalize):

    manifest.json          key, dim, count, the current generation's file names and their sha256
    vectors-<gen>.npy      float32 [count, dim], opened memory-mapped
    keys-<gen>.npy         |S20 [count], sha1 of each row's text (utf-8)
    .lock                  flock taken while appending

Appending writes a new generation of both arrays to temp files, renames them into place, then atomically replaces
the manifest that names them: readers see either the old or the new generation, never a mix. Anything that does
not add up (other key, wrong size, checksum mismatch, index/matrix length mismatch) raises `DataError` - a cache
is never silently trusted or silently rebuilt, because stale vectors would quietly poison a model.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from recsys.errors import DataError
from recsys.text.model_source import sha256_file, write_text_atomic

log = logging.getLogger("recsys.text.cache")

FORMAT_VERSION = 1
HASH_BYTES = 20  # sha1


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

    def folder_name(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        norm = "norm" if self.normalize else "raw"
        return f"{self.model_identity[:12]}-{self.pooling}-{self.max_length}-{norm}-{digest}"


@dataclass
class Manifest:
    format_version: int
    key: dict
    dim: int
    count: int
    generation: int
    vectors_file: str
    keys_file: str
    vectors_sha256: str
    keys_sha256: str


class VectorCache:
    """Vectors of texts for one `CacheKey`, stored under `root / key.folder_name()`."""

    def __init__(self, root: Path, key: CacheKey, verify: bool = True) -> None:
        self.key = key
        self.folder = Path(root) / key.folder_name()
        self.verify = verify
        self.manifest: Optional[Manifest] = None
        self.vectors: Optional[np.ndarray] = None  # memory-mapped float32 [count, dim]
        self._index: Dict[bytes, int] = {}
        self._load()

    # ------------------------------------------------------------------------------------------------- reading
    @property
    def count(self) -> int:
        return 0 if self.manifest is None else self.manifest.count

    @property
    def dim(self) -> Optional[int]:
        return None if self.manifest is None else self.manifest.dim

    def _fail(self, what: str) -> DataError:
        return DataError(f"text vector cache {self.folder}: {what}; delete that folder and rerun "
                         f"`python jobs/encode_text.py --spec <spec>`")

    def _read_manifest(self) -> Optional[Manifest]:
        path = self.folder / "manifest.json"
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            manifest = Manifest(**raw)
        except (ValueError, TypeError) as exc:
            raise self._fail(f"unreadable manifest.json ({exc})") from None
        if manifest.format_version != FORMAT_VERSION:
            raise self._fail(f"format version {manifest.format_version}, expected {FORMAT_VERSION}")
        if manifest.key != asdict(self.key):
            # Same folder, different encoder/config: the folder was copied or renamed by hand.
            raise self._fail(f"made by another encoder/config ({manifest.key}), not {asdict(self.key)}")
        return manifest

    def _load(self) -> None:
        manifest = self._read_manifest()
        if manifest is None:
            self.manifest, self.vectors, self._index = None, None, {}
            return
        vec_path = self.folder / manifest.vectors_file
        key_path = self.folder / manifest.keys_file
        for path in (vec_path, key_path):
            if not path.is_file():
                raise self._fail(f"{path.name} named by manifest.json is missing")
        try:
            vectors = np.load(vec_path, mmap_mode="r")
            keys = np.load(key_path)
        except (ValueError, OSError) as exc:  # numpy refuses files shorter than their header says
            raise self._fail(f"truncated or corrupt matrix ({exc})") from None
        if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape != (manifest.count, manifest.dim):
            raise self._fail(f"matrix is {vectors.dtype}{list(vectors.shape)}, manifest says "
                             f"float32[{manifest.count}, {manifest.dim}]")
        if keys.dtype != np.dtype(f"S{HASH_BYTES}") or keys.shape != (manifest.count,):
            raise self._fail(f"index holds {keys.shape[0] if keys.ndim else 0} entries for "
                             f"{manifest.count} vectors (index/matrix mismatch)")
        if self.verify:
            if sha256_file(vec_path) != manifest.vectors_sha256:
                raise self._fail(f"{vec_path.name} checksum mismatch (modified or truncated)")
            if sha256_file(key_path) != manifest.keys_sha256:
                raise self._fail(f"{key_path.name} checksum mismatch (modified or truncated)")
        index = {bytes(k): i for i, k in enumerate(keys.tolist())}
        if len(index) != manifest.count:
            raise self._fail("index holds duplicate text hashes")
        self.manifest, self.vectors, self._index = manifest, vectors, index

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

    def gather(self, hashes: Sequence[bytes]) -> np.ndarray:
        """float32 [len(hashes), dim]; every hash must be cached."""
        rows = self.lookup(hashes)
        if (rows < 0).any():
            raise self._fail(f"{int((rows < 0).sum())} requested texts are not cached")
        return np.asarray(self.vectors[rows], dtype=np.float32)

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

    def append(self, hashes: Sequence[bytes], vectors: np.ndarray) -> int:
        """Add vectors for texts not cached yet (others are ignored); returns how many rows were added."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(hashes):
            raise ValueError(f"append: {len(hashes)} hashes for vectors of shape {vectors.shape}")
        with self._locked():
            self._load()  # another process may have appended since we opened
            if self.manifest is not None and vectors.shape[1] != self.manifest.dim:
                raise self._fail(f"new vectors have dim {vectors.shape[1]}, cache has {self.manifest.dim}")
            fresh = self.missing(hashes)
            if not fresh:
                return 0
            new_keys = np.array([bytes(hashes[i]) for i in fresh], dtype=f"S{HASH_BYTES}")
            new_vecs = vectors[fresh]
            if self.manifest is None:
                all_keys, all_vecs, gen = new_keys, new_vecs, 1
            else:
                all_keys = np.concatenate([np.load(self.folder / self.manifest.keys_file), new_keys])
                all_vecs = np.concatenate([np.asarray(self.vectors), new_vecs])
                gen = self.manifest.generation + 1
            old = self.manifest
            manifest = Manifest(format_version=FORMAT_VERSION, key=asdict(self.key), dim=int(all_vecs.shape[1]),
                                count=int(all_vecs.shape[0]), generation=gen,
                                vectors_file=f"vectors-{gen}.npy", keys_file=f"keys-{gen}.npy",
                                vectors_sha256="", keys_sha256="")
            manifest.vectors_sha256 = self._save_array(manifest.vectors_file, all_vecs)
            manifest.keys_sha256 = self._save_array(manifest.keys_file, all_keys)
            # The manifest swap is the commit point.
            write_text_atomic(self.folder / "manifest.json", json.dumps(asdict(manifest), indent=1))
            self.vectors = None  # drop our mmap of the old generation before deleting it
            if old is not None:
                for name in (old.vectors_file, old.keys_file):
                    (self.folder / name).unlink(missing_ok=True)
            self._load()
            log.debug("cache %s: +%d vectors (now %d)", self.folder.name, len(fresh), self.count)
            return len(fresh)
