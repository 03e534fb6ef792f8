"""Benchmark: the two tensor-parallel layouts of the Kronecker projection, with and without SP.

- `shard_d`:    W[:, d/TP] per rank; the kernel runs on all tokens for its columns, then an
                all-gather (no SP) or an all-to-all to [s/TP, b, d] (SP).
- `replicated`: all of W on every rank; no SP: every rank embeds every token (no communication);
                SP: each rank embeds its sequence slice, and W's gradient is all-reduced over TP
                (what finalize_model_grads does for `sequence_parallel` parameters).

Runs TP processes (gloo on CPU, NCCL on GPU). Reported per rank: median forward+backward time, and
the payload bytes handed to collectives (counted by wrapping torch.distributed's collectives).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _count_collectives(counter: dict) -> list:
    """Wrap torch.distributed's collectives (and megatron's import-time references to them) so each
    call adds the bytes of this rank's input buffer to `counter`. Returns what to restore."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    restore = []

    def wrap(owner, attr, name, input_index):
        fn = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            t = args[input_index] if len(args) > input_index else None
            if isinstance(t, (list, tuple)):
                t = t[0] if t else None
            if torch.is_tensor(t):
                counter[name] = counter.get(name, 0) + t.numel() * t.element_size()
            return fn(*args, **kwargs)

        setattr(owner, attr, wrapped)
        restore.append((owner, attr, fn))

    # (output, input) signatures: the input is argument 1; all_reduce works in place on argument 0
    wrap(dist, "all_to_all_single", "all_to_all", 1)
    wrap(dist, "all_reduce", "all_reduce", 0)
    wrap(mappings, "dist_all_gather_func", "all_gather", 1)
    wrap(mappings, "dist_reduce_scatter_func", "reduce_scatter", 1)
    return restore


def _worker(rank: int, world: int, init_file: str, args: dict, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from kronecker_scale import quiet

    quiet.install(os.environ.get("KSCALE_VERBOSE") == "1")  # before megatron is imported
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from kronecker_scale.benchmarks.embedding import real_ids
    from kronecker_scale.embedding import ByteTable
    from kronecker_scale.model import megatron_cpu
    from kronecker_scale.model.megatron_gpt import GPTConfig, KroneckerLanguageModelEmbedding, transformer_config
    from kronecker_scale.tokenizer.assets import tokenizer_path

    megatron_cpu.enable()
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    tok = tokenizer_path("tekken")
    table = ByteTable.from_tokenizer(tok, pos_dim=args["pos_dim"]).pad_to(128 * world)
    b, s, d = args["batch"], args["tokens"] // args["batch"], args["d_model"]
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    ids = real_ids(tok, b * s, device).reshape(b, s)
    rows = []
    for variant in ("shard_d", "replicated"):
        for sp in (False, True):
            cfg = GPTConfig(
                d_model=d, n_heads=world * 4, seq_len=s, pos_dim=args["pos_dim"], position="rope", kronecker_tp=variant
            )
            tcfg = transformer_config(cfg, tensor_parallel=world, sequence_parallel=sp)
            emb = KroneckerLanguageModelEmbedding(
                tcfg,
                table.vocab_size,
                s,
                position_embedding_type="rope",
                tp_group=ps.get_tensor_model_parallel_group(),
                byte_table=table,
                model_cfg=cfg,
            ).to(device)
            grad = torch.randn(s // world if sp else s, b, d, device=device)

            def step(emb=emb, grad=grad):
                emb.word_embeddings.weight.grad = None
                emb(ids, None).backward(grad)
                w = emb.word_embeddings.weight
                if getattr(w, "sequence_parallel", False):  # finalize_model_grads' TP all-reduce
                    torch.distributed.all_reduce(w.grad, group=ps.get_tensor_model_parallel_group())
                if cuda:
                    torch.cuda.synchronize()

            step()
            counter: dict = {}
            restore = _count_collectives(counter)
            step()
            for owner, attr, fn in restore:
                setattr(owner, attr, fn)
            times = []
            for _ in range(args["reps"]):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
            rows.append(
                {
                    "variant": variant,
                    "sequence_parallel": sp,
                    "tp": world,
                    "tokens": b * s,
                    "d_model": d,
                    "pos_dim": args["pos_dim"],
                    "ms": statistics.median(times),
                    "payload_bytes": sum(counter.values()),
                    "collectives": counter,
                    "weight_bytes_per_rank": emb.word_embeddings.weight.numel() * 4,
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                }
            )
    if rank == 0:
        Path(out_dir, "rows.json").write_text(json.dumps(rows))
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def run(
    tp: int = 2, tokens: int = 4096, d_model: int = 1024, pos_dim: int = 32, batch: int = 4, reps: int = 5
) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        args = dict(tokens=tokens, d_model=d_model, pos_dim=pos_dim, batch=batch, reps=reps)
        mp.start_processes(
            _worker, args=(tp, os.path.join(tmp, "init"), args, tmp), nprocs=tp, join=True, start_method="spawn"
        )
        return json.loads(Path(tmp, "rows.json").read_text())


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        f"`{command}` on {rows[0]['device']}, TP={rows[0]['tp']}, {rows[0]['tokens']} tokens, "
        f"d={rows[0]['d_model']}, P={rows[0]['pos_dim']}\n",
        "| variant | SP | fwd+bwd ms | collective payload per rank (MiB) | collectives | W per rank (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        coll = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in r["collectives"].items()) or "none"
        lines.append(
            f"| {r['variant']} | {'on' if r['sequence_parallel'] else 'off'} | {r['ms']:.2f} | "
            f"{r['payload_bytes'] / 2**20:.2f} | {coll} | {r['weight_bytes_per_rank'] / 2**20:.1f} |"
        )
    return "\n".join(lines) + "\n"
