"""The training loop of the megatron engine: one process per rank, started by `kscale train`.

config -> tokenizer + byte table -> data (this DP rank) -> model (this TP/PP rank) -> DDP + optimizer
-> steps (megatron's schedules) -> metrics, evaluation, checkpoints. Resumes from `latest` exactly.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import checkpoint, common
from .common import learning_rate  # noqa: F401  (shared with the deepspeed engine; imported from here too)


def init_distributed() -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank,
                                         world_size=world)
    if not torch.cuda.is_available():
        from ..model import megatron_cpu
        megatron_cpu.enable()


class Trainer:
    def __init__(self, cfg: DictConfig):
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        self.cfg, self.ps = cfg, ps
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        p = cfg.parallel
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline)
        torch.manual_seed(cfg.run.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)
        self.model_cfg, tok, self.byte_table = common.model_inputs(cfg)
        common.check_train_data(cfg, tok, self.model_cfg)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.num_micro = cfg.data.global_batch_size // (cfg.data.micro_batch_size * self.dp_size)
        self._build_model(tok.vocab_size)
        self.train_loader, self.val_loader = common.build_loaders(cfg, tok, self.model_cfg, self.dp_rank, self.dp_size)
        self.val_batches = None
        self.is_logger = (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
                          and self.dp_rank == 0)

    # --- model, optimizer --------------------------------------------------------------------------
    def _build_model(self, vocab_size: int) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer import get_standard_config_overrides
        from megatron.core.optimizer.optimizer_config import ParamKey
        from megatron.core.transformer.module import Float16Module

        from ..model.megatron_gpt import build_model, transformer_config
        cfg, p = self.cfg, self.cfg.parallel
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.run.precision]
        self.tcfg = transformer_config(self.model_cfg, tensor_parallel=p.tensor, pipeline_parallel=p.pipeline,
                                       sequence_parallel=p.sequence, params_dtype=dtype,
                                       deterministic_mode=cfg.run.deterministic)
        model = build_model(self.model_cfg, self.tcfg, byte_table=self.byte_table, vocab_size=vocab_size)
        self.n_params = sum(x.numel() for x in model.parameters())
        self.core_model = model
        if torch.cuda.is_available():
            model.cuda()
        if dtype != torch.float32:
            model = Float16Module(self.tcfg, model)
        self.model = DistributedDataParallel(self.tcfg, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=p.distributed_optimizer), model)
        o = cfg.optim
        opt_cfg = OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                  adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad,
                                  bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
                                  use_distributed_optimizer=p.distributed_optimizer)
        overrides = get_standard_config_overrides(opt_cfg)
        if not o.decay_projection and self.model_cfg.input_layer == "kronecker":
            overrides[ParamKey(name=("*embedding.word_embeddings.weight", "*output_layer.weight")
                               if self.model_cfg.head == "kronecker_tied" else "*embedding.word_embeddings.weight")] \
                = {"wd_mult": 0.0}
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

        poison = self.nan_step is not None and self.step_in_progress == self.nan_step   # fault injection

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

    def evaluate(self) -> float | None:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        if self.val_loader is None:
            return None
        if self.val_batches is None:
            self.val_batches = common.fixed_batches(self.val_loader, self.cfg.eval.batches)
        batches = self.val_batches
        self.model.eval()
        with torch.no_grad():
            stats = get_forward_backward_func()(
                forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.model],
                num_microbatches=len(batches), seq_length=self.model_cfg.seq_len,
                micro_batch_size=self.cfg.data.micro_batch_size, forward_only=True)
        self.model.train()
        return self._reduce_loss(stats)[0] if stats else None

    def norm_stats(self) -> dict:
        """The paper's norm-drift statistics of the input layer (first stage): mean row L2 norm and the
        std of the weight, over the whole (TP-partitioned) weight, sent to the logging rank."""
        ps = self.ps
        w = self.core_model.embedding.word_embeddings.weight if ps.is_pipeline_first_stage(ignore_virtual=True) \
            else None
        device = w.device if w is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        # [sum of row norms, rows, sum, sum of squares, elements]
        stats = torch.zeros(5, dtype=torch.float64, device=device)
        tp_group = ps.get_tensor_model_parallel_group()
        sharded = ps.get_tensor_model_parallel_world_size() > 1 and (
            self.model_cfg.input_layer == "bpe" or self.model_cfg.kronecker_tp == "shard_d")
        if w is not None:
            w = w.detach().double()
            row_sq = (w ** 2).sum(1)
            by_columns = self.model_cfg.input_layer == "kronecker"       # shard_d splits d; BPE splits rows
            if sharded and by_columns:
                torch.distributed.all_reduce(row_sq, group=tp_group)
            stats += torch.stack([row_sq.sqrt().sum(), torch.tensor(float(w.shape[0]), device=device),
                                  w.sum(), (w ** 2).sum(), torch.tensor(float(w.numel()), device=device)])
            if sharded:
                part = stats[2:].clone()
                torch.distributed.all_reduce(part, group=tp_group)
                stats[2:] = part
                if not by_columns:
                    rows = stats[:2].clone()
                    torch.distributed.all_reduce(rows, group=tp_group)
                    stats[:2] = rows
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(stats, group=ps.get_pipeline_model_parallel_group())
        return common.norm_record(stats, self.model_cfg.input_layer)

    # --- the loop ------------------------------------------------------------------------------------
    def train(self, console=print) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from .metrics import MetricsWriter
        cfg = self.cfg
        step, tokens, skipped = 0, 0, 0
        resume = common.resume_path(cfg, self.ckpt_dir)
        if resume is not None:
            state = checkpoint.load(resume, self.core_model, self.optimizer)
            step, tokens, skipped = state["step"], state["tokens"], state["skipped_steps"]
            self.train_loader.load_state_dict(state["train_loader"])
            console(f"resumed from {resume} at step {step}" + ("" if state.get("rng_restored") else
                                                              " (new world size: RNG states re-seeded)"))
        metrics = MetricsWriter(self.run_dir, self.is_logger, cfg.logging.tensorboard, console, resume_step=step)
        batches = common.endless(self.train_loader)
        fb = get_forward_backward_func()
        tokens_per_step = cfg.data.global_batch_size * self.model_cfg.seq_len
        faults = common.Faults()
        self.nan_step = faults.nan_step
        while step < cfg.schedule.train_steps:
            self.step_in_progress = step + 1
            t0 = time.perf_counter()
            lr = learning_rate(step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            stats = fb(forward_step_func=self._forward_step, data_iterator=batches, model=[self.model],
                       num_microbatches=self.num_micro, seq_length=self.model_cfg.seq_len,
                       micro_batch_size=cfg.data.micro_batch_size, forward_only=False)
            loss, _ = self._reduce_loss(stats)
            if not common.all_finite(loss, have_loss=bool(stats)):          # every rank decides alike
                skipped = common.skip_nonfinite_step(cfg, step + 1, skipped)
                grad_norm = float("nan")
            else:
                _, grad_norm, _ = self.optimizer.step()
            step += 1
            tokens += tokens_per_step
            dt = time.perf_counter() - t0
            record = common.step_record(cfg, step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens,
                                        tokens_per_step=tokens_per_step, step_time=dt, skipped=skipped,
                                        n_params=self.n_params)
            common.finish_step(self, record, metrics, faults, step, tokens, skipped)
        metrics.close()
        return {"step": step, "tokens": tokens, "skipped_steps": skipped}

    def save(self, step: int, tokens: int, skipped: int) -> None:
        state = {"step": step, "tokens": tokens, "skipped_steps": skipped,
                 "train_loader": self.train_loader.state_dict(),
                 "world_size": torch.distributed.get_world_size()}
        checkpoint.save(self.ckpt_dir, step, self.core_model, self.optimizer, state, OmegaConf.to_yaml(self.cfg),
                        self.byte_table, keep_last=self.cfg.checkpoint.keep_last)
