"""Diagnosing & Re-learning as a training method: the `Relearner` of diagnose.py on the model's
encoders, applied after each epoch's evaluation (methods/base.py runs it; diagnosis.py holds the
flags). Plain cross-entropy otherwise: D&R adds no loss term."""
from __future__ import annotations

from .base import Method, register_method


@register_method
class Relearn(Method):
    name = "relearn"
    help = "Diagnosing & Re-learning (ECCV 2024): purity-gap diagnosis, soft re-initialisation"
    relearn = True
