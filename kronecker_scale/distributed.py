"""Process groups and devices: what every rank of a training job, an offline converter or a single-process
tool sets up before it builds a model. Used by train/, convert/, inference/ and launch/.
"""

from __future__ import annotations

import os
import socket

import torch

from .errors import KScaleError

DEVICES = ("auto", "cuda", "cpu")


def device() -> str:
    """The device this process computes on: CUDA when a CUDA device is usable, else the CPU (a run with
    run.device=cpu hides the GPUs from its ranks before torch looks at them: `hide_gpus`)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_problem() -> str | None:
    """Why this process cannot compute on CUDA, in words a user can act on; None when it can."""
    if torch.version.cuda is None:
        return (
            f"this torch ({torch.__version__}) is a CPU build without CUDA; install the CUDA build "
            f"(KSCALE_TARGET=cuda bash scripts/setup.sh, docs/setup.md)"
        )
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "CUDA_VISIBLE_DEVICES is empty: no GPU is visible to this process"
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable CUDA device: check "
            f"`nvidia-smi` (the NVIDIA driver must support CUDA {torch.version.cuda}, docs/setup.md) and "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}"
        )
    return None


def resolve_device(requested: str, *, local_ranks: int = 1, where: str = "run.device") -> str:
    """ "cuda" or "cpu" for run.device (auto | cuda | cpu): auto is CUDA when a device is usable. CUDA that
    was asked for and cannot be used, or fewer GPUs than local NCCL ranks, is an error, never a fallback."""
    if requested not in DEVICES:
        raise KScaleError(f"unknown device {requested!r}", where=where, fix=f"use one of {', '.join(DEVICES)}")
    if requested == "cpu" or (requested == "auto" and cuda_problem() is not None):
        return "cpu"
    problem = cuda_problem()
    if problem is not None:
        raise KScaleError(
            f"CUDA was asked for and is not usable: {problem}",
            where=f"{where}={requested}",
            fix="fix the CUDA set-up, or set run.device=cpu to train on the CPU",
        )
    count = torch.cuda.device_count()
    if local_ranks > count:
        raise KScaleError(
            f"{local_ranks} ranks on this node but {count} visible GPU(s): NCCL cannot run two ranks on one GPU",
            where=where,
            fix="start one rank per GPU (parallel.nproc / launcher.tasks_per_node = the GPU count)",
        )
    return "cuda"


def hide_gpus() -> None:
    """Make torch in this process (and the processes it starts) see no GPU: run.device=cpu on a GPU node.
    Call before anything asks torch.cuda."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(requested: str = "auto") -> str:
    """This rank's process group, from RANK / WORLD_SIZE / LOCAL_RANK (torchrun, srun or `kscale train`):
    NCCL on CUDA, else gloo with megatron's CPU compatibility layer. Returns the device ("cuda" or "cpu");
    `requested` is run.device (checked here again: a Slurm job checks on its compute node)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if requested == "cpu":
        hide_gpus()
    dev = resolve_device(requested)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if dev == "cuda":
        # one GPU per task (Slurm's --gpus-per-task) or all of the node's: LOCAL_RANK modulo the visible ones
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    torch.distributed.init_process_group("nccl" if dev == "cuda" else "gloo", rank=rank, world_size=world)
    if dev == "cuda":
        _check_one_rank_per_gpu()
    if dev == "cpu":
        from .model import megatron_cpu

        megatron_cpu.enable()
    return dev


def _check_one_rank_per_gpu() -> None:
    """NCCL fails late and obscurely with two ranks on one GPU: compare every rank's (host, GPU UUID) over
    a gloo group first and name the ranks that share one."""
    gloo = torch.distributed.new_group(backend="gloo")
    mine = (socket.gethostname(), str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid))
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine, group=gloo)
    seen: dict = {}
    for rank, key in enumerate(everyone):
        if key in seen:
            raise KScaleError(
                f"ranks {seen[key]} and {rank} share GPU {key[1]} on {key[0]}: NCCL needs one GPU per rank",
                where=f"LOCAL_RANK={os.environ.get('LOCAL_RANK')}",
                fix="start one task per GPU (Slurm: --ntasks-per-node = --gpus-per-node)",
            )
        seen[key] = rank
    torch.distributed.destroy_process_group(gloo)


def destroy_distributed() -> None:
    """Undo `init_distributed` and megatron's parallel state (a rank's last step, also after an error)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def init_single_process() -> None:
    """A world of one (gloo) with megatron's TP = PP = 1 state, for tools that load a checkpoint in the
    calling process; idempotent."""
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if torch.distributed.get_world_size() != 1:
        raise KScaleError(
            "single-process loading was called inside a multi-process job",
            fix="load checkpoints for export or probes in a plain Python process",
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
