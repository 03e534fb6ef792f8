"""Compare runs: validation (and training) loss by step as a table, a markdown file and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import KScaleError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise KScaleError("no metrics.jsonl: not a run directory (or it has not logged yet)", where=str(run_dir))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_label(run_dir: Path) -> str:
    cfg = Path(run_dir) / "config.yaml"
    if cfg.is_file():
        from omegaconf import OmegaConf

        c = OmegaConf.load(cfg)
        return f"{run_dir.name} ({c.model.input_layer}, head {c.model.head})"
    return run_dir.name


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Validation loss of each run at each evaluated step; writes compare.md and compare.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(r): read_metrics(r) for r in run_dirs}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5))
    table: dict[int, dict[str, float]] = {}
    finals = {}
    for run, records in runs.items():
        label = run_label(run)
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
        if val:
            ax_val.plot(*zip(*val), marker="o", label=label)
            for step, v in val:
                table.setdefault(step, {})[label] = v
            finals[label] = val[-1][1]
        if train:
            ax_train.plot(*zip(*train), alpha=0.8, label=label)
    for ax, title in ((ax_val, "validation loss (held-out genre)"), (ax_train, "training loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=120)
    plt.close(fig)
    labels = [run_label(r) for r in runs]
    lines = ["| step | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for step in sorted(table):
        lines.append(
            f"| {step} | "
            + " | ".join(f"{table[step][lab]:.4f}" if lab in table[step] else "" for lab in labels)
            + " |"
        )
    (out / "compare.md").write_text("# Validation loss by step\n\n" + "\n".join(lines) + "\n\n![loss](compare.png)\n")
    return {"labels": labels, "table": table, "final": finals, "png": out / "compare.png", "md": out / "compare.md"}
