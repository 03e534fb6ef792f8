"""Offline change of a checkpoint's parallel layout (`kscale convert reshard CKPT OUT --tensor T --pipeline P`).

megatron dist_checkpointing stores global tensors (the non-distributed optimizer's state and the
distributed optimizer's default `fully_sharded_model_space` are global too), so any layout can load any
checkpoint. Resharding therefore means: start T x P x D gloo processes, build the model and optimizer in
the target layout exactly as the trainer does, load the checkpoint (which proves it loads there) and
save it again from those ranks, with the config's `parallel` section rewritten. The result is a normal
checkpoint folder under OUT (`OUT/step_XXXXXXXX` + `OUT/latest`); train from it with
`checkpoint.resume=OUT/step_XXXXXXXX parallel.tensor=T ...`. RNG states are those of the new ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from ..inference import read_config, resolve_checkpoint
from ..launch.offline import offline_rank, run_offline_ranks


def target_config(step_dir: Path, tensor: int, pipeline: int, data: int = 1, sequence: bool | None = None):
    """The checkpoint's config with the new layout, validated (heads / layers divisible, batch sizes)."""
    from ..config import validate

    cfg = read_config(step_dir)
    cfg.parallel.tensor, cfg.parallel.pipeline = tensor, pipeline
    cfg.parallel.nproc = tensor * pipeline * data
    cfg.parallel.sequence = bool(cfg.parallel.sequence if sequence is None else sequence) and tensor > 1
    validate(cfg)
    return cfg


def reshard(
    checkpoint: str | Path,
    out_root: str | Path,
    *,
    tensor: int,
    pipeline: int,
    data: int = 1,
    sequence: bool | None = None,
    timeout: float = 1800,
) -> Path:
    """Write the checkpoint in the layout TP=tensor, PP=pipeline, DP=data under out_root; returns the step folder."""
    step_dir = resolve_checkpoint(checkpoint)
    cfg = target_config(step_dir, tensor, pipeline, data, sequence)
    return run_offline_ranks(
        "kronecker_scale.convert.reshard", [str(step_dir)], step_dir, out_root, cfg, timeout, "reshard"
    )


def offline_inputs(cfg, step_dir: Path):
    """The model inputs of a checkpoint: its own byte table (Kronecker) or the tokenizer's size (BPE)."""
    from ..embedding import ByteTable
    from ..model.config import GPTConfig
    from ..tokenizer import load_tokenizer
    from ..tokenizer.assets import tokenizer_path
    from ..train.inputs import ModelInputs

    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))
    if model_cfg.input_layer == "kronecker":
        byte_table = ByteTable.load(step_dir / "byte_table.safetensors")
        return ModelInputs(model_cfg, byte_table.num_token_ids, byte_table)
    return ModelInputs(model_cfg, load_tokenizer(tokenizer_path(cfg.tokenizer.path)).vocab_size, None)


def _reshard_rank(step_dir: Path, out_root: Path, cfg) -> None:
    """Build the engine in the new layout, load, save."""
    import torch

    from ..train import checkpoint
    from ..train.loop import save_checkpoint
    from ..train.megatron_engine import MegatronEngine

    inputs = offline_inputs(cfg, step_dir)
    engine = MegatronEngine(cfg, inputs)
    state = checkpoint.load(step_dir, engine.read_checkpoint)
    state.pop("rng_restored", None)
    state["world_size"] = torch.distributed.get_world_size()
    save_checkpoint(engine, cfg, inputs, out_root, state, keep_last=0)


if __name__ == "__main__":
    step, out, resolved = map(Path, sys.argv[1:4])
    sys.exit(offline_rank(lambda cfg: _reshard_rank(step, out, cfg), resolved))
