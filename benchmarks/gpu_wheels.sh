#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels benchmarks/gpu_check.sh installs on a GPU machine
# that has torch, torchvision, timm, accelerate, safetensors and tensorboard but nothing else of
# eatdist's (and no network): webdataset, braceexpand and fsspec for CPython 3.12 on manylinux
# x86_64, and eatdist itself (its entry points register the timm backbones). Run it here, then
# bring .whl/ along with the tree.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    'webdataset>=0.2.90,<2' 'braceexpand>=0.1.7' 'fsspec>=2023.6'
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl .
rm -rf build eatdist.egg-info
ls -1 .whl
