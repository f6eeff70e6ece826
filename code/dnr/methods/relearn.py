"""Diagnosing & Re-learning as a training method: the `Relearner` of diagnose.py on the model's
encoders, applied after each epoch's evaluation (methods/base.py runs it; diagnosis.py holds the
flags). Plain cross-entropy otherwise: D&R adds no loss term."""
from __future__ import annotations

from ..diagnose import diagnosis_epochs
from .base import Method, register_method


@register_method
class Relearn(Method):
    name = "relearn"
    help = "Diagnosing & Re-learning (ECCV 2024): purity-gap diagnosis, soft re-initialisation"
    relearn = True

    @classmethod
    def check_args(cls, args) -> None:
        """Refuse a schedule under which D&R cannot differ from the baseline: no diagnosis at all, or
        none that is followed by a training epoch (a re-initialisation after the last epoch only
        changes weights nobody trains or selects)."""
        super().check_args(args)
        if args.reinit_epoch == 0 or args.reinit_num == 0:
            raise ValueError(f"--method relearn with --reinit_epoch {args.reinit_epoch} and --reinit_num "
                             f"{args.reinit_num} never re-initialises: that is the baseline. Use --method baseline "
                             f"(--track_purity records the diagnoses), or --reinit_epoch N > 0")
        due = diagnosis_epochs(args.epochs, args.reinit_epoch, args.reinit_num)
        if not any(e < args.epochs - 1 for e in due):
            raise ValueError(f"--method relearn: with --epochs {args.epochs} and --reinit_epoch {args.reinit_epoch} "
                             f"no diagnosis is followed by a training epoch (diagnoses after 0-based epochs "
                             f"{due or 'none'}; the last epoch is {args.epochs - 1}), so D&R would train exactly "
                             f"the baseline. Use more --epochs or a smaller --reinit_epoch")
