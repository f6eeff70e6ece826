"""The D&R diagnosis as a trainer feature shared by every method: its flags, their one check,
and the `Relearner` (diagnose.py) built from them. D&R (relearn.py) applies it; any other method
with --track_purity records the same diagnoses without acting on them. `PurityTracker`
(--track_purity_every) measures purity on its own schedule, for curves, apart from all of that."""
from __future__ import annotations

import argparse
from typing import Callable, Optional

from ..diagnose import KMEANS_BACKENDS, Diagnosis, FeatureFn, Relearner, check_lam, diagnose_features


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
    group.add_argument("--diagnosis_repeats", type=int, default=1,
                       help="k-means seeds per purity (--kmeans_seed, +1, ...); with R > 1 the gap and the "
                            "strength use the mean purity and the stds are recorded (our extension; 1 = the "
                            "method as published) (default: %(default)s)")
    group.add_argument("--track_purity_every", type=int, default=0,
                       help="any method: measure every encoder's purity (and the strength D&R would apply) "
                            "after every 0-based epoch e with e %% N == 0, recorded only, as 'tracked_purity' "
                            "in log.jsonl and results.json; apart from D&R's own diagnoses, whose schedule "
                            "it does not change; 0 never (default: %(default)s)")


def check_diagnosis_args(args: argparse.Namespace) -> None:
    try:
        check_lam(args.move_lambda)
    except ValueError:
        raise ValueError(f"--move_lambda must be >= 0, got {args.move_lambda}") from None
    for ok, message in (
        (args.reinit_epoch >= 0, f"--reinit_epoch must be >= 0 (0 disables), got {args.reinit_epoch}"),
        (args.reinit_num >= 0, f"--reinit_num must be >= 0, got {args.reinit_num}"),
        (args.kmeans_n_init >= 1, f"--kmeans_n_init must be >= 1, got {args.kmeans_n_init}"),
        (args.diagnosis_repeats >= 1, f"--diagnosis_repeats must be >= 1, got {args.diagnosis_repeats}"),
        (args.track_purity_every >= 0, f"--track_purity_every must be >= 0 (0 never), got {args.track_purity_every}"),
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
        repeats=args.diagnosis_repeats,
    )


class PurityTracker:
    """--track_purity_every N: after every 0-based epoch e with e % N == 0, every encoder's purity on
    train and val and the strength D&R would apply (the D&R flags' k-means settings and lambda),
    recorded only. It owns no snapshot and changes nothing, so it can run beside any method,
    D&R included, without moving D&R's schedule."""

    def __init__(self, args: argparse.Namespace, info):
        self.every = args.track_purity_every
        self.options = dict(n_clusters=info.num_classes, lam=args.move_lambda, seed=args.kmeans_seed,
                            n_init=args.kmeans_n_init, backend=args.kmeans_backend, repeats=args.diagnosis_repeats)

    def due(self, epoch: int) -> bool:
        return self.every > 0 and epoch % self.every == 0

    def step(self, epoch: int, extract: FeatureFn, *, compute: bool = True,
             share: Optional[Callable[[Optional[Diagnosis]], Diagnosis]] = None) -> Optional[Diagnosis]:
        """The record after `epoch`, or None when not due. Several processes: as `Relearner.step`
        (every process extracts, the one with `compute` clusters, `share` hands its record to all)."""
        if not self.due(epoch):
            return None
        train, val = extract("train"), extract("val")
        record = diagnose_features(train, val, epoch=epoch, **self.options) if compute else None
        return share(record) if share is not None else record


def make_tracker(args: argparse.Namespace, info) -> Optional[PurityTracker]:
    return PurityTracker(args, info) if args.track_purity_every > 0 else None
