"""A frozen Hugging Face encoder turning texts into fixed-size vectors.

Throughput matters more than anything here (tens of thousands of item texts per dataset), so texts are tokenised
once, sorted by token length and batched in that order: a batch then pads to the length of similar texts instead
of the longest one in the corpus. Vectors are put back into input order, so the result does not depend on it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Sequence

import numpy as np

from recsys.errors import DataError
from recsys.text.model_source import hidden_size, model_identity

log = logging.getLogger("recsys.text.encoder")

Pooling = Literal["mean", "cls"]


def pick_device(device: str) -> str:
    """`auto` -> cuda when available (under torchrun: the local rank's GPU); an explicit `cuda` without CUDA is a
    clear error, not a crash later."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("text.encoder.device: cuda requested but CUDA is not available on this machine")
    if device not in ("cpu", "cuda"):
        raise DataError(f"text.encoder.device: unknown device {device!r} (use auto, cpu or cuda)")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        # one GPU per rank of a torchrun launch
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


@dataclass
class EncodeCounters:
    """What the encoder actually did; tests and the CLI read these (a cache hit must leave them at zero)."""

    forward_calls: int = 0
    texts_encoded: int = 0
    seconds: float = 0.0


class TextEncoder:
    """Loads a local model folder (never a hub) and encodes texts to float32 vectors."""

    def __init__(self, model_dir: Path, pooling: Pooling = "mean", max_length: int = 64, batch_size: int = 128,
                 normalize: bool = True, device: str = "auto", backend: str = "torch",
                 derived_root: Optional[Path] = None, identity: Optional[str] = None) -> None:
        import torch
        import transformers
        from transformers import AutoModel, AutoTokenizer

        from recsys.text import backends

        # the encode progress bar is ours; transformers' per-load "Loading weights" bar and notices are noise
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()

        if pooling not in ("mean", "cls"):
            raise DataError(f"text.encoder.pooling: unknown pooling {pooling!r} (use mean or cls)")
        self.model_dir = Path(model_dir)
        self.pooling = pooling
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.normalize = bool(normalize)
        self.backend = backends.resolve_backend(backend)
        self.device = pick_device(device)
        if self.backend == "torch-int8" and self.device != "cpu":
            raise DataError("text.encoder.backend: torch-int8 runs on CPU only (set text.encoder.device: cpu)")
        if self.backend == "torch-bf16":
            from recsys.models.precision import bf16_native

            native, why = bf16_native(self.device.split(":")[0])
            if not native:
                raise DataError(f"text.encoder.backend: torch-bf16 needs native bf16 ({why}); use torch or onnx-int8")

        def load_model():
            try:
                return AutoModel.from_pretrained(str(self.model_dir), local_files_only=True).eval()
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot load text encoder from {self.model_dir}: {exc}") from None

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot load text encoder from {self.model_dir}: {exc}") from None
        self.config = json.loads((self.model_dir / "config.json").read_text())
        limit = self.config.get("max_position_embeddings")
        if isinstance(limit, int) and self.max_length > limit:
            raise DataError(f"text.encoder.max_length: {self.max_length} exceeds the model's "
                            f"max_position_embeddings ({limit})")
        self.model = None  # the torch module (torch backends only)
        if self.backend in ("torch", "torch-bf16", "torch-int8"):
            model = load_model()
            if self.backend == "torch-int8":
                model = backends.torch_int8_model(model)
            elif self.backend == "torch-bf16":
                model = model.to(torch.bfloat16)
            self.model = model.to(self.device)
            self._run = backends.torch_runner(self.model, self.device)
        else:
            if derived_root is None or identity is None:
                derived_root = self.model_dir / ".onnx"
                identity = model_identity(self.model_dir)
            path = backends.export_onnx(load_model, identity, Path(derived_root))
            if self.backend == "onnx-int8":
                path = backends.quantize_onnx(path, self.config.get("intermediate_size"))
            threads = torch.get_num_threads() if self.device == "cpu" else None
            self._run = backends.onnx_runner(path, self.device, threads)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.dim = hidden_size(self.model_dir)
        self.counters = EncodeCounters()
        self._torch = torch

    # ------------------------------------------------------------------------------------------------ internals
    def _tokenize(self, texts: Sequence[str]) -> List[List[int]]:
        # One fast-tokenizer call for everything; padding is done per batch after sorting.
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)
        return enc["input_ids"]

    def _forward(self, ids: List[List[int]]) -> np.ndarray:
        torch = self._torch
        width = max(1, max(len(x) for x in ids))  # a tokenizer may emit nothing for ''
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        hidden = self._run(input_ids, mask)
        mask_t = torch.from_numpy(mask).to(hidden.device)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            # Mean over real tokens only: padded positions must not dilute short texts.
            m = mask_t.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        self.counters.forward_calls += 1
        return pooled.cpu().numpy().astype(np.float32, copy=False)

    # ---------------------------------------------------------------------------------------------------- public
    def encode(self, texts: Sequence[str], progress: bool = False, desc: str = "encode", bar=None) -> np.ndarray:
        """float32 [len(texts), dim], row i = vector of texts[i] (its position in `texts` does not matter; with
        an int8 backend the other texts of its batch do, slightly). `bar`: a tqdm to advance per batch."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if len(texts) == 0:
            return out
        start = time.perf_counter()
        ids = self._tokenize(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        # Longest first: the biggest batch runs first (an out-of-memory shows at once) and the ETA is pessimistic.
        order = np.argsort(-lengths, kind="stable")
        own_bar = bar is None and progress
        if own_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc=desc, unit="text", unit_scale=False, dynamic_ncols=True)
        try:
            with self._torch.inference_mode():
                for lo in range(0, len(order), self.batch_size):
                    idx = order[lo: lo + self.batch_size]
                    out[idx] = self._forward([ids[i] for i in idx])
                    if bar is not None:
                        bar.update(len(idx))
        finally:
            if own_bar:
                bar.close()
        elapsed = time.perf_counter() - start
        self.counters.texts_encoded += len(texts)
        self.counters.seconds += elapsed
        log.debug("encoded %d texts in %.2fs on %s", len(texts), elapsed, self.device)
        return out


def load_encoder(model_dir: Path, enc_spec, device: Optional[str], derived_root: Optional[Path] = None,
                 identity: Optional[str] = None) -> TextEncoder:
    """The encoder a spec's `text.encoder` section describes (`device` overrides the spec's)."""
    return TextEncoder(model_dir, pooling=enc_spec.pooling, max_length=enc_spec.max_length,
                       batch_size=enc_spec.batch_size, normalize=enc_spec.normalize,
                       device=device or enc_spec.device, backend=enc_spec.backend, derived_root=derived_root,
                       identity=identity)
