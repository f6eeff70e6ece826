"""Training methods, one small class each, selected with --method (see base.py for the hooks).

To add a method: subclass `Method`, override the hooks it needs, decorate it with
`register_method`, declare its flags in `add_args` (and check them in `check_args`), and import
its module here. Everything else (the trainer, script/compare.py, the tests that run every
method) reads the registry.
"""
from .base import METHODS, Method, TrainContext, create_method, register_method
from .diagnosis import PurityTracker, add_diagnosis_args, make_relearner, make_tracker
# Each module registers its method on import.
from . import (  # noqa: F401,E402
    relearn,
    unimodal,
    ogm_ge,
    pmr,
    mmpareto,
    agm,
    opm,
    reconboost,
    mbsd,
    lfm,
    umt,
    ume,
    sample_valuation,
    amco,
    gblending,
    mmcosine,
    cml,
    mla,
    greedy,
)

__all__ = ["METHODS", "Method", "TrainContext", "create_method", "register_method",
           "add_diagnosis_args", "make_relearner", "PurityTracker", "make_tracker"]
