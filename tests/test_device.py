"""Devices are explicit (docs/design.md §5): CUDA that was asked for and is not usable stops the run before
any rank starts; ranks map onto the GPUs they see; tools run where they are told; run.deterministic is
real. This machine has no GPU: where a test needs "a GPU is visible", it patches torch.cuda's answers
(the mock stands for hardware that cannot run here) and says so."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kronecker_scale import distributed
from kronecker_scale.config import TrainConfig, validate
from kronecker_scale.errors import KScaleError

REPO = Path(__file__).resolve().parents[1]


def fake_gpus(monkeypatch, count: int, cuda: str = "13.0") -> None:
    """Mock: a CUDA build of torch that sees `count` GPUs (no GPU on this machine)."""
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_cuda_requested_without_cuda_exits_2_before_anything_is_written(tmp_path):
    from tiny_runs import kscale

    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    r = kscale("train", REPO / "configs" / "tiny-cpu.yaml", "run.device=cuda", f"run.dir={run_dir}")
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert "CUDA" in r.stderr and "run.device=cuda" in r.stderr
    assert "CPU build" in r.stderr  # this machine's torch is the CPU wheel: say so
    assert not run_dir.exists()  # no config.yaml, no checkpoints, nothing
    assert "rank" not in r.stderr and "device:" not in r.stdout  # no rank started
    assert elapsed < 60


def test_auto_and_cpu_resolve_to_cpu_here():
    if torch.cuda.is_available():
        pytest.skip("a GPU is usable here: auto means cuda")
    assert distributed.resolve_device("auto") == "cpu"
    assert distributed.resolve_device("cpu") == "cpu"
    with pytest.raises(KScaleError, match="unknown device"):
        distributed.resolve_device("tpu")


def test_cuda_problem_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU build" in distributed.cuda_problem()
    fake_gpus(monkeypatch, 0)
    assert "no usable CUDA device" in distributed.cuda_problem() and "nvidia-smi" in distributed.cuda_problem()
    fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES is empty" in distributed.cuda_problem()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert distributed.cuda_problem() is None


def test_more_local_ranks_than_gpus_is_refused_up_front(monkeypatch):
    fake_gpus(monkeypatch, 1)
    assert distributed.resolve_device("cuda", local_ranks=1) == "cuda"
    assert distributed.resolve_device("auto", local_ranks=1) == "cuda"
    with pytest.raises(KScaleError, match="two ranks on one GPU"):
        distributed.resolve_device("cuda", local_ranks=2)


def test_rank_takes_local_rank_modulo_the_visible_gpus(monkeypatch):
    """Where each Slurm task sees one GPU (--gpus-per-task=1), LOCAL_RANK 3 must use device 0, not 3."""
    fake_gpus(monkeypatch, 1)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(distributed, "_check_one_rank_per_gpu", lambda: None)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # init_distributed fills these in: keep them out of
    monkeypatch.setenv("MASTER_PORT", "29999")  # this process's environment (later tests start jobs)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.init_distributed("cuda") == "cuda"
    assert chosen == [0]


def test_slurm_job_with_gpus_requires_cuda_on_its_node():
    from kronecker_scale.launch.local import _requested_device

    cfg = OmegaConf.structured(TrainConfig)
    assert _requested_device(cfg) == "auto"
    cfg.launcher.cluster, cfg.launcher.gpus_per_node = "slurm", 8
    assert _requested_device(cfg) == "cuda"
    cfg.run.device = "cpu"
    assert _requested_device(cfg) == "cpu"


def test_sbatch_template_passes_cpus_and_threads_to_srun():
    text = (REPO / "slurm" / "train.sbatch").read_text()
    assert 'srun --cpus-per-task="${SLURM_CPUS_PER_TASK' in text
    assert "export OMP_NUM_THREADS=" in text


def test_resolved_config_temp_name_is_unique_per_job_host_and_rank(tmp_path, monkeypatch):
    """Every srun task writes the same config.yaml on a shared filesystem: a PID alone can collide."""
    from kronecker_scale.launch import local

    names = []
    real_replace = os.replace
    monkeypatch.setattr(local.os, "replace", lambda a, b: (names.append(Path(a).name), real_replace(a, b)))
    cfg = OmegaConf.structured(TrainConfig)
    cfg.run.dir = str(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("RANK", "7")
    local.write_resolved(cfg)
    assert "4242" in names[0] and ".7." in names[0] and os.uname().nodename in names[0]
    assert (tmp_path / "config.yaml").is_file() and not list(tmp_path.glob("*.tmp"))


def test_deterministic_run_turns_on_torch_deterministic_algorithms():
    from kronecker_scale.train.loop import set_determinism

    cfg = OmegaConf.structured(TrainConfig)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert "off" in set_determinism(cfg) and not torch.are_deterministic_algorithms_enabled()
        cfg.run.deterministic = True
        line = set_determinism(cfg)
        assert torch.are_deterministic_algorithms_enabled()  # the embedding's backward follows this flag
        assert "deterministic embedding backward" in line
    finally:
        torch.use_deterministic_algorithms(before)


def test_deterministic_run_refuses_a_forced_atomic_embedding_backward():
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"data": {"train": [{"path": "x"}]}})
    cfg.run.deterministic = True
    cfg.model.deterministic_embedding = False
    with pytest.raises(KScaleError, match="model.deterministic_embedding"):
        validate(cfg)


@pytest.mark.slow
def test_tools_run_on_the_cpu_when_a_gpu_is_visible(tmp_path_factory, monkeypatch):
    """`convert` and `probe` default to --device cpu: the model and its inputs stay on the CPU even where
    torch reports a GPU (mocked here: torch.cuda answers as on a GPU node; any real CUDA call would fail)."""
    import tiny_runs
    from kronecker_scale.inference import load_checkpoint

    run = tiny_runs.gpt2_run(tiny_runs.shared_base(tmp_path_factory))
    reference, _ = load_checkpoint(run).forward(torch.arange(10))
    fake_gpus(monkeypatch, 1)
    ck = load_checkpoint(run, device="cpu")
    assert ck.device == "cpu" and all(p.device.type == "cpu" for p in ck.model.parameters())
    logits, hidden = ck.forward(torch.arange(10))
    assert torch.equal(logits, reference)
    with pytest.raises(KScaleError, match="unknown device"):
        load_checkpoint(run, device="tpu")


def test_overrides_may_follow_options(tmp_path):
    """`kscale train CONFIG --nproc 1 key=value`: the override after an option is applied (here it asks for
    CUDA, which stops the run), and an unknown option is still refused."""
    from tiny_runs import kscale

    r = kscale(
        "train", REPO / "configs" / "tiny-cpu.yaml", "--nproc", "1", "run.device=cuda", f"run.dir={tmp_path / 'run'}"
    )
    assert r.returncode == 2 and "run.device=cuda" in r.stderr
    r = kscale("train", REPO / "configs" / "tiny-cpu.yaml", "--nproc", "1", "--bogus")
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
