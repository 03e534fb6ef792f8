"""Byte-table reports: coverage and collisions per tokenizer, exact vs decode, as rows and a plot."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .byte_table import ByteTable


@dataclass(frozen=True)
class ByteTableRow:
    tokenizer: str
    format: str
    vocab_size: int
    pos_dim: int
    byte_source: str
    fits: float
    coverage: float
    truncated: int
    empty: int
    colliding_ids: int
    mean_length: float
    seconds: float
    fingerprint: str


def byte_table_rows(
    tokenizers: dict[str, Path], pos_dims=(16, 32), byte_sources=("exact", "decode"), progress=None
) -> tuple[list[ByteTableRow], dict[tuple[str, int], ByteTable]]:
    """One row per (tokenizer, pos_dim, byte_source); also the exact tables, for plotting."""
    from ..tokenizer import load_tokenizer

    rows, tables = [], {}
    for name, path in tokenizers.items():
        tok = load_tokenizer(path)
        for P in pos_dims:
            for src in byte_sources:
                t0 = time.perf_counter()
                table = ByteTable.from_token_bytes(
                    tok.token_bytes(src), P, byte_source=src, tokenizer_fingerprint=tok.fingerprint, source=str(path)
                )
                s = table.stats()
                n = max(s.vocab_size - s.empty, 1)
                mean_len = sum(k * v for k, v in s.length_histogram.items()) / n
                rows.append(
                    ByteTableRow(
                        name,
                        tok.format,
                        s.vocab_size,
                        P,
                        src,
                        s.fits,
                        s.coverage,
                        s.truncated,
                        s.empty,
                        s.colliding_ids,
                        mean_len,
                        time.perf_counter() - t0,
                        table.fingerprint[:12],
                    )
                )
                if src == "exact":
                    tables[(name, P)] = table
                if progress:
                    progress(rows[-1])
    return rows, tables


def plot_length_histograms(tables: dict[tuple[str, int], ByteTable], out: Path) -> Path:
    """Token byte-length distributions (exact bytes, largest pos_dim) of each tokenizer, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    largest: dict[str, tuple[int, ByteTable]] = {}
    for (name, P), t in tables.items():
        if P >= largest.get(name, (0, None))[0]:
            largest[name] = (P, t)
    fig, (ax, tail) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, (_, t) in largest.items():
        n = t.num_token_ids
        full = t.full_lengths if t.full_lengths is not None else t.lengths[:n].numpy()
        counts = np.bincount(np.clip(full, 0, 40), minlength=41)[1:] / n
        ax.plot(np.arange(1, 41), counts * 100, marker=".", label=f"{name} (V={n:,})")
        xs = np.arange(1, 65)
        cut = np.array([(full > x).mean() for x in xs]) * 100
        tail.semilogy(xs, np.where(cut > 0, cut, np.nan), label=name)
    for P in sorted({P for _, P in tables}):
        for a in (ax, tail):
            a.axvline(P, color="grey", ls="--", lw=0.8)
        tail.text(P + 0.5, 50, f"pos_dim={P}", fontsize=8, color="grey")
    ax.set_xlabel("token length in bytes (exact bytes; 40 = 40 or more)")
    ax.set_ylabel("share of ids (%)")
    ax.set_title("Token byte lengths of real vocabularies")
    ax.legend()
    tail.set_xlabel("pos_dim P")
    tail.set_ylabel("ids cut at P: share with more than P bytes (%)")
    tail.set_title("What a pos_dim truncates")
    tail.legend()
    for a in (ax, tail):
        a.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
