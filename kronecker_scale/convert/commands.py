"""`kscale convert to-hf|from-hf|reshard|extract|summary`: thin layers over kronecker_scale.convert (wired into the
parser by cli.py)."""

from __future__ import annotations

import json
from pathlib import Path


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --- convert ------------------------------------------------------------------------------------
def cmd_to_hf(args) -> int:
    from .to_hf import PARITY_TEXT, export_to_hf, kl_ok

    info = export_to_hf(
        args.checkpoint, args.out_dir, check_text=None if args.no_check else PARITY_TEXT, device=args.device
    )
    print(
        f"wrote {args.out_dir}: {info['architecture']} ({info['model_type']}), {info['vocab_size']:,} ids "
        f"({info['padded_rows_dropped']} padded rows dropped), tokenizer: {info['tokenizer']}"
    )
    if "parity" in info:
        p = info["parity"]
        print(
            f"parity on {p['positions']} positions of sample text: max KL(ours || HF) {p['max_kl']:.3e}, "
            f"max |logit diff| {p['max_abs_logit_diff']:.3e}, same greedy continuation: {p['greedy_match']}"
        )
        t = p["tokenizer"]
        print(
            f"tokenizer parity ({t['class']} from {args.out_dir}): same ids on {t['samples']} samples "
            f"({t['tokens']} tokens): {t['ids_match']}, decode(encode(text)) == text: {t['round_trip']}"
        )
        return 0 if kl_ok(p) else 1
    return 0


def cmd_from_hf(args) -> int:
    from .from_hf import retrofit

    text = Path(args.text).read_text(encoding="utf-8") if args.text else None
    r = retrofit(
        args.hf_dir,
        args.out_dir,
        pos_dim=args.pos_dim,
        byte_source=args.byte_source,
        ridge=args.ridge,
        data=args.data,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        text=text,
    )
    print(
        f"wrote {r['out_dir']} (report: retrofit.json); continue training with: kscale train {r['config']}"
        + ("" if args.data else " data.train='[{path: DATA}]'")
        + " schedule.train_steps=N"
    )
    return 0


def cmd_reshard(args) -> int:
    from .reshard import reshard

    out = reshard(args.checkpoint, args.out_dir, tensor=args.tensor, pipeline=args.pipeline, data=args.data)
    print(
        f"wrote {out} (TP={args.tensor}, PP={args.pipeline}, DP={args.data}); train from it with "
        f"checkpoint.resume={out} parallel.tensor={args.tensor} parallel.pipeline={args.pipeline} "
        f"parallel.nproc={args.tensor * args.pipeline * args.data}"
    )
    return 0


def cmd_extract(args) -> int:
    from .summary import extract_input_layer

    meta = extract_input_layer(args.checkpoint, args.out)
    print(
        f"wrote {meta['file']} and {Path(meta['file']).with_suffix('.json')}: projection "
        f"[{256 * meta['pos_dim']}, {meta['d_model']}] + byte table [{meta['vocab_size']}, {meta['pos_dim']}]"
    )
    return 0


def cmd_summary(args) -> int:
    from .summary import checkpoint_summary

    s = checkpoint_summary(args.checkpoint)
    if args.json:
        _print_json(s)
        return 0
    m = s["model"]
    print(f"checkpoint  {s['checkpoint']}")
    print(f"step        {s['step']:,}   tokens {s['tokens']:,}   skipped steps {s['skipped_steps']}")
    print(f"arm         {s['arm']} (input {m['input_layer']}, head {m['head']})   tokenizer {s['tokenizer']['path']}")
    print(
        f"model       {m['n_layers']} layers, d={m['d_model']}, {m['n_heads']} heads, T={m['seq_len']}, "
        f"pos_dim={m['pos_dim']}, {m['position']}, {m['norm']}, {m['activation']}, bias={m['bias']}"
    )
    par = s["parallel"]
    print(
        f"saved with  TP={par['tensor']} PP={par['pipeline']} world={s['saved_world_size']} ({s['precision']}), "
        f"padded vocabulary {s['padded_vocab_size']:,}, {s['bytes_on_disk'] / 2**20:.1f} MiB on disk"
    )
    for k in ("input", "head", "transformer", "total"):
        print(f"params      {k:12s} {s['parameters'][k]:>14,}   (accounting: {s['parameters_by_accounting'][k]:,})")
    return 0


def add_convert_commands(convert) -> None:
    """Subcommands of `kscale convert` (convert = its add_subparsers object)."""
    s = convert.add_parser("to-hf", help="export to Hugging Face transformers (GPT-2 or Llama), parity-checked")
    s.add_argument("checkpoint", help="step folder, checkpoints folder or run folder")
    s.add_argument("out_dir")
    s.add_argument("--no-check", action="store_true", help="skip the logit parity check against the export")
    s.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the checkpoint's model runs for the parity check (default cpu, whatever is visible)",
    )
    s.set_defaults(func=cmd_to_hf)

    s = convert.add_parser(
        "from-hf",
        help="retrofit a transformers GPT-2/Llama checkpoint: Kronecker input layer "
        "fitted by least squares, a run directory that kscale train continues",
    )
    s.add_argument("hf_dir", help="folder with config.json, the weights and the tokenizer (tokenizer.json)")
    s.add_argument("out_dir", help="run directory to write (new or empty)")
    s.add_argument("--pos-dim", type=int, default=32, help="byte positions P (D = 256 P; default 32)")
    s.add_argument("--byte-source", choices=["exact", "decode"], default="exact", help="token bytes (default exact)")
    s.add_argument("--ridge", type=float, default=1e-6, help="ridge, relative to the mean diagonal of C^T C")
    s.add_argument("--data", help="prepared dataset (kscale prepare-data) for data.train of the written config")
    s.add_argument("--tokenizer", help="tokenizer file or folder (default: the model folder's)")
    s.add_argument("--seq-len", type=int, help="training sequence length (default: the model's positions)")
    s.add_argument("--text", help="text file for the held-out loss (default: built-in public-domain prose)")
    s.set_defaults(func=cmd_from_hf)

    s = convert.add_parser("reshard", help="rewrite a checkpoint in another TP/PP(/DP) layout, offline")
    s.add_argument("checkpoint")
    s.add_argument("out_dir", help="checkpoints folder to write (step_* + latest)")
    s.add_argument("--tensor", type=int, default=1)
    s.add_argument("--pipeline", type=int, default=1)
    s.add_argument("--data", type=int, default=1, help="data-parallel size (processes = T x P x D)")
    s.set_defaults(func=cmd_reshard)

    s = convert.add_parser("extract", help="the Kronecker projection + byte table alone (safetensors + JSON)")
    s.add_argument("checkpoint")
    s.add_argument("out", help="file to write, e.g. input_layer.safetensors")
    s.set_defaults(func=cmd_extract)

    s = convert.add_parser("summary", help="config, step, tokens and parameter counts of a checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_summary)
