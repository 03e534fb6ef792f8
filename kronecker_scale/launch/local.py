"""`kscale train`: validate the config, write it to the run directory, then run the ranks.

Under torchrun or srun (RANK/WORLD_SIZE already set) this process is one rank. Otherwise it starts
`parallel.nproc` local processes (gloo on CPU, NCCL on GPU) and waits; if one fails the others are
stopped and the exit status is non-zero.
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

from ..config import load_config, to_yaml
from ..errors import KScaleError

PREEMPTED_EXIT = 3     # a rank's exit status after a checkpoint-and-stop on the preemption signal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_run(config_path, overrides, nproc: int | None = None):
    cfg = load_config(config_path, list(overrides) + ([f"parallel.nproc={nproc}"] if nproc else []))
    check_engine(cfg)
    return cfg, write_resolved(cfg)


def check_engine(cfg) -> None:
    """What only the engine's library can check (the DeepSpeed JSON with its passthrough), before any
    process starts, any job is submitted or anything is written."""
    if cfg.run.engine == "deepspeed":
        from ..train.deepspeed_adapter import deepspeed_config
        deepspeed_config(cfg, dp_size=cfg.parallel.nproc)          # TP = PP = 1: every rank is data parallel


def write_resolved(cfg) -> Path:
    """The resolved config in the run directory (what every rank, and a requeued job, reads)."""
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "config.yaml"
    tmp = resolved.with_suffix(f".yaml.{os.getpid()}.tmp")          # srun starts every rank with the same path
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, resolved)
    return resolved


def run_rank(resolved_config: str | Path, overrides=()) -> int:
    """One rank: called in each process. Returns 0, 2 (bad input) or PREEMPTED_EXIT (checkpoint saved on
    the preemption signal; run again to resume)."""
    import torch

    from ..config import TrainConfig, validate
    from ..train import preemption
    from ..train.trainer import Trainer, init_distributed
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(resolved_config),
                          OmegaConf.from_dotlist(list(overrides)))
    validate(cfg)
    preemption.install_handler()
    init_distributed()
    rank = torch.distributed.get_rank()
    try:
        engine = Trainer
        if cfg.run.engine == "deepspeed":                   # DeepSpeed is imported only when used
            from ..train.deepspeed_engine import DeepSpeedTrainer as engine
        engine(cfg).train(console=print if rank == 0 or _is_logger() else (lambda *a, **k: None))
    except KScaleError as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2
    except preemption.Preempted as e:
        if rank == 0:
            print(f"{e}; the run resumes from it when started again", flush=True)
        return PREEMPTED_EXIT
    finally:
        from megatron.core import parallel_state
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    return 0


def _is_logger() -> bool:
    from megatron.core import parallel_state as ps
    return ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0 \
        and ps.get_data_parallel_rank() == 0


def train(config_path, overrides=(), nproc: int | None = None) -> int:
    cfg, resolved = prepare_run(config_path, overrides, nproc)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:       # started by torchrun / srun
        return run_rank(resolved)
    n = cfg.parallel.nproc
    # share the cores: more OpenMP threads than cores across ranks stalls everything on small machines
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(n),
           "LOCAL_WORLD_SIZE": str(n), "OMP_NUM_THREADS": threads}
    # each rank leads its own process group, so stopping a rank also stops what it spawned (megatron's
    # checkpoint writer starts a multiprocessing Manager that would otherwise outlive a killed rank)
    procs = [subprocess.Popen([sys.executable, "-m", "kronecker_scale.launch.local", str(resolved)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, start_new_session=True)
             for r in range(n)]

    def stop_all(sig=signal.SIGTERM):
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass

    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                stop_all()
                deadline = time.time() + 10
                while any(p.poll() is None for p in procs) and time.time() < deadline:
                    time.sleep(0.1)
                stop_all(signal.SIGKILL)
                return failed[0]
            if all(c == 0 for c in codes):
                stop_all(signal.SIGKILL)            # leftovers of finished ranks, if any
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop_all()
        raise


if __name__ == "__main__":
    sys.exit(run_rank(sys.argv[1]))
