"""Benchmark: the whole training step of the megatron engine (forward + backward of every micro-batch +
optimizer step), by core-attention backend (model.attention_backend: local, sdpa) and precision
(run.precision: fp32, bf16), optionally with activation recompute (model.recompute).

One process (gloo + megatron's CPU layer on the CPU, NCCL on a GPU), the engine exactly as training builds
it (Float16Module, megatron DDP, optimizer), a Kronecker GPT on a synthetic vocabulary (random byte strings
of 1-8 bytes) and random token ids; the step is timed after warm-up steps (median). Reported per variant:
step time, tokens/s, MFU when a peak is given (the accounting of docs/design.md §6.1), and on CUDA the peak
memory; ratios sdpa / local and bf16 / fp32 within the run. CPU figures are ratios only; absolute numbers
come from a GPU (docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# model shapes: cpu = what 2 cores finish in minutes with attention a real share of the step (s = 1024);
# full = the 1B model of configs/scale/1b-131k.yaml on one GPU (micro-batch 4, V = 131,072)
GRIDS: dict[str, dict[str, Any]] = {
    "smoke": dict(n_layers=1, d_model=32, n_heads=2, seq_len=64, micro_batch=1, vocab=512, pos_dim=8),
    "cpu": dict(n_layers=2, d_model=256, n_heads=4, seq_len=1024, micro_batch=2, vocab=8192, pos_dim=16),
    "full": dict(
        n_layers=16,
        d_model=2048,
        n_heads=16,
        ffn_hidden=5632,
        seq_len=2048,
        micro_batch=4,
        vocab=131072,
        pos_dim=32,
        position="rope",
        norm="rmsnorm",
        activation="swiglu",
        bias=False,
    ),
}
SHAPE_KEYS = (
    "n_layers",
    "d_model",
    "n_heads",
    "ffn_hidden",
    "seq_len",
    "pos_dim",
    "position",
    "norm",
    "activation",
    "bias",
)


def synthetic_table(vocab: int, pos_dim: int, seed: int = 0):
    from kronecker_scale.embedding import ByteTable

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, min(8, pos_dim) + 1, (vocab,), generator=g).tolist()
    data = torch.randint(0, 256, (vocab, 8), generator=g, dtype=torch.uint8)
    return ByteTable.from_token_bytes([bytes(data[i, :n].tolist()) for i, n in enumerate(lengths)], pos_dim=pos_dim)


def _config(shape: dict, backend: str, precision: str, recompute: str):
    from omegaconf import OmegaConf

    from kronecker_scale.config.schema import TrainConfig

    cfg = OmegaConf.structured(TrainConfig)
    model = {
        **{k: shape[k] for k in SHAPE_KEYS if k in shape},
        "input_layer": "kronecker",
        "head": "untied",
        "attention_backend": backend,
        "recompute": recompute,
    }
    for key, value in model.items():
        cfg.model[key] = value
    cfg.run.precision = precision
    cfg.data.micro_batch_size = cfg.data.global_batch_size = shape["micro_batch"]
    return cfg


def _worker(rank: int, init_file: str, args: dict, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    from kronecker_scale import quiet

    quiet.install(os.environ.get("KSCALE_VERBOSE") == "1")  # before megatron is imported
    cuda = args["device"] == "cuda"
    if not cuda:
        from kronecker_scale.distributed import hide_gpus

        hide_gpus()
    torch.distributed.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=0, world_size=1
    )
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    from kronecker_scale.model import megatron_cpu
    from kronecker_scale.model.config import GPTConfig
    from kronecker_scale.train.inputs import ModelInputs
    from kronecker_scale.train.megatron_engine import MegatronEngine

    if not cuda:
        megatron_cpu.enable()
    shape = args["shape"]
    table = synthetic_table(shape["vocab"], shape["pos_dim"])
    g = torch.Generator().manual_seed(1)
    b, s = shape["micro_batch"], shape["seq_len"]
    samples = [torch.randint(0, table.num_token_ids, (b, s + 1), generator=g) for _ in range(4)]
    batches = [{"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()} for t in samples]

    def endless():
        while True:
            yield from batches

    rows = []
    for backend in args["backends"]:
        for precision in args["precisions"]:
            cfg = _config(shape, backend, precision, args["recompute"])
            model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))
            engine = MegatronEngine(cfg, ModelInputs(model_cfg, table.num_token_ids, table))
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            it = endless()
            times, first_loss = [], None
            for i in range(args["warmup"] + args["steps"]):
                t0 = time.perf_counter()
                engine.set_learning_rate(1e-4)
                loss, _ = engine.forward_backward(it)
                engine.optimizer_step(True)
                if cuda:
                    torch.cuda.synchronize()
                if i >= args["warmup"]:
                    times.append(time.perf_counter() - t0)
                first_loss = loss if first_loss is None else first_loss
            step_s = statistics.median(times)
            tokens_per_s = b * s / step_s
            peak = args["peak_tflops"]
            rows.append(
                {
                    "backend": backend,
                    "precision": precision,
                    "recompute": args["recompute"],
                    "step_ms": step_s * 1e3,
                    "tokens_per_s": tokens_per_s,
                    "mfu": engine.flops_per_token * tokens_per_s / (peak * 1e12) if peak else None,
                    "flops_per_token": engine.flops_per_token,
                    "first_loss": first_loss,
                    "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                    "steps": args["steps"],
                    "tokens_per_step": b * s,
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    **{k: v for k, v in shape.items()},
                }
            )
            if args["progress"]:
                print(f"step benchmark: {backend} {precision}: {step_s * 1e3:.1f} ms per step", flush=True)
            del engine
            ps.destroy_model_parallel()
    Path(out_dir, "rows.json").write_text(json.dumps(rows))
    torch.distributed.destroy_process_group()


def run(
    grid: str = "cpu",
    backends=("local", "sdpa"),
    precisions=("fp32", "bf16"),
    recompute: str = "none",
    steps: int = 3,
    warmup: int = 1,
    device: str | None = None,
    peak_tflops: float | None = None,
    progress: bool = True,
    **shape_overrides,
) -> list[dict]:
    """One row per backend x precision (in a spawned process, so megatron's state and the CPU layer stay
    out of the caller)."""
    import torch.multiprocessing as mp

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = {**GRIDS[grid], **{k: v for k, v in shape_overrides.items() if v is not None}}
    args = dict(
        shape=shape,
        backends=list(backends),
        precisions=list(precisions),
        recompute=recompute,
        steps=steps,
        warmup=warmup,
        device=device,
        peak_tflops=peak_tflops,
        progress=progress,
    )
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker, args=(os.path.join(tmp, "init"), args, tmp), nprocs=1, join=True, start_method="spawn"
        )
        return json.loads(Path(tmp, "rows.json").read_text())


def ratios(rows: list[dict]) -> list[dict]:
    """sdpa / local step time at each precision, bf16 / fp32 at each backend (within this run)."""
    ms = {(r["backend"], r["precision"]): r["step_ms"] for r in rows}
    out = []
    for prec in sorted({p for _, p in ms}):
        if ("local", prec) in ms and ("sdpa", prec) in ms:
            out.append({"ratio": f"sdpa / local ({prec})", "value": ms[("sdpa", prec)] / ms[("local", prec)]})
    for backend in sorted({b for b, _ in ms}):
        if (backend, "fp32") in ms and (backend, "bf16") in ms:
            out.append({"ratio": f"bf16 / fp32 ({backend})", "value": ms[(backend, "bf16")] / ms[(backend, "fp32")]})
    return out


def markdown(rows: list[dict], command: str) -> str:
    r0 = rows[0]
    lines = [
        f"`{command}`  \n{r0['device']}, torch {torch.__version__}; Kronecker GPT L={r0['n_layers']}, "
        f"d={r0['d_model']}, heads={r0['n_heads']}, s={r0['seq_len']}, micro-batch {r0['micro_batch']}, "
        f"V={r0['vocab']:,} (synthetic), recompute={r0['recompute']}; median of {r0['steps']} steps\n",
        "| backend | precision | step ms | tokens/s | MFU | peak MiB | first loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-"
        peak = f"{r['peak_mib']:,.0f}" if r["peak_mib"] is not None else "-"
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} "
            f"| {peak} | {r['first_loss']:.4f} |"
        )
    rat = ratios(rows)
    if rat:
        lines += ["", "| ratio (step time) | value |", "|---|---|"] + [
            f"| {x['ratio']} | {x['value']:.2f}x |" for x in rat
        ]
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], out_dir: Path, command: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "bench_step.md", "json": out_dir / "bench_step.json", "csv": out_dir / "bench_step.csv"}
    paths["md"].write_text(markdown(rows, command))
    paths["json"].write_text(json.dumps({"command": command, "rows": rows, "ratios": ratios(rows)}, indent=2))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return paths
