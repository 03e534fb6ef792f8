"""Benchmark: data preparation throughput (tokens/s, and per tokenizer process) on real text."""

from __future__ import annotations

import tempfile
from pathlib import Path


def run(inputs: list, tokenizer: str = "gpt2", seq_len: int = 1024, workers=(1, 2), progress=print) -> list[dict]:
    from kronecker_scale.data.prepare import prepare_data
    from kronecker_scale.tokenizer.assets import tokenizer_path

    rows = []
    for n in workers:
        with tempfile.TemporaryDirectory() as tmp:
            m = prepare_data(tokenizer_path(tokenizer), inputs, Path(tmp) / "out", seq_len, workers=n)
        tokens = sum(sp["tokens"] for sp in m["splits"].values())
        rows.append(
            {
                "tokenizer": tokenizer,
                "workers": n,
                "bytes": m["bytes_read"],
                "tokens": tokens,
                "seconds": m["seconds"],
                "tokens_per_s": tokens / m["seconds"],
                "tokens_per_s_per_worker": tokens / m["seconds"] / n,
            }
        )
        progress(
            f"  {tokenizer} workers={n}: {tokens:,} tokens in {m['seconds']:.1f} s = "
            f"{rows[-1]['tokens_per_s']:,.0f} tokens/s ({rows[-1]['tokens_per_s_per_worker']:,.0f} per worker)"
        )
    return rows
