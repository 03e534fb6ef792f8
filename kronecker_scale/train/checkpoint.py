"""Checkpoints of both engines: the engine writes its model and optimizer (megatron: dist_checkpointing,
which loads into another TP/PP layout; deepspeed: its ZeRO files), this module adds what a resume needs
to continue exactly and makes the whole folder appear at once.

Layout of one checkpoint, `checkpoints/step_00000100/`:
    (engine files)                model + optimizer
    trainer_state.pt              step, tokens, skipped steps, data-loader state (rank 0)
    rng/rank_XXXXX.pt             each rank's RNG states (restored when the world size is unchanged)
    config.yaml                   the resolved config
    byte_table.safetensors        the model's byte table (Kronecker input layers)
    lineage                       the id of the run history it belongs to (retention keeps to it)
    manifest.json                 every file's size and SHA-256, written last, checked on resume
It is written as `.step_00000100.tmp` and renamed when complete; only then does `checkpoints/latest`
(a one-line file, itself replaced atomically) move to it. A crash mid-write leaves `latest` on the
previous complete checkpoint.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import KScaleError
from . import integrity

LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def latest_checkpoint(root: Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not path.is_dir():
        raise KScaleError(
            f"`latest` points to a missing checkpoint {path.name}",
            where=str(pointer),
            fix="point it at an existing step_* folder, or set checkpoint.resume=none",
        )
    return path


def _agree(value):
    """Rank 0's value on every rank (a decision all ranks must take alike)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def save(
    root: Path,
    step: int,
    write_engine_state,
    trainer_state: dict,
    config_yaml: str,
    byte_table=None,
    *,
    keep_last: int = 3,
    before_commit=None,
    protect: tuple[str, ...] = (),
) -> Path:
    """Collective: every rank calls it. `write_engine_state(folder)` writes the engine's model and
    optimizer; `before_commit(step)` runs when every file is written, before the rename (fault hooks).
    A save that will not fit, or runs out of room, stops with "disk full" and leaves nothing behind."""
    root = Path(root)
    full = _agree(integrity.free_space_problem(root, latest_checkpoint(root)) if _rank() == 0 else None)
    if full:
        raise KScaleError(full, where=str(root), fix="free space (or lower checkpoint.keep_last), then resume")
    tmp = begin(root, step)
    try:
        write_engine_state(tmp)
        write_run_state(tmp, trainer_state, config_yaml, byte_table)
        integrity.write_manifest(tmp)
    except BaseException as e:  # torch's checkpoint writer raises CheckpointException(BaseException)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (KeyboardInterrupt, SystemExit)) and _out_of_space(e, root):
            raise KScaleError(
                f"disk full while writing the checkpoint of step {step} ({type(e).__name__}; "
                f"{shutil.disk_usage(root).free / 2**20:,.1f} MiB free)",
                where=str(root),
                fix="free space, then resume: the previous checkpoint is intact and the partial one was removed",
            ) from None
        raise
    if before_commit is not None:
        before_commit(step)
    return commit(root, step, keep_last, trainer_state.get("lineage"), protect)


def _out_of_space(error: BaseException, root: Path) -> bool:
    """ENOSPC anywhere in the exception chain, or (libraries that hide it: torch's writer says "unexpected
    pos") almost nothing left on the file system."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    return shutil.disk_usage(root).free < 16 * 2**20


def clean_partial(root: Path) -> list[str]:
    """Remove the temporary folders of saves that never completed (a crash or a full disk); rank 0, at
    start. Returns their names."""
    gone = []
    for tmp in sorted(Path(root).glob(".step_*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
        gone.append(tmp.name)
    return gone


# megatron's distributed optimizer: Adam states gathered into model-shaped tensors (any DP/TP/PP layout
# loads them); its default format ("fully_sharded_model_space") cannot be saved by dist_checkpointing 0.19
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def dist_save(model, optimizer, folder: Path) -> None:
    """The megatron engine's model and optimizer, sharded (any TP/PP layout can load them)."""
    from megatron.core import dist_checkpointing

    model_sd = model.sharded_state_dict()
    dist_checkpointing.save(
        {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)},
        str(folder),
    )


