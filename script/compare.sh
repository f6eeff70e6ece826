#!/bin/sh
# Every method, several seeds, one dataset; then OUT/results.md and OUT/results.png.
#   sh script/compare.sh                                     built-in dataset, demo settings, seeds 0 1 2
#   METHODS="baseline relearn ogm_ge" SEEDS="0 1" sh script/compare.sh
#   DATA=data/cremad sh script/compare.sh                    CREMA-D, the paper's settings
# Extra arguments go to code/main.py for every run. Finished runs are re-read, not recomputed.
set -eu
. "$(dirname "$0")/settings.sh"
OUT=${OUT:-runs/compare_$DATASET}
METHODS=${METHODS:-"baseline relearn ogm ogm_ge pmr mmpareto agm opm unimodal"}
SEEDS=${SEEDS:-"0 1 2"}
# shellcheck disable=SC2086  # word lists on purpose
exec "$PYTHON" "$HERE/compare.py" --out "$OUT" --methods $METHODS --seeds $SEEDS -- $SETTINGS --track_purity "$@"
