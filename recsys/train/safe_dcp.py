"""Read torch.distributed.checkpoint folders without executing anything they contain.

DCP's `FileSystemReader.read_metadata` unpickles `.metadata` with plain `pickle.load`, and its `DefaultLoadPlanner`
reads non-tensor values with `torch.load(weights_only=False)`: a checkpoint written by someone else could run code
on `evaluate`, `finetune --from` or `--resume`. Here `.metadata` goes through an unpickler that only builds the
handful of DCP metadata classes (plain dataclasses), `torch.Size`, dtypes and paths, and non-tensor values are read
with `weights_only=True`. The metadata's shard file names must be files the manifest lists (no `../` reads).
Tensors themselves were already read with `weights_only=True` by DCP.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from recsys.errors import CheckpointError

# (module, name) pairs a DCP `.metadata` pickle may name (found by recording what torch 2.13 writes; the metadata
# classes are dataclasses whose state is a plain dict, so building them runs no user code)
_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_META, "Metadata"), (_DCP_META, "MetadataIndex"), (_DCP_META, "StorageMeta"),
    (_DCP_META, "TensorProperties"), (_DCP_META, "TensorStorageMetadata"), (_DCP_META, "BytesStorageMetadata"),
    (_DCP_META, "ChunkStorageMetadata"), (_DCP_META, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not a checkpoint metadata type)")


def read_metadata(folder: Path, allowed_files: Optional[Iterable[str]] = None) -> Metadata:
    """`folder/.metadata` through the restricted unpickler; CheckpointError when it is not DCP metadata or names
    a data file outside `allowed_files`."""
    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as fh:
            meta = _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no .metadata (not a torch.distributed.checkpoint folder)") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from a damaged or hostile file
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(meta, Metadata) or not isinstance(getattr(meta, "state_dict_metadata", None), dict):
        raise CheckpointError(f"{path}: not checkpoint metadata (holds a {type(meta).__name__})")
    if allowed_files is not None:
        allowed = set(allowed_files)
        for info in (meta.storage_data or {}).values():
            name = str(getattr(info, "relative_path", ""))
            if name not in allowed:
                raise CheckpointError(f"{path}: refers to data file {name!r}, which the manifest does not list")
    return meta


class _SafeReader(dcp.FileSystemReader):
    def __init__(self, folder: Path, allowed_files: Optional[Iterable[str]]) -> None:
        super().__init__(str(folder))
        self._folder, self._allowed = Path(folder), allowed_files

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        meta = read_metadata(self._folder, self._allowed)
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        # DefaultLoadPlanner unpickles non-tensor values with weights_only=False; plain data is all we save
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # DCP's own helper for this

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load(state: dict, folder: Path, allowed_files: Optional[Iterable[str]] = None) -> None:
    """`dcp.load(state, folder)` through the restricted reader and planner (collective, like dcp.load)."""
    dcp.load(state, storage_reader=_SafeReader(folder, allowed_files), planner=_SafePlanner())


def plain_file_name(name: str) -> bool:
    """A file directly inside the checkpoint folder: no separators, not `.`/`..`."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")
