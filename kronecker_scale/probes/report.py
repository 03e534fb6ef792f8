"""What every probe writes into its output folder: NAME.json, NAME.md (a markdown table) and NAME.png."""

from __future__ import annotations

import json
from pathlib import Path


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str | Path, name: str, data: dict, markdown: str, plot) -> dict[str, Path]:
    """Write NAME.json, NAME.md and NAME.png (plot(ax_factory) draws on a matplotlib figure it makes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["md"].write_text(markdown + f"\n![{name}]({paths['png'].name})\n")
    fig = plot(plt)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths


def labels_for(checkpoints) -> list[str]:
    """Short unique labels: run folder and step (`tiny-cpu@250`), numbered when they repeat."""

    def run_name(path: Path) -> str:
        return path.parent.parent.name if path.parent.name == "checkpoints" else path.parent.name

    raw = [f"{run_name(Path(ck.path))}@{ck.step}" for ck in checkpoints]
    return [f"{r}#{i + 1}" if raw.count(r) > 1 else r for i, r in enumerate(raw)]
