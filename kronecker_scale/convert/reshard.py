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

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import KScaleError
from .load import read_config, resolve_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def target_config(step_dir: Path, tensor: int, pipeline: int, data: int = 1, sequence: bool | None = None):
    """The checkpoint's config with the new layout, validated (heads / layers divisible, batch sizes)."""
    from ..config import validate
    cfg = read_config(step_dir)
    cfg.parallel.tensor, cfg.parallel.pipeline = tensor, pipeline
    cfg.parallel.nproc = tensor * pipeline * data
    cfg.parallel.sequence = bool(cfg.parallel.sequence if sequence is None else sequence) and tensor > 1
    validate(cfg)
    return cfg


def reshard(checkpoint: str | Path, out_root: str | Path, *, tensor: int, pipeline: int, data: int = 1,
            sequence: bool | None = None, timeout: float = 1800) -> Path:
    """Write the checkpoint in the layout TP=tensor, PP=pipeline, DP=data under out_root; returns the step folder."""
    step_dir = resolve_checkpoint(checkpoint)
    cfg = target_config(step_dir, tensor, pipeline, data, sequence)
    return run_offline_ranks("kronecker_scale.convert.reshard", [str(step_dir)], step_dir, out_root, cfg, timeout,
                             "reshard")


def run_offline_ranks(module: str, args: list[str], step_dir: Path, out_root: str | Path, cfg, timeout: float,
                      what: str) -> Path:
    """Start cfg.parallel.nproc gloo ranks of `python -m module *args OUT_ROOT CONFIG` (the config written
    to a hidden file in OUT_ROOT) and wait; returns the checkpoint they wrote under OUT_ROOT."""
    from ..train.checkpoint import latest_checkpoint
    out_root = Path(out_root)
    if out_root.resolve() == step_dir.parent.resolve():
        raise KScaleError("the output folder is the checkpoint's own folder", where=str(out_root),
                          fix="write the new checkpoint into a new folder")
    out_root.mkdir(parents=True, exist_ok=True)
    resolved = out_root / f".{what}-config.yaml"
    resolved.write_text(OmegaConf.to_yaml(cfg))
    n = cfg.parallel.nproc
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(n),
           "OMP_NUM_THREADS": threads}
    procs = [subprocess.Popen([sys.executable, "-m", module, *args, str(out_root), str(resolved)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, start_new_session=True,
                              stderr=subprocess.PIPE, text=True)
             for r in range(n)]
    failed = _wait(procs, timeout)
    resolved.unlink(missing_ok=True)
    if failed is not None:
        rank, code, err = failed
        raise KScaleError(f"{what} failed on rank {rank} (exit status {code}): {err.strip()[-1500:]}",
                          where=str(step_dir))
    return latest_checkpoint(out_root)


def _wait(procs, timeout: float):
    """None when every rank exits 0; else (rank, code, stderr) of the first failure (the rest are stopped)."""
    deadline = time.time() + timeout
    while True:
        codes = [p.poll() for p in procs]
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if bad or time.time() > deadline:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            rank, code = bad[0] if bad else (0, "timeout")
            return rank, code, procs[rank].communicate()[1] or ""
        if all(c == 0 for c in codes):
            for p in procs:
                p.communicate()
            return None
        time.sleep(0.2)


def _run_rank(step_dir: Path, out_root: Path, resolved: Path) -> int:
    """One rank: build model + optimizer in the new layout, load, save."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from ..config import TrainConfig
    from ..embedding import ByteTable
    from ..model.config import GPTConfig
    from ..tokenizer import load_tokenizer
    from ..tokenizer.assets import tokenizer_path
    from ..train import checkpoint
    from ..train.trainer import init_distributed

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(resolved))
    init_distributed()
    try:
        p = cfg.parallel
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline)
        torch.manual_seed(cfg.run.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)
        model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))
        byte_table = ByteTable.load(step_dir / "byte_table.safetensors") if model_cfg.input_layer == "kronecker" \
            else None
        vocab = load_tokenizer(tokenizer_path(cfg.tokenizer.path)).vocab_size if byte_table is None else None
        built = _ModelAndOptimizer(cfg, model_cfg, byte_table, vocab)
        state = checkpoint.load(step_dir, built.core_model, built.optimizer)
        state.pop("rng_restored", None)
        state["world_size"] = torch.distributed.get_world_size()
        checkpoint.save(out_root, state["step"], built.core_model, built.optimizer, state, OmegaConf.to_yaml(cfg),
                        byte_table, keep_last=0)
    except KScaleError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    return 0


class _ModelAndOptimizer:
    """The trainer's model, DDP wrapper and optimizer for a config, without its data: the trainer's own
    builder (Trainer._build_model reads cfg, model_cfg and byte_table), so the optimizer matches."""

    def __init__(self, cfg, model_cfg, byte_table, vocab_size):
        from ..train.trainer import Trainer
        self.cfg, self.model_cfg, self.byte_table = cfg, model_cfg, byte_table
        Trainer._build_model(self, vocab_size)


if __name__ == "__main__":
    sys.exit(_run_rank(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
