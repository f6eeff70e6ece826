#!/usr/bin/env python3
"""Prepare CREMA-D, Kinetics-Sounds or UCF-101 from the raw download for the trainer.

    python script/prepare.py cremad --root CREMA-D --out data/cremad
    python script/prepare.py {cremad,kinetics_sounds,ucf101} --help
    python script/prepare.py pack --data_path data/cremad    # packed frame cache (--frame_cache)

The tool itself is code/dnr/data/prepare.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from dnr.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
