"""`kscale probe typos|geometry|echo|norm-drift|layers`: thin layers over the probes (wired into the parser by
cli.py)."""

from __future__ import annotations


def cmd_probe(args) -> int:
    from . import echo, geometry, layers, norm_drift, typos

    if args.probe == "typos":
        res = typos.typos_probe(args.pairs or typos.default_pairs(), args.checkpoints, args.out, args.device)
        print(typos.markdown(res))
    elif args.probe == "geometry":
        res = geometry.geometry_probe(
            args.checkpoints,
            args.out,
            k=args.k,
            codec=not args.no_codec,
            random=not args.no_random,
            pos_dim=args.pos_dim,
            device=args.device,
        )
        print(geometry.markdown(res).split("## Neighbours")[0])
    elif args.probe == "echo":
        res = echo.echo_probe(args.checkpoints, args.out, new_tokens=args.new_tokens, device=args.device)
        print(echo.markdown(res).split("\n## ")[0])
    elif args.probe == "layers":
        fams = layers.read_families(args.families) if args.families else None
        res = layers.layers_probe(
            args.checkpoints, args.out, families=fams, k=args.k, n_layers=args.layers, device=args.device
        )
        print(layers.markdown(res).split("\n## ")[0])
    else:
        res = norm_drift.norm_drift_probe(args.checkpoints, args.out)
        print(norm_drift.markdown(res))
    print("wrote " + ", ".join(res["paths"].values()))
    return 0


def add_probe_commands(sub) -> None:
    """`kscale probe ...` (sub = the top-level add_subparsers object)."""
    s = sub.add_parser(
        "probe", help="the paper's probes: typos, geometry, echo, norm-drift, layers (JSON, markdown, PNG)"
    )
    probes = s.add_subparsers(dest="probe", required=True)
    t = probes.add_parser("typos", help="spelling robustness over clean/typo prompt pairs")
    t.add_argument("checkpoints", nargs="+")
    t.add_argument(
        "--pairs",
        help="JSON Lines {category, clean, typo} (default: the 121 shipped pairs), or a JSON "
        'list of them / {"prompt_pairs": [...]} (the paper\'s results file)',
    )
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
    lay = probes.add_parser(
        "layers",
        help="the layered probe: morph@10 (loose / root-substring / strict family) "
        "of E_raw, E_post, layer 0 and layer 1",
    )
    lay.add_argument("checkpoints", nargs="+", help="kscale checkpoints (step, checkpoints or run folders)")
    lay.add_argument("--k", type=int, default=10, help="neighbours per probe (default 10, the paper's)")
    lay.add_argument("--layers", type=int, default=2, help="transformer layers probed (default 2: L0, L1)")
    lay.add_argument("--families", help="JSON {name: {root, probes, family}} instead of the built-in six families")
    for p in (t, g, e, n, lay):
        p.add_argument("--out", default="runs/probes", help="output folder")
        p.add_argument(
            "--device",
            choices=["cpu", "cuda"],
            default="cpu",
            help="where the models run (default cpu, whatever GPUs are visible)",
        )
        p.set_defaults(func=cmd_probe)
