"""Offline conversion between the engines' checkpoints (`kscale convert deepspeed-to-megatron SRC OUT`,
`kscale convert megatron-to-deepspeed SRC OUT`).

Both directions start one gloo process per rank and use the engines' own code: the source engine
loads the checkpoint, every parameter and its Adam states (exp_avg, exp_avg_sq, step) are taken as whole
fp32 tensors by name (ZeRO-3 partitions gathered), then the target engine is built from the same config
and writes them in its own format with the source's run state (step, tokens, data-loader state, RNG).

- deepspeed -> megatron runs at the checkpoint's world size (ZeRO partitions depend on it) and writes
  a megatron dist_checkpointing checkpoint that loads into any TP/PP layout.
- megatron -> deepspeed loads any TP/PP layout and writes ZeRO partitions for `world_size` ranks
  (default: the source's data-parallel size, which its data-loader state was saved for).
The result is OUT/step_XXXXXXXX + OUT/latest; train from it with checkpoint.resume=OUT/step_XXXXXXXX.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import KScaleError
from ..inference import read_config, resolve_checkpoint
from ..launch.offline import offline_rank, run_offline_ranks

# torch, omegaconf and the engines are imported inside the functions: `kscale --help` stays fast


def _target_config(step_dir: Path, engine: str, world_size: int, zero_stage: int | None = None):
    from ..config import validate

    cfg = read_config(step_dir)
    cfg.run.engine = engine
    cfg.parallel.tensor = cfg.parallel.pipeline = 1
    cfg.parallel.sequence = cfg.parallel.distributed_optimizer = False
    cfg.parallel.nproc = world_size
    if zero_stage is not None:
        cfg.deepspeed.zero_stage = zero_stage
    validate(cfg)
    return cfg


def deepspeed_to_megatron(src: str | Path, out_root: str | Path, timeout: float = 1800) -> Path:
    """A deepspeed-engine checkpoint as a megatron-engine checkpoint under out_root; returns its step folder."""
    import torch

    step_dir = resolve_checkpoint(src)
    state = torch.load(step_dir / "trainer_state.pt", weights_only=False)
    if state.get("engine") != "deepspeed":
        raise KScaleError(
            "not a deepspeed-engine checkpoint",
            where=str(step_dir),
            fix="for a megatron checkpoint use: kscale convert megatron-to-deepspeed",
        )
    return _run("to_megatron", step_dir, out_root, _target_config(step_dir, "megatron", state["world_size"]), timeout)


def megatron_to_deepspeed(
    src: str | Path,
    out_root: str | Path,
    *,
    world_size: int | None = None,
    zero_stage: int | None = None,
    timeout: float = 1800,
) -> Path:
    """A megatron-engine checkpoint (any TP/PP layout) as a deepspeed-engine checkpoint for world_size ranks."""
    import torch

    step_dir = resolve_checkpoint(src)
    state = torch.load(step_dir / "trainer_state.pt", weights_only=False)
    if state.get("engine", "megatron") != "megatron":
        raise KScaleError(
            "not a megatron-engine checkpoint",
            where=str(step_dir),
            fix="for a deepspeed checkpoint use: kscale convert deepspeed-to-megatron",
        )
    if world_size is None:
        p = read_config(step_dir).parallel
        world_size = max(1, state.get("world_size", 1) // (p.tensor * p.pipeline))
    cfg = _target_config(step_dir, "deepspeed", world_size, zero_stage)
    return _run("to_deepspeed", step_dir, out_root, cfg, timeout)


def _run(direction: str, step_dir: Path, out_root: str | Path, cfg, timeout: float) -> Path:
    return run_offline_ranks(
        "kronecker_scale.convert.engines", [direction, str(step_dir)], step_dir, out_root, cfg, timeout, direction
    )


# --- one rank -----------------------------------------------------------------------------------------
def _convert_rank(direction: str, step_dir: Path, out_root: Path, cfg) -> None:
    """Load with the source engine, take whole tensors by name, write them with the target engine."""
    import torch
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    from ..train import checkpoint
    from ..train.engine import build_engine
    from ..train.loop import save_checkpoint
    from .reshard import offline_inputs

    inputs = offline_inputs(cfg, step_dir)
    source_engine = "deepspeed" if direction == "to_megatron" else "megatron"
    source = build_engine(OmegaConf.merge(cfg, {"run": {"engine": source_engine}}), inputs)
    source.read_checkpoint(step_dir)
    full = source.full_state()
    del source
    ps.destroy_model_parallel()
    target = build_engine(cfg, inputs)
    if direction == "to_deepspeed":
        _create_adam_state(target, cfg, inputs.model_cfg.seq_len)
    target.set_full_state(full)
    state = checkpoint.read_run_state(step_dir)  # also restores this rank's RNG states
    state = {k: v for k, v in state.items() if k not in ("rng_restored", "engine", "zero_stage")}
    state.update(world_size=torch.distributed.get_world_size(), **target.run_state())
    save_checkpoint(target, cfg, inputs, out_root, state, keep_last=0)


def _create_adam_state(engine, cfg, seq_len: int) -> None:
    """torch's AdamW creates its state on the first step: take one with learning rate 0 on a dummy batch
    (the weights do not move: the update and the decoupled decay are both multiplied by lr = 0)."""
    import torch

    engine.set_learning_rate(0.0)
    shape = (cfg.data.micro_batch_size, seq_len)
    dummy = iter(
        lambda: {"tokens": torch.zeros(shape, dtype=torch.long), "labels": torch.zeros(shape, dtype=torch.long)}, None
    )
    engine.forward_backward(dummy)
    engine.optimizer_step(True)


if __name__ == "__main__":
    direction, step, out, resolved = sys.argv[1], *map(Path, sys.argv[2:5])
    sys.exit(offline_rank(lambda cfg: _convert_rank(direction, step, out, cfg), resolved))


# --- `kscale convert` subcommands ---------------------------------------------------------------------
def cmd_deepspeed_to_megatron(args) -> int:
    out = deepspeed_to_megatron(args.checkpoint, args.out_dir)
    print(f"wrote {out} (megatron engine); train from it with checkpoint.resume={out}")
    return 0


def cmd_megatron_to_deepspeed(args) -> int:
    out = megatron_to_deepspeed(args.checkpoint, args.out_dir, world_size=args.world_size, zero_stage=args.zero_stage)
    print(f"wrote {out} (deepspeed engine); train from it with run.engine=deepspeed checkpoint.resume={out}")
    return 0


def add_engine_commands(convert) -> None:
    """`kscale convert deepspeed-to-megatron|megatron-to-deepspeed` (convert = its add_subparsers object)."""
    s = convert.add_parser("deepspeed-to-megatron", help="a deepspeed-engine checkpoint in the megatron format")
    s.add_argument("checkpoint", help="step folder, checkpoints folder or run folder")
    s.add_argument("out_dir", help="checkpoints folder to write (step_* + latest)")
    s.set_defaults(func=cmd_deepspeed_to_megatron)
    s = convert.add_parser("megatron-to-deepspeed", help="a megatron-engine checkpoint in DeepSpeed's ZeRO format")
    s.add_argument("checkpoint", help="step folder, checkpoints folder or run folder")
    s.add_argument("out_dir", help="checkpoints folder to write (step_* + latest)")
    s.add_argument(
        "--world-size",
        type=int,
        help="ranks the ZeRO partitions are written for (default: the source's data-parallel size)",
    )
    s.add_argument("--zero-stage", type=int, choices=[1, 2, 3], help="default: the config's deepspeed.zero_stage")
    s.set_defaults(func=cmd_megatron_to_deepspeed)
