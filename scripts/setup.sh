#!/usr/bin/env bash
# Create .venv and install eatdist with its test tools, once; later calls return at once.
# Set PYTHON to pick the interpreter (3.10+), EATDIST_TORCH to choose the torch build installed
# when the venv has none (default: the tested torch 2.14.1 + torchvision 0.29.1 pair).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${EATDIST_VENV:-.venv}
STAMP="$VENV/.eatdist-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/eatdist" ]; then
    exit 0
fi
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"eatdist needs Python 3.10 or newer; {sys.executable} is {sys.version.split()[0]}")
PY
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
# An existing torch (for example the user's own CUDA build) is kept.
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "setup: installing ${EATDIST_TORCH:-torch==2.14.1 torchvision==0.29.1} into $VENV (first run only)"
    # shellcheck disable=SC2086
    "${PIP[@]}" ${EATDIST_TORCH:-torch==2.14.1 torchvision==0.29.1}
fi
# DeepSpeed ships as source and builds against the torch above: without build isolation, so
# the build cannot fetch a different torch of its own.
if ! "$VENV/bin/python" -c "import deepspeed" >/dev/null 2>&1; then
    echo "setup: installing DeepSpeed into $VENV"
    "${PIP[@]}" --quiet "setuptools>=64" wheel
    "${PIP[@]}" --quiet --no-build-isolation "deepspeed>=0.14"
fi
echo "setup: installing eatdist and its dependencies into $VENV"
"${PIP[@]}" --quiet -e ".[dev,deepspeed]"
# Without a GPU, DeepSpeed compiles its shared-memory collective op at the first launch of a run
# (about 40 s on 2 cores); build it now into the folder the DeepSpeed tests use.
echo "setup: building DeepSpeed's CPU collective op into .torch_extensions (no GPU only)"
TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions" PYTHONWARNINGS=ignore "$VENV/bin/python" - <<'PY' >/dev/null 2>&1 ||
import deepspeed.ops
from deepspeed.accelerator import get_accelerator

builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    builder.load(verbose=False)
PY
    echo "setup: could not build it now; DeepSpeed builds it at its first CPU run"
echo "$want" > "$STAMP"
