"""The megatron engine: megatron-core's GPT with tensor, pipeline, sequence and data parallelism, its DDP
wrapper, optimizer and schedules (PP included), and dist_checkpointing (a checkpoint loads into any
TP/PP layout). The loop that drives it is loop.py; the contract is engine.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import checkpoint
from .inputs import ModelInputs
from .records import model_flops_per_token, norm_record, weight_sums

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# optimizer settings a resumed run takes from its config rather than from the checkpoint
HYPERPARAMETERS = ("max_lr", "min_lr", "start_wd", "end_wd", "weight_decay", "betas", "eps")
# what tells megatron's parameter groups apart besides those settings
GROUP_STRUCTURE = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr", "default_config")


def _match_param_groups(state: dict, current: list[tuple[tuple, dict]]) -> None:
    """megatron pairs saved and current parameter groups by a key that includes max_lr / min_lr, so a
    resume with another learning rate fails ("Could not find parameter group"). Give each saved group the
    current settings of the one current group with the same structure (wd_mult, lr_mult, ...), in place."""
    for groups in _param_group_lists(state):
        for saved in groups:
            matches = [
                settings for structure, settings in current if structure == tuple(saved.get(k) for k in GROUP_STRUCTURE)
            ]
            if len(matches) == 1:
                saved.update(matches[0])


def _param_group_lists(obj):
    """Every `param_groups` list in a (nested) optimizer state dict."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "param_groups" and isinstance(v, list):
                yield v
            else:
                yield from _param_group_lists(v)


def input_layer_norms(core_model, model_cfg) -> dict:
    """Collective over TP and PP. records.norm_record of this stage's model's input layer, the weight's
    parts summed over its TP layout: `shard_d` W [D, d/TP] per rank (row norms from all-reduced squared
    row norms; the output units' (column) norms are whole on each rank and are summed over TP); BPE
    [V/TP, d] rows per rank (real rows: global id < core_model.real_vocab_size); `replicated` W whole on
    every rank. Only the first pipeline stage holds the weight; the totals are summed over PP."""
    from megatron.core import parallel_state as ps

    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    emb = core_model.embedding.word_embeddings if first else None
    device = emb.weight.device if emb is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    stats = torch.zeros(8, dtype=torch.float64, device=device)
    tp_group = ps.get_tensor_model_parallel_group()
    sharded = ps.get_tensor_model_parallel_world_size() > 1 and (
        model_cfg.input_layer == "bpe" or model_cfg.kronecker_tp == "shard_d"
    )
    if emb is not None:
        w = emb.weight.detach().double()
        by_columns = model_cfg.input_layer == "kronecker"  # shard_d splits d; BPE splits rows
        row_sq = (w**2).sum(1)
        if sharded and by_columns:
            torch.distributed.all_reduce(row_sq, group=tp_group)
        stats += weight_sums(
            w,
            model_cfg.input_layer,
            real_rows=getattr(core_model, "real_vocab_size", None),
            row_offset=getattr(emb, "vocab_start_index", 0),
            row_sq=row_sq,
        )
        if sharded:
            # parts of the sums (entries; BPE rows; units / real rows): add over TP. shard_d rows are
            # whole already (all-reduced above): their norm sum and count stay this rank's
            part = stats.clone()
            torch.distributed.all_reduce(part, group=tp_group)
            if by_columns:
                part[:2] = stats[:2]
            stats = part
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(stats, group=ps.get_pipeline_model_parallel_group())
    return norm_record(stats, model_cfg.input_layer)


