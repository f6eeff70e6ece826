#!/bin/sh
# Every method, several seeds, one dataset; then OUT/results.md and OUT/results.png.
#   sh script/compare.sh                                     built-in dataset, demo settings, seeds 0 1 2
#   METHODS="baseline relearn ogm_ge" SEEDS="0 1" sh script/compare.sh   (default: every registered method)
#   DATA=data/cremad sh script/compare.sh                    any prepared dataset, its settings (settings.sh)
#   DATASET=mosi DATA=data/mosi sh script/compare.sh         a folder holding a MOSI/MOSEI feature file
# Extra arguments go to code/main.py for every run. Finished runs are re-read, not recomputed.
# --track_purity records the D&R diagnoses of every method; --track_purity_every 5 the purity curves
# of results.png's second row (recorded only: neither changes a method's training).
set -eu
. "$(dirname "$0")/settings.sh"
OUT=${OUT:-runs/compare_$DATASET}
SEEDS=${SEEDS:-"0 1 2"}
# shellcheck disable=SC2086  # word lists on purpose; no METHODS: compare.py takes the registry's list
exec "$PYTHON" "$HERE/compare.py" --out "$OUT" ${METHODS:+--methods $METHODS} --seeds $SEEDS -- $SETTINGS --track_purity --track_purity_every 5 "$@"
