#!/usr/bin/env bash
# After a training slot: put its model into the package and its records into training/shapes2/
# (to commit):
#   scripts/unpack_shapes2_slot.sh FOLDER SLOT [MODEL]   (FOLDER: where the slot's $OUT files are)
# The model replaces MODEL, by default the shipped src/imagic/assets/shapes2-128 (the next slot
# starts from it); give another folder for a model to evaluate before it ships. The log, samples
# and evaluation are kept per slot.
set -euo pipefail
FROM=${1:?give the folder the slot files came back in}
SLOT=${2:?give the slot number}
cd "$(dirname "$0")/.."
DEST=training/shapes2
mkdir -p "$DEST"
TMP=$(mktemp -d)
cat "$FROM"/model.tar.part-* | tar -C "$TMP" -xf -
MODEL=${3:-src/imagic/assets/shapes2-128}
rm -rf "$MODEL" && mv "$TMP/model" "$MODEL"
cp "$FROM/train_log.jsonl" "$DEST/train_log-slot$SLOT.jsonl"
cp "$FROM/samples.png" "$DEST/samples-slot$SLOT.png"
cp "$FROM/eval.json" "$DEST/eval-slot$SLOT.json"
cp "$FROM/run.txt" "$DEST/run-slot$SLOT.txt"
ls -l "$DEST" "$MODEL"
