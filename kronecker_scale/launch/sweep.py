"""Sweeps: a grid and/or a list of overrides over one base config, submitted as one Slurm job array
(or run one after another locally), and a summary table of the final metrics.

A sweep file (YAML):

    name: arms                      # folder: runs/sweeps/<name> unless --sweep-dir
    grid:                           # cartesian product
      model.input_layer: [kronecker, bpe]
      optim.lr: [3e-4, 6e-4]
    runs:                           # and/or explicit override sets (each combined with the grid)
      - {tokenizer.path: gpt2}
      - {tokenizer.path: llama3, model.pos_dim: 16}

Every element gets its own run directory `<sweep dir>/<index>-<slug>` (checkpoints, metrics) and the
sweep directory keeps `sweep.json` (elements, job ids) and, once runs finish, `summary.{md,csv,json}`.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import re
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import KScaleError


def read_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise KScaleError("sweep file not found", where=str(path), fix="give a YAML file with grid: and/or runs:")
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:
        raise KScaleError(f"malformed sweep YAML ({e})", where=str(path)) from None
    if not isinstance(spec, dict) or not (spec.get("grid") or spec.get("runs")):
        raise KScaleError("a sweep needs a non-empty `grid:` mapping or `runs:` list", where=str(path))
    spec.setdefault("name", path.stem)
    return spec


def grid_from_args(items: list[str]) -> dict:
    """`--grid key=a,b` (repeatable) as a grid mapping."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise KScaleError(
                f"--grid {item!r} is not key=v1,v2,...",
                where="command line",
                fix="e.g. --grid model.input_layer=kronecker,bpe",
            )
        grid[key] = [OmegaConf.from_dotlist([f"v={v}"]).v for v in values.split(",")]
    return grid


def expand(spec: dict) -> list[dict[str, object]]:
    """The sweep's elements: each explicit run combined with every point of the grid."""
    grid = spec.get("grid") or {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise KScaleError(f"grid values of {key} must be a non-empty list", where=f"sweep grid: {key}")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    runs = spec.get("runs") or [{}]
    if not all(isinstance(r, dict) for r in runs):
        raise KScaleError("each entry of `runs:` must be a mapping of key: value", where="sweep runs")
    elements = [{**r, **p} for r in runs for p in points]
    for e in elements:
        bad = [k for k in e if "." not in k and k != "name"]
        if bad:
            raise KScaleError(
                f"sweep keys {bad} are not config keys",
                where="sweep",
                fix="write full dotted keys (model.d_model); `name` labels an element",
            )
    launcher_keys = sorted({k for e in elements for k in e if k.startswith("launcher.")})
    if launcher_keys:
        raise KScaleError(
            f"sweep elements set {launcher_keys}",
            where="sweep",
            fix="one job array shares one set of resources: set launcher.* on the command line",
        )
    return elements


def slug(overrides: dict) -> str:
    if "name" in overrides:
        return re.sub(r"[^A-Za-z0-9=._-]+", "_", str(overrides["name"]))[:80]
    parts = []
    for key, value in overrides.items():
        if isinstance(value, (list, dict)):
            continue
        v = Path(str(value)).stem if "/" in str(value) else str(value)
        parts.append(f"{key.split('.')[-1]}={v}")
    s = re.sub(r"[^A-Za-z0-9=._-]+", "_", ",".join(parts))[:80]
    return s or "base"


def dotlist(overrides: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in overrides.items() if k != "name"]


# --- summary --------------------------------------------------------------------------------------
SUMMARY_COLUMNS = ["run", "overrides", "status", "step", "loss", "val_loss", "tokens_per_s", "memory_gb", "params"]


@functools.cache
def vocab_size(tokenizer: str) -> int:
    """The real vocabulary size of a tokenizer path or built-in name, read once per process (a sweep's
    runs share a few tokenizers, and loading a 100K-262K vocabulary takes seconds)."""
    from ..tokenizer import load_tokenizer
    from ..tokenizer.assets import tokenizer_path

    return load_tokenizer(tokenizer_path(tokenizer)).vocab_size


def _params(run_dir: Path) -> int | None:
    from ..model.accounting import GPTShape, model_params

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return None
    cfg = OmegaConf.load(cfg_path)
    m = cfg.model
    try:
        vocab = vocab_size(cfg.tokenizer.path)
    except KScaleError:
        return None
    shape = GPTShape(
        vocab_size=vocab,
        d_model=m.d_model,
        n_layers=m.n_layers,
        seq_len=m.seq_len,
        ffn_hidden=m.ffn_hidden,
        position=m.position,
        norm=m.norm,
        activation=m.activation,
        bias=m.bias,
        n_heads=m.n_heads,
    )
    arm = {
        ("kronecker", "untied"): "kronecker",
        ("kronecker", "kronecker_tied"): "kronecker_tied",
        ("bpe", "untied"): "bpe_untied",
        ("bpe", "tied"): "bpe_tied",
    }[(m.input_layer, m.head)]
    return model_params(shape, arm, m.pos_dim)["total"]


def run_summary(run_dir: Path) -> dict:
    metrics_path = run_dir / "metrics.jsonl"
    records = (
        [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.is_file() else []
    )
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    target = (
        OmegaConf.load(run_dir / "config.yaml").schedule.train_steps if (run_dir / "config.yaml").is_file() else None
    )
    step = train[-1]["step"] if train else 0
    rates = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]  # step 1 compiles
    return {
        "run": run_dir.name,
        "status": "done" if target and step >= target else ("running" if train else "pending"),
        "step": step,
        "loss": train[-1]["loss"] if train else math.nan,
        "val_loss": val[-1]["val_loss"] if val else math.nan,
        "tokens_per_s": statistics.median(rates) if rates else math.nan,
        "memory_gb": max((r.get("memory_gb", 0) for r in train), default=math.nan),
        "params": _params(run_dir),
    }


def summarize(sweep_dir: str | Path) -> list[dict]:
    """Final metrics of every element; writes summary.md, summary.csv and summary.json."""
    sweep_dir = Path(sweep_dir)
    meta_path = sweep_dir / "sweep.json"
    if not meta_path.is_file():
        raise KScaleError(
            "no sweep.json: not a sweep directory",
            where=str(sweep_dir),
            fix="give the folder `kscale launch --sweep` printed",
        )
    meta = json.loads(meta_path.read_text())
    rows = []
    for e in meta["elements"]:
        row = run_summary(Path(e["run_dir"]))
        row["overrides"] = " ".join(e["overrides"])
        rows.append(row)
    (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (sweep_dir / "summary.md").write_text(f"# Sweep {meta['name']}\n\n" + markdown_table(SUMMARY_COLUMNS, rows))
    return rows


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def format_cell(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else (f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}")
    if isinstance(v, int) and v > 9999:
        return f"{v:,}"
    return "-" if v is None else str(v)
