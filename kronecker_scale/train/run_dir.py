"""A run directory's history: which checkpoint a run continues from, and what happens to the rest.

- A run that starts over (`checkpoint.resume=none`) in a directory holding checkpoints is refused unless
  `run.restart=true`, which moves the old run aside (`previous-<time>/`) rather than deleting it.
- A rollback (resuming from a checkpoint older than the newest, e.g. after a loss spike) moves the later
  checkpoints aside (`checkpoints/abandoned-<time>/`) and cuts metrics.jsonl back to the resumed step
  (the cut rows are kept beside it), so `latest`, retention and the metrics all follow one history.
- Every checkpoint records its lineage (an id kept across resumes); retention only ever deletes
  checkpoints of the current lineage, never the one just written or the one resumed from.
- Before a run starts, a resume that changes what a checkpoint cannot change (the model's shape, the
  vocabulary, pos_dim) is refused naming the keys; the settings that may change (learning rate,
  schedule, weight decay, betas, clipping, ...) are listed.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..config.load import flatten
from ..errors import KScaleError
from . import checkpoint

# model keys a resumed run may change: how the same weights are computed, not what they are
MODEL_RUNTIME_KEYS = {
    "embedding_impl",
    "deterministic_embedding",
    "hidden_dropout",
    "attention_dropout",
    "attention_backend",
    "recompute",
}


def has_checkpoints(ckpt_dir: Path) -> bool:
    return ckpt_dir.is_dir() and (any(p.is_dir() for p in ckpt_dir.glob("step_*")) or (ckpt_dir / "latest").exists())


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def resume_changes(saved: DictConfig, new: DictConfig) -> list[str]:
    """The settings a resume changes, as "key: old -> new"; raises naming the keys it cannot change."""
    old_flat = flatten(OmegaConf.to_container(saved, resolve=True))
    new_flat = flatten(OmegaConf.to_container(new, resolve=True))
    fixed, changed = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(key), new_flat.get(key)
        if before == after or key.startswith(("run.dir", "run.name", "checkpoint.resume", "run.restart")):
            continue
        section, _, name = key.partition(".")
        if (section == "model" and name not in MODEL_RUNTIME_KEYS) or section == "tokenizer":
            fixed.append(f"{key}: {before!r} -> {after!r}")
        else:
            changed.append(f"{key}: {before!r} -> {after!r}")
    if fixed:
        raise KScaleError(
            "the run would resume a checkpoint with another model or vocabulary: " + "; ".join(fixed),
            where="model.* / tokenizer.* against the checkpoint's config.yaml",
            fix="set these keys back, or start a new run in another run.dir (convert the "
            "checkpoint first if you mean another layout: kscale convert reshard)",
        )
    return changed


def check_before_start(cfg: DictConfig) -> list[str]:
    """Read-only checks of the run directory before anything is written (the launcher): returns the
    settings a resume changes; raises when the run would destroy or misuse what is there."""
    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    resume = cfg.checkpoint.resume
    if resume == "none":
        if has_checkpoints(ckpt_dir) and not cfg.run.restart:
            raise KScaleError(
                "checkpoint.resume=none in a run directory that holds checkpoints",
                where=str(ckpt_dir),
                fix="resume (checkpoint.resume=auto), start over keeping the "
                "old run aside (run.restart=true), or use another run.dir",
            )
        return []
    path = checkpoint.latest_checkpoint(ckpt_dir) if resume == "auto" else Path(resume)
    if path is None:
        return []
    if not (path / "config.yaml").is_file():
        raise KScaleError(
            "the checkpoint to resume has no config.yaml",
            where=str(path),
            fix="give a complete checkpoint folder (step_*) in checkpoint.resume",
        )
    return resume_changes(OmegaConf.load(path / "config.yaml"), cfg)


def prepare(cfg: DictConfig, ckpt_dir: Path, console) -> Path | None:
    """Collective, at the start of every run: clean what crashed saves left, carry out a restart or a
    rollback, and return the verified checkpoint to resume from (None: a fresh start)."""
    run_dir = Path(cfg.run.dir)
    if _rank() == 0:
        for name in checkpoint.clean_partial(ckpt_dir) if ckpt_dir.is_dir() else []:
            console(f"removed the partial checkpoint {ckpt_dir / name} of a save that did not complete")
    if cfg.checkpoint.resume == "none":
        if _rank() == 0 and has_checkpoints(ckpt_dir):
            if not cfg.run.restart:
                raise KScaleError(
                    "checkpoint.resume=none in a run directory that holds checkpoints",
                    where=str(ckpt_dir),
                    fix="set run.restart=true to start over",
                )
            aside = _move_aside_run(run_dir)
            console(f"run.restart: the previous run was moved to {aside}")
        _barrier()
        return None
    explicit = None if cfg.checkpoint.resume == "auto" else Path(cfg.checkpoint.resume)
    path, warnings = checkpoint.resumable(ckpt_dir, explicit)
    for line in warnings:
        console(line)
    if path is not None and _rank() == 0:
        _roll_back_to(path, ckpt_dir, run_dir, console)
    _barrier()
    return path


def new_lineage() -> str:
    box = [uuid.uuid4().hex[:12]]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _move_aside_run(run_dir: Path) -> Path:
    aside = run_dir / f"previous-{_stamp()}"
    aside.mkdir()
    for name in ("checkpoints", "metrics.jsonl", "tensorboard"):
        if (run_dir / name).exists():
            (run_dir / name).rename(aside / name)
    return aside


def _roll_back_to(path: Path, ckpt_dir: Path, run_dir: Path, console) -> None:
    """Rank 0: the checkpoints of this run directory after `path` leave the history (moved aside, not
    deleted), `latest` names `path` when it is one of ours, and metrics.jsonl ends at its step."""
    step = checkpoint.step_of(path)
    later = (
        [p for p in ckpt_dir.glob("step_*") if p.is_dir() and checkpoint.step_of(p) > step] if ckpt_dir.is_dir() else []
    )
    if not later:
        return
    aside = ckpt_dir / f"abandoned-{_stamp()}"
    aside.mkdir()
    for p in later:
        p.rename(aside / p.name)
    if path.resolve().parent == ckpt_dir.resolve():
        pointer = ckpt_dir / ".latest.tmp"
        pointer.write_text(path.name + "\n")
        pointer.replace(ckpt_dir / checkpoint.LATEST)
    metrics = run_dir / "metrics.jsonl"
    cut = 0
    if metrics.is_file():
        kept: list[str] = []
        dropped: list[str] = []
        for line in metrics.read_text().splitlines():
            if line:
                (dropped if json.loads(line).get("step", 0) > step else kept).append(line)
        if dropped:
            (run_dir / f"metrics.abandoned-{_stamp()}.jsonl").write_text("".join(x + "\n" for x in dropped))
            metrics.write_text("".join(x + "\n" for x in kept))
            cut = len(dropped)
    console(
        f"rollback to step {step}: {len(later)} later checkpoint(s) moved to {aside}"
        + (f", {cut} metrics rows after step {step} moved beside metrics.jsonl" if cut else "")
    )
