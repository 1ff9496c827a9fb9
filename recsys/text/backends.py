"""How a text encoder's transformer is run: PyTorch fp32 (the reference), ONNX Runtime, or either in int8.

Every backend maps (input_ids, attention_mask) int64 [batch, width] to last_hidden_state float32
[batch, width, hidden]; pooling and normalisation stay in `recsys.text.encoder`, common to all. A backend other
than the reference computes other numbers, so its name is part of the cache key (`recsys.text.cache.CacheKey`):
vectors of different backends never mix.

- `torch`: transformers' model in fp32 on CPU or CUDA.
- `torch-bf16`: the same model with bfloat16 weights and activations (outputs returned as float32), only where the
  device runs bf16 natively (AVX512-BF16 / AMX CPUs, GPUs with bf16 units): emulated bf16 is far slower than fp32.
- `torch-int8`: `torch.ao.quantization.quantize_dynamic` on every Linear (int8 weights per tensor, activations
  quantised per batch at run time; fbgemm kernels, CPU only).
- `onnx`: the model exported once with `torch.onnx.export` and run by ONNX Runtime (graph fusions: attention,
  GELU, layer norm), CPU execution provider, or CUDA's when onnxruntime-gpu is installed.
- `onnx-int8`: that export quantised by `onnxruntime.quantization.quantize_dynamic` (int8 weights per output
  channel; activations quantised per batch at run time; the feed-forward down-projections stay fp32, see
  `int8_excluded_nodes`). On x86 the int8 GEMMs use AVX2 (vpmaddubsw), AVX512-BW,
  or AVX512-VNNI / AVX-VNNI when the CPU has them (the fastest); fp32 is not involved in those GEMMs at all.

Exported and quantised models are derived files: they are written once under `<cache_dir>/models/onnx/`, named
by the source model's identity, with their sha256 recorded next to them and checked before a session loads them.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from recsys.errors import DataError
from recsys.fileio import sha256_file, write_text_atomic

log = logging.getLogger("recsys.text.backends")

BACKENDS = ("torch", "torch-bf16", "torch-int8", "onnx", "onnx-int8")
ONNX_OPSET = 17
# Bump when the export or quantisation recipe changes: it names the derived files (other recipe, other file).
ONNX_RECIPE = 2

Runner = Callable[[np.ndarray, np.ndarray], "object"]  # (ids, mask) -> torch.Tensor [B, W, H] float32


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise DataError(f"text.encoder.backend: unknown backend {backend!r} (use one of {', '.join(BACKENDS)})")
    return backend


def backend_identity(backend: str) -> str:
    """The backend as the cache key names it: ONNX backends carry their export/quantisation recipe (a new recipe
    computes other numbers, so it must not reuse the old one's vectors)."""
    backend = resolve_backend(backend)
    return f"{backend}-r{ONNX_RECIPE}" if backend.startswith("onnx") else backend


def torch_runner(model, device: str) -> Runner:
    import torch

    def run(ids: np.ndarray, mask: np.ndarray):
        out = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device))
        return out.last_hidden_state.float()

    return run


def torch_int8_model(model):
    """int8 dynamic quantisation of every Linear (torch.ao); CPU only."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


# ------------------------------------------------------------------------------------------------------ ONNX
def _last_hidden_state_module(model):
    """The model behind a plain (input_ids, attention_mask) -> last_hidden_state signature, for the exporter."""
    import torch

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return LastHiddenState(model)


def _verified(path: Path) -> bool:
    sidecar = path.with_suffix(path.suffix + ".sha256")
    if not path.is_file() or not sidecar.is_file():
        return False
    if sidecar.read_text().strip() != sha256_file(path):
        raise DataError(f"{path}: checksum differs from {sidecar.name} (modified or truncated); delete "
                        f"{path.parent} to rebuild it")
    return True


def _publish(tmp: Path, path: Path) -> None:
    """Move a finished derived file into place with its checksum (sidecar last: it marks the file complete)."""
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    write_text_atomic(path.with_suffix(path.suffix + ".sha256"), digest + "\n")


def export_onnx(model_loader: Callable[[], object], identity: str, root: Path) -> Path:
    """The fp32 ONNX export of the model, written once under `root` (atomic; concurrent ranks may race: same
    result, last rename wins)."""
    folder = root / f"{identity[:16]}-r{ONNX_RECIPE}"
    path = folder / "model.onnx"
    if _verified(path):
        return path
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    model = model_loader()
    # The attention mask of the example must hold padding: with an all-ones mask the tracer may fold the mask
    # away and the exported graph would ignore padding.
    ids = torch.ones((2, 8), dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    mask[1, 5:] = 0
    fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".onnx.tmp", dir=folder)
    os.close(fd)
    try:
        log.info("exporting the text encoder to ONNX (once) -> %s", path)
        with warnings.catch_warnings():
            # the tracer notes every Python-side `if` of transformers' mask code; for an encoder those branches
            # go the same way at every width (tests/text/test_backends.py compares widths 1..max_length with
            # torch), so the notes would only flood the console
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", module=r"torch\.onnx\..*")
            torch.onnx.export(_last_hidden_state_module(model), (ids, mask), tmp,
                              input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                              opset_version=ONNX_OPSET, dynamo=False,
                              dynamic_axes={"input_ids": {0: "batch", 1: "width"},
                                            "attention_mask": {0: "batch", 1: "width"},
                                            "last_hidden_state": {0: "batch", 1: "width"}})
        _publish(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def int8_excluded_nodes(model_path: Path, intermediate_size: Optional[int]) -> list:
    """MatMuls kept in fp32 by the int8 recipe: products of two activations (attention scores) and the
    feed-forward down-projections, whose GELU-output inputs have the widest range: quantising those per tensor
    costs the most accuracy (on all-MiniLM-L6-v2 the worst text's cosine to fp32 goes from 0.984 to 0.992)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = shapes.get(node.input[1])
        if weight is None or (intermediate_size and len(weight) == 2 and weight[0] == intermediate_size):
            out.append(node.name)
    return out


def quantize_onnx(fp32_path: Path, intermediate_size: Optional[int]) -> Path:
    """int8 weights (per output channel) with dynamic int8 activations, via onnxruntime.quantization, on every
    weight MatMul except those of `int8_excluded_nodes`."""
    path = fp32_path.with_name("model.int8.onnx")
    if _verified(path):
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fd, tmp = tempfile.mkstemp(prefix=".model.int8.", suffix=".onnx.tmp", dir=fp32_path.parent)
    os.close(fd)
    try:
        log.info("quantising the ONNX text encoder to int8 (once) -> %s", path)
        quantize_dynamic(str(fp32_path), tmp, weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=int8_excluded_nodes(fp32_path, intermediate_size))
        _publish(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def onnx_runner(path: Path, device: str, threads: Optional[int]) -> Runner:
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # its warnings about unused initialisers are noise on every start
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DataError("text.encoder.backend: onnx on cuda needs onnxruntime-gpu (CUDAExecutionProvider); "
                            "use backend torch on GPUs")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        providers = [("CUDAExecutionProvider", {"device_id": index})]
    session = ort.InferenceSession(str(path), options, providers=providers)

    def run(ids: np.ndarray, mask: np.ndarray):
        hidden = session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
        return torch.from_numpy(hidden).float()

    return run
