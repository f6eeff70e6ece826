"""Training methods, one small class each, selected with --method (see base.py for the hooks).

To add a method: subclass `Method`, override the hooks it needs, decorate it with
`register_method`, declare its flags in `add_args`, and import its module here.
"""
from .base import METHODS, Method, TrainContext, create_method, register_method
from . import agm, mmpareto, ogm_ge, opm, pmr, relearn, unimodal  # noqa: F401  (register themselves)
from .relearn import add_diagnosis_args, make_relearner

__all__ = ["METHODS", "Method", "TrainContext", "create_method", "register_method",
           "add_diagnosis_args", "make_relearner"]
