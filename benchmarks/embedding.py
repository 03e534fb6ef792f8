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

Traffic: every row carries the bytes its provider reads and writes per token in that mode, from the
bytes model below (`traffic`: shapes plus three statistics of the ids), and on a GPU the achieved
GB/s (those bytes / time) and their fraction of the device's peak memory bandwidth.
`python -m kronecker_scale.benchmarks.embedding` prints the model's table at the goal shape
(docs/benchmarks.md, "Bytes model").
"""

from __future__ import annotations

import csv
import math
import os
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
GRIDS: dict[str, dict[str, tuple]] = {
    # the grid, for a GPU
    "full": dict(tokens=(4096, 16384, 65536), d_model=(768, 2048, 4096), pos_dim=(16, 32), dtype=("bf16", "fp32")),
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
    bytes_per_token: float = float("nan")  # read + written per token in this mode (bytes model)
    gbps: float = float("nan")  # bytes_per_token * tokens / time (GPU only)
    frac_peak: float = float("nan")  # gbps / the device's peak bandwidth (GPU only)


# ------------------------------------------------------------------------------------------
# bytes model (docs/benchmarks.md, "Bytes model")
# ------------------------------------------------------------------------------------------
GOAL = dict(N=16_384, d=4_096, P=32, V=VOCAB, elem=2)  # docs/design.md §6's shape, bf16
BANDWIDTHS = {"H100 SXM (3.35 TB/s)": 3.35e12, "H200 (4.8 TB/s)": 4.8e12}
# peak memory bandwidth by device name (bytes/s), first match wins; else clock x bus width
PEAK_BY_NAME = (
    ("GH200", 4.0e12),
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
)


@dataclass(frozen=True)
class IdStats:
    """What the ids contribute to the traffic: mean bytes per token L (<= P), distinct ids U, distinct
    code rows touched R (<= D = 256 P). None in `traffic` means the bound (see there)."""

    mean_len: float
    distinct_ids: int
    touched_rows: int

    @classmethod
    def of(cls, table: ByteTable, ids: torch.Tensor) -> IdStats:
        ids = ids.reshape(-1).cpu()
        L = table.lengths[ids].long()
        P = table.pos_dim
        rows = (table.bytes[ids].long() * P + torch.arange(P))[torch.arange(P) < L[:, None]]
        return cls(float(L.double().mean()) if len(L) else 0.0, int(ids.unique().numel()), int(rows.unique().numel()))


def traffic(
    provider: str,
    N: int,
    d: int,
    P: int,
    V: int = VOCAB,
    elem: int = 2,
    stats: IdStats | None = None,
    main_grad: bool = False,
) -> dict[str, list[tuple[str, float]]]:
    """Bytes read + written by one forward and one backward: {"forward": [(term, bytes)], "backward": [...],
    "per_step": [...]} (per_step: colsum(W), once per optimizer step, not in forward/backward).

    Rules. Each torch op reads its inputs and writes its outputs once. A gather reads every row it gathers,
    except in the Triton kernels, whose grid runs the token blocks of one column block together: the
    D x BLOCK_D slice of W (forward) or of the fp32 accumulator (backward), 2-4 MiB, stays in L2, so W is
    read and the accumulator's touched rows are read and written about once. Per-token tables (ids,
    lengths, bytes) re-read per column block come from L2 too. nn.Embedding's gathers are counted once
    per distinct id. stats=None is the bound that favours nn.Embedding: L = P and R = min(D, N P) for the
    Kronecker paths, U = 0 for nn.Embedding (its distinct rows read forward and written backward dropped).
    """
    D, e, f, i = 256 * P, elem, 4, 8
    if stats is None:
        L, U, R = float(P), 0, min(D, N * P)
    else:
        L, U, R = stats.mean_len, stats.distinct_ids, stats.touched_rows
    tok = N * (i + 2)  # int64 ids, int16 lengths through the id
    half = e != f
    fwd: list[tuple[str, float]] = []
    bwd: list[tuple[str, float]] = []
    step: list[tuple[str, float]] = []
    if provider == "nn_embedding":
        fwd += [("ids", N * i), ("gather distinct rows U*d", U * d * e), ("write out N*d", N * d * e)]
        bwd += [
            ("ids", N * i),
            ("read g N*d", N * d * e),
            ("write the dense gradient V*d", V * d * e),
            ("fp32 partial sums of U rows, written and read", 2 * U * d * f),
            ("write U rows", U * d * e),
        ]
    elif provider in ("kron_triton", "kron_triton_det"):
        fwd += [
            ("ids, lengths", tok),
            ("bytes (<= P per token)", N * L),
            ("W once (L2-resident column slice)", D * d * e),
            ("cached colsum", d * f),
            ("write out N*d", N * d * e),
        ]
        step += [("colsum(W): read W, write S", D * d * e + d * f)]
        if provider == "kron_triton":
            bwd += [("ids, lengths, bytes", tok + N * L), ("read g N*d", N * d * e), ("b: d-vector atomics", 2 * d * f)]
            if main_grad:
                bwd += [
                    ("scatter: read + write touched main_grad rows R*d fp32", 2 * R * d * f),
                    ("broadcast b: read + write main_grad D*d fp32", 2 * D * d * f),
                ]
            else:
                bwd += [
                    ("zero the fp32 accumulator D*d", D * d * f),
                    ("scatter: read + write touched rows R*d fp32", 2 * R * d * f),
                    ("finalize: read accumulator D*d fp32", D * d * f),
                    ("finalize: write dW D*d", D * d * e),
                ]
        else:
            pairs = N * P
            bwd += [
                ("pair keys: ids, lengths, bytes; write int32 keys N*P, alpha N", tok + N * P + pairs * 4 + N * f),
                (
                    "stable sort of N*P int32 keys with int64 order (4 radix passes)",
                    pairs * (4 + 12) + 4 * 2 * pairs * 12,
                ),
                ("searchsorted: row starts", (D + 1) * i),
                ("b: read g N*d (fixed chunks)", N * d * e),
                ("rows: read order of N*L pairs", N * L * i),
                ("rows: read g N*d (L2-resident column slice)", N * d * e),
                (
                    "rows: write dW D*d" if not main_grad else "rows: read + write main_grad D*d fp32",
                    D * d * e if not main_grad else 2 * D * d * f,
                ),
            ]
    elif provider == "kron_torch":
        c = f  # the closed form computes in fp32 for half types
        ids_rows = 2 * N * P + 28 * N  # byte rows and lengths of the ids, lengths to int64
        fwd += [
            ("byte rows and lengths of the ids", ids_rows),
            (
                "index bookkeeping: mask, codec index, masked select, offsets, per-sample weights",
                51 * N * P + 12 * N * L + 76 * N,
            ),
            ("W.to(fp32)", D * d * (e + c) if half else 0),
            ("embedding_bag: gather N*L rows of fp32 W", N * L * d * c),
            ("embedding_bag: indices, weights, offset2bag; write out N*d fp32", N * L * 20 + 3 * N * i + N * d * c),
            ("colsum(W) in fp32", D * d * c + d * c),
            ("beta*S: write N*d", N * d * c),
            ("add: read 2 N*d, write N*d", 3 * N * d * c),
            ("cast out to the weight dtype", N * d * (c + e) if half else 0),
        ]
        bwd += [
            ("cast g to fp32", N * d * (e + c) if half else 0),
            ("grad of S: g*beta written, read and summed", 3 * N * d * c),
            ("embedding_bag backward: zero D*d fp32", D * d * c),
            ("embedding_bag backward: sort N*L indices (8 radix passes)", N * L * 8 * 2 * 2 * i),
            ("embedding_bag backward: gather g for N*L pairs", N * L * d * c),
            ("embedding_bag backward: partial sums, write R rows", 3 * R * d * c),
            ("sum the two gradients of W: read 2 D*d, write D*d", 3 * D * d * c),
            ("cast dW to the weight dtype", D * d * (c + e) if half else 0),
        ]
    elif provider == "kron_dense":
        c = f
        x = N * D * c  # the [N, D] code, fp32
        fwd += [
            ("byte rows and lengths of the ids", 2 * N * P + 28 * N),
            ("codec index and cell values", 51 * N * P),
            ("zero the [N, D] code", x),
            ("scatter_add the cells", 20 * N * P),
            ("z-normalise: mean (1 pass), x - mean and std (3), x - mean (2), divide (2)", 8 * x),
            ("code to the weight dtype", N * D * (c + e) if half else 0),
            ("matmul: read the code and W, write out N*d", N * D * e + D * d * e + N * d * e),
        ]
        bwd += [("dW = code^T g: read the code and g, write dW", N * D * e + N * d * e + D * d * e)]
    else:
        raise ValueError(f"no bytes model for provider {provider!r}")
    return {"forward": fwd, "backward": bwd, "per_step": step}


def bytes_per_token(
    provider: str,
    mode: str,
    N: int,
    d: int,
    P: int,
    V: int = VOCAB,
    elem: int = 2,
    stats: IdStats | None = None,
    main_grad: bool = False,
) -> float:
    """forward / backward / full (both) bytes per token; colsum(W) excluded (once per optimizer step)."""
    t = traffic(provider, N, d, P, V, elem, stats, main_grad)
    parts = {"forward": ["forward"], "backward": ["backward"], "full": ["forward", "backward"]}[mode]
    return sum(b for part in parts for _, b in t[part]) / N


def peak_bandwidth(device) -> float | None:
    """Peak memory bandwidth of a CUDA device in bytes/s (KSCALE_PEAK_GBPS overrides); None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if os.environ.get("KSCALE_PEAK_GBPS"):
        return float(os.environ["KSCALE_PEAK_GBPS"]) * 1e9
    name = torch.cuda.get_device_name(device)
    for key, bw in PEAK_BY_NAME:
        if key in name:
            return bw
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def goal_table(stats: IdStats | None = None, shape: dict = GOAL) -> str:
    """Markdown: bytes per token (forward, backward, both; then both plus colsum(W) at one micro-batch per
    optimizer step) of every provider at `shape`, and the GPU time each bandwidth in BANDWIDTHS predicts
    for forward + backward + colsum."""
    N = shape["N"]
    head = (
        [
            "provider",
            "fwd B/token",
            "bwd B/token",
            "fwd+bwd B/token",
            "+ colsum, 1 micro-batch/step",
            "bytes per micro-batch",
        ]
        + [f"predicted ms at {k}" for k in BANDWIDTHS]
        + ["vs nn_embedding"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = (
        [(p, False) for p in ("nn_embedding", "kron_triton")]
        + [("kron_triton", True)]
        + [(p, False) for p in ("kron_triton_det", "kron_torch", "kron_dense")]
    )
    base = bytes_per_token("nn_embedding", "full", stats=stats, **shape)
    for prov, mg in rows:
        f, b = (bytes_per_token(prov, m, stats=stats, main_grad=mg, **shape) for m in ("forward", "backward"))
        step = sum(x for _, x in traffic(prov, stats=stats, main_grad=mg, **shape)["per_step"]) / N
        total = (f + b + step) * N
        name = prov + (" (into fp32 main_grad)" if mg else "")
        lines.append(
            f"| {name} | {f:,.0f} | {b:,.0f} | {f + b:,.0f} | {f + b + step:,.0f} | {total / 1e9:.3f} GB | "
            + " | ".join(f"{total / bw * 1e3:.3f}" for bw in BANDWIDTHS.values())
            + f" | {(f + b + step) / base:.2f}x |"
        )
    return "\n".join(lines)


def goal_stats() -> IdStats:
    """The ids' statistics the benchmark's real ids have at the goal shape (Tekken, English, N = 16,384, P = 32)."""
    from kronecker_scale.tokenizer.assets import tokenizer_path

    tok = tokenizer_path("tekken")
    return IdStats.of(ByteTable.from_tokenizer(tok, pos_dim=GOAL["P"]), real_ids(tok, GOAL["N"], torch.device("cpu")))


def real_ids(tokenizer_path: Path, n: int, device) -> torch.Tensor:
    """n ids of real English text (CPython's LICENSE, tiled) under a 131K-vocabulary tokenizer."""
    from kronecker_scale.tokenizer import load_tokenizer

    text = (
        Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"
    ).read_text(encoding="utf-8")
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
    return KroneckerEmbedding(
        table, d, impl=impl, deterministic=provider == "kron_triton_det", device=device, dtype=dtype
    )


def available(provider: str, device) -> bool:
    if provider.startswith("kron_triton"):
        return device.type == "cuda"
    return True


def bench_one(provider, table, ids, d, dtype_name, device, reps, stats: IdStats | None = None) -> list[Result]:
    dtype = DTYPES[dtype_name]
    stats = stats or IdStats.of(table, ids)
    peak_bw = peak_bandwidth(device)
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
        bpt = bytes_per_token(provider, mode, ids.numel(), d, table.pos_dim, table.vocab_size, dtype.itemsize, stats)
        gbps = bpt * ids.numel() / (ms * 1e-3) / 1e9 if device.type == "cuda" else float("nan")
        frac = gbps * 1e9 / peak_bw if peak_bw else float("nan")
        rows.append(
            Result(
                provider,
                mode,
                ids.numel(),
                d,
                table.pos_dim,
                dtype_name,
                ms,
                saved,
                peak,
                torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                bytes_per_token=bpt,
                gbps=gbps,
                frac_peak=frac,
            )
        )
    return rows


def run(
    grid: str = "cpu", providers=PROVIDERS, reps: int = 5, device=None, progress=print, max_dense_bytes: int = 4 << 30
) -> list[Result]:
    from kronecker_scale.tokenizer.assets import tokenizer_path

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = GRIDS[grid]
    tok = tokenizer_path("tekken")
    results: list[Result] = []
    tables = {P: ByteTable.from_tokenizer(tok, pos_dim=P) for P in g["pos_dim"]}
    for N in g["tokens"]:
        ids = real_ids(tok, N, device)
        for P, table in tables.items():
            stats = IdStats.of(table, ids)
            for d in g["d_model"]:
                for dt in g["dtype"]:
                    for prov in providers:
                        if not available(prov, device):
                            continue
                        if prov == "kron_dense" and device.type == "cpu" and dt == "bf16":
                            progress(
                                f"  skip kron_dense {dt} on cpu: bf16 matmul has no fast CPU path here "
                                f"(~100x slower than fp32), which would measure the CPU, not the method"
                            )
                            continue
                        if prov == "kron_dense" and N * 256 * P * 4 > max_dense_bytes:
                            progress(
                                f"  skip kron_dense N={N} P={P}: the [N, D] codec alone is "
                                f"{N * 256 * P * 4 / 2**30:.1f} GiB"
                            )
                            continue
                        rows = bench_one(prov, table, ids, d, dt, device, reps, stats)
                        results += rows
                        full = rows[-1]
                        progress(
                            f"  N={N:6d} d={d:5d} P={P} {dt:4s} {prov:16s} "
                            + " ".join(f"{r.mode}={r.ms:8.2f}ms" for r in rows)
                            + f"  saved={rows[0].saved_bytes / 2**10:10.1f}KiB  fwd+bwd "
                            f"{full.bytes_per_token:,.0f} B/token"
                            + (
                                f" {full.gbps:,.0f} GB/s ({full.frac_peak:.0%} of peak)"
                                if math.isfinite(full.gbps)
                                else ""
                            )
                        )
    base = {(r.mode, r.tokens, r.d_model, r.pos_dim, r.dtype): r.ms for r in results if r.provider == "nn_embedding"}
    for r in results:
        b = base.get((r.mode, r.tokens, r.d_model, r.pos_dim, r.dtype))
        if b:
            r.ratio_vs_nn_embedding = r.ms / b
    return results


def write_outputs(results: list[Result], out_dir: Path, command: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "bench_embedding.csv",
        "md": out_dir / "bench_embedding.md",
        "png": out_dir / "bench_embedding.png",
    }
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        w.writeheader()
        for r in results:
            w.writerow(asdict(r))
    dev = results[0].device
    lines = [
        f"# Embedding benchmark ({dev})\n",
        f"`{command}`  \ntorch {torch.__version__}; V = {VOCAB:,} "
        f"(Mistral Tekken ids on real English text); time = median ms; ratio = time / nn.Embedding's; "
        f"saved = bytes kept for backward beyond parameters and buffers; B/token = bytes read + written per "
        f"token by forward + backward (bytes model, docs/benchmarks.md); GB/s and % of peak on a GPU only.\n",
        "| N | d | P | dtype | provider | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd ratio | saved KiB "
        "| fwd+bwd B/token | GB/s | % of peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key: dict = {}
    for r in results:
        by_key.setdefault((r.tokens, r.d_model, r.pos_dim, r.dtype, r.provider), {})[r.mode] = r
    for (N, d, P, dt, prov), m in by_key.items():
        lines.append(
            f"| {N} | {d} | {P} | {dt} | {prov} | {m['forward'].ms:.3f} | {m['backward'].ms:.3f} | "
            f"{m['full'].ms:.3f} | {m['full'].ratio_vs_nn_embedding:.2f}x | "
            f"{m['full'].saved_bytes / 2**10:.1f} | {m['full'].bytes_per_token:,.0f} | "
            f"{_num(m['full'].gbps, '{:,.0f}')} | {_num(m['full'].frac_peak * 100, '{:.0f}%')} |"
        )
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(by_key, paths["png"], dev)
    return paths


def _num(x: float, fmt: str) -> str:
    return fmt.format(x) if math.isfinite(x) else "-"


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


if __name__ == "__main__":  # python -m kronecker_scale.benchmarks.embedding: the goal-shape table
    print(f"Bytes model at N = {GOAL['N']:,}, d = {GOAL['d']:,}, P = {GOAL['P']}, V = {GOAL['V']:,}, bf16\n")
    print("Bound (Kronecker: L = P, every row touched; nn.Embedding: no distinct-row terms):\n")
    print(goal_table())
    st = goal_stats()
    print(
        f"\nThe benchmark's ids (Tekken, English): L = {st.mean_len:.2f}, U = {st.distinct_ids:,}, "
        f"R = {st.touched_rows:,}:\n"
    )
    print(goal_table(st))
