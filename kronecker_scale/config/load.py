"""Loading configs: YAML files compose through a `defaults: [base.yaml, ...]` list (paths relative to the
file), the command line overrides any key (`optim.lr=3e-4`), and the result is checked against the
schema (unknown keys and wrong types fail, naming the key) and for impossible layouts (world size not
divisible by TP x PP, heads not divisible by TP, ...), all before any process starts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import KScaleError
from .schema import TrainConfig


def _read_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    if not path.is_file():
        raise KScaleError("config file not found", where=str(path), fix="check the path (configs/ has examples)")
    if path.resolve() in seen:
        raise KScaleError("config defaults form a cycle", where=" -> ".join(map(str, (*seen, path))))
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise KScaleError(f"malformed YAML ({e})", where=str(path)) from None
    if not isinstance(cfg, DictConfig):
        raise KScaleError("a config file must hold a mapping", where=str(path))
    bases = cfg.pop("defaults", []) or []
    merged = OmegaConf.create()
    for base in bases:
        merged = OmegaConf.merge(merged, _read_yaml((path.parent / str(base)), (*seen, path.resolve())))
    return OmegaConf.merge(merged, cfg)


def _explain(e: OmegaConfBaseException, where: str) -> KScaleError:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    return KScaleError(
        f"invalid config: {msg}",
        where=f"{where}: key {key}" if key else where,
        fix="see kronecker_scale/config/schema.py for the keys and their types",
    )


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    """The validated, resolved config (an omegaconf DictConfig typed by TrainConfig)."""
    schema = OmegaConf.structured(TrainConfig)
    where = str(path) if path else "<defaults>"
    try:
        cfg = OmegaConf.merge(schema, _read_yaml(Path(path)) if path else OmegaConf.create())
    except OmegaConfBaseException as e:
        raise _explain(e, where) from None
    for item in overrides:
        if "=" not in item:
            raise KScaleError(
                f"override {item!r} is not key=value", where="command line", fix="write e.g. optim.lr=3e-4"
            )
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, "command line" if overrides else where) from None
    if cfg.launcher.cluster == "slurm":  # the world size is what Slurm starts: one rank per task
        cfg.parallel.nproc = cfg.launcher.nodes * cfg.launcher.tasks_per_node
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks across keys that the schema's types cannot express."""

    def bad(key, value, fix):
        raise KScaleError(f"{key}={value!r} is not possible", where=f"config key {key}", fix=fix)

    from ..model.config import GPTConfig

    GPTConfig(**OmegaConf.to_container(cfg.model)).validate()
    _validate_launcher(cfg, bad)  # first: it decides the world size the rest is checked against
    p = cfg.parallel
    for key in ("tensor", "pipeline", "nproc"):
        if p[key] < 1:
            bad(f"parallel.{key}", p[key], "use a positive integer")
    if p.nproc % (p.tensor * p.pipeline):
        bad("parallel.nproc", p.nproc, f"the world size must be divisible by TP x PP = {p.tensor * p.pipeline}")
    if cfg.model.n_heads % p.tensor:
        bad("parallel.tensor", p.tensor, f"model.n_heads={cfg.model.n_heads} must be divisible by it")
    if cfg.model.n_layers % p.pipeline:
        bad("parallel.pipeline", p.pipeline, f"model.n_layers={cfg.model.n_layers} must be divisible by it")
    if p.sequence and p.tensor == 1:
        bad("parallel.sequence", True, "sequence parallelism needs parallel.tensor > 1")
    d = cfg.data
    for key, value, least in (
        ("data.micro_batch_size", d.micro_batch_size, 1),
        ("data.global_batch_size", d.global_batch_size, 1),
        ("schedule.train_steps", cfg.schedule.train_steps, 1),
        ("schedule.warmup_steps", cfg.schedule.warmup_steps, 0),
        ("checkpoint.every", cfg.checkpoint.every, 0),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last, 0),
        ("eval.every", cfg.eval.every, 0),
        ("eval.batches", cfg.eval.batches, 1),
        ("logging.every", cfg.logging.every, 1),
    ):
        if value < least:
            bad(key, value, f"use an integer >= {least}")
    dp = p.nproc // (p.tensor * p.pipeline)
    if d.global_batch_size % (d.micro_batch_size * dp):
        bad(
            "data.global_batch_size",
            d.global_batch_size,
            f"must be a multiple of micro_batch_size x data-parallel size = {d.micro_batch_size * dp}",
        )
    if p.sequence and cfg.model.seq_len % p.tensor:
        bad("model.seq_len", cfg.model.seq_len, "must be divisible by parallel.tensor under sequence parallelism")
    if cfg.run.precision not in ("fp32", "bf16", "fp16"):
        bad("run.precision", cfg.run.precision, "use fp32, bf16 or fp16")
    if cfg.run.engine not in ("megatron", "deepspeed"):
        bad("run.engine", cfg.run.engine, "use megatron or deepspeed")
    if cfg.run.deterministic and cfg.model.deterministic_embedding is False:
        bad(
            "model.deterministic_embedding",
            False,
            "run.deterministic=true needs the deterministic embedding backward: leave it unset (null) or true",
        )
    if cfg.run.device not in ("auto", "cuda", "cpu"):
        bad("run.device", cfg.run.device, "use auto, cuda or cpu")
    if cfg.model.attention_backend == "te":
        import importlib.util

        if cfg.run.device == "cpu":
            bad("model.attention_backend", "te", "Transformer Engine runs on CUDA only: use sdpa or auto on the CPU")
        if importlib.util.find_spec("transformer_engine") is None:
            bad(
                "model.attention_backend",
                "te",
                "transformer_engine is not installed: install it on the CUDA node, "
                "or use sdpa (torch's fused attention) or auto",
            )
    if cfg.run.on_nan not in ("stop", "skip"):
        bad("run.on_nan", cfg.run.on_nan, "use stop or skip")
    if cfg.schedule.decay not in ("cosine", "linear", "constant"):
        bad("schedule.decay", cfg.schedule.decay, "use cosine, linear or constant")
    if cfg.schedule.warmup_steps > cfg.schedule.train_steps:
        bad("schedule.warmup_steps", cfg.schedule.warmup_steps, "must not exceed schedule.train_steps")
    if not d.train:
        bad("data.train", [], "give at least one prepared dataset: data.train=[{path: DIR}]")
    import re

    if d.cache_limit is not None and not re.fullmatch(
        r"\s*(\d+(\.\d*)?\s*(b|kb|mb|gb|tb|pb)?|\d+(\.\d*)?\s*%|none)\s*", str(d.cache_limit), re.IGNORECASE
    ):
        bad(
            "data.cache_limit",
            d.cache_limit,
            'use a percentage of the cache filesystem ("50%"), a size ("200gb") or null',
        )
    if cfg.tokenizer.byte_source not in ("exact", "decode"):
        bad("tokenizer.byte_source", cfg.tokenizer.byte_source, "use exact or decode")
    if cfg.run.engine == "deepspeed":
        _validate_deepspeed(cfg, bad)
    _validate_launcher(cfg, bad)


