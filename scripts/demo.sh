#!/usr/bin/env bash
# The main job on the built-in synthetic corpus: synth → 2-process training → 2-process
# explanation → summary. Extra arguments go to `eatdist demo` (e.g. train.epochs=4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/eatdist demo "$@"
