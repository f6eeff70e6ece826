# Shared settings of script/baseline.sh and script/ours.sh (sourced, not run).
#
# DATA set:   the authors' CREMA-D settings (SPEC: ResNet-18 x 2 from scratch with the official
#             backbone's initialisation, SGD lr 0.002, momentum 0.9, weight decay 1e-4, batch 64,
#             90 epochs, no LR schedule; D&R with lambda 3, a diagnosis every 20 epochs, at most 3).
# DATA unset: the built-in dataset with demo settings (a few minutes on 2 CPU cores).
HERE=$(cd "$(dirname "$0")" && pwd)
MAIN="$HERE/../code/main.py"
PYTHON=${PYTHON:-python3}
SEED=${SEED:-0}
if [ -n "${DATA:-}" ]; then
    DATASET=cremad
    SETTINGS="--dataset cremad --init official --batch_size 64 --epochs 90 --optimizer sgd
              --learning_rate 0.002 --lr_decay_step 0 --move_lambda 3 --reinit_epoch 20 --reinit_num 3
              --num_workers ${NUM_WORKERS:-8}"
    set -- --data_path "$DATA" "$@"  # kept out of SETTINGS so a path with spaces survives
else
    DATASET=builtin
    SETTINGS="--dataset builtin --batch_size 64 --epochs 30 --optimizer sgd --learning_rate 0.01
              --lr_decay_step 0 --move_lambda 3 --reinit_epoch 5 --reinit_num 3"
fi
