"""The one adapter between kronecker-scale and DeepSpeed (tested with 0.19.8; 0.19.x is required).

Everything the deepspeed engine and the engine converter ask of DeepSpeed goes through here: the
DeepSpeed JSON generated from our config, the expert passthrough merged into it (a contradiction is an
error; a key DeepSpeed does not know is an error, found up front because DeepSpeed ignores unknown
top-level keys silently), `deepspeed.initialize`, checkpoint save/load, and full (ZeRO-3: gathered)
parameters and Adam states by parameter name.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..config.load import flatten
from ..errors import KScaleError

TESTED_VERSION = "0.19.8"

# generated key (dotted path) -> the config key it comes from
_SOURCES = {
    "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "data.global_batch_size / (data.micro_batch_size x data-parallel size)",
    "train_batch_size": "data.global_batch_size",
    "gradient_clipping": "optim.clip_grad",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param.device": "deepspeed.offload_params",
    "bf16.enabled": "run.precision",
    "fp16.enabled": "run.precision",
    "zero_allow_untested_optimizer": "(the engine's torch AdamW)",
    "zero_force_ds_cpu_optimizer": "(the engine's torch AdamW)",
}
# top-level keys the engine owns outright: its optimizer and learning-rate schedule come from our config
_OWNED = {
    "optimizer": "optim.* (the engine passes its own AdamW)",
    "scheduler": "schedule.* (the engine sets the learning rate every step)",
}


def _deepspeed():
    import deepspeed

    if not deepspeed.__version__.startswith(TESTED_VERSION.rsplit(".", 1)[0] + "."):
        raise KScaleError(
            f"deepspeed {deepspeed.__version__} is installed; the deepspeed engine is built for "
            f"0.19.x (tested with {TESTED_VERSION})",
            where="python environment",
            fix=f"pip install deepspeed=={TESTED_VERSION} -c requirements/constraints-cpu.txt",
        )
    return deepspeed


# --- the DeepSpeed JSON ----------------------------------------------------------------------------
def generated_config(cfg: DictConfig, dp_size: int) -> dict:
    """The DeepSpeed JSON that our config implies (no passthrough)."""
    d, ds = cfg.data, cfg.deepspeed
    zero: dict = {"stage": int(ds.zero_stage)}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    out = {
        "train_micro_batch_size_per_gpu": int(d.micro_batch_size),
        "gradient_accumulation_steps": int(d.global_batch_size) // (int(d.micro_batch_size) * dp_size),
        "train_batch_size": int(d.global_batch_size),
        "gradient_clipping": float(cfg.optim.clip_grad),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.run.precision == "bf16"},
        "fp16": {"enabled": cfg.run.precision == "fp16"},
        # the client optimizer is torch's AdamW, the one megatron's CPU path uses, so both engines step alike
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our MetricsWriter logs; DeepSpeed's own prints stay off
    }
    if ds.offload_optimizer:
        out["zero_force_ds_cpu_optimizer"] = False
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge_passthrough(generated: dict, passthrough: dict) -> dict:
    """The generated JSON plus the passthrough; a passthrough value that contradicts a generated one is a
    KScaleError naming both keys (never silently overridden)."""
    flat = flatten(generated)
    for key, value in flatten(passthrough).items():
        top = key.split(".")[0]
        if top in _OWNED:
            raise KScaleError(
                f"deepspeed.passthrough.{top} is set by the engine itself",
                where=f"config key deepspeed.passthrough.{top}",
                fix=f"remove it; set {_OWNED[top]} instead",
            )
        if key in flat and flat[key] != value:
            raise KScaleError(
                f"deepspeed.passthrough.{key}={value!r} contradicts {flat[key]!r}, which comes from "
                f"{_SOURCES.get(key, 'the config')}",
                where=f"config key deepspeed.passthrough.{key}",
                fix=f"remove it from the passthrough and set {_SOURCES.get(key, 'that key')} instead",
            )
        clash = next((p for p in flat if p.startswith(key + ".") or key.startswith(p + ".")), None)
        if clash:
            raise KScaleError(
                f"deepspeed.passthrough.{key} replaces the generated {clash}",
                where=f"config key deepspeed.passthrough.{key}",
                fix=f"set {_SOURCES.get(clash, 'the config key')} instead",
            )
    return _merge(generated, passthrough)


class _ReadKeys(dict):
    """A dict that records which keys DeepSpeed's config parser looks at (it ignores the others)."""

    def __init__(self, *args, seen: set | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = set() if seen is None else seen

    def __getitem__(self, k):
        self.seen.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.seen.add(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.seen.add(k)
        return super().__contains__(k)

    def keys(self):
        outer = self

        class _Keys:
            def __contains__(self, k):
                return k in outer

            def __iter__(self):
                return iter(dict.keys(outer))

        return _Keys()

    def __copy__(self):
        return _ReadKeys(self, seen=self.seen)


def check_with_deepspeed(config: dict, passthrough: dict) -> None:
    """Let DeepSpeed's own parser check the merged JSON; unknown top-level passthrough keys (which
    DeepSpeed would ignore) and invalid values become KScaleErrors."""
    _deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    # DeepSpeed checks train_batch_size against the world size it sees; ours is checked by validate()
    probe = _ReadKeys({k: v for k, v in config.items() if k != "train_batch_size"})
    try:
        DeepSpeedConfig(probe, mpu=None)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise KScaleError(
            f"DeepSpeed rejects the config ({e.title}): {problems}",
            where="config key deepspeed.passthrough",
            fix="see https://www.deepspeed.ai/docs/config-json/ for the keys and their types",
        ) from None
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise KScaleError(
            f"DeepSpeed rejects the config: {e}",
            where="config key deepspeed.passthrough",
            fix="see https://www.deepspeed.ai/docs/config-json/",
        ) from None
    unknown = [k for k in passthrough if k not in probe.seen]
    if unknown:
        hints = {k: difflib.get_close_matches(k, sorted(probe.seen), n=1) for k in unknown}
        raise KScaleError(
            f"DeepSpeed {TESTED_VERSION} has no config key {', '.join(map(repr, unknown))}",
            where=", ".join(f"config key deepspeed.passthrough.{k}" for k in unknown),
            fix="; ".join(f"did you mean {h[0]!r}?" if h else f"remove {k!r}" for k, h in hints.items()),
        )


def deepspeed_config(cfg: DictConfig, dp_size: int) -> dict:
    """Generated JSON + passthrough, checked: what `initialize` gets."""
    passthrough = OmegaConf.to_container(cfg.deepspeed.passthrough, resolve=True) or {}
    merged = merge_passthrough(generated_config(cfg, dp_size), passthrough)
    check_with_deepspeed(merged, passthrough)
    return merged


# --- the engine ------------------------------------------------------------------------------------
def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """deepspeed.initialize over an existing torch.distributed process group (gloo or NCCL)."""
    deepspeed = _deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def step_applied(engine) -> bool:
    return engine.was_step_applied()


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def gathered(params: list):
    """Context in which ZeRO-3-partitioned params are whole on every rank (read only); a no-op otherwise."""
    deepspeed = _deepspeed()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def save_checkpoint(engine, folder: Path) -> None:
    """Collective: DeepSpeed's own format (model states + every rank's ZeRO partitions) in `folder`."""
    folder = Path(folder)
    engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)


def load_checkpoint(engine, folder: Path, *, load_optimizer: bool = True) -> None:
    folder = Path(folder)
    if not any(folder.glob("*model_states.pt")):
        raise KScaleError(
            "not a deepspeed-engine checkpoint (no DeepSpeed model states)",
            where=str(folder),
            fix="point checkpoint.resume at a checkpoint of the deepspeed engine, or convert a "
            "megatron one: kscale convert megatron-to-deepspeed SRC OUT",
        )
    try:
        path, _ = engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=load_optimizer, load_lr_scheduler_states=False
        )
    except (AssertionError, ValueError, ZeroDivisionError) as e:
        raise KScaleError(
            f"DeepSpeed cannot load this checkpoint: {str(e).strip().splitlines()[0]}",
            where=str(folder),
            fix="resume with the data-parallel size it was written with (ZeRO partitions depend on "
            "it), or convert it: kscale convert deepspeed-to-megatron / megatron-to-deepspeed "
            "--world-size N",
        ) from None
    if path is None:
        raise KScaleError("DeepSpeed found no checkpoint to load", where=str(folder))


