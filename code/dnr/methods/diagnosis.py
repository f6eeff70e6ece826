"""The D&R diagnosis as a trainer feature shared by every method: its flags, their one check,
and the `Relearner` (diagnose.py) built from them. D&R (relearn.py) applies it; any other method
with --track_purity records the same diagnoses without acting on them."""
from __future__ import annotations

import argparse

from ..diagnose import KMEANS_BACKENDS, Relearner, check_lam


def add_diagnosis_args(group: argparse._ArgumentGroup) -> None:
    """D&R flags; the authors' names and CREMA-D defaults where they had them."""
    group.add_argument("--move_lambda", type=float, default=3.0,
                       help="lambda in a_k = tanh(lambda * |purity_train - purity_val|) (default: %(default)s)")
    group.add_argument("--reinit_epoch", type=int, default=20,
                       help="diagnose after every 0-based epoch e > 0 with e %% reinit_epoch == 0, "
                            "as the authors' code; 0 disables (default: %(default)s)")
    group.add_argument("--reinit_num", type=int, default=3,
                       help="at most this many diagnoses / re-initialisations (default: %(default)s)")
    group.add_argument("--kmeans_backend", choices=KMEANS_BACKENDS, default="torch",
                       help="k-means used by the diagnosis: torch (on the features' device) or "
                            "sklearn (the authors' scikit-learn KMeans; reproduction switch) "
                            "(default: %(default)s)")
    group.add_argument("--kmeans_n_init", type=int, default=10,
                       help="k-means restarts, best inertia kept; the authors' scikit-learn default was "
                            "10 before 1.4 and 1 since (default: %(default)s)")
    group.add_argument("--kmeans_seed", type=int, default=0,
                       help="seed of the diagnosis k-means, fixed as in the paper (default: %(default)s)")
    group.add_argument("--reinit_buffers", action="store_true",
                       help="also interpolate BatchNorm running statistics towards their initial "
                            "values (the authors leave them alone)")
    group.add_argument("--track_purity", action="store_true",
                       help="with a method other than relearn: run the same diagnoses on the same "
                            "schedule and log them, without re-initialising")


def check_diagnosis_args(args: argparse.Namespace) -> None:
    try:
        check_lam(args.move_lambda)
    except ValueError:
        raise ValueError(f"--move_lambda must be >= 0, got {args.move_lambda}") from None
    for ok, message in (
        (args.reinit_epoch >= 0, f"--reinit_epoch must be >= 0 (0 disables), got {args.reinit_epoch}"),
        (args.reinit_num >= 0, f"--reinit_num must be >= 0, got {args.reinit_num}"),
        (args.kmeans_n_init >= 1, f"--kmeans_n_init must be >= 1, got {args.kmeans_n_init}"),
    ):
        if not ok:
            raise ValueError(message)


def make_relearner(args: argparse.Namespace, model, info, apply: bool) -> Relearner:
    return Relearner(
        model.encoders,
        n_clusters=info.num_classes,
        lam=args.move_lambda,
        reinit_epoch=args.reinit_epoch,
        reinit_num=args.reinit_num,
        seed=args.kmeans_seed,
        n_init=args.kmeans_n_init,
        kmeans_backend=args.kmeans_backend,
        reinit_buffers=args.reinit_buffers,
        apply=apply,
    )
