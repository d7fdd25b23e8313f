#!/usr/bin/env bash
# The test suite (CPU only; multi-process tests start real launchers). Extra arguments go to
# pytest, e.g. `-m "not slow"` for the quick part.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-}
exec .venv/bin/python -m pytest "$@"
