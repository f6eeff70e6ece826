"""Run logging: a JSON line per epoch (log.jsonl), TensorBoard scalars, a short stdout line."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path, obj: Dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2) + "\n")
    tmp.replace(path)


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """{'val': {'acc': 1}} -> {'val/acc': 1}; non-numbers are dropped (for TensorBoard)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


class RunLogger:
    """Writes one JSON line per epoch to `<out>/log.jsonl` and scalars to TensorBoard."""

    def __init__(self, out_dir, tensorboard_dir: Optional[str], resume_epoch: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_epoch > 0 and self.path.exists():
            # Drop lines of epochs the resumed run will redo, so each epoch appears once.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("epoch", -1) < resume_epoch]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step discards events of epochs after the checkpoint (a killed run's tail).
            self.tb = SummaryWriter(tensorboard_dir, purge_step=resume_epoch if resume_epoch > 0 else None)

    def log_epoch(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
        if self.tb is not None:
            step = int(record["epoch"])
            for key, value in flatten({k: v for k, v in record.items() if k != "epoch"}).items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
