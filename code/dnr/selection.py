"""Model selection: which epoch a run reports. The epoch with the best accuracy on `select_on`
(val by default) is selected, and its test numbers are the ones reported; the best test accuracy
over all epochs (how the authors' code selected) is kept beside it, labelled as such."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Optional


@dataclass
class Selection:
    select_on: str = "val"
    best_score: float = -math.inf
    best_epoch: int = -1
    best_val: Optional[dict] = None
    best_test: Optional[dict] = None
    best_test_acc: float = -math.inf
    best_test_epoch: int = -1

    def __post_init__(self):
        if self.select_on not in ("val", "test"):
            raise ValueError(f"--select_on must be val or test, got {self.select_on!r}")

    def update(self, epoch: int, val: Mapping[str, float], test: Mapping[str, float]) -> bool:
        """Take this epoch's metrics; True when it is the new selected epoch (strictly better)."""
        score = (val if self.select_on == "val" else test)["acc"]
        is_best = score > self.best_score
        if is_best:
            self.best_score, self.best_epoch, self.best_val, self.best_test = score, epoch, dict(val), dict(test)
        if test["acc"] > self.best_test_acc:
            self.best_test_acc, self.best_test_epoch = test["acc"], epoch
        return is_best

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: Mapping) -> None:
        for key, value in state.items():
            if key != "select_on":  # the flag of this run decides; check_resumable compares it
                setattr(self, key, value)
