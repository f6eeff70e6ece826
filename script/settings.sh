# Shared settings of script/baseline.sh, script/ours.sh and script/compare.sh (sourced, not run).
#
# DATA unset:  the built-in dataset with demo settings (a few minutes on 2 CPU cores).
# DATA=FOLDER: a folder written by script/prepare.py (its manifest.json names the dataset), or, with
#              DATASET=mosi or DATASET=mosei, a folder holding the feature file. DATASET= also
#              overrides the manifest (the loader then checks that they agree). Settings per dataset:
#   cremad                    the D&R authors' (SPEC section 2): ResNet-18 x 2 from scratch with the
#                             official backbone's initialisation (--init official), SGD lr 0.002,
#                             momentum 0.9, weight decay 1e-4, batch 64, 90 epochs, no LR schedule;
#                             D&R lambda 3, a diagnosis every 20 epochs, at most 3.
#   kinetics_sounds, vggsound, ucf101, food101
#                             ours, not the field's: the CREMA-D settings carried over unchanged (the
#                             D&R authors published settings for CREMA-D only; nothing here was tuned).
#   mosi, mosei               ours: Adam lr 1e-3, batch 32, 30 epochs, a diagnosis every 5 epochs, at
#                             most 3 (a starting point; the paper's are not available to us).
# Any flag given to the script comes after these and wins (e.g. --epochs 30).
HERE=$(cd "$(dirname "$0")" && pwd)
MAIN="$HERE/../code/main.py"
PYTHON=${PYTHON:-python3}
SEED=${SEED:-0}
if [ -n "${DATA:-}" ]; then
    if [ -z "${DATASET:-}" ]; then
        if [ ! -f "$DATA/manifest.json" ]; then
            echo "error: DATA=$DATA holds no manifest.json: give a folder written by script/prepare.py, or" \
                 "set DATASET=mosi or DATASET=mosei for a folder holding a feature file" >&2
            exit 2
        fi
        DATASET=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["dataset"])' \
                  "$DATA/manifest.json") || exit 2
    fi
    case "$DATASET" in
        cremad)
            SETTINGS="--dataset cremad --init official --batch_size 64 --epochs 90 --optimizer sgd
                      --learning_rate 0.002 --lr_decay_step 0 --move_lambda 3 --reinit_epoch 20 --reinit_num 3
                      --num_workers ${NUM_WORKERS:-8}" ;;
        kinetics_sounds|vggsound|ucf101|food101)
            SETTINGS="--dataset $DATASET --batch_size 64 --epochs 90 --optimizer sgd
                      --learning_rate 0.002 --lr_decay_step 0 --move_lambda 3 --reinit_epoch 20 --reinit_num 3
                      --num_workers ${NUM_WORKERS:-8}" ;;
        mosi|mosei)
            SETTINGS="--dataset $DATASET --batch_size 32 --epochs 30 --optimizer adam --learning_rate 0.001
                      --lr_decay_step 0 --move_lambda 3 --reinit_epoch 5 --reinit_num 3" ;;
        *)
            echo "error: no settings for dataset '$DATASET' (DATA=$DATA); known: cremad kinetics_sounds" \
                 "vggsound ucf101 food101 mosi mosei" >&2
            exit 2 ;;
    esac
    set -- --data_path "$DATA" "$@"  # kept out of SETTINGS so a path with spaces survives
else
    DATASET=builtin
    SETTINGS="--dataset builtin --batch_size 64 --epochs 30 --optimizer sgd --learning_rate 0.01
              --lr_decay_step 0 --move_lambda 3 --reinit_epoch 5 --reinit_num 3"
fi