class MegatronEngine:
    """One rank's model, DDP wrapper and optimizer in the layout cfg.parallel names."""

    def __init__(self, cfg: DictConfig, inputs: ModelInputs):
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        self.cfg, self.ps = cfg, ps
        self.model_cfg, self.byte_table = inputs.model_cfg, inputs.byte_table
        p = cfg.parallel
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline)
        torch.manual_seed(cfg.run.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.num_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * self.dp_size)
        self._build_model(inputs.vocab_size)
        self.is_logger = (
            ps.is_pipeline_last_stage(ignore_virtual=True)
            and ps.get_tensor_model_parallel_rank() == 0
            and self.dp_rank == 0
        )
        self._poison = False

    # --- model, optimizer --------------------------------------------------------------------------
    def _build_model(self, vocab_size: int) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
        from megatron.core.optimizer.optimizer_config import ParamKey
        from megatron.core.transformer.module import Float16Module

        from ..model.megatron_gpt import build_model, transformer_config

        cfg, p = self.cfg, self.cfg.parallel
        dtype = DTYPES[cfg.run.precision]
        self.tcfg = transformer_config(
            self.model_cfg,
            tensor_parallel=p.tensor,
            pipeline_parallel=p.pipeline,
            sequence_parallel=p.sequence,
            params_dtype=dtype,
            deterministic_mode=cfg.run.deterministic,
        )
        model = build_model(self.model_cfg, self.tcfg, byte_table=self.byte_table, vocab_size=vocab_size)
        self.n_params = sum(x.numel() for x in model.parameters())
        self.flops_per_token = model_flops_per_token(self.model_cfg, vocab_size, p.tensor)["total"]
        self.core_model = model
        if torch.cuda.is_available():
            model.cuda()
        if dtype != torch.float32:
            # megatron's mixed precision: bf16/fp16 model, fp32 main params and grads in the optimizer; the
            # codec's scale tables stay fp64 through the cast (KroneckerEmbedding._apply)
            model = Float16Module(self.tcfg, model)
        self.model = DistributedDataParallel(
            self.tcfg,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=p.distributed_optimizer),
            model,
        )
        o = cfg.optim
        opt_cfg = OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.beta1,
            adam_beta2=o.beta2,
            adam_eps=o.eps,
            clip_grad=o.clip_grad,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            params_dtype=dtype,
            use_distributed_optimizer=p.distributed_optimizer,
            # fp16: dynamic loss scaling from 2^16 (DeepSpeed's start; megatron's 2^32
            # skips the first ~17 updates on overflow)
            **({"initial_loss_scale": 2.0**16} if dtype == torch.float16 else {}),
        )
        overrides = get_standard_config_overrides(opt_cfg)
        if not o.decay_projection and self.model_cfg.input_layer == "kronecker":
            overrides[
                ParamKey(
                    name=("*embedding.word_embeddings.weight", "*output_layer.weight")
                    if self.model_cfg.head == "kronecker_tied"
                    else "*embedding.word_embeddings.weight"
                )
            ] = {"wd_mult": 0.0}
        self.optimizer = get_megatron_optimizer(opt_cfg, [self.model], config_overrides=overrides)
        self.tcfg.finalize_model_grads_func = finalize_model_grads
        self.tcfg.no_sync_func = self.model.no_sync
        if dtype == torch.float16:
            self.tcfg.grad_scale_func = self.optimizer.scale_loss

    # --- one step ------------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        output = model(tokens, positions, None, labels=labels)

        poison = self._poison

        def loss_func(per_token):
            total = per_token.float().sum() * (float("nan") if poison else 1.0)
            n = torch.tensor(per_token.numel(), device=per_token.device)
            return total, n.to(torch.int), {"lm loss": torch.stack([total.detach(), n.float()])}

        return output, loss_func

    def _reduce_loss(self, stats) -> tuple[float, int]:
        """Mean loss over the global batch (summed over micro-batches and data-parallel ranks)."""
        total = torch.zeros(2)
        for s in stats:
            total += s["lm loss"].detach().float().cpu()
        if self.ps.is_pipeline_last_stage(ignore_virtual=True):
            total_dev = total.to("cuda") if torch.cuda.is_available() else total
            torch.distributed.all_reduce(total_dev, group=self.ps.get_data_parallel_group())
            total = total_dev.cpu()
        return (total[0] / total[1].clamp_min(1)).item(), int(total[1])

    def evaluate(self, batches: list[dict]) -> float | None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model.eval()
        with torch.no_grad():
            stats = get_forward_backward_func()(
                forward_step_func=self._forward_step,
                data_iterator=iter(batches),
                model=[self.model],
                num_microbatches=len(batches),
                seq_length=self.model_cfg.seq_len,
                micro_batch_size=self.cfg.data.micro_batch_size,
                forward_only=True,
            )
        self.model.train()
        return self._reduce_loss(stats)[0] if stats else None

    def norm_stats(self) -> dict:
        """The paper's norm-drift statistics of the input layer (first stage), over the whole
        (TP-partitioned) weight, sent to the logging rank (`input_layer_norms`)."""
        return input_layer_norms(self.core_model, self.model_cfg)

    # --- the engine contract (engine.py) ------------------------------------------------------------
    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward_backward(self, batches: Iterator[dict], poison: bool = False) -> tuple[float, bool]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._poison = poison
        stats = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=batches,
            model=[self.model],
            num_microbatches=self.num_micro,
            seq_length=self.model_cfg.seq_len,
            micro_batch_size=self.cfg.data.micro_batch_size,
            forward_only=False,
        )
        self._poison = False
        return self._reduce_loss(stats)[0], bool(stats)

    def optimizer_step(self, finite: bool) -> float:
        if not finite:
            return float("nan")
        _, grad_norm, _ = self.optimizer.step()
        return grad_norm

    def write_checkpoint(self, folder: Path) -> None:
        checkpoint.dist_save(self.core_model, self.optimizer, folder)

    def read_checkpoint(self, folder: Path, load_optimizer: bool = True) -> None:
        """The model and optimizer; the optimizer settings of the current config (learning rate, min LR,
        weight decay, betas, eps) stay in force, so they may change on resume."""
        current = [
            (tuple(g.get(k) for k in GROUP_STRUCTURE), {k: g[k] for k in HYPERPARAMETERS if k in g})
            for g in self.optimizer.param_groups
        ]
        if load_optimizer:
            self._materialize_distributed_optimizer_state()
        checkpoint.dist_load(
            self.core_model,
            self.optimizer if load_optimizer else None,
            folder,
            adapt_optimizer_state=lambda sd: _match_param_groups(sd, current),
        )
        for group, (_, settings) in zip(self.optimizer.param_groups, current):
            group.update(settings)
        if load_optimizer:
            self._unshare_adam_steps()

    def run_state(self) -> dict:
        return {}

    def _unshare_adam_steps(self) -> None:
        """megatron 0.19's distributed optimizer restores torch Adam's step as one tensor shared by every
        parameter's state, which Adam then increments once per parameter and step (wrong bias correction,
        ranks disagree): give each state its own copy."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            for st in getattr(inner, "state", {}).values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()

    def _materialize_distributed_optimizer_state(self) -> None:
        """megatron's distributed optimizer reads the Adam step from its (torch) optimizer's state before it
        loads a checkpoint, which is empty before the first step (an AssertionError without Apex/TE): give it
        placeholder states first (megatron's own zero-gradient step; the load overwrites them)."""
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if not isinstance(opt, DistributedOptimizer):
                continue
            if not opt.optimizer.state:
                opt._init_optimizer_states_with_dummy_values()
            if not hasattr(opt, "_kscale_step_patch"):
                # torch's Adam keeps "step" as a tensor in each parameter's state; a fully_reshardable
                # checkpoint restores it from the param groups instead, and megatron 0.19 then looks for it
                # among the parameter's tensors (KeyError 'step'): mark it as not given
                set_states = opt._set_main_param_and_optimizer_states
                opt._set_main_param_and_optimizer_states = lambda model_param, tensors, _set=set_states: _set(
                    model_param, {"step": None, **tensors}
                )
                opt._kscale_step_patch = True

    # --- whole tensors by name (the engine converter) --------------------------------------------------
    def _adam_slots(self) -> list[tuple]:
        """(model param, main fp32 param, torch optimizer) of the (non-distributed) megatron optimizer."""
        out = []
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if hasattr(opt, "float16_groups"):  # bf16/fp16: fp32 main copies
                pairs = [
                    (m, f) for mg, fg in zip(opt.float16_groups, opt.fp32_from_float16_groups) for m, f in zip(mg, fg)
                ]
                pairs += [(p, p) for g in opt.fp32_from_fp32_groups for p in g]
            else:
                pairs = [(p, p) for g in opt.optimizer.param_groups for p in g["params"]]
            out += [(m, f, opt.optimizer) for m, f in pairs]
        return out

    def full_state(self) -> dict:
        by_id = {id(m): (f, inner) for m, f, inner in self._adam_slots()}
        tensors, steps = {}, set()
        for name, p in self.core_model.named_parameters():
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

    def set_full_state(self, state: dict) -> None:
        by_id = {id(m): (f, inner) for m, f, inner in self._adam_slots()}
        with torch.no_grad():
            for name, p in self.core_model.named_parameters():
                entry = state["tensors"][name]
                main, inner = by_id[id(p)]
                main.copy_(entry["param"].to(main.dtype))
                p.copy_(entry["param"].to(p.dtype))
                if "exp_avg" in entry:
                    inner.state[main] = {
                        "step": torch.tensor(float(state["adam_step"])),
                        "exp_avg": entry["exp_avg"].to(main.dtype).clone(),
                        "exp_avg_sq": entry["exp_avg_sq"].to(main.dtype).clone(),
                    }
