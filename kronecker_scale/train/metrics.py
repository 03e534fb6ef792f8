"""Where metrics go: metrics.jsonl (one object per logged step or evaluation), TensorBoard, console."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    """Written by one rank (the one that sees the loss); the others get a writer that does nothing."""

    def __init__(self, run_dir: Path, active: bool, tensorboard: bool, console=print, resume_step: int = 0):
        self.active, self.console = active, console
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not active:
            return
        if resume_step and self.path.exists():
            # drop lines past the checkpoint we resume from: the resumed run writes them again
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step or None)
            except ImportError:
                console("tensorboard is not installed: metrics go to metrics.jsonl only")

    def write(self, record: dict, show: bool = True) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])
        if show:
            keys = [k for k in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "step_time") if k in record]
            self.console(f"step {record['step']:>6} " + "  ".join(
                f"{k} {record[k]:.4g}" if isinstance(record[k], float) else f"{k} {record[k]}" for k in keys))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
