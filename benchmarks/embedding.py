"""Benchmark: the Kronecker embedding's implementations against nn.Embedding(V=131,072, d).

Providers (what runs on the device at hand):
- `nn_embedding`: the V x d table the method replaces (dense gradient, as in training);
- `kron_torch`:   the closed form with F.embedding_bag (kronecker_scale.embedding);
- `kron_dense`:   the materialised [N, D] codec + matmul: what the reference package does;
- `kron_triton`:  the fused kernels (CUDA only), fast (atomic) and deterministic backward.

Modes: forward, backward, full (forward + backward). Time is the median over repeats
(triton.testing.do_bench on CUDA). Memory: bytes saved for backward that are not parameters or
buffers (measured with saved-tensor hooks, on any device), and on CUDA the peak allocation of a
full step above the inputs. Ids are real: Mistral Tekken (V = 131,072) on real English text.
"""
from __future__ import annotations

import csv
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kronecker_scale.embedding import ByteTable, KroneckerEmbedding

VOCAB = 131_072
PROVIDERS = ("nn_embedding", "kron_torch", "kron_dense", "kron_triton", "kron_triton_det")
MODES = ("forward", "backward", "full")
GRIDS = {
    # the grid, for a GPU
    "full": dict(tokens=(4096, 16384, 65536), d_model=(768, 2048, 4096), pos_dim=(16, 32),
                 dtype=("bf16", "fp32")),
    # what 2 CPU cores get through in a few minutes
    "cpu": dict(tokens=(4096, 16384), d_model=(768, 2048), pos_dim=(16, 32), dtype=("fp32", "bf16")),
    "smoke": dict(tokens=(512,), d_model=(64,), pos_dim=(16,), dtype=("fp32",)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Result:
    provider: str
    mode: str
    tokens: int
    d_model: int
    pos_dim: int
    dtype: str
    ms: float
    saved_bytes: int
    peak_bytes: int
    device: str
    ratio_vs_nn_embedding: float = float("nan")


def real_ids(tokenizer_path: Path, n: int, device) -> torch.Tensor:
    """n ids of real English text (CPython's LICENSE, tiled) under a 131K-vocabulary tokenizer."""
    from kronecker_scale.tokenizer import load_tokenizer
    text = (Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
            / "LICENSE.txt").read_text(encoding="utf-8")
    ids = torch.tensor(load_tokenizer(tokenizer_path).encode(text))
    return ids.repeat(-(-n // len(ids)))[:n].to(device)


def _time_ms(fn, device, reps: int) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=10, rep=max(50, reps * 10)))
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _saved_bytes(module: nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward that are not the module's own parameters/buffers."""
    own = {t.data_ptr() for t in [*module.parameters(), *module.buffers()]}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in own:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(ids)
    return total


def build(provider: str, table: ByteTable, d: int, dtype, device) -> nn.Module:
    if provider == "nn_embedding":
        return nn.Embedding(table.vocab_size, d, device=device, dtype=dtype)
    impl = {"kron_torch": "torch", "kron_dense": "dense"}.get(provider, "triton")
    return KroneckerEmbedding(table, d, impl=impl, deterministic=provider == "kron_triton_det",
                              device=device, dtype=dtype)


def available(provider: str, device) -> bool:
    if provider.startswith("kron_triton"):
        return device.type == "cuda"
    return True


def bench_one(provider, table, ids, d, dtype_name, device, reps) -> list[Result]:
    dtype = DTYPES[dtype_name]
    module = build(provider, table, d, dtype, device)
    grad = torch.randn(ids.numel(), d, device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            module(ids)

    out = module(ids)

    def backward():
        module.weight.grad = None
        out.backward(grad, retain_graph=True)

    def full():
        module.weight.grad = None
        module(ids).backward(grad)

    saved = _saved_bytes(module, ids)
    peak = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        full()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    rows = []
    for mode, fn in (("forward", forward), ("backward", backward), ("full", full)):
        ms = _time_ms(fn, device, reps)
        rows.append(Result(provider, mode, ids.numel(), d, table.pos_dim, dtype_name, ms, saved, peak,
                           torch.cuda.get_device_name() if device.type == "cuda" else "cpu"))
    del module, out
    return rows


def run(grid: str = "cpu", providers=PROVIDERS, reps: int = 5, device=None, progress=print,
        max_dense_bytes: int = 4 << 30) -> list[Result]:
    from kronecker_scale.tokenizer.assets import tokenizer_path
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = GRIDS[grid]
    tok = tokenizer_path("tekken")
    results: list[Result] = []
    tables = {P: ByteTable.from_tokenizer(tok, pos_dim=P) for P in g["pos_dim"]}
    for N in g["tokens"]:
        ids = real_ids(tok, N, device)
        for P, table in tables.items():
            for d in g["d_model"]:
                for dt in g["dtype"]:
                    for prov in providers:
                        if not available(prov, device):
                            continue
                        if prov == "kron_dense" and device.type == "cpu" and dt == "bf16":
                            progress(f"  skip kron_dense {dt} on cpu: bf16 matmul has no fast CPU path here "
                                     f"(~100x slower than fp32), which would measure the CPU, not the method")
                            continue
                        if prov == "kron_dense" and N * 256 * P * 4 > max_dense_bytes:
                            progress(f"  skip kron_dense N={N} P={P}: the [N, D] codec alone is "
                                     f"{N * 256 * P * 4 / 2**30:.1f} GiB")
                            continue
                        rows = bench_one(prov, table, ids, d, dt, device, reps)
                        results += rows
                        progress(f"  N={N:6d} d={d:5d} P={P} {dt:4s} {prov:16s} " +
                                 " ".join(f"{r.mode}={r.ms:8.2f}ms" for r in rows) +
                                 f"  saved={rows[0].saved_bytes / 2**10:10.1f}KiB")
    base = {(r.mode, r.tokens, r.d_model, r.pos_dim, r.dtype): r.ms for r in results if r.provider == "nn_embedding"}
    for r in results:
        b = base.get((r.mode, r.tokens, r.d_model, r.pos_dim, r.dtype))
        if b:
            r.ratio_vs_nn_embedding = r.ms / b
    return results


def write_outputs(results: list[Result], out_dir: Path, command: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "bench_embedding.csv", "md": out_dir / "bench_embedding.md",
             "png": out_dir / "bench_embedding.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        w.writeheader()
        for r in results:
            w.writerow(asdict(r))
    dev = results[0].device
    lines = [f"# Embedding benchmark ({dev})\n", f"`{command}`  \ntorch {torch.__version__}; V = {VOCAB:,} "
             f"(Mistral Tekken ids on real English text); time = median ms; ratio = time / nn.Embedding's; "
             f"saved = bytes kept for backward beyond parameters and buffers.\n",
             "| N | d | P | dtype | provider | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd ratio | saved KiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_key: dict = {}
    for r in results:
        by_key.setdefault((r.tokens, r.d_model, r.pos_dim, r.dtype, r.provider), {})[r.mode] = r
    for (N, d, P, dt, prov), m in by_key.items():
        lines.append(f"| {N} | {d} | {P} | {dt} | {prov} | {m['forward'].ms:.3f} | {m['backward'].ms:.3f} | "
                     f"{m['full'].ms:.3f} | {m['full'].ratio_vs_nn_embedding:.2f}x | "
                     f"{m['full'].saved_bytes / 2**10:.1f} |")
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(by_key, paths["png"], dev)
    return paths


def _plot(by_key, out: Path, device: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = sorted({k[:4] for k in by_key})
    providers = [p for p in PROVIDERS if any(k[4] == p for k in by_key)]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(configs)), 4.5))
    width = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        ratios = [by_key.get((*c, prov), {}).get("full") for c in configs]
        ys = [r.ratio_vs_nn_embedding if r else float("nan") for r in ratios]
        ax.bar([x + i * width for x in range(len(configs))], ys, width, label=prov)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(configs))])
    ax.set_xticklabels([f"N={c[0]}\nd={c[1]} P={c[2]}\n{c[3]}" for c in configs], fontsize=7)
    ax.set_ylabel("forward+backward time / nn.Embedding's (log)")
    ax.set_title(f"Kronecker embedding vs nn.Embedding(V=131,072) on {device}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
