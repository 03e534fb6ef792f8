"""Norm drift of the input layer across a run's checkpoints (paper: "BPE embedding norm drifts during
training while Kronecker projection norm stays near 1.0").

Per checkpoint: the weight's mean row L2 norm and its std over all rows (the trainer logs the same two
numbers as projection_/table_row_norm and _std), and the RMS and mean row norm of the input embeddings
of the real ids (Kronecker: codec + projection materialised; BPE: the table's rows). Drift = value /
value at the first checkpoint. Reads single tensors: no model is built.
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
    from ..inference import read_config, read_tensors
    from ..embedding import ByteTable, kronecker_embed_torch
    from ..embedding.codec import scale_tables
    cfg = read_config(step_dir)
    w = read_tensors(step_dir, [KEY])[KEY].double()
    row = w.norm(dim=1)
    if cfg.model.input_layer == "kronecker":
        table = ByteTable.load(step_dir / "byte_table.safetensors")
        n = table.num_token_ids
        alpha, beta = scale_tables(table.pos_dim, length_normalize=cfg.model.length_normalize,
                                   z_normalize=cfg.model.z_normalize, eps=cfg.model.codec_eps)
        emb = kronecker_embed_torch(table.bytes[:n], table.lengths[:n], w, alpha, beta)
    else:
        from ..tokenizer import load_tokenizer
        from ..tokenizer.assets import tokenizer_path
        emb = w[: load_tokenizer(tokenizer_path(cfg.tokenizer.path)).vocab_size]
    state = torch.load(step_dir / "trainer_state.pt", weights_only=False)
    return {"step": int(state["step"]), "tokens": int(state["tokens"]), "checkpoint": str(step_dir),
            "input_layer": cfg.model.input_layer, "weight_row_norm": float(row.mean()), "weight_std": float(w.std()),
            "embedding_rms": float(emb.pow(2).mean().sqrt()), "embedding_row_norm": float(emb.norm(dim=1).mean())}


def run_norm_drift(runs: list) -> dict:
    results = {}
    for run in runs:
        rows = [weight_stats(p) for p in checkpoints_of(run)]
        first = rows[0]
        for r in rows:
            for key in ("weight_row_norm", "weight_std", "embedding_rms", "embedding_row_norm"):
                r[key + "_drift"] = r[key] / first[key] if first[key] else float("nan")
        results[Path(run).name] = rows
    return {"runs": list(results), "results": results}


def markdown(res: dict) -> str:
    cols = ["run", "step", "tokens", "weight row norm", "weight std", "embedding RMS", "embedding row norm",
            "RMS drift"]
    rows = [[run, r["step"], f"{r['tokens']:,}", f"{r['weight_row_norm']:.4f}", f"{r['weight_std']:.5f}",
             f"{r['embedding_rms']:.4f}", f"{r['embedding_row_norm']:.4f}", f"{r['embedding_rms_drift']:.3f}"]
            for run in res["runs"] for r in res["results"][run]]
    return "# Input-layer norm drift across checkpoints\n\n" + markdown_table(cols, rows)


def plot(res: dict):
    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for run in res["runs"]:
            rows = res["results"][run]
            steps = [r["step"] for r in rows]
            axes[0].plot(steps, [r["embedding_rms_drift"] for r in rows], marker="o", label=run)
            axes[1].plot(steps, [r["weight_row_norm_drift"] for r in rows], marker="o", label=run)
        for ax, title in zip(axes, ["input embedding RMS / first checkpoint", "weight row norm / first checkpoint"]):
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.legend()
        return fig
    return draw


def norm_drift_probe(runs, out_dir) -> dict:
    res = run_norm_drift(runs)
    res["paths"] = {k: str(v) for k, v in write_outputs(out_dir, "norm_drift", res, markdown(res), plot(res)).items()}
    return res
