#!/usr/bin/env bash
# The main job end to end on the embedded MovieLens default: install -> prepare data -> encode text with the
# frozen LLM -> torchrun pretraining on 2 ranks -> evaluate on test (per-domain AUC table).
# Re-running it is cheap: every step skips work already done (the pretraining resumes its finished run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python
SPEC=${SPEC:-feature_specs/movielens.yaml}
NPROC=${NPROC:-2}
$PY jobs/prepare_data.py --spec "$SPEC"
$PY jobs/encode_text.py --spec "$SPEC"
.venv/bin/torchrun --standalone --nproc_per_node="$NPROC" jobs/pretrain.py --spec "$SPEC" --resume "$@"
OUT_DIR=$($PY -c "import sys; from recsys.spec.loader import load_spec, resolve_path; s=load_spec(sys.argv[1], sys.argv[2:]); print(resolve_path(s, s.train.output_dir))" "$SPEC" "${@:2}" 2>/dev/null || true)
$PY jobs/evaluate.py --spec "$SPEC" --checkpoint "${OUT_DIR:-runs/movielens}" --split test --out "${OUT_DIR:-runs/movielens}/test_metrics.json"
