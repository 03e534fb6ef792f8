#!/usr/bin/env python
"""Two GPU checks of scripts/gpu-acceptance.sh, each printing a markdown section (and writing JSON):

    python tools/gpu_bench_point.py bench [--tokens 16384 65536] [--d-model 4096] [--pos-dim 32]
        forward+backward of KroneckerEmbedding(impl="triton") (fast and deterministic backward) against
        nn.Embedding(131,072, d), bf16, real ids (Mistral Tekken on English text), timed with CUDA events
        (median of --reps after --warmup); achieved GB/s = 2·N·d·2 bytes (the [N, d] bf16 output written
        forward plus its gradient read backward: traffic no embedding avoids) / fwd+bwd time.
    python tools/gpu_bench_point.py large-probe [--tokens 266240] [--d-model 8192]
        the triton forward where N·d > 2^31 (element offsets past int32), compared on a few rows, those past
        the 2^31 boundary included, against the torch closed form in fp64.

Off CUDA both run on the CPU for a smoke test (the triton impl then needs TRITON_INTERPRET=1 and tiny sizes).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kronecker_scale.embedding import ByteTable, KroneckerEmbedding  # noqa: E402

VOCAB = 131_072


def byte_table(pos_dim: int, tokenizer: str) -> tuple[ByteTable, object]:
    from kronecker_scale.tokenizer import load_tokenizer
    from kronecker_scale.tokenizer.assets import tokenizer_path

    path = tokenizer_path(tokenizer)
    return ByteTable.from_tokenizer(path, pos_dim=pos_dim), load_tokenizer(path)


def real_ids(tok, n: int, vocab: int, device) -> torch.Tensor:
    """n ids of real English text (CPython's LICENSE, tiled); uniform random ids if that file is missing."""
    lic = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"
    if lic.exists():
        ids = torch.tensor(tok.encode(lic.read_text(encoding="utf-8")))
        ids = ids[ids < vocab]
        return ids.repeat(-(-n // len(ids)))[:n].to(device)
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)).to(device)


def time_ms(fn, device, warmup: int, reps: int) -> float:
    """Median wall time of fn in ms: CUDA events on a GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(args, device) -> tuple[list[str], dict]:
    dtype = torch.bfloat16
    table, tok = byte_table(args.pos_dim, args.tokenizer)
    providers = {
        "nn.Embedding": lambda: nn.Embedding(table.vocab_size, args.d_model, device=device, dtype=dtype),
        "kron_triton": lambda: KroneckerEmbedding(
            table, args.d_model, impl=args.impl, deterministic=False, device=device, dtype=dtype
        ),
        "kron_triton_det": lambda: KroneckerEmbedding(
            table, args.d_model, impl=args.impl, deterministic=True, device=device, dtype=dtype
        ),
    }
    rows, lines = (
        [],
        [
            f"V = {table.vocab_size:,}, d = {args.d_model:,}, P = {args.pos_dim}, bf16, ids: {args.tokenizer} on English "
            f"text; forward+backward, median of {args.reps} (CUDA events); GB/s = 2·N·d·2 bytes / time.",
            "",
            "| N | provider | fwd+bwd ms | x nn.Embedding | GB/s | peak MiB |",
            "|---|---|---|---|---|---|",
        ],
    )
    for n in args.tokens:
        ids = real_ids(tok, n, table.vocab_size, device)
        grad = torch.randn(n, args.d_model, device=device, dtype=dtype)
        base = None
        for name, make in providers.items():
            module = make()

            def step(module=module, ids=ids, grad=grad):
                module.weight.grad = None
                module(ids).backward(grad)

            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            ms = time_ms(step, device, args.warmup, args.reps)
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if device.type == "cuda" else float("nan")
            base = ms if name == "nn.Embedding" else base
            gbs = 2 * n * args.d_model * 2 / (ms * 1e-3) / 1e9
            rows.append(dict(tokens=n, provider=name, ms=ms, ratio=ms / base, gb_s=gbs, peak_mib=peak))
            lines.append(f"| {n:,} | {name} | {ms:.3f} | {ms / base:.2f} | {gbs:,.1f} | {peak:,.0f} |")
            module = step = None  # free this provider's memory before the next one's
    worst = max((r["ratio"] for r in rows if r["provider"] == "kron_triton"), default=float("nan"))
    lines += ["", f"kron_triton fwd+bwd at most {worst:.2f}x nn.Embedding (target: <= 1.1x)."]
    return lines, {"rows": rows, "worst_ratio_kron_triton": worst}


def large_probe(args, device) -> tuple[list[str], dict]:
    torch.manual_seed(0)
    dtype = torch.bfloat16
    table, tok = byte_table(args.pos_dim, args.tokenizer)
    n, d = args.tokens, args.d_model
    emb = KroneckerEmbedding(table, d, impl=args.impl, device=device, dtype=dtype)
    ids = real_ids(tok, n, table.vocab_size, device)
    with torch.no_grad():
        out = emb(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        boundary = (2**31) // d  # first row whose element offsets pass 2^31
        picks = sorted({0, 1, n // 2, boundary - 1, boundary, boundary + 1, n - 2, n - 1} & set(range(n)))
        ref_mod = copy.deepcopy(emb).double()
        ref_mod.impl = "torch"
        rows = torch.tensor(picks, device=device)
        ref = ref_mod(ids[rows])
        got = out[rows].double()
        err = (got - ref).abs().max().item()
        scale = ref.abs().max().item()
    tol = 2**-7 * scale
    ok = bool(err <= tol) and bool(torch.isfinite(got).all())
    lines = [
        f"N = {n:,}, d = {d:,}: N·d = {n * d:,} ({'>' if n * d > 2**31 else '<='} 2^31 = {2**31:,}); "
        f"triton forward, bf16, rows {picks} against the torch closed form in fp64: max |error| {err:.3g} "
        f"(tolerance {tol:.3g}) -> **{'PASS' if ok else 'FAIL'}**"
    ]
    return lines, {"tokens": n, "d_model": d, "rows": picks, "max_abs_err": err, "tol": tol, "pass": ok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["bench", "large-probe"])
    ap.add_argument("--tokens", type=int, nargs="+")
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--pos-dim", type=int, default=32)
    ap.add_argument("--tokenizer", default="tekken")
    ap.add_argument("--impl", default="triton", help="KroneckerEmbedding impl (triton; torch for a CPU smoke test)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.what == "bench":
        args.tokens, args.d_model = args.tokens or [16_384, 65_536], args.d_model or 4096
        lines, data = bench(args, device)
        ok = True
    else:
        args.tokens, args.d_model = (args.tokens or [266_240])[0], args.d_model or 8192
        lines, data = large_probe(args, device)
        ok = data["pass"]
    data["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
