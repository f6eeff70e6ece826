#!/bin/sh
# Diagnosing & Re-learning.
#   sh script/ours.sh                          built-in dataset, demo settings
#   DATA=data/cremad sh script/ours.sh         a prepared dataset (here CREMA-D), its settings (settings.sh)
#   SEED=1 OUT=runs/x sh script/ours.sh --device cpu    extra flags go to code/main.py
set -eu
. "$(dirname "$0")/settings.sh"
OUT=${OUT:-runs/${DATASET}_relearn_seed$SEED}
# shellcheck disable=SC2086  # SETTINGS is a list of flags
exec "$PYTHON" "$MAIN" $SETTINGS --method relearn --random_seed "$SEED" --ckpt_path "$OUT" "$@"
