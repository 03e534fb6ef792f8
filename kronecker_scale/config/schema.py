"""The typed config schema (omegaconf structured dataclasses). One YAML file, composed from bases,
overridden from the command line, validated before any process starts, saved with every run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..model.config import GPTConfig


@dataclass
class TokenizerConfig:
    path: str = "gpt2"  # a tokenizer file/folder or a built-in name (kscale tokenizers)
    byte_source: str = "exact"  # exact | decode (reference-package parity)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    sequence: bool = False
    nproc: int = 1  # local processes started by `kscale train` (world size)
    distributed_optimizer: bool = False


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 6e-5
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_projection: bool = True  # weight decay on the Kronecker projection (nanoGPT decays all 2-D)
    clip_grad: float = 1.0


@dataclass
class ScheduleConfig:
    train_steps: int = 100
    warmup_steps: int = 10
    decay: str = "cosine"  # cosine | linear | constant
    decay_steps: int | None = None  # default: train_steps


@dataclass
class DataSourceConfig:
    path: str = "???"
    proportion: float | None = None


@dataclass
class DataConfig:
    train: list[DataSourceConfig] = field(default_factory=list)
    val: str | None = None  # a prepared dataset with a val split (default: the first train one)
    micro_batch_size: int = 4
    global_batch_size: int = 8
    num_workers: int = 0
    seed: int = 1234
    cache_dir: str | None = None  # node cache root (default: ${TMPDIR:-/tmp}/kscale-data-cache-<uid>)
    cache_limit: str | None = "50%"  # bound on the cache root: "N%" of its filesystem, "200gb", null = none


@dataclass
class CheckpointConfig:
    every: int = 50  # steps; 0 = only at the end
    keep_last: int = 3
    resume: str = "auto"  # auto (latest if any) | none | PATH of a checkpoint
    save_at_end: bool = True


@dataclass
class EvalConfig:
    every: int = 50
    batches: int = 4


@dataclass
class WandbConfig:
    """Weights & Biases (train/metrics.py, docs/export.md): the logging rank sends every metrics.jsonl record
    and the resolved config; a resumed run continues the same W&B run (its id is in the run state)."""

    mode: str = "disabled"  # disabled (wandb not imported) | offline (files, `wandb sync`) | online
    project: str | None = None  # None = "kronecker-scale"
    entity: str | None = None  # None = your W&B default entity
    name: str | None = None  # None = run.name
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    every: int = 1
    tensorboard: bool = True
    peak_tflops: float | None = None  # per device, for MFU; None = not reported
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    dir: str = "runs/${run.name}"
    name: str = "run"
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16 | fp16
    engine: str = "megatron"  # megatron | deepspeed
    on_nan: str = "stop"  # stop | skip (skipped steps are counted and logged)
    max_skipped_steps: int = 10
    deterministic: bool = False  # torch's deterministic algorithms + the deterministic embedding backward
    device: str = "auto"  # auto (CUDA when usable) | cuda (stop if unusable) | cpu
    restart: bool = False  # with checkpoint.resume=none: move an existing run aside, start over


@dataclass
class DeepSpeedConfig:
    """The deepspeed engine (run.engine=deepspeed): data parallel only (parallel.tensor = pipeline = 1).
    Its JSON is generated from this config; `passthrough` adds any other DeepSpeed key (a key that
    contradicts a generated one is an error, not overridden)."""

    zero_stage: int = 1  # 1 | 2 | 3
    offload_optimizer: bool = False  # optimizer states (and the step) on the CPU (DeepSpeedCPUAdam)
    offload_params: bool = False  # parameters on the CPU (ZeRO-3 only)
    passthrough: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed JSON


@dataclass
class LauncherConfig:
    cluster: str = "local"  # local | slurm | debug
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1  # one per GPU: each task is one rank
    cpus_per_task: int = 2
    mem_gb: int = 8  # per task
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 60
    signal_delay_s: int = 120  # preemption signal this long before the time limit (checkpoint time)
    constraint: str | None = None
    exclusive: bool = False
    sbatch_extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
