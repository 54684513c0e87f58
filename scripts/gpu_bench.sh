#!/usr/bin/env bash
# The speed benchmark on one GPU: the one command run on a rented machine. From the repository
# root, with $OUT set to a folder whose files come back:
#   OUT=/tmp/out bash scripts/gpu_bench.sh
# Runs tests/test_gpu.py (the CUDA-only tests, ~30 s), then benchmarks/gpu_edit.py (SD-1.5
# shape, random weights: the paper's way against the `fast` preset in one process, then the
# variants: `fast` with CUDA graphs twice, a LoRA candidate with graphs, and `fast` with graphs
# in the channels-last layout; about 8 minutes on an H100).
# Knobs:
# PYTHON (default python3), DEVICE (default cuda; DEVICE=cpu TINY=1 for a smoke test),
# REF_STEPS (default 100: timed over 30 and 60 steps, the reference's projection was off by up
# to 2×, docs/PERFORMANCE.md). Carry .whl/ when the machine lacks diffusers. Returns in $OUT:
# log.txt and gpu_edit.json (commit it under docs/perf/).
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
: "${OUT:?set OUT to the folder whose files come back}"
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

echo "== setup $(date -u +%FT%TZ)"
source scripts/device_env.sh

if [ "${DEVICE:-cuda}" != cpu ]; then
    echo "== tests/test_gpu.py $(date -u +%FT%TZ)"
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py || echo "== tests failed"
fi

echo "== gpu_edit $(date -u +%FT%TZ)"
"$PYTHON" benchmarks/gpu_edit.py --device "${DEVICE:-cuda}" --reference-steps "${REF_STEPS:-100}" \
    --variants ${TINY:+--tiny} ${NO_LOW_MEMORY:+--no-low-memory} --out "$OUT/gpu_edit.json"
echo "== done $(date -u +%FT%TZ)"
