"""Norm drift of the input layer across a run's checkpoints (paper: "BPE embedding norm drifts during
training while Kronecker projection norm stays near 1.0").

Per checkpoint: the weight's mean row L2 norm and its std over all rows (the trainer logs the same two
numbers as projection_/table_row_norm and _std), and the RMS and mean row norm of the input embeddings
of the real ids (Kronecker: codec + projection materialised; BPE: the table's rows). Drift = value /
value at the first checkpoint. Reads single tensors: no model is built.

The paper's own statistics ("Kronecker projection norm stays near 1.0"):
- Kronecker: `projection_unit_norm`, the mean over the d output units of the L2 norm of that unit's D
  weights (the column norms of W [D, d]), and `projection_unit_norm_std`, their std over the d units.
  At init, W ~ N(0, 1/D) gives every column a norm of about 1.0.
- BPE: `table_row_norm`, the mean L2 norm of the table's rows over the real ids (padded rows left out),
  and `table_row_norm_std`.
`paper_norm` / `paper_norm_std` hold whichever of the two the input layer has.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import KScaleError
from .report import markdown_table, write_outputs

KEY = "embedding.word_embeddings.weight"


def checkpoints_of(run: str | Path) -> list[Path]:
    run = Path(run)
    root = run / "checkpoints" if (run / "checkpoints").is_dir() else run
    steps = sorted(p for p in root.glob("step_*") if (p / "trainer_state.pt").is_file())
    if not steps:
        raise KScaleError("no complete checkpoints", where=str(root), fix="give a run folder with checkpoints/step_*")
    return steps


def weight_stats(step_dir: Path) -> dict:
    from ..embedding import ByteTable, kronecker_embed_torch
    from ..embedding.codec import scale_tables
    from ..inference import read_config, read_tensors

    cfg = read_config(step_dir)
    w = read_tensors(step_dir, [KEY])[KEY].double()
    row = w.norm(dim=1)
    if cfg.model.input_layer == "kronecker":
        table = ByteTable.load(step_dir / "byte_table.safetensors")
        n = table.num_token_ids
        alpha, beta = scale_tables(
            table.pos_dim,
            length_normalize=cfg.model.length_normalize,
            z_normalize=cfg.model.z_normalize,
            eps=cfg.model.codec_eps,
        )
        emb = kronecker_embed_torch(table.bytes[:n], table.lengths[:n], w, alpha, beta)
    else:
        from ..tokenizer import load_tokenizer
        from ..tokenizer.assets import tokenizer_path

        emb = w[: load_tokenizer(tokenizer_path(cfg.tokenizer.path)).vocab_size]
    state = torch.load(step_dir / "trainer_state.pt", weights_only=False)
    paper = paper_norms(w, cfg.model.input_layer, real_rows=emb.shape[0])
    return {
        "step": int(state["step"]),
        "tokens": int(state["tokens"]),
        "checkpoint": str(step_dir),
        "input_layer": cfg.model.input_layer,
        "weight_row_norm": float(row.mean()),
        "weight_std": float(w.std()),
        "embedding_rms": float(emb.pow(2).mean().sqrt()),
        "embedding_row_norm": float(emb.norm(dim=1).mean()),
        **paper,
    }


def paper_norms(w: torch.Tensor, input_layer: str, real_rows: int | None = None) -> dict:
    """The paper's norm statistics of an input-layer weight (module docstring): Kronecker W [D, d] ->
    column (unit) norms; BPE table [V, d] -> row norms of the first `real_rows` rows."""
    w = w.double()
    if input_layer == "kronecker":
        units = w.norm(dim=0)
        mean, std = float(units.mean()), float(units.std()) if units.numel() > 1 else 0.0
        return {
            "projection_unit_norm": mean,
            "projection_unit_norm_std": std,
            "table_row_norm": None,
            "table_row_norm_std": None,
            "paper_norm": mean,
            "paper_norm_std": std,
            "paper_norm_name": "projection_unit_norm",
        }
    rows = w[: real_rows or w.shape[0]].norm(dim=1)
    mean, std = float(rows.mean()), float(rows.std()) if rows.numel() > 1 else 0.0
    return {
        "projection_unit_norm": None,
        "projection_unit_norm_std": None,
        "table_row_norm": mean,
        "table_row_norm_std": std,
        "paper_norm": mean,
        "paper_norm_std": std,
        "paper_norm_name": "table_row_norm",
    }


def run_norm_drift(runs: list) -> dict:
    results = {}
    for run in runs:
        rows = [weight_stats(p) for p in checkpoints_of(run)]
        first = rows[0]
        for r in rows:
            for key in ("weight_row_norm", "weight_std", "embedding_rms", "embedding_row_norm", "paper_norm"):
                r[key + "_drift"] = r[key] / first[key] if first[key] else float("nan")
        results[Path(run).name] = rows
    return {"runs": list(results), "results": results}


def markdown(res: dict) -> str:
    cols = [
        "run",
        "step",
        "tokens",
        "paper's norm (± std)",
        "paper's norm drift",
        "weight row norm",
        "weight std",
        "embedding RMS",
        "embedding row norm",
        "RMS drift",
    ]
    rows = [
        [
            run,
            r["step"],
            f"{r['tokens']:,}",
            f"{r['paper_norm_name']} {r['paper_norm']:.4f} ± {r['paper_norm_std']:.4f}",
            f"{r['paper_norm_drift']:.3f}",
            f"{r['weight_row_norm']:.4f}",
            f"{r['weight_std']:.5f}",
            f"{r['embedding_rms']:.4f}",
            f"{r['embedding_row_norm']:.4f}",
            f"{r['embedding_rms_drift']:.3f}",
        ]
        for run in res["runs"]
        for r in res["results"][run]
    ]
    return (
        "# Input-layer norm drift across checkpoints\n\n"
        "paper's norm: Kronecker `projection_unit_norm` (mean L2 norm of W's d columns, 1.0 at init), "
        "BPE `table_row_norm` (mean L2 norm of the table's real rows)\n\n" + markdown_table(cols, rows)
    )


def plot(res: dict):
    def draw(plt):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4))
        for run in res["runs"]:
            rows = res["results"][run]
            steps = [r["step"] for r in rows]
            axes[0].plot(steps, [r["embedding_rms_drift"] for r in rows], marker="o", label=run)
            axes[1].plot(steps, [r["weight_row_norm_drift"] for r in rows], marker="o", label=run)
            axes[2].errorbar(
                steps,
                [r["paper_norm"] for r in rows],
                yerr=[r["paper_norm_std"] for r in rows],
                marker="o",
                capsize=3,
                label=f"{run} ({rows[0]['paper_norm_name']})",
            )
        axes[2].axhline(1.0, color="grey", lw=0.8, ls="--")
        for ax, title in zip(
            axes,
            [
                "input embedding RMS / first checkpoint",
                "weight row norm / first checkpoint",
                "paper's norm (Kronecker: W column norm; BPE: table row norm)",
            ],
        ):
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.legend()
        return fig

    return draw


def norm_drift_probe(runs, out_dir) -> dict:
    res = run_norm_drift(runs)
    res["paths"] = {k: str(v) for k, v in write_outputs(out_dir, "norm_drift", res, markdown(res), plot(res)).items()}
    return res
