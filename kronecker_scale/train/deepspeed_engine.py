"""The deepspeed engine: the same GPT (megatron-core's, TP = PP = 1) as the megatron engine, trained
data-parallel under DeepSpeed ZeRO 1-3 with optional CPU offload, by the same loop (loop.py).
`kscale train` picks it with run.engine=deepspeed.

Every DeepSpeed call is in deepspeed_adapter.py. Checkpoints: DeepSpeed's own format in
`checkpoints/step_XXXXXXXX/`, with the run state checkpoint.py adds beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..distributed import device
from ..errors import KScaleError
from .inputs import ModelInputs
from .megatron_engine import DTYPES
from .records import model_flops_per_token, norm_record, weight_sums


def param_groups(model: torch.nn.Module, cfg: DictConfig, model_cfg) -> list[dict]:
    """AdamW groups as the megatron engine forms them: no weight decay on biases and 1-D parameters
    (norms); none on the Kronecker projection either when optim.decay_projection is false."""
    exempt = set()
    if not cfg.optim.decay_projection and model_cfg.input_layer == "kronecker":
        exempt.add("embedding.word_embeddings.weight")
        if model_cfg.head == "kronecker_tied":
            exempt.add("output_layer.weight")
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() == 1 or name.endswith(".bias") or name in exempt
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class DeepSpeedEngine:
    """One data-parallel rank's model under a DeepSpeed engine, with a client AdamW."""

    def __init__(self, cfg: DictConfig, inputs: ModelInputs):
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        from . import deepspeed_adapter as ds

        self.cfg, self.ds = cfg, ds
        self.model_cfg = inputs.model_cfg
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        # the megatron engine's seeding, in the same order: the same initial weights for one seed
        torch.manual_seed(cfg.run.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.num_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * self.dp_size)
        ds_config = ds.deepspeed_config(cfg, self.dp_size)  # bad passthrough: fail before building
        self._build_model(inputs, ds_config)
        self.is_logger = self.dp_rank == 0

    def _build_model(self, inputs: ModelInputs, ds_config: dict) -> None:
        from ..model.megatron_gpt import build_model, transformer_config

        cfg = self.cfg
        dtype = DTYPES[cfg.run.precision]
        tcfg = transformer_config(self.model_cfg, params_dtype=dtype, deterministic_mode=cfg.run.deterministic)
        model = build_model(self.model_cfg, tcfg, byte_table=inputs.byte_table, vocab_size=inputs.vocab_size)
        self.n_params = sum(x.numel() for x in model.parameters())
        self.flops_per_token = model_flops_per_token(self.model_cfg, inputs.vocab_size, 1)["total"]
        if torch.cuda.is_available():
            model.cuda()
        o = cfg.optim
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg, self.model_cfg), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
        )
        self.engine = self.ds.initialize(model, optimizer, ds_config)

    @property
    def module(self):
        return self.engine.module

    # --- one step ------------------------------------------------------------------------------------
    def _loss_sums(self, batch, poison: bool = False) -> tuple[torch.Tensor, int]:
        """(sum of per-token losses, tokens) of one micro-batch; the forward of the engine."""
        dev = self.engine.device
        tokens, labels = batch["tokens"].to(dev), batch["labels"].to(dev)
        positions = torch.arange(tokens.shape[1], device=dev).expand_as(tokens)
        per_token = self.engine(tokens, positions, None, labels=labels)
        total = per_token.float().sum() * (float("nan") if poison else 1.0)
        return total, per_token.numel()

    def _global_mean(self, total: float, count: int) -> float:
        """Mean loss over the global batch: summed over micro-batches and data-parallel ranks."""
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device())
        torch.distributed.all_reduce(t)
        return (t[0] / t[1].clamp_min(1)).item()

    # --- the engine contract (engine.py) ------------------------------------------------------------
    def set_learning_rate(self, lr: float) -> None:
        self.ds.set_learning_rate(self.engine, lr)

    def forward_backward(self, batches: Iterator[dict], poison: bool = False) -> tuple[float, bool]:
        """Every micro-batch (DeepSpeed divides each by the accumulation steps and averages over
        data-parallel ranks: the megatron engine's mean over all tokens of the global batch). The step of
        the last micro-batch (the update) is optimizer_step's."""
        total, count = 0.0, 0
        for i in range(self.num_micro):
            if i:
                self.engine.step()  # DeepSpeed counts micro-batches here; it updates only at the boundary
            s, n = self._loss_sums(next(batches), poison)
            self.engine.backward(s / n)
            total, count = total + s.item(), count + n
        return self._global_mean(total, count), True

    def optimizer_step(self, finite: bool) -> float:
        self.engine.step()  # DeepSpeed skips the update itself when the gradients are not finite
        if not finite and self.ds.step_applied(self.engine):
            raise KScaleError(
                "DeepSpeed applied an update despite a non-finite loss",
                where=f"{self.cfg.run.dir}",
                fix="set run.on_nan=stop for this precision",
            )
        return self.ds.grad_norm(self.engine) if finite else float("nan")

    def evaluate(self, batches: list[dict]) -> float | None:
        self.engine.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                s, n = self._loss_sums(batch)
                total, count = total + s.item(), count + n
        self.engine.train()
        return self._global_mean(total, count)

    def norm_stats(self) -> dict:
        """The paper's norm-drift statistics of the input layer (collective: ZeRO-3 gathers the weight)."""
        w = self.module.embedding.word_embeddings.weight
        with self.ds.gathered([w]):
            stats = weight_sums(w, self.model_cfg.input_layer, real_rows=self.module.real_vocab_size)
        return norm_record(stats, self.model_cfg.input_layer)

    def write_checkpoint(self, folder: Path) -> None:
        self.ds.save_checkpoint(self.engine, folder)

    def read_checkpoint(self, folder: Path, load_optimizer: bool = True) -> None:
        """The model and optimizer; the current config's optimizer settings (betas, eps, weight decay)
        stay in force, so they may change on resume (the learning rate is set every step)."""
        groups = self.engine.optimizer.param_groups
        current = [{k: g[k] for k in ("betas", "eps", "weight_decay") if k in g} for g in groups]
        self.ds.load_checkpoint(self.engine, folder, load_optimizer=load_optimizer)
        for group, settings in zip(self.engine.optimizer.param_groups, current):
            group.update(settings)

    def run_state(self) -> dict:
        return {"engine": "deepspeed", "zero_stage": int(self.cfg.deepspeed.zero_stage)}

    def full_state(self) -> dict:
        return self.ds.full_state(self.engine)

    def set_full_state(self, state: dict) -> None:
        self.ds.set_full_state(self.engine, state)
