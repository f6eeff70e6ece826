"""Diagnosing & Re-learning as a training method: the `Relearner` of diagnose.py on the model's
encoders, called after each epoch's evaluation. Plain cross-entropy otherwise (no extra loss)."""
from __future__ import annotations

import argparse
from typing import Dict, Mapping

from ..diagnose import KMEANS_BACKENDS, Relearner
from .base import Method, TrainContext, register_method


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


@register_method
class Relearn(Method):
    name = "relearn"
    help = "Diagnosing & Re-learning (ECCV 2024): purity-gap diagnosis, soft re-initialisation"

    def __init__(self, args, model, info):
        super().__init__(args, model, info)
        # Built before the first optimisation step: this is where theta_init is taken.
        self.relearner = make_relearner(args, model, info, apply=True)

    def on_epoch_end(self, epoch: int, ctx: TrainContext) -> Dict[str, object]:
        record = self.relearner.step(epoch, ctx.extract_features, compute=ctx.is_main, share=ctx.broadcast)
        return {"diagnosis": record.to_dict()} if record is not None else {}

    def state_dict(self) -> dict:
        return {"relearner": self.relearner.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.relearner.load_state_dict(state["relearner"])
