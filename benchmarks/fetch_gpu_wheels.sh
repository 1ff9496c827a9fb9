#!/usr/bin/env bash
# Downloads, HERE (PyPI reachable), the cp312 manylinux wheels that benchmarks/gpu_check.sh installs on a CUDA machine
# that has torch but no network: the CUDA fbgemm-gpu of torch's minor, torchrec and the small pure-Python packages
# the CUDA image lacks. Output: wheels_gpu/ (ignored by git through its own .gitignore).
#
#   bash benchmarks/fetch_gpu_wheels.sh [TORCH_MINOR]     # default 2.11, the torch of the lent GPU machines
#
# The device tool carries at most 64 MiB per call (working tree included), and fbgemm-gpu alone is ~465 MB, so the
# fbgemm wheel is cut into numbered folders wheels_gpu/partNN/ of CHUNK_MB (default 56) each: carry ONE part per call
# on a warm machine (ignored files already there are kept between calls), the last call carrying wheels_gpu/small
# and running gpu_check.sh, which joins the parts and checks the sha256. See docs/scale_out.md.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_MINOR="${1:-2.11}"
CHUNK_MB="${CHUNK_MB:-56}"
OUT_DIR="${WHEELS:-wheels_gpu}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
# fbgemm-gpu / torchrec of the same minor as torch (torchrec 1.6.0 was never published; 1.6.1 is the 1.6 release).
case "$TORCH_MINOR" in
  2.11) FBGEMM=1.6.0; TORCHREC=1.6.1;;
  2.12) FBGEMM=1.7.0; TORCHREC=1.7.0;;
  2.13) FBGEMM=1.8.0; TORCHREC=1.8.0;;
  *) echo "error: unsupported torch minor $TORCH_MINOR (2.11, 2.12 or 2.13)" >&2; exit 2;;
esac
# Small dependencies missing from the CUDA image (torchrec needs tensordict+pyvers+iopath (0.1.10 has no wheel); the spec needs pydantic).
SMALL=("torchrec==$TORCHREC" "tensordict==0.15.3" "pyvers==0.2.3" "iopath==0.1.9" "pydantic==2.14.4"
       "pydantic-core" "annotated-types" "typing-inspection==0.4.5" "torchdata==0.11.0")

mkdir -p "$OUT_DIR/small" "$OUT_DIR/full"
echo '*' > "$OUT_DIR/.gitignore"
DL=("$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"${DL[@]}" -d "$OUT_DIR/full" "fbgemm-gpu==$FBGEMM"
# pydantic-core must match pydantic's pin: resolve it from pydantic's metadata.
"${DL[@]}" -d "$OUT_DIR/small" "pydantic==2.14.4"
CORE="$(unzip -p "$OUT_DIR"/small/pydantic-2.14.4-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')"
for pkg in "${SMALL[@]}"; do
  [ "$pkg" = "pydantic-core" ] && pkg="pydantic-core==$CORE"
  "${DL[@]}" -d "$OUT_DIR/small" "$pkg"
done

WHL="$(ls "$OUT_DIR"/full/fbgemm_gpu-"$FBGEMM"-*.whl)"
rm -rf "$OUT_DIR"/part*
split -b "${CHUNK_MB}m" -d -a 2 "$WHL" "$OUT_DIR/chunk."
for c in "$OUT_DIR"/chunk.*; do n="${c##*.}"; mkdir -p "$OUT_DIR/part$n"; mv "$c" "$OUT_DIR/part$n/$(basename "$WHL").$n"; done
(cd "$OUT_DIR/full" && sha256sum "$(basename "$WHL")") > "$OUT_DIR/small/SHA256SUMS"

echo "torch $TORCH_MINOR -> fbgemm-gpu $FBGEMM, torchrec $TORCHREC"
du -b "$WHL" "$OUT_DIR"/small/*.whl | awk '{printf "%8.1f MiB  %s\n", $1/1048576, $2}'
echo "small total: $(du -cb "$OUT_DIR"/small/*.whl | tail -1 | awk '{printf "%.1f MiB", $1/1048576}')"
echo "fbgemm parts (carry one per call): $(ls -d "$OUT_DIR"/part* | tr '\n' ' ')"
