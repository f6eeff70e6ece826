import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ROOT / "code"
if str(CODE) not in sys.path:  # also when pytest runs without the pyproject's pythonpath
    sys.path.insert(0, str(CODE))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


# Tiny built-in dataset: a handful of samples per split, 16x16 frames.
TINY = ["--builtin_train_size", "40", "--builtin_val_size", "20", "--builtin_test_size", "20",
        "--builtin_image_size", "16", "--batch_size", "16", "--progress", "off"]
