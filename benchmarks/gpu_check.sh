#!/usr/bin/env bash
# One prepared check for a CUDA machine with torch preinstalled and NO network (the lent H100/H200: torch 2.11+cu130,
# Python 3.12). Installs the matching CUDA fbgemm-gpu + torchrec (--no-deps) from wheels carried in $WHEELS
# (default ./wheels_gpu, made by benchmarks/fetch_gpu_wheels.sh) when they are missing, prints versions, runs
# `pytest -m gpu`, then the throughput benchmark if benchmarks/throughput.py exists, and prints samples/s.
#
#   bash benchmarks/gpu_check.sh            # logs also go to $OUT/gpu_check.log when $OUT is set
#
# fbgemm-gpu may arrive whole ($WHEELS/full/*.whl) or as parts ($WHEELS/partNN/*.whl.NN, carried one per call):
# the parts are joined and checked against $WHEELS/small/SHA256SUMS before installing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-./wheels_gpu}"
SITE="${RECSYS_GPU_SITE:-/tmp/site}"   # packages go here (not into the image's environment), put on PYTHONPATH
LOG="${OUT:+$OUT/gpu_check.log}"
[ -n "$LOG" ] && exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
say() { printf '\n== %s\n' "$*"; }
die() { echo "gpu_check: error: $*" >&2; exit 1; }

say "machine"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi not found"
TORCH_MINOR="$("$PY" -c 'import torch;print(torch.__version__.split("+")[0].rsplit(".",1)[0])')" || die "no torch in $PY"
case "$TORCH_MINOR" in
  2.11) FBGEMM=1.6;; 2.12) FBGEMM=1.7;; 2.13) FBGEMM=1.8;;
  *) die "torch $TORCH_MINOR has no matching fbgemm-gpu here (2.11<->1.6, 2.12<->1.7, 2.13<->1.8)";;
esac
"$PY" -c 'import torch;assert torch.cuda.is_available(), "CUDA not available";print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
  || die "torch sees no GPU"

have_stack() {  # CUDA fbgemm of the right minor and torchrec of the same minor, importable together
  "$PY" - "$FBGEMM" <<'PY' 2>/dev/null
import sys, fbgemm_gpu, torchrec  # noqa: F401
from importlib.metadata import version
want = sys.argv[1]
ok = fbgemm_gpu.__variant__ != "cpu" and version("fbgemm_gpu").startswith(want + ".") \
     and version("torchrec").startswith(want + ".")
sys.exit(0 if ok else 1)
PY
}

if ! have_stack; then
  say "installing fbgemm-gpu $FBGEMM.x + torchrec from $WHEELS into $SITE"
  [ -d "$WHEELS" ] || die "$WHEELS missing: run benchmarks/fetch_gpu_wheels.sh $TORCH_MINOR where PyPI is reachable and carry it"
  TMPW="$(mktemp -d)"
  FULL="$(ls "$WHEELS"/full/fbgemm_gpu-"$FBGEMM".*-cp312-*.whl 2>/dev/null | head -1 || true)"
  if [ -z "$FULL" ]; then  # join the carried parts
    PARTS=("$WHEELS"/part*/fbgemm_gpu-"$FBGEMM".*.whl.[0-9][0-9])
    [ -e "${PARTS[0]}" ] || die "no fbgemm_gpu-$FBGEMM wheel nor parts under $WHEELS"
    NAME="$(basename "${PARTS[0]}")"; NAME="${NAME%.*}"
    cat $(printf "%s\n" "${PARTS[@]}" | sort) > "$TMPW/$NAME"  # names differ only in the .NN suffix
    FULL="$TMPW/$NAME"
    echo "joined ${#PARTS[@]} parts -> $NAME ($(du -m "$FULL" | cut -f1) MiB)"
  fi
  if [ -f "$WHEELS/small/SHA256SUMS" ]; then
    WANT_SUM="$(awk -v n="$(basename "$FULL")" '$2==n{print $1}' "$WHEELS/small/SHA256SUMS")"
    GOT_SUM="$(sha256sum "$FULL" | cut -d' ' -f1)"
    [ -z "$WANT_SUM" ] || [ "$WANT_SUM" = "$GOT_SUM" ] || die "fbgemm wheel checksum mismatch (missing or stale part?)"
  fi
  # Only the small wheels the image lacks: never reinstall what it has (torch, numpy, ...).
  SMALL=()
  for w in "$WHEELS"/small/*.whl; do
    mod="$(basename "$w" | cut -d- -f1)"
    case "$mod" in torchrec) SMALL+=("$w");; *) "$PY" -c "import importlib.util,sys;sys.exit(importlib.util.find_spec('$mod') is None)" || SMALL+=("$w");; esac
  done
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$FULL" "${SMALL[@]}" \
    || die "pip install failed"
  rm -rf "$TMPW"
  have_stack || die "fbgemm-gpu/torchrec still not importable after install"
fi

say "versions"
"$PY" - <<'PY'
from importlib.metadata import version
import torch, fbgemm_gpu
for p in ("torch", "fbgemm_gpu", "torchrec", "tensordict", "pydantic"):
    try:
        print(f"{p:12s} {version(p)}")
    except Exception as e:
        print(f"{p:12s} missing ({e})")
print("fbgemm variant", fbgemm_gpu.__variant__)
PY

say "pytest -m gpu"
# only the modules holding GPU tests: collecting the whole suite would import packages this image lacks
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests/train/test_sharding.py
PYTEST_RC=$?

say "throughput (cuda, synthetic amazon-sr-shaped batches: no data files needed)"
"$PY" benchmarks/synthetic_throughput.py --device cuda --batch-sizes ${GPU_BATCH_SIZES:-4096 16384 65536} \
  ${OUT:+--out "$OUT/gpu_throughput.json"} 2>&1 | tee /tmp/throughput.log | grep -v -i warn
BENCH_RC=${PIPESTATUS[0]}
say "done: pytest rc=$PYTEST_RC, throughput rc=$BENCH_RC"
[ "$PYTEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
