#!/usr/bin/env bash
# The wheels the offline GPU machine lacks (its image has torch, transformers, peft, accelerate
# and safetensors, not diffusers), for its Python 3.12, into .whl/ (ignored by git; carry it).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(.venv/bin/python -c "import diffusers; print(diffusers.__version__)")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py -d .whl "diffusers==$VERSION" importlib_metadata
ls .whl