def dist_load(model, optimizer, folder: Path, adapt_optimizer_state=None) -> None:
    """Collective. The inverse of dist_save, into any TP/PP layout; the optimizer is skipped when None.
    `adapt_optimizer_state(state)` may edit the loaded optimizer state before the optimizer takes it."""
    from megatron.core import dist_checkpointing

    model_sd = model.sharded_state_dict()
    request = {"model": model_sd}
    if optimizer is not None:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)
    state = dist_checkpointing.load(request, str(folder))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        if adapt_optimizer_state is not None:
            adapt_optimizer_state(state["optimizer"])
        optimizer.load_state_dict(state["optimizer"])


def begin(root: Path, step: int) -> Path:
    """Collective: a fresh temporary folder for the checkpoint of `step`."""
    tmp = Path(root) / f".{step_dir_name(step)}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def write_run_state(tmp: Path, trainer_state: dict, config_yaml: str, byte_table=None) -> None:
    """Every rank's RNG states; rank 0: trainer state, config and byte table."""
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    if _rank() == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        if trainer_state.get("lineage"):
            (tmp / "lineage").write_text(trainer_state["lineage"] + "\n")
        if byte_table is not None:
            byte_table.save(tmp / "byte_table.safetensors")


def commit(
    root: Path, step: int, keep_last: int = 3, lineage: str | None = None, protect: tuple[str, ...] = ()
) -> Path:
    """Collective: rename the complete temporary folder, then move `latest` to it; drop old checkpoints of
    the same lineage (never the one just written, nor those named in `protect`: the one resumed from)."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp"
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, root / LATEST)
        ours = sorted(p for p in root.glob("step_*") if p.is_dir() and lineage_of(p) in (lineage, None))
        for old in ours[:-keep_last] if keep_last > 0 else []:
            if old.name not in protect and old != final:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def lineage_of(folder: Path) -> str | None:
    """The lineage a checkpoint belongs to (None: written before lineages existed)."""
    path = Path(folder) / "lineage"
    return path.read_text().strip() if path.is_file() else None


def step_of(folder: Path) -> int:
    return int(Path(folder).name.split("_")[-1])


def resumable(root: Path, explicit: Path | None = None) -> tuple[Path | None, list[str]]:
    """Collective. The checkpoint to resume from, verified against its manifest, and warnings. With an
    explicit path a damaged checkpoint is an error; otherwise (`latest`) the run falls back to the newest
    intact checkpoint and says which it skipped."""
    if explicit is not None:
        bad = _agree(integrity.problem(explicit))  # collective: every rank hashes its share
        if bad:
            raise KScaleError(
                f"the checkpoint is damaged: {bad}",
                where=str(explicit),
                fix="resume from another checkpoint (checkpoint.resume=PATH or auto)",
            )
        return explicit, []
    latest = latest_checkpoint(root)
    if latest is None:
        return None, []
    older = sorted((p for p in Path(root).glob("step_*") if p.is_dir() and p != latest), key=step_of, reverse=True)
    warnings: list[str] = []
    for candidate in [latest, *older]:
        bad = _agree(integrity.problem(candidate))  # collective: every rank hashes its share
        if not bad:
            return candidate, warnings
        warnings.append(f"warning: skipping damaged checkpoint {candidate}: {bad}")
    raise KScaleError(
        "no intact checkpoint to resume from",
        where=str(root),
        fix="; ".join(warnings) + "; or start over with checkpoint.resume=none run.restart=true",
    )


def load(path: Path, read_engine_state) -> dict:
    """Collective. `read_engine_state(folder)` loads the engine's model and optimizer; returns the trainer
    state, with `rng_restored` set when this rank's RNG states were restored (unchanged world size)."""
    path = Path(path)
    if not (path / "trainer_state.pt").is_file():
        raise KScaleError("not a complete kscale checkpoint (no trainer_state.pt)", where=str(path))
    try:
        read_engine_state(path)
        return read_run_state(path)
    except (KScaleError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # megatron, DeepSpeed, torch.load (CheckpointException): name the checkpoint
        raise KScaleError(
            f"could not read the checkpoint ({type(e).__name__}: {str(e)[:500]})",
            where=str(path),
            fix="resume from an older checkpoint: checkpoint.resume=PATH",
        ) from None


def read_run_state(path: Path) -> dict:
    """The trainer state, with `rng_restored` set when this rank's RNG file exists and the world size is
    unchanged (then the RNG states are restored)."""
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if trainer_state.get("world_size") == world and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
        trainer_state["rng_restored"] = True
    return trainer_state
