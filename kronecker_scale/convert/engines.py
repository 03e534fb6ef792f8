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

# torch, omegaconf and the engines are imported inside the functions: `kscale --help` stays fast


def _target_config(step_dir: Path, engine: str, world_size: int, zero_stage: int | None = None):
    from .load import read_config
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
    
    from .load import resolve_checkpoint
    step_dir = resolve_checkpoint(src)
    state = torch.load(step_dir / "trainer_state.pt", weights_only=False)
    if state.get("engine") != "deepspeed":
        raise KScaleError("not a deepspeed-engine checkpoint", where=str(step_dir),
                          fix="for a megatron checkpoint use: kscale convert megatron-to-deepspeed")
    return _run("to_megatron", step_dir, out_root, _target_config(step_dir, "megatron", state["world_size"]),
                timeout)


def megatron_to_deepspeed(src: str | Path, out_root: str | Path, *, world_size: int | None = None,
                          zero_stage: int | None = None, timeout: float = 1800) -> Path:
    """A megatron-engine checkpoint (any TP/PP layout) as a deepspeed-engine checkpoint for world_size ranks."""
    import torch
    
    from .load import read_config, resolve_checkpoint
    step_dir = resolve_checkpoint(src)
    state = torch.load(step_dir / "trainer_state.pt", weights_only=False)
    if state.get("engine", "megatron") != "megatron":
        raise KScaleError("not a megatron-engine checkpoint", where=str(step_dir),
                          fix="for a deepspeed checkpoint use: kscale convert deepspeed-to-megatron")
    if world_size is None:
        p = read_config(step_dir).parallel
        world_size = max(1, state.get("world_size", 1) // (p.tensor * p.pipeline))
    cfg = _target_config(step_dir, "deepspeed", world_size, zero_stage)
    return _run("to_deepspeed", step_dir, out_root, cfg, timeout)


def _run(direction: str, step_dir: Path, out_root: str | Path, cfg, timeout: float) -> Path:
    from .reshard import run_offline_ranks
    return run_offline_ranks("kronecker_scale.convert.engines", [direction, str(step_dir)], step_dir, out_root, cfg,
                             timeout, direction)


# --- the megatron side: whole tensors by name ---------------------------------------------------------
def _adam_slots(optimizer) -> list[tuple]:
    """(model param, main fp32 param, torch optimizer) of a megatron (non-distributed) optimizer."""
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "float16_groups"):             # bf16/fp16: fp32 main copies
            pairs = [(m, f) for mg, fg in zip(opt.float16_groups, opt.fp32_from_float16_groups) for m, f in zip(mg, fg)]
            pairs += [(p, p) for g in opt.fp32_from_fp32_groups for p in g]
        else:
            pairs = [(p, p) for g in opt.optimizer.param_groups for p in g["params"]]
        out += [(m, f, opt.optimizer) for m, f in pairs]
    return out


