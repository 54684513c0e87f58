#!/usr/bin/env bash
# One slot of ShapesWorld 2 cascade training, from the repo root: on the offline GPU machine
#   bash scripts/train_shapes2_slot.sh SLOT [MINUTES]
# or here on the CPU (its batch 32, 50 evaluation captions, the files in /tmp/slot):
#   DEVICE=cpu PYTHON=.venv/bin/python EVAL_SAMPLES=50 OUT=/tmp/slot \
#     bash scripts/train_shapes2_slot.sh SLOT MINUTES
# SLOT (1, 2, ..., one count whatever the device) seeds the slot's data; MINUTES (default 7) is
# its training budget; FREEZE (e.g. unet,text_encoder) holds those models and trains the rest
# (--freeze); BASE_CHANNELS (e.g. 48,96,144) widens the base, which then needs FRESH=unet (it
# starts from its seed beside the shipped stage and text encoder; --fresh); LR sets AdamW's rate
# (--lr; default 1e-3 × √(batch / 256)). The slot continues
# from INIT_FROM, by default the shipped model in src/imagic/assets/shapes2-128 when there is one
# (a warm start: the weights carry over, the optimizer and its warm-up start again), trains,
# scores text-to-image on EVAL_SAMPLES (default 200) captions, and leaves in $OUT (or
# ./gpu-out): model.tar.part-aa, -ab, ... (the export, in parts under the GPU machine's 16 MiB
# per returned file), train_log.jsonl, samples.png, eval.json and run.txt. Then:
# scripts/unpack_shapes2_slot.sh FOLDER SLOT.
# On the GPU machine it needs the diffusers wheel in .whl/ (scripts/gpu_wheels.sh makes it;
# carry .whl). A dry run: DEVICE=cpu PYTHON=.venv/bin/python EVAL_SAMPLES=4 bash ... 1 0.2
set -euo pipefail
SLOT=${1:?give the slot number}
MINUTES=${2:-7}
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
EVAL_SAMPLES=${EVAL_SAMPLES:-200}
FREEZE=${FREEZE:-}
FRESH=${FRESH:-}
BASE_CHANNELS=${BASE_CHANNELS:-}
LR=${LR:-}
mkdir -p "$OUT"
if [ -f ../shared/gpu/device_env.sh ]; then
  source ../shared/gpu/device_env.sh
else  # the same set-up as ../shared/gpu/device_env.sh, where that folder did not travel
  SITE=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  export PYTHONPATH=$SITE:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
fi
RUN=$(mktemp -d)/run
INIT=()
if [ -n "${INIT_FROM:-}" ]; then  # train-shapes refuses a folder that is no exported model
  INIT=(--init-from "$INIT_FROM")
elif [ -f src/imagic/assets/shapes2-128/imagic_model.json ]; then
  INIT=(--init-from src/imagic/assets/shapes2-128)
fi
[ -n "$FREEZE" ] && INIT+=(--freeze "$FREEZE")
[ -n "$FRESH" ] && INIT+=(--fresh "$FRESH")
[ -n "$BASE_CHANNELS" ] && INIT+=(--base-channels "$BASE_CHANNELS")
[ -n "$LR" ] && INIT+=(--lr "$LR")
{
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
  "$PYTHON" -m imagic.cli train-shapes --world 2 --out "$RUN" --device "$DEVICE" --seed "$SLOT" \
      --max-minutes "$MINUTES" --checkpoint-every 1000000 --sample-every 0 "${INIT[@]}"
  "$PYTHON" -m imagic.cli eval-shapes --model "$RUN/model" --device "$DEVICE" \
      --samples "$EVAL_SAMPLES" \
      --steps 50 --batch 100 --quiet --json "$OUT/eval.json"
} 2>&1 | tee "$OUT/run.txt"
cp "$RUN/train_log.jsonl" "$OUT/train_log.jsonl"
cp "$(ls "$RUN"/samples/*.png | tail -1)" "$OUT/samples.png"
tar -C "$RUN" -cf - model | split -b 15m - "$OUT/model.tar.part-"
ls -l "$OUT"