def _validate_launcher(cfg: DictConfig, bad) -> None:
    la = cfg.launcher
    if la.cluster not in ("local", "slurm", "debug"):
        bad("launcher.cluster", la.cluster, "use slurm, local or debug")
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "mem_gb", "time_min"):
        if la[key] < 1:
            bad(f"launcher.{key}", la[key], "use a positive integer")
    if la.gpus_per_node and la.tasks_per_node != la.gpus_per_node:
        bad(
            "launcher.tasks_per_node",
            la.tasks_per_node,
            f"one task per GPU: set it to launcher.gpus_per_node={la.gpus_per_node}",
        )
    if la.cluster == "slurm" and cfg.parallel.nproc != la.nodes * la.tasks_per_node:
        bad(
            "parallel.nproc",
            cfg.parallel.nproc,
            f"under Slurm the world size is launcher.nodes x launcher.tasks_per_node = {la.nodes * la.tasks_per_node}",
        )


def _validate_deepspeed(cfg: DictConfig, bad) -> None:
    """The deepspeed engine is data parallel only (ZeRO shards over data-parallel ranks). Its passthrough
    block is checked against DeepSpeed itself when the engine starts (train/deepspeed_adapter.py)."""
    p, ds = cfg.parallel, cfg.deepspeed
    for key in ("tensor", "pipeline"):
        if p[key] != 1:
            bad(
                f"parallel.{key}",
                p[key],
                "the deepspeed engine is data parallel only: set it to 1, or use "
                "run.engine=megatron for tensor/pipeline parallelism",
            )
    if ds.zero_stage not in (1, 2, 3):
        bad("deepspeed.zero_stage", ds.zero_stage, "use 1, 2 or 3")
    if ds.offload_params and ds.zero_stage != 3:
        bad("deepspeed.offload_params", True, "parameter offload needs deepspeed.zero_stage=3")
    if p.distributed_optimizer:
        bad(
            "parallel.distributed_optimizer",
            True,
            "megatron's distributed optimizer is not used by the deepspeed "
            "engine (ZeRO shards the optimizer): set it to false",
        )


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested settings as dotted keys (config diffs, DeepSpeed JSON)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
