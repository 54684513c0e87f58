#!/usr/bin/env bash
# Train the embedded ShapesWorld model on one GPU, evaluate it and pack it: the one command run
# on a rented machine. Run from the repository root with $OUT set to a folder whose files come
# back (at most 8 files, 16 MB each), e.g.
#   OUT=/tmp/out bash scripts/train_shapes_gpu.sh
# Knobs (environment): MINUTES (training budget, default 7), STEPS (cap, default 100000),
# BATCH (default 256), DEVICE (default cuda; DEVICE=cpu for a smoke test), SAMPLES (default 500),
# EVAL_STEPS (default 50), GUIDANCE_SWEEP (extra guidance scales to score, default "2 7"),
# PYTHON (default python3), RUN (work folder, default /tmp/run), INIT_FROM (an exported model
# folder to start from), SNR_GAMMA (Min-SNR-γ loss weighting; train-shapes' default 5, 0 turns
# it off), LR (AdamW learning rate; train-shapes' default 1e-3 at batch 256), SEED (default 0;
# the embedded model used 5), WORKERS (data processes, default min(12, cores - 2)).
# Returns in $OUT (5 files): log.txt; shapes-32.tar, holding the exported model folder as
# shapes-32/ (ready to untar into src/imagic/assets/) beside train_log.jsonl and the last sample
# grid as samples.png; eval.json (the bar, default guidance) and eval_guidance{2,7}.json.
# Two runs side by side on one GPU (different RUN and OUT folders, WORKERS=6 each): source
# scripts/device_env.sh first, and each script then skips the install.
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
: "${OUT:?set OUT to the folder whose files come back}"
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
RUN=${RUN:-/tmp/run}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

echo "== setup $(date -u +%FT%TZ)"
source scripts/device_env.sh

echo "== train $(date -u +%FT%TZ)"
rm -rf "$RUN"
"$PYTHON" -m imagic.shapes.train train-shapes --out "$RUN" --device "$DEVICE" \
    --max-minutes "${MINUTES:-7}" --steps "${STEPS:-100000}" \
    ${BATCH:+--batch-size "$BATCH"} ${INIT_FROM:+--init-from "$INIT_FROM"} \
    ${SNR_GAMMA:+--snr-gamma "$SNR_GAMMA"} ${LR:+--lr "$LR"} ${SEED:+--seed "$SEED"} \
    ${WORKERS:+--workers "$WORKERS"} \
    --checkpoint-every 2000 --sample-every 2000
cp "$(ls "$RUN"/samples/step_*.png | sort | tail -n 1)" "$RUN/samples.png"
tar -cf "$OUT/shapes-32.tar" -C "$RUN" --transform 's,^model,shapes-32,' \
    model train_log.jsonl samples.png
ls -l "$OUT/shapes-32.tar"

echo "== evaluate $(date -u +%FT%TZ)"
evaluate() {  # $1: file name, then extra eval-shapes options
    local name=$1; shift
    "$PYTHON" -m imagic.shapes.train eval-shapes --model "$RUN/model" --device "$DEVICE" \
        --samples "${SAMPLES:-500}" --steps "${EVAL_STEPS:-50}" --json "$OUT/$name" --quiet "$@"
}
evaluate eval.json  # the default guidance: the bar
for g in ${GUIDANCE_SWEEP-2 7}; do  # a few seconds each on a GPU: helps pick the default
    echo "-- guidance $g"
    evaluate "eval_guidance$g.json" --guidance "$g"
done
chmod a+r "$OUT"/*
echo "== done $(date -u +%FT%TZ)"
