"""The deepspeed engine: the same GPT (megatron-core's, TP = PP = 1), config, data, schedule, metrics
and evaluation as the megatron engine (trainer.py), trained data-parallel under DeepSpeed ZeRO 1-3 with
optional CPU offload. `kscale train` picks it with run.engine=deepspeed.

Every DeepSpeed call is in deepspeed_adapter.py; what both engines share is in common.py.
Checkpoints: DeepSpeed's own format in `checkpoints/step_XXXXXXXX/` plus our run state next to it
(trainer_state.pt, rng/, config.yaml, byte_table.safetensors), written to a temporary name and renamed
before `latest` moves (checkpoint.begin / commit, as for the megatron engine).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import KScaleError
from . import checkpoint, common


def param_groups(model: torch.nn.Module, cfg: DictConfig, model_cfg) -> list[dict]:
    """AdamW groups as the megatron engine forms them: no weight decay on biases and 1-D parameters
    (norms); none on the Kronecker projection either when optim.decay_projection is false."""
    exempt = set()
    if not cfg.optim.decay_projection and model_cfg.input_layer == "kronecker":
        exempt.add("embedding.word_embeddings.weight")
        if model_cfg.head == "kronecker_tied":
            exempt.add("output_layer.weight")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() == 1 or name.endswith(".bias") or name in exempt
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class DeepSpeedTrainer:
    """One rank of the deepspeed engine. `train(console)` returns {"step", "tokens", "skipped_steps"}."""

    def __init__(self, cfg: DictConfig, with_data: bool = True):
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        from . import deepspeed_adapter as ds
        self.cfg, self.ps, self.ds = cfg, ps, ds
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        # the megatron engine's seeding, in the same order: the same initial weights for one seed
        torch.manual_seed(cfg.run.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)
        self.model_cfg, tok, self.byte_table = common.model_inputs(cfg)
        if with_data:
            common.check_train_data(cfg, tok, self.model_cfg)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.num_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * self.dp_size)
        ds_config = ds.deepspeed_config(cfg, self.dp_size)          # bad passthrough: fail before building
        self._build_model(tok.vocab_size, ds_config)
        self.train_loader = self.val_loader = None
        if with_data:
            self.train_loader, self.val_loader = common.build_loaders(cfg, tok, self.model_cfg, self.dp_rank,
                                                                      self.dp_size)
        self.val_batches = None
        self.is_logger = self.dp_rank == 0

    def _build_model(self, vocab_size: int, ds_config: dict) -> None:
        from ..model.megatron_gpt import build_model, transformer_config
        cfg = self.cfg
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.run.precision]
        tcfg = transformer_config(self.model_cfg, params_dtype=dtype, deterministic_mode=cfg.run.deterministic)
        model = build_model(self.model_cfg, tcfg, byte_table=self.byte_table, vocab_size=vocab_size)
        self.n_params = sum(x.numel() for x in model.parameters())
        if torch.cuda.is_available():
            model.cuda()
        o = cfg.optim
        optimizer = torch.optim.AdamW(param_groups(model, cfg, self.model_cfg), lr=o.lr, betas=(o.beta1, o.beta2),
                                      eps=o.eps)
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
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=common.device())
        torch.distributed.all_reduce(t)
        return (t[0] / t[1].clamp_min(1)).item()

    def train_step(self, batches, poison: bool) -> float:
        """Forward/backward of every micro-batch (DeepSpeed divides each by the accumulation steps and
        averages over data-parallel ranks: the megatron engine's mean over all tokens of the global
        batch). Returns the loss; the step of the last micro-batch (the update) is left to the caller."""
        total, count = 0.0, 0
        for i in range(self.num_micro):
            if i:
                self.engine.step()         # DeepSpeed counts micro-batches here; it updates only at the boundary
            s, n = self._loss_sums(next(batches), poison)
            self.engine.backward(s / n)
            total, count = total + s.item(), count + n
        return self._global_mean(total, count)

    def evaluate(self) -> float | None:
        if self.val_loader is None:
            return None
        if self.val_batches is None:
            self.val_batches = common.fixed_batches(self.val_loader, self.cfg.eval.batches)
        if not self.val_batches:
            return None
        self.engine.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.val_batches:
                s, n = self._loss_sums(batch)
                total, count = total + s.item(), count + n
        self.engine.train()
        return self._global_mean(total, count)

    def norm_stats(self) -> dict:
        """The paper's norm-drift statistics of the input layer (collective: ZeRO-3 gathers the weight)."""
        w = self.module.embedding.word_embeddings.weight
        with self.ds.gathered([w]):
            stats = common.weight_sums(w)
        return common.norm_record(stats, self.model_cfg.input_layer)

    # --- the loop ------------------------------------------------------------------------------------
    def train(self, console=print) -> dict:
        from .metrics import MetricsWriter
        cfg = self.cfg
        step, tokens, skipped = 0, 0, 0
        resume = common.resume_path(cfg, self.ckpt_dir)
        if resume is not None:
            state = self.load(resume)
            step, tokens, skipped = state["step"], state["tokens"], state["skipped_steps"]
            self.train_loader.load_state_dict(state["train_loader"])
            console(f"resumed from {resume} at step {step}" + ("" if state.get("rng_restored") else
                                                              " (new world size: RNG states re-seeded)"))
        metrics = MetricsWriter(self.run_dir, self.is_logger, cfg.logging.tensorboard, console, resume_step=step)
        batches = common.endless(self.train_loader)
        tokens_per_step = cfg.data.global_batch_size * self.model_cfg.seq_len
        faults = common.Faults()
        while step < cfg.schedule.train_steps:
            t0 = time.perf_counter()
            lr = common.learning_rate(step, cfg)
            self.ds.set_learning_rate(self.engine, lr)
            loss = self.train_step(batches, poison=faults.nan_step == step + 1)
            finite = common.all_finite(loss)
            if not finite:
                skipped = common.skip_nonfinite_step(cfg, step + 1, skipped)     # raises under on_nan=stop
            self.engine.step()             # DeepSpeed skips the update itself when the gradients are not finite
            if not finite and self.ds.step_applied(self.engine):
                raise KScaleError(f"DeepSpeed applied the update of step {step + 1} despite a non-finite loss",
                                  where=f"{cfg.run.dir}", fix="set run.on_nan=stop for this precision")
            grad_norm = self.ds.grad_norm(self.engine) if finite else float("nan")
            step += 1
            tokens += tokens_per_step
            record = common.step_record(cfg, step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens,
                                        tokens_per_step=tokens_per_step, step_time=time.perf_counter() - t0,
                                        skipped=skipped, n_params=self.n_params)
            common.finish_step(self, record, metrics, faults, step, tokens, skipped)
        metrics.close()
        return {"step": step, "tokens": tokens, "skipped_steps": skipped}

    # --- checkpoints ---------------------------------------------------------------------------------
    def run_state(self, step: int, tokens: int, skipped: int) -> dict:
        return {"step": step, "tokens": tokens, "skipped_steps": skipped, "engine": "deepspeed",
                "zero_stage": int(self.cfg.deepspeed.zero_stage),
                "train_loader": self.train_loader.state_dict() if self.train_loader is not None else None,
                "world_size": torch.distributed.get_world_size()}

    def save(self, step: int, tokens: int, skipped: int, state: dict | None = None) -> Path:
        """Collective. `state` replaces the trainer state (the converter passes the source's)."""
        tmp = checkpoint.begin(self.ckpt_dir, step)
        self.ds.save_checkpoint(self.engine, tmp)
        checkpoint.write_run_state(tmp, state or self.run_state(step, tokens, skipped), OmegaConf.to_yaml(self.cfg),
                                   self.byte_table)
        return checkpoint.commit(self.ckpt_dir, step, self.cfg.checkpoint.keep_last)

    def load(self, path: Path, *, load_optimizer: bool = True) -> dict:
        path = Path(path)
        if not (path / "trainer_state.pt").is_file():
            raise KScaleError("not a complete kscale checkpoint (no trainer_state.pt)", where=str(path))
        self.ds.load_checkpoint(self.engine, path, load_optimizer=load_optimizer)
        return checkpoint.read_run_state(path)
