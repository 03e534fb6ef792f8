"""Where metrics go: one `MetricsLogger` interface (write a record, close), implemented by metrics.jsonl
(`JsonlLogger`), TensorBoard (`TensorBoardLogger`) and Weights & Biases (`WandbLogger`), composed by
`MetricsWriter` with the console line.

Records are plain dicts with a "step" (one per logged step or evaluation). The logging rank (the one that
sees the loss) writes them; the other ranks get a writer that does nothing. Weights & Biases
(`logging.wandb`, docs/export.md): mode disabled (default; wandb is not even imported), offline (files
under <run.dir>/wandb/, `wandb sync` uploads them later) or online; the run gets the resolved config and
every record, with step = the record's step. Its run id is kept in the checkpoints' run state
(`wandb_run_id` in trainer_state.pt), so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import uuid
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import KScaleError

WANDB_MODES = ("disabled", "offline", "online")


@runtime_checkable
class MetricsLogger(Protocol):
    """A destination for metric records."""

    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """metrics.jsonl: one JSON object per record. On resume, lines past the resumed step are dropped
    first (the resumed run writes them again)."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        if resume_step and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Finite numbers of each record as TensorBoard scalars under <run.dir>/tensorboard."""

    def __init__(self, log_dir: Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # ImportError when tensorboard is missing

        self.tb = SummaryWriter(str(log_dir), purge_step=resume_step or None)

    def write(self, record: dict) -> None:
        for k, v in record.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.tb.close()


class WandbLogger:
    """A Weights & Biases run: the resolved config, then every record at step = record["step"].

    `run_id` continues that run (resume="allow": it is created if W&B has no such run); files go under
    `directory`/wandb/ (offline: offline-run-<time>-<id>/run-<id>.wandb, uploaded by `wandb sync`)."""

    def __init__(self, settings, directory: Path, run_id: str | None, config: dict | None = None, console=print):
        import wandb

        self.run_id = run_id
        mode: Any = str(settings.mode)
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name,
            tags=list(settings.tags or []) or None,
            mode=mode,
            id=run_id,
            resume="allow",
            dir=str(directory),
            settings=wandb.Settings(console="off", silent=True),
        )
        if config is not None:  # on resume the config may have changed (learning rate, schedule, ...)
            self.run.config.update(config, allow_val_change=True)
        where = getattr(self.run, "dir", None) or directory
        console(
            f"wandb: {mode} run {run_id}"
            + (f" ({self.run.url})" if mode == "online" and self.run.url else f" in {Path(where).parent}")
        )

    def write(self, record: dict) -> None:
        data = {k: v for k, v in record.items() if k != "step"}
        self.run.log(data, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def check_wandb_settings(settings) -> str:
    """logging.wandb's mode, checked (every rank calls this, so all stop together on a bad setting)."""
    mode = str(settings.mode)
    if mode not in WANDB_MODES:
        raise KScaleError(
            f"logging.wandb.mode={mode!r} is not possible",
            where="config key logging.wandb.mode",
            fix="use disabled, offline or online",
        )
    if mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise KScaleError(
            f"logging.wandb.mode={mode} needs the wandb package, which is not installed",
            where="config key logging.wandb.mode",
            fix="pip install -e '.[wandb]' (or set logging.wandb.mode=disabled)",
        )
    return mode


def new_wandb_run_id() -> str:
    """A fresh W&B run id, the same on every rank (collective when torch.distributed is initialised)."""
    box = [uuid.uuid4().hex[:16]]
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class MetricsWriter:
    """Written by one rank (the one that sees the loss); the others get a writer that does nothing.

    The records go to every logger in `loggers` (metrics.jsonl, TensorBoard, W&B); `write(..., show=True)`
    also prints the console line."""

    def __init__(
        self,
        run_dir: Path,
        active: bool,
        tensorboard: bool,
        console=print,
        resume_step: int = 0,
        loggers: list[MetricsLogger] | None = None,
    ):
        self.active, self.console = active, console
        self.path = Path(run_dir) / "metrics.jsonl"
        self.loggers: list[MetricsLogger] = []
        self.wandb_run_id: str | None = None
        if not active:
            return
        self.loggers.append(JsonlLogger(self.path, resume_step))
        if tensorboard:
            try:
                self.loggers.append(TensorBoardLogger(Path(run_dir) / "tensorboard", resume_step))
            except ImportError:
                console("tensorboard is not installed: metrics go to metrics.jsonl only")
        self.loggers.extend(loggers or [])

    @classmethod
    def for_run(
        cls, cfg, active: bool, console=print, resume_step: int = 0, wandb_run_id: str | None = None
    ) -> MetricsWriter:
        """The writer of a training run: metrics.jsonl, TensorBoard (logging.tensorboard) and W&B
        (logging.wandb). Collective when W&B is on and the run has no W&B id yet: every rank calls it.
        `wandb_run_id`: the id from the resumed checkpoint's run state (None: a new one)."""
        from omegaconf import OmegaConf

        settings = cfg.logging.get("wandb")
        mode = check_wandb_settings(settings) if settings is not None else "disabled"
        if mode != "disabled" and not wandb_run_id:
            wandb_run_id = new_wandb_run_id()
        writer = cls(Path(cfg.run.dir), active, cfg.logging.tensorboard, console, resume_step)
        writer.wandb_run_id = wandb_run_id  # kept even while disabled: turning W&B back on continues the run
        if mode != "disabled":
            if active:
                if settings.name is None or settings.project is None:
                    settings = OmegaConf.merge(
                        settings,
                        {"name": settings.name or cfg.run.name, "project": settings.project or "kronecker-scale"},
                    )
                writer.loggers.append(
                    WandbLogger(
                        settings, Path(cfg.run.dir), wandb_run_id, OmegaConf.to_container(cfg, resolve=True), console
                    )
                )
        return writer

    def write(self, record: dict, show: bool = True) -> None:
        if not self.active:
            return
        for logger in self.loggers:
            logger.write(record)
        if show:
            keys = [k for k in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "step_time") if k in record]
            self.console(
                f"step {record['step']:>6} "
                + "  ".join(
                    f"{k} {record[k]:.4g}" if isinstance(record[k], float) else f"{k} {record[k]}" for k in keys
                )
            )

    def close(self) -> None:
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()
