#!/usr/bin/env bash
# The main job end to end on the embedded MovieLens default: install -> prepare data -> encode text with the
# frozen LLM -> torchrun pretraining -> evaluate on test (per-domain AUC table) ->
# export a serving bundle and rank one request with it. Ranks: one per GPU, on CPU one per
# 8 cores (recsys.train.dist.recommended_ranks; set NPROC to override).
# Re-running it is cheap: every step skips work already done (the pretraining resumes its finished run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python
SPEC=feature_specs/movielens.yaml
RUN=runs/movielens   # the spec's train.output_dir
NPROC=${NPROC:-$(PYTHONPATH=. $PY -c "from recsys.train.dist import recommended_ranks; print(recommended_ranks())")}
# cores per rank (what torchrun would pick with a warning banner when unset; set it yourself to override)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
$PY jobs/prepare_data.py --spec "$SPEC"
$PY jobs/encode_text.py --spec "$SPEC"
# torchrun through recsys.launch: same options, but a bad spec is one line and exit 2, no launcher traceback
$PY -m recsys.launch --standalone --nproc_per_node="$NPROC" jobs/pretrain.py --spec "$SPEC" --resume
$PY jobs/evaluate.py --spec "$SPEC" --checkpoint "$RUN" --split test --out "$RUN/test_metrics.json"
$PY jobs/export.py --spec "$SPEC" --checkpoint "$RUN" --out bundles/movielens --force
$PY jobs/rank.py --bundle bundles/movielens --request docs/examples/movielens_request.json
