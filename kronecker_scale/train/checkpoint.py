"""Checkpoints of both engines: the engine writes its model and optimizer (megatron: dist_checkpointing,
which loads into another TP/PP layout; deepspeed: its ZeRO files), this module adds what a resume needs
to continue exactly and makes the whole folder appear at once.

Layout of one checkpoint, `checkpoints/step_00000100/`:
    (engine files)                model + optimizer
    trainer_state.pt              step, tokens, skipped steps, data-loader state (rank 0)
    rng/rank_XXXXX.pt             each rank's RNG states (restored when the world size is unchanged)
    config.yaml                   the resolved config
    byte_table.safetensors        the model's byte table (Kronecker input layers)
It is written as `.step_00000100.tmp` and renamed when complete; only then does `checkpoints/latest`
(a one-line file, itself replaced atomically) move to it. A crash mid-write leaves `latest` on the
previous complete checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import KScaleError

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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
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
        raise KScaleError(f"`latest` points to a missing checkpoint {path.name}", where=str(pointer),
                          fix="point it at an existing step_* folder, or set checkpoint.resume=none")
    return path


def save(root: Path, step: int, write_engine_state, trainer_state: dict, config_yaml: str, byte_table=None, *,
         keep_last: int = 3, before_commit=None) -> Path:
    """Collective: every rank calls it. `write_engine_state(folder)` writes the engine's model and
    optimizer; `before_commit(step)` runs when every file is written, before the rename (fault hooks)."""
    tmp = begin(root, step)
    write_engine_state(tmp)
    write_run_state(tmp, trainer_state, config_yaml, byte_table)
    if before_commit is not None:
        before_commit(step)
    return commit(root, step, keep_last)


def dist_save(model, optimizer, folder: Path) -> None:
    """The megatron engine's model and optimizer, sharded (any TP/PP layout can load them)."""
    from megatron.core import dist_checkpointing
    model_sd = model.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}, str(folder))


def dist_load(model, optimizer, folder: Path) -> None:
    """Collective. The inverse of dist_save, into any TP/PP layout; the optimizer is skipped when None."""
    from megatron.core import dist_checkpointing
    model_sd = model.sharded_state_dict()
    request = {"model": model_sd}
    if optimizer is not None:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
    state = dist_checkpointing.load(request, str(folder))
    model.load_state_dict(state["model"])
    if optimizer is not None:
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
        if byte_table is not None:
            byte_table.save(tmp / "byte_table.safetensors")


def commit(root: Path, step: int, keep_last: int = 3) -> Path:
    """Collective: rename the complete temporary folder, then move `latest` to it; drop old checkpoints."""
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
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: Path, read_engine_state) -> dict:
    """Collective. `read_engine_state(folder)` loads the engine's model and optimizer; returns the trainer
    state, with `rng_restored` set when this rank's RNG states were restored (unchanged world size)."""
    path = Path(path)
    if not (path / "trainer_state.pt").is_file():
        raise KScaleError("not a complete kscale checkpoint (no trainer_state.pt)", where=str(path))
    read_engine_state(path)
    return read_run_state(path)


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
