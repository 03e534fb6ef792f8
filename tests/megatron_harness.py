"""Runs megatron-core GPT cases in real processes on gloo and writes what they computed to files.

Every case starts from the same weights: a TP=1/PP=1 reference model's full state dict, cut into
this rank's shard (megatron's partition dim and stride) and this stage's layers. Gradients are
gathered back to full tensors with the global layer names, so any layout compares to the reference.
Used by tests/test_megatron_gpt.py (which spawns the processes and asserts).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but have "
    "an had they you were their one all we can her has there been if more when will would who so no "
    "running runner ran runs compute commute nation notion naïve café 日本 🙂 RUN Run .run"
).split()
B, S = 2, 16


def byte_table():
    from kronecker_scale.embedding import ByteTable

    tokens = [w.encode() for w in WORDS] + [(" " + w).encode() for w in WORDS] + [b"", b"\n", b"x" * 40]
    return ByteTable.from_token_bytes(tokens, pos_dim=16)


def batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, S + 1), generator=g)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(S).repeat(B, 1),
        "loss_mask": torch.ones(B, S),
    }


def _global_name(name: str, layer_offset: int) -> str:
    return re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)


def _shard(full: torch.Tensor, param, tp_rank: int, tp: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = torch.split(full, full.shape[dim] // (tp * stride), dim=dim)
    return torch.cat(pieces[tp_rank::tp], dim=dim)


def _gather(local: torch.Tensor, param, group, tp: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    split = [torch.split(p, p.shape[dim] // stride, dim=dim) for p in parts]
    return torch.cat([split[r][k] for k in range(stride) for r in range(tp)], dim=dim)


def run_case(case: dict, ref_state: dict | None) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from kronecker_scale.model.megatron_gpt import GPTConfig, build_model, transformer_config

    tp, pp, sp = case.get("tp", 1), case.get("pp", 1), case.get("sp", False)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    cfg = GPTConfig(**case["model"])
    tcfg = transformer_config(cfg, tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp)
    table = byte_table()
    model = build_model(cfg, tcfg, byte_table=table, vocab_size=table.vocab_size)
    tp_rank, tp_group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    offset = ps.get_pipeline_model_parallel_rank() * (cfg.n_layers // pp)
    names = {n: _global_name(n, offset) for n, _ in model.named_parameters()}
    if ref_state is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                key = names[n]
                if key == "output_layer.weight" and key not in ref_state:  # last-stage copy of the projection
                    key = "embedding.word_embeddings.weight"
                p.copy_(_shard(ref_state[key], p, tp_rank, tp))
    if case.get("load_ckpt"):
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load(model.sharded_state_dict(), case["load_ckpt"])
        model.load_state_dict(loaded, strict=True)
    if case.get("save_ckpt"):
        from megatron.core import dist_checkpointing

        dist_checkpointing.save(model.sharded_state_dict(), case["save_ckpt"])
    out = {
        "state": None,
        "n_params": sum(p.numel() for p in model.parameters()),
        "full_state": {names[n]: _gather(p.detach(), p, tp_group, tp) for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }
    if ps.get_pipeline_model_parallel_world_size() == 1 and tp == 1:
        out["state"] = {n: p.detach().clone() for n, p in model.state_dict().items() if not n.endswith("_extra_state")}
    if case.get("steps", 1) == 0:
        ps.destroy_model_parallel()
        return {"losses": [], "grads": {}, "logits": None, **out}
    ddp = DistributedDataParallel(tcfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.no_sync_func = ddp.no_sync
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0, bf16=False), [ddp])
    data = batch(table.num_token_ids if cfg.input_layer == "kronecker" else table.vocab_size)

    def forward_step(data_iterator, m):
        d = next(data_iterator)
        output = m(d["tokens"], d["position_ids"], None, labels=d["labels"])

        def loss_func(output_tensor):
            total = (output_tensor.float() * d["loss_mask"]).sum()
            n = d["loss_mask"].sum()
            return total, n.to(torch.int), {"lm loss": torch.stack([total.detach(), n])}

        return output, loss_func

    logits = None
    if pp == 1:
        model.eval()  # at the starting weights, before any step
        with torch.no_grad():
            local = model(data["tokens"], data["position_ids"], None)  # [b, s, V/TP]
            logits = _gather(local, type("P", (), {"tensor_model_parallel": True, "partition_dim": 2})(), tp_group, tp)
            # the real ids only: padded ids carry the mask value, which would swamp a tolerance scaled by the logits
            logits = logits[..., : table.num_token_ids if cfg.input_layer == "kronecker" else table.vocab_size]
        model.train()
    fb = get_forward_backward_func()
    losses, grads = [], {}
    for step in range(case.get("steps", 1)):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        stats = fb(
            forward_step_func=forward_step,
            data_iterator=iter([data]),
            model=[ddp],
            num_microbatches=1,
            seq_length=S,
            micro_batch_size=B,
            forward_only=False,
        )
        if stats:
            s = stats[0]["lm loss"]
            losses.append((s[0] / s[1]).item())
        if step == 0:
            for n, p in model.named_parameters():
                grads[names[n]] = _gather(p.main_grad, p, tp_group, tp)
        opt.step()
    ps.destroy_model_parallel()
    return {"losses": losses, "grads": grads, "logits": logits, **out}


def worker(rank: int, world: int, init_file: str, cases: dict, out_dir: str, ref_file: str | None = None):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from kronecker_scale.model import megatron_cpu

    megatron_cpu.enable()
    refs = torch.load(ref_file) if ref_file else {}
    results = {}
    for name, case in cases.items():
        ref = refs.get(case.get("ref", name), {}).get("state") if refs else None
        results[name] = run_case(case, ref)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def embedding_worker(rank: int, world: int, init_file: str, out_dir: str):
    """Both TP layouts of the Kronecker input layer, SP off and on, against the single-device module."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from kronecker_scale.embedding import KroneckerEmbedding
    from kronecker_scale.model import megatron_cpu
    from kronecker_scale.model.megatron_gpt import GPTConfig, KroneckerLanguageModelEmbedding, transformer_config

    megatron_cpu.enable()
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    group = ps.get_tensor_model_parallel_group()
    table = byte_table().pad_to(128 * world)
    single = KroneckerEmbedding(table, 64)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, table.vocab_size, (B, S), generator=g)
    grad = torch.randn(S, B, 64, generator=g)
    ref = single(ids)  # [b, s, d]
    ref.backward(grad.transpose(0, 1))
    results = {"ref_out": ref.detach(), "ref_grad": single.weight.grad.clone()}
    for variant in ("shard_d", "replicated"):
        for sp in (False, True):
            cfg = GPTConfig(d_model=64, n_heads=4, seq_len=S, pos_dim=16, position="rope", kronecker_tp=variant)
            tcfg = transformer_config(cfg, tensor_parallel=world, sequence_parallel=sp)
            layer = KroneckerLanguageModelEmbedding(
                tcfg,
                table.vocab_size,
                S,
                position_embedding_type="rope",
                tp_group=group,
                byte_table=table,
                model_cfg=cfg,
            )
            w = layer.word_embeddings.weight
            with torch.no_grad():
                w.copy_(_shard(single.weight.detach(), w, rank, world))
            out = layer(ids, None)  # [s(/TP), b, d]
            local_grad = grad.chunk(world)[rank] if sp else grad
            out.backward(local_grad)
            wgrad = w.grad.clone()
            if getattr(w, "sequence_parallel", False):  # what finalize_model_grads does over TP
                torch.distributed.all_reduce(wgrad, group=group)
            if sp:
                parts = [torch.empty_like(out) for _ in range(world)]
                torch.distributed.all_gather(parts, out.detach().contiguous(), group=group)
                out = torch.cat(parts, 0)
            results[f"{variant}/sp={sp}"] = {
                "out": out.detach().transpose(0, 1),
                "grad": _gather(wgrad, w, group, world),
            }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def spawn(tmp_path, world: int, cases: dict, ref_file: str | None = None, tag: str = "run") -> list[dict]:
    """Run `worker` on `world` real gloo processes over `cases`; each rank's results."""
    import torch.multiprocessing as mp

    out = tmp_path / tag
    out.mkdir()
    mp.start_processes(
        worker,
        args=(world, str(out / "init"), cases, str(out), ref_file),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]
