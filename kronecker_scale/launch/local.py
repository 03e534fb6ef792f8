"""`kscale train`: validate the config, write it to the run directory, then run the ranks.

Under torchrun or srun (RANK/WORLD_SIZE already set) this process is one rank. Otherwise it starts
`parallel.nproc` local processes (gloo on CPU, NCCL on GPU) and waits; if one fails the others are
stopped and the exit status is non-zero.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from ..config import load_config, to_yaml
from ..errors import KScaleError
from .ranks import signal_ranks, start_ranks

PREEMPTED_EXIT = 3     # a rank's exit status after a checkpoint-and-stop on the preemption signal


def prepare_run(config_path, overrides, nproc: int | None = None):
    """The validated config, checked against this machine (a local run) and the engine's library, then
    written to the run directory: nothing is written when a check fails."""
    cfg = load_config(config_path, list(overrides) + ([f"parallel.nproc={nproc}"] if nproc else []))
    if cfg.launcher.cluster == "local" and "RANK" not in os.environ:
        from ..distributed import resolve_device
        resolve_device(cfg.run.device, local_ranks=cfg.parallel.nproc)   # a Slurm job checks on its nodes
    check_engine(cfg)
    check_embedding_impl(cfg)
    return cfg, write_resolved(cfg)


def check_engine(cfg) -> None:
    """What only the engine's library can check (the DeepSpeed JSON with its passthrough), before any
    process starts, any job is submitted or anything is written."""
    if cfg.run.engine == "deepspeed":
        from ..train.deepspeed_adapter import deepspeed_config
        deepspeed_config(cfg, dp_size=cfg.parallel.nproc)          # TP = PP = 1: every rank is data parallel


def check_embedding_impl(cfg) -> None:
    """model.embedding_impl=triton that cannot import stops here, before any rank starts (whether a CUDA
    device is there is the device check's question, asked on the node that runs the job)."""
    if cfg.model.input_layer != "kronecker" or cfg.model.embedding_impl != "triton":
        return
    from ..embedding.kronecker_embedding import triton_problem
    problem = triton_problem(on_cuda=True)
    if problem:
        raise KScaleError(f"embedding impl 'triton' cannot run: {problem}", where="model.embedding_impl=triton",
                          fix="install the CUDA build (docs/setup.md), or set model.embedding_impl=auto")


def write_resolved(cfg) -> Path:
    """The resolved config in the run directory (what every rank, and a requeued job, reads)."""
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "config.yaml"
    # srun starts every rank with the same path, possibly on a shared filesystem: a name per job, host, rank
    unique = f"{os.environ.get('SLURM_JOB_ID', 'local')}.{socket.gethostname()}.{os.environ.get('RANK', 0)}"
    tmp = resolved.with_suffix(f".yaml.{unique}.{os.getpid()}.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, resolved)
    return resolved


def run_rank(resolved_config: str | Path, overrides=()) -> int:
    """One rank: called in each process. Returns 0, 2 (bad input) or PREEMPTED_EXIT (checkpoint saved on
    the preemption signal; run again to resume)."""
    from .. import quiet
    quiet.install(os.environ.get("KSCALE_VERBOSE") == "1")     # before megatron and DeepSpeed are imported
    import torch

    from ..config import TrainConfig, validate
    from ..distributed import destroy_distributed, init_distributed
    from ..train import hooks, preemption
    from ..train.loop import TrainingRun
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(resolved_config),
                          OmegaConf.from_dotlist(list(overrides)))
    validate(cfg)
    preemption.install_handler()
    try:
        device = init_distributed(_requested_device(cfg))
    except KScaleError as e:                   # e.g. run.device=cuda on a node without a usable GPU
        print(f"error (rank {os.environ.get('RANK', 0)}, {socket.gethostname()}): {e}", file=sys.stderr, flush=True)
        return 2
    rank = torch.distributed.get_rank()
    if rank == 0:
        if line := quiet.summary():
            print(line, file=sys.stderr, flush=True)
        print(f"device: {device} ({'NCCL' if device == 'cuda' else 'gloo'}), world size "
              f"{torch.distributed.get_world_size()}", flush=True)
    try:
        TrainingRun(cfg, hooks.from_environment()).run()
    except KScaleError as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2
    except preemption.Preempted as e:
        if rank == 0:
            print(f"{e}; the run resumes from it when started again", flush=True)
        return PREEMPTED_EXIT
    finally:
        destroy_distributed()
    return 0


def _requested_device(cfg) -> str:
    """run.device, where a Slurm job given GPUs (launcher.gpus_per_node > 0) means CUDA: checked on the
    compute node as the job starts (a login node often has no GPU, so submitting never needs one)."""
    la = cfg.launcher
    if cfg.run.device == "auto" and la.cluster == "slurm" and la.gpus_per_node > 0:
        return "cuda"
    return cfg.run.device


def train(config_path, overrides=(), nproc: int | None = None) -> int:
    cfg, resolved = prepare_run(config_path, overrides, nproc)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:       # started by torchrun / srun
        return run_rank(resolved)
    procs = start_ranks("kronecker_scale.launch.local", [str(resolved)], cfg.parallel.nproc)
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                signal_ranks(procs)
                deadline = time.time() + 10
                while any(p.poll() is None for p in procs) and time.time() < deadline:
                    time.sleep(0.1)
                signal_ranks(procs, signal.SIGKILL)
                return failed[0]
            if all(c == 0 for c in codes):
                signal_ranks(procs, signal.SIGKILL)            # leftovers of finished ranks, if any
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        signal_ranks(procs)
        raise


if __name__ == "__main__":
    sys.exit(run_rank(sys.argv[1]))