# --- whole tensors by name (conversion between engines) ---------------------------------------------
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def full_state(engine) -> dict:
    """Collective. {name: {"param": fp32, "exp_avg": ..., "exp_avg_sq": ...}} (whole tensors, ZeRO-3
    partitions gathered) and the Adam step, on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in engine.module.named_parameters():
        entry = {"param": safe_get_full_fp32_param(p).detach().cpu().clone()}
        for key in ADAM_KEYS:
            state = safe_get_full_optimizer_state(p, key)
            if state is not None:
                entry[key] = state.detach().cpu().clone()
        out[name] = entry
    return {"tensors": out, "adam_step": adam_step(engine)}


def adam_step(engine) -> int:
    steps = {int(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s}
    return max(steps) if steps else 0


def set_full_state(engine, state: dict) -> None:
    """Collective. Overwrite fp32 params, the module's params and Adam states from whole tensors by name
    (the inverse of full_state). Adam states must exist already (after one step)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = dict(engine.module.named_parameters())
    missing = sorted(set(params) - set(state["tensors"]))
    if missing:
        raise KScaleError(
            f"the source checkpoint lacks parameters {missing[:4]}", fix="convert a checkpoint of the same model config"
        )
    for name, p in params.items():
        entry = state["tensors"][name]
        safe_set_full_fp32_param(p, entry["param"].to(torch.float32))
        for key in ADAM_KEYS:
            if key in entry:
                safe_set_full_optimizer_state(p, entry[key].to(torch.float32), key)
    with torch.no_grad():  # the working (low-precision) copies follow
        with _deepspeed().zero.GatheredParameters(list(params.values()), modifier_rank=0):
            for name, p in params.items():
                p.data.copy_(state["tensors"][name]["param"].to(p.dtype).reshape(p.shape))
    for s in engine.optimizer.optimizer.state.values():
        if "step" in s:
            s["step"] = (
                torch.full_like(s["step"], float(state["adam_step"]))
                if torch.is_tensor(s["step"])
                else state["adam_step"]
            )


def consolidated_weights(folder: Path) -> dict:
    """Offline, one process: the whole fp32 parameters of a checkpoint by name (ZeRO partitions merged by
    DeepSpeed's zero_to_fp32)."""
    _deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(folder)
    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
