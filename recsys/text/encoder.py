"""A frozen Hugging Face encoder turning texts into fixed-size vectors.

Throughput matters more than anything here (tens of thousands of item texts per dataset), so texts are tokenised
once, sorted by token length and batched in that order: a batch then pads to the length of similar texts instead
of the longest one in the corpus. Vectors are put back into input order, so the result does not depend on it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Sequence

import numpy as np

from recsys.errors import DataError

log = logging.getLogger("recsys.text.encoder")

Pooling = Literal["mean", "cls"]


def pick_device(device: str) -> str:
    """`auto` -> cuda when available; an explicit `cuda` without CUDA is a clear error, not a crash later."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("text.encoder.device: cuda requested but CUDA is not available on this machine")
    if device not in ("cpu", "cuda"):
        raise DataError(f"text.encoder.device: unknown device {device!r} (use auto, cpu or cuda)")
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
                 normalize: bool = True, device: str = "auto") -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("mean", "cls"):
            raise DataError(f"text.encoder.pooling: unknown pooling {pooling!r} (use mean or cls)")
        self.model_dir = Path(model_dir)
        self.pooling = pooling
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.normalize = bool(normalize)
        self.device = pick_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot load text encoder from {self.model_dir}: {exc}") from None
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and self.max_length > limit:
            raise DataError(f"text.encoder.max_length: {self.max_length} exceeds the model's "
                            f"max_position_embeddings ({limit})")
        self.model.eval().to(self.device)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.dim = int(self.model.config.hidden_size)
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
        input_t = torch.from_numpy(input_ids).to(self.device)
        mask_t = torch.from_numpy(mask).to(self.device)
        hidden = self.model(input_ids=input_t, attention_mask=mask_t).last_hidden_state.float()
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
    def encode(self, texts: Sequence[str], progress: bool = False, desc: str = "encode") -> np.ndarray:
        """float32 [len(texts), dim], row i = vector of texts[i] (independent of batching and order)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if len(texts) == 0:
            return out
        start = time.perf_counter()
        ids = self._tokenize(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        # Longest first: the biggest batch runs first (an out-of-memory shows at once) and the ETA is pessimistic.
        order = np.argsort(-lengths, kind="stable")
        bar = None
        if progress:
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
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - start
        self.counters.texts_encoded += len(texts)
        self.counters.seconds += elapsed
        log.debug("encoded %d texts in %.2fs on %s", len(texts), elapsed, self.device)
        return out


def load_encoder(model_dir: Path, pooling: Pooling, max_length: int, batch_size: int, normalize: bool,
                 device: Optional[str]) -> TextEncoder:
    return TextEncoder(model_dir, pooling=pooling, max_length=max_length, batch_size=batch_size,
                       normalize=normalize, device=device or "auto")
