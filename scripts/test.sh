#!/usr/bin/env bash
# Installs everything (idempotent) and runs the whole test suite, slow end-to-end tests included.
# Tests that need ../shared/data skip with a reason when it is absent; GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
