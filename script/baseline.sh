#!/bin/sh
# The joint-training baseline, on the same data, splits, schedule and evaluation as script/ours.sh.
# --track_purity runs the same diagnoses without re-initialising, so the purities can be compared.
#   sh script/baseline.sh                      built-in dataset, demo settings
#   DATA=data/vggsound sh script/baseline.sh   any prepared dataset, its settings (settings.sh)
#   DATASET=mosei DATA=data/mosei sh script/baseline.sh   a folder holding a MOSI/MOSEI feature file
set -eu
. "$(dirname "$0")/settings.sh"
OUT=${OUT:-runs/${DATASET}_baseline_seed$SEED}
# shellcheck disable=SC2086  # SETTINGS is a list of flags
exec "$PYTHON" "$MAIN" $SETTINGS --method baseline --track_purity --random_seed "$SEED" --ckpt_path "$OUT" "$@"
