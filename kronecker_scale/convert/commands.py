"""`kscale convert to-hf|reshard|extract|summary` and `kscale probe typos|geometry|echo|norm-drift`: thin
layers over kronecker_scale.convert and kronecker_scale.probes (wired into the parser by cli.py)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path


def _quiet() -> None:
    # megatron and torch.distributed.checkpoint warn about Apex/TE and single-process loading on every load
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --- convert ------------------------------------------------------------------------------------
def cmd_to_hf(args) -> int:
    _quiet()
    from .to_hf import PARITY_TEXT, export_to_hf, kl_ok
    info = export_to_hf(args.checkpoint, args.out_dir, check_text=None if args.no_check else PARITY_TEXT)
    print(f"wrote {args.out_dir}: {info['architecture']} ({info['model_type']}), {info['vocab_size']:,} ids "
          f"({info['padded_rows_dropped']} padded rows dropped), tokenizer: {info['tokenizer']}")
    if "parity" in info:
        p = info["parity"]
        print(f"parity on {p['positions']} positions of sample text: max KL(ours || HF) {p['max_kl']:.3e}, "
              f"max |logit diff| {p['max_abs_logit_diff']:.3e}, same greedy continuation: {p['greedy_match']}")
        return 0 if kl_ok(p) else 1
    return 0


def cmd_reshard(args) -> int:
    _quiet()
    from .reshard import reshard
    out = reshard(args.checkpoint, args.out_dir, tensor=args.tensor, pipeline=args.pipeline, data=args.data)
    print(f"wrote {out} (TP={args.tensor}, PP={args.pipeline}, DP={args.data}); train from it with "
          f"checkpoint.resume={out} parallel.tensor={args.tensor} parallel.pipeline={args.pipeline} "
          f"parallel.nproc={args.tensor * args.pipeline * args.data}")
    return 0


def cmd_extract(args) -> int:
    _quiet()
    from .summary import extract_input_layer
    meta = extract_input_layer(args.checkpoint, args.out)
    print(f"wrote {meta['file']} and {Path(meta['file']).with_suffix('.json')}: projection "
          f"[{256 * meta['pos_dim']}, {meta['d_model']}] + byte table [{meta['vocab_size']}, {meta['pos_dim']}]")
    return 0


def cmd_summary(args) -> int:
    _quiet()
    from .summary import checkpoint_summary
    s = checkpoint_summary(args.checkpoint)
    if args.json:
        _print_json(s)
        return 0
    m = s["model"]
    print(f"checkpoint  {s['checkpoint']}")
    print(f"step        {s['step']:,}   tokens {s['tokens']:,}   skipped steps {s['skipped_steps']}")
    print(f"arm         {s['arm']} (input {m['input_layer']}, head {m['head']})   tokenizer {s['tokenizer']['path']}")
    print(f"model       {m['n_layers']} layers, d={m['d_model']}, {m['n_heads']} heads, T={m['seq_len']}, "
          f"pos_dim={m['pos_dim']}, {m['position']}, {m['norm']}, {m['activation']}, bias={m['bias']}")
    par = s["parallel"]
    print(f"saved with  TP={par['tensor']} PP={par['pipeline']} world={s['saved_world_size']} ({s['precision']}), "
          f"padded vocabulary {s['padded_vocab_size']:,}, {s['bytes_on_disk'] / 2**20:.1f} MiB on disk")
    for k in ("input", "head", "transformer", "total"):
        print(f"params      {k:12s} {s['parameters'][k]:>14,}   (accounting: {s['parameters_by_accounting'][k]:,})")
    return 0


def add_convert_commands(convert) -> None:
    """Subcommands of `kscale convert` (convert = its add_subparsers object)."""
    s = convert.add_parser("to-hf", help="export to Hugging Face transformers (GPT-2 or Llama), parity-checked")
    s.add_argument("checkpoint", help="step folder, checkpoints folder or run folder")
    s.add_argument("out_dir")
    s.add_argument("--no-check", action="store_true", help="skip the logit parity check against the export")
    s.set_defaults(func=cmd_to_hf)

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


# --- probes -------------------------------------------------------------------------------------
def cmd_probe(args) -> int:
    _quiet()
    from ..probes import echo, geometry, norm_drift, typos
    if args.probe == "typos":
        res = typos.typos_probe(args.pairs or typos.default_pairs(), args.checkpoints, args.out)
        print(typos.markdown(res))
    elif args.probe == "geometry":
        res = geometry.geometry_probe(args.checkpoints, args.out, k=args.k, codec=not args.no_codec,
                                      random=not args.no_random, pos_dim=args.pos_dim)
        print(geometry.markdown(res).split("## Neighbours")[0])
    elif args.probe == "echo":
        res = echo.echo_probe(args.checkpoints, args.out, new_tokens=args.new_tokens)
        print(echo.markdown(res).split("\n## ")[0])
    else:
        res = norm_drift.norm_drift_probe(args.checkpoints, args.out)
        print(norm_drift.markdown(res))
    print("wrote " + ", ".join(res["paths"].values()))
    return 0


def add_probe_commands(sub) -> None:
    """`kscale probe ...` (sub = the top-level add_subparsers object)."""
    s = sub.add_parser("probe", help="the paper's probes: typos, geometry, echo, norm-drift (JSON, markdown, PNG)")
    probes = s.add_subparsers(dest="probe", required=True)
    t = probes.add_parser("typos", help="spelling robustness over clean/typo prompt pairs")
    t.add_argument("checkpoints", nargs="+")
    t.add_argument("--pairs", help="JSON Lines {category, clean, typo} (default: the 121 shipped pairs)")
    g = probes.add_parser("geometry", help="top-k neighbours of probe words: typographic vs morphological")
    g.add_argument("checkpoints", nargs="+", help="kscale checkpoints or Hugging Face model folders")
    g.add_argument("--k", type=int, default=5)
    g.add_argument("--pos-dim", type=int, default=32, help="pos_dim of the codec space")
    g.add_argument("--no-codec", action="store_true")
    g.add_argument("--no-random", action="store_true")
    e = probes.add_parser("echo", help="generation echo of normal, misspelled and forced-OOV strings")
    e.add_argument("checkpoints", nargs="+")
    e.add_argument("--new-tokens", type=int, default=12)
    n = probes.add_parser("norm-drift", help="input-layer norms across each run's checkpoints")
    n.add_argument("checkpoints", nargs="+", metavar="RUN", help="run folders (with checkpoints/step_*)")
    for p in (t, g, e, n):
        p.add_argument("--out", default="runs/probes", help="output folder")
        p.set_defaults(func=cmd_probe)
