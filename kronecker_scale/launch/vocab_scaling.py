"""The vocabulary-scaling experiment: for each vocabulary (nested cuts of a tiktoken file, and byte-level
BPEs trained on the corpus), prepare the data, train every arm on the same token budget (one job array
on Slurm, or one run after another locally), then report loss, tokens/s, memory and parameters against
V as a table and a plot.

A spec (YAML; paths relative to it):

    name: vocab-scaling
    train_config: ../paper-124m/kronecker.yaml        # base training config
    corpus: {train: ../../runs/data/corpus/train, val: ../../runs/data/corpus/val}
    vocabularies:
      nested: {source: cl100k, sizes: [8192, 32768, 100256]}
      trained: {sizes: [8192, 65536, 262144], min_frequency: 2}
    arms:
      kronecker: {model.input_layer: kronecker, model.head: untied}
      bpe: {model.input_layer: bpe, model.head: untied}
    budget_tokens: 50000000                            # every run sees this many training tokens
    overrides: [logging.tensorboard=false]

Layout under runs/sweeps/<name>: tokenizers/, data/, one run directory per (vocabulary, arm), the
sweep's summary, and vocab_scaling.{md,csv,png}.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import KScaleError
from . import slurm, sweep


def read_spec(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise KScaleError(
            "vocabulary-scaling spec not found", where=str(path), fix="see configs/sweeps/vocab-scaling.yaml"
        )
    spec = OmegaConf.to_container(OmegaConf.load(path))
    for key in ("train_config", "corpus", "vocabularies", "arms", "budget_tokens"):
        if key not in spec:
            raise KScaleError(f"the spec has no `{key}`", where=str(path), fix="see configs/sweeps/vocab-scaling.yaml")
    spec.setdefault("name", path.stem)
    base = path.resolve().parent
    spec["train_config"] = str(base / spec["train_config"])
    spec["corpus"] = {k: str(base / v) for k, v in spec["corpus"].items()}
    return spec


def _vocabularies(spec: dict) -> list[tuple[str, str, int]]:
    """(family, name, requested size) for every vocabulary of the spec."""
    out = []
    v = spec["vocabularies"]
    for size in (v.get("nested") or {}).get("sizes", []):
        out.append(("nested", f"nested-{v['nested']['source']}-{size}", int(size)))
    for size in (v.get("trained") or {}).get("sizes", []):
        out.append(("trained", f"trained-bpe-{size}", int(size)))
    if not out:
        raise KScaleError(
            "the spec lists no vocabulary sizes",
            where="vocabularies",
            fix="give vocabularies.nested.sizes and/or vocabularies.trained.sizes",
        )
    return out


def build_tokenizer(spec: dict, family: str, name: str, size: int, root: Path, console=print) -> Path:
    from ..data.prepare import list_inputs
    from ..data.tokenizer_training import cut_tiktoken, train_bpe
    from ..tokenizer.assets import tokenizer_path

    if family == "nested":
        out = root / "tokenizers" / f"{name}.tiktoken"
        if not out.is_file():
            console(f"tokenizer {name}: the first {size:,} ranks of {spec['vocabularies']['nested']['source']}")
            cut_tiktoken(tokenizer_path(spec["vocabularies"]["nested"]["source"]), size, out)
        return out
    out = root / "tokenizers" / name / "tokenizer.json"
    if not out.is_file():
        console(f"tokenizer {name}: training a byte-level BPE of {size:,} ids on {spec['corpus']['train']}")
        train_bpe(
            list_inputs([spec["corpus"]["train"]]),
            size,
            out,
            min_frequency=spec["vocabularies"]["trained"].get("min_frequency", 2),
            progress=console,
        )
    return out


def prepare(spec: dict, tokenizer: Path, name: str, seq_len: int, root: Path, console=print) -> Path:
    from ..data import prepare_data
    from ..tokenizer import load_tokenizer

    out = root / "data" / f"{name}-{seq_len}"
    if (out / "manifest.json").is_file():
        return out
    tok = load_tokenizer(tokenizer)
    # the nested cuts carry no special tokens: documents end with the newline token there
    eod = None if tok.eos_id is not None else tok.encode("\n")[0]
    console(f"data {out.name}: tokenizing {spec['corpus']['train']}")
    val = [spec["corpus"]["val"]] if "val" in spec["corpus"] else None
    prepare_data(tokenizer, [spec["corpus"]["train"]], out, seq_len, val_inputs=val, eod_id=eod)
    if val:
        (out / "val_text_stats.json").write_text(json.dumps(val_text_stats(tok, val)))
    return out


def val_text_stats(tok, inputs) -> dict:
    """Tokens and UTF-8 bytes of the held-out text: what turns a loss per token (not comparable across
    vocabularies) into bits per byte (comparable)."""
    from ..data.prepare import list_inputs, read_documents

    tokens = n_bytes = 0
    for path in list_inputs(inputs):
        for doc in read_documents(path):
            tokens += len(tok.encode(doc)) + 1  # + the end-of-document token
            n_bytes += len(doc.encode("utf-8"))
    return {"tokens": tokens, "bytes": n_bytes}


def plan(spec: dict, root: Path, overrides=(), console=print) -> list[dict]:
    """Tokenizers and data (built once, reused on later calls), then the sweep's runs."""
    from ..config import load_config

    base = load_config(spec["train_config"], [*spec.get("overrides", []), *overrides])
    seq_len, batch = base.model.seq_len, base.data.global_batch_size
    steps = max(1, spec["budget_tokens"] // (seq_len * batch))
    runs = []
    for family, name, size in _vocabularies(spec):
        tok = build_tokenizer(spec, family, name, size, root, console)
        data = prepare(spec, tok, name, seq_len, root, console)
        for arm, arm_overrides in spec["arms"].items():
            runs.append(
                {
                    "name": f"{name}-{arm}",
                    "tokenizer.path": str(tok.resolve()),
                    "data.train": [{"path": str(data.resolve())}],
                    "data.val": str(data.resolve()),
                    "schedule.train_steps": steps,
                    "schedule.warmup_steps": min(base.schedule.warmup_steps, steps),
                    **arm_overrides,
                }
            )
    return runs


def run(spec_path, overrides=(), sweep_dir=None, dry_run: bool = False, wait: bool = True, console=print):
    """Returns the sweep directory and how many runs failed (0 when not waited for)."""
    spec = read_spec(spec_path)
    root = Path(sweep_dir or Path("runs/sweeps") / spec["name"]).resolve()
    runs = plan(spec, root, overrides, console)
    jobs = slurm.launch_sweep(
        spec["train_config"],
        [*spec.get("overrides", []), *overrides],
        {"name": spec["name"], "kind": "vocab-scaling", "runs": runs},
        root,
        dry_run,
        console,
    )
    failed = slurm.wait(jobs, console) if wait and not dry_run else 0
    return root, failed


# --- report ---------------------------------------------------------------------------------------
COLUMNS = ["vocabulary", "V", "arm", "status", "loss", "val_loss", "val_bpb", "tokens_per_s", "memory_gb", "params"]


def _vocab_of(run_dir: Path) -> tuple[str, int]:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    path = Path(cfg.tokenizer.path)
    name = path.parent.name if path.name == "tokenizer.json" else path.stem
    return name, sweep.vocab_size(cfg.tokenizer.path)


def report(sweep_dir: str | Path, summaries: list[dict] | None = None) -> list[dict]:
    """vocab_scaling.{md,csv,json,png}: each run's final metrics against its real vocabulary size
    (`summaries`: sweep.summarize's rows when the caller has them already)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_dir = Path(sweep_dir)
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    rows = []
    for e, summary in zip(meta["elements"], summaries or sweep.summarize(sweep_dir)):
        run_dir = Path(e["run_dir"])
        cfg = OmegaConf.load(run_dir / "config.yaml")
        name, V = _vocab_of(run_dir)
        arm = f"{cfg.model.input_layer}/{cfg.model.head}"
        stats_path = Path(cfg.data.val or "") / "val_text_stats.json"
        bpb = math.nan
        if cfg.data.val and stats_path.is_file() and not math.isnan(summary["val_loss"]):
            st = json.loads(stats_path.read_text())
            bpb = summary["val_loss"] * st["tokens"] / (st["bytes"] * math.log(2))
        rows.append(
            {
                "vocabulary": name,
                "V": V,
                "arm": arm,
                "val_bpb": bpb,
                **{k: summary[k] for k in COLUMNS[3:] if k != "val_bpb"},
            }
        )
    rows.sort(key=lambda r: (r["arm"], r["vocabulary"].split("-")[0], r["V"]))
    (sweep_dir / "vocab_scaling.json").write_text(json.dumps(rows, indent=2))
    with open(sweep_dir / "vocab_scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        ("val_bpb", "validation bits per byte"),
        ("tokens_per_s", "training tokens/s"),
        ("params", "parameters"),
        ("memory_gb", "peak memory (GB)"),
    ]
    for ax, (key, label) in zip(axes.flat, panels):
        for arm, family in sorted({(r["arm"], r["vocabulary"].split("-")[0]) for r in rows}):
            pts = [
                (r["V"], r[key])
                for r in rows
                if r["arm"] == arm
                and r["vocabulary"].split("-")[0] == family
                and r[key] is not None
                and not (isinstance(r[key], float) and math.isnan(r[key]))
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{arm} ({family})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Vocabulary scaling: {meta['name']}")
    fig.tight_layout()
    fig.savefig(sweep_dir / "vocab_scaling.png", dpi=120)
    plt.close(fig)
    (sweep_dir / "vocab_scaling.md").write_text(
        f"# Vocabulary scaling: {meta['name']}\n\n"
        + sweep.markdown_table(COLUMNS, rows)
        + "\n![vocab scaling](vocab_scaling.png)\n"
    )
    return rows