def megatron_full_state(core_model, optimizer) -> dict:
    by_id = {id(m): (f, inner) for m, f, inner in _adam_slots(optimizer)}
    tensors, steps = {}, set()
    for name, p in core_model.named_parameters():
        main, inner = by_id[id(p)]
        st = inner.state.get(main, {})
        entry = {"param": main.detach().float().cpu().clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                entry[key] = st[key].detach().float().cpu().clone()
        if "step" in st:
            steps.add(int(st["step"]))
        tensors[name] = entry
    return {"tensors": tensors, "adam_step": max(steps) if steps else 0}


def set_megatron_full_state(core_model, optimizer, state: dict) -> None:
    import torch
    by_id = {id(m): (f, inner) for m, f, inner in _adam_slots(optimizer)}
    with torch.no_grad():
        for name, p in core_model.named_parameters():
            entry = state["tensors"][name]
            main, inner = by_id[id(p)]
            main.copy_(entry["param"].to(main.dtype))
            p.copy_(entry["param"].to(p.dtype))
            if "exp_avg" in entry:
                inner.state[main] = {"step": torch.tensor(float(state["adam_step"])),
                                     "exp_avg": entry["exp_avg"].to(main.dtype).clone(),
                                     "exp_avg_sq": entry["exp_avg_sq"].to(main.dtype).clone()}


def _build_megatron(cfg):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from ..train import common
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    torch.manual_seed(cfg.run.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)
    model_cfg, tok, byte_table = common.model_inputs(cfg)
    from .reshard import _ModelAndOptimizer
    return _ModelAndOptimizer(cfg, model_cfg, byte_table, tok.vocab_size), byte_table


# --- one rank -----------------------------------------------------------------------------------------
def _to_megatron(step_dir: Path, out_root: Path, cfg) -> None:
    from omegaconf import OmegaConf
    from megatron.core import parallel_state as ps

    from ..train import checkpoint
    from ..train import deepspeed_adapter as ds
    from ..train.deepspeed_engine import DeepSpeedTrainer
    source = DeepSpeedTrainer(OmegaConf.merge(cfg, {"run": {"engine": "deepspeed"}}), with_data=False)
    source.load(step_dir)
    full = ds.full_state(source.engine)
    del source
    ps.destroy_model_parallel()
    built, byte_table = _build_megatron(cfg)
    set_megatron_full_state(built.core_model, built.optimizer, full)
    state = checkpoint.read_run_state(step_dir)            # also restores this rank's RNG states
    _save_state = {k: v for k, v in state.items() if k not in ("rng_restored", "engine", "zero_stage")}
    checkpoint.save(out_root, state["step"], built.core_model, built.optimizer, _save_state, OmegaConf.to_yaml(cfg),
                    byte_table, keep_last=0)


def _to_deepspeed(step_dir: Path, out_root: Path, cfg) -> None:
    import torch
    from omegaconf import OmegaConf
    from megatron.core import parallel_state as ps

    from ..train import checkpoint
    from ..train.deepspeed_engine import DeepSpeedTrainer
    built, _ = _build_megatron(OmegaConf.merge(cfg, {"run": {"engine": "megatron"}}))
    checkpoint.load(step_dir, built.core_model, built.optimizer)
    full = megatron_full_state(built.core_model, built.optimizer)
    del built
    ps.destroy_model_parallel()
    target = DeepSpeedTrainer(cfg, with_data=False)
    _create_adam_state(target)
    target.ds.set_full_state(target.engine, full)
    state = checkpoint.read_run_state(step_dir)
    state = {k: v for k, v in state.items() if k != "rng_restored"}
    state.update(engine="deepspeed", zero_stage=int(cfg.deepspeed.zero_stage),
                 world_size=torch.distributed.get_world_size())
    target.ckpt_dir = out_root
    target.cfg.checkpoint.keep_last = 0
    target.save(state["step"], state["tokens"], state["skipped_steps"], state=state)


def _create_adam_state(trainer) -> None:
    """torch's AdamW creates its state on the first step: take one with learning rate 0 on a dummy batch
    (the weights do not move: the update and the decoupled decay are both multiplied by lr = 0)."""
    import torch
    cfg = trainer.cfg
    trainer.ds.set_learning_rate(trainer.engine, 0.0)
    shape = (cfg.data.micro_batch_size, trainer.model_cfg.seq_len)
    dummy = iter(lambda: {"tokens": torch.zeros(shape, dtype=torch.long), "labels": torch.zeros(shape, dtype=torch.long)},
                 None)
    trainer.train_step(dummy, poison=False)
    trainer.engine.step()


def _run_rank(direction: str, step_dir: Path, out_root: Path, resolved: Path) -> int:
    import torch
    from omegaconf import OmegaConf
    from megatron.core import parallel_state as ps

    from ..config import TrainConfig
    from ..train.trainer import init_distributed
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(resolved))
    init_distributed()
    try:
        (_to_megatron if direction == "to_megatron" else _to_deepspeed)(step_dir, out_root, cfg)
    except KScaleError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_run_rank(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])))


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
    s.add_argument("--world-size", type=int, help="ranks the ZeRO partitions are written for "
                                                   "(default: the source's data-parallel size)")
    s.add_argument("--zero-stage", type=int, choices=[1, 2, 3], help="default: the config's deepspeed.zero_stage")
    s.set_defaults(func=cmd_megatron_to_deepspeed)
