"""Work functions run in the preparation tool's spawned worker processes by test_data_real.py and
test_data_faults.py (imported there by the workers themselves; not a test module)."""
import os
import sys

from dnr.data.prepare import Outcome, prepare_clip

HEAVY = ("torch", "torchvision", "sklearn", "matplotlib")  # what a worker must never import


def crash_on_boom(task):
    if task.clip == "boom":
        os._exit(3)  # what a segfault in FFmpeg looks like to the pool
    return Outcome(task.clip)


def prepare_and_report_modules(task):
    """The real worker function, then a failure naming any heavy module it loaded."""
    done = prepare_clip(task)
    heavy = [m for m in HEAVY if m in sys.modules]
    return Outcome(done.clip, done.error or (f"the worker imported {heavy}" if heavy else None), done.probe)
