"""The layered probe (paper §6.8, Table 10): does the nearest-neighbour geometry of a token stay
morphological through the input layer and the first transformer layers?

Representations of every real id, each id alone as a one-token sequence at position 0:
- `E_raw`: the input embedding (Kronecker: codec + projection materialised; BPE: the table's row);
- `E_post`: what the first layer receives, E_raw plus the position embedding of position 0 (RoPE
  models add none: E_post = E_raw);
- `L0`, `L1`: the residual stream after transformer layer 0 and layer 1 (before the final norm).
Every representation is centred (its mean over the vocabulary subtracted) before cosines are taken, so
E_post and E_raw retrieve the same neighbours (the position embedding of position 0 is one constant
offset): the paper reports the same.

For each probe word (6 families x 8 probes) the query is the representation of the word's first token
(the paper's rule: a word GPT-2 splits, like "rerun" -> "re", is queried by its first piece), and its
10 nearest ids by cosine, the query id itself excluded, are scored at three strictness levels:
- L (loose): share of the neighbours whose canonical form (whitespace markers and edge punctuation
  stripped, case-folded; geometry.canonical) differs from the probe word's: 1 - typographic@10;
- M (root-substring): share whose canonical form contains the family's root ("comput", "cod", ...);
- S (strict family): share whose canonical form is one of the family's listed words.
So L is high when neighbours are not mere case/space variants, M and S are high when they are the
word's morphological relatives. Per family the mean over its probes, overall the mean over families.
Also reported: the centred mean L2 norm of each representation (the paper: Kronecker E_raw 20.19 vs
BPE 0.839 at 124M), whether every query retrieves itself first, and the mean cosine of random pairs of
centred rows (near 0 when centring worked).

The families and probe words below are this project's lists for the paper's six roots (run, compute,
nation, code, act, build); `--families FILE` takes any other lists (JSON: {name: {root, probes,
family}}), e.g. the exact lists of the paper's reference results.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from ..errors import KScaleError
from .geometry import canonical
from .report import labels_for, markdown_table, write_outputs

K = 10
LEVELS = ("L", "M", "S")
FAMILIES: dict[str, dict] = {
    "run": {
        "root": "run",
        "probes": ["run", "runs", "running", "runner", "ran", "rerun", "runners", "runway"],
        "family": [
            "run",
            "runs",
            "running",
            "ran",
            "runner",
            "runners",
            "rerun",
            "reruns",
            "outrun",
            "overrun",
            "runway",
            "runways",
            "runaway",
            "runnable",
        ],
    },
    "compute": {
        "root": "comput",
        "probes": [
            "compute",
            "computer",
            "computing",
            "computation",
            "computes",
            "computed",
            "computers",
            "computational",
        ],
        "family": [
            "compute",
            "computes",
            "computed",
            "computing",
            "computer",
            "computers",
            "computation",
            "computations",
            "computational",
            "computationally",
            "computable",
            "computability",
            "recompute",
            "recomputed",
            "uncomputable",
        ],
    },
    "nation": {
        "root": "nation",
        "probes": [
            "nation",
            "nations",
            "national",
            "nationally",
            "international",
            "nationality",
            "nationals",
            "nationwide",
        ],
        "family": [
            "nation",
            "nations",
            "national",
            "nationally",
            "nationals",
            "nationality",
            "nationalities",
            "nationalism",
            "nationalist",
            "nationalists",
            "nationwide",
            "international",
            "internationally",
            "multinational",
            "transnational",
        ],
    },
    "code": {
        "root": "cod",
        "probes": ["code", "codes", "coded", "coding", "coder", "encode", "decode", "encoding"],
        "family": [
            "code",
            "codes",
            "coded",
            "coding",
            "coder",
            "coders",
            "codec",
            "codecs",
            "encode",
            "encodes",
            "encoded",
            "encoder",
            "encoding",
            "decode",
            "decodes",
            "decoded",
            "decoder",
            "decoding",
            "recode",
            "recoded",
        ],
    },
    "act": {
        "root": "act",
        "probes": ["act", "acts", "acted", "acting", "action", "actor", "active", "react"],
        "family": [
            "act",
            "acts",
            "acted",
            "acting",
            "action",
            "actions",
            "actor",
            "actors",
            "actress",
            "active",
            "actively",
            "activity",
            "activities",
            "activate",
            "activation",
            "react",
            "reacts",
            "reacted",
            "reaction",
            "reactions",
            "interact",
            "interaction",
            "enact",
            "transact",
        ],
    },
    "build": {
        "root": "build",
        "probes": ["build", "builds", "built", "builder", "building", "buildings", "rebuild", "rebuilt"],
        "family": [
            "build",
            "builds",
            "built",
            "builder",
            "builders",
            "building",
            "buildings",
            "rebuild",
            "rebuilds",
            "rebuilt",
            "rebuilding",
            "prebuilt",
            "buildup",
        ],
    },
}


class _Stop(Exception):
    """Raised by the last hook: the layers past the ones probed (and the head) are not run."""


def read_families(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    try:
        fams = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise KScaleError(f"cannot read the families file ({e})", where=str(path)) from None
    for name, fam in fams.items() if isinstance(fams, dict) else [("?", None)]:
        ok = (
            isinstance(fam, dict)
            and isinstance(fam.get("root"), str)
            and fam["root"]
            and all(
                isinstance(fam.get(k), list) and fam[k] and all(isinstance(w, str) and w for w in fam[k])
                for k in ("probes", "family")
            )
        )
        if not ok:
            raise KScaleError(
                f"family {name!r} is not {{root: str, probes: [str], family: [str]}}",
                where=str(path),
                fix='e.g. {"run": {"root": "run", "probes": ["run", "runs"], "family": ["run", "runs"]}}',
            )
    return fams


# --- representations ---------------------------------------------------------------------------------
@torch.no_grad()
def representations(ck, n_layers: int = 2, chunk: int = 2048) -> dict[str, torch.Tensor]:
    """{E_raw, E_post, L0, L1, ...} -> [V real ids, d] float64: every id alone at position 0."""
    from ..inference.load import cpu_layer

    model = ck.model
    layers = min(n_layers, len(model.decoder.layers))
    names = ["E_post", *[f"L{i}" for i in range(layers)]]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    captured: dict[str, torch.Tensor] = {}

    def keep(name, last):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            captured[name] = h.detach()[0].double().cpu()  # [s=1, b, d] -> [b, d]
            if last:
                raise _Stop

        return hook

    hooks = [model.embedding.register_forward_hook(keep("E_post", layers == 0))]
    hooks += [model.decoder.layers[i].register_forward_hook(keep(f"L{i}", i == layers - 1)) for i in range(layers)]
    try:
        with cpu_layer(ck.device == "cpu"):
            for start in range(0, ck.vocab_size, chunk):
                ids = torch.arange(start, min(start + chunk, ck.vocab_size), device=ck.device)[:, None]
                captured.clear()
                try:
                    model(ids, torch.zeros_like(ids), None)
                except _Stop:
                    pass
                for n in names:
                    out[n].append(captured[n])
    finally:
        for h in hooks:
            h.remove()
    reps = {"E_raw": ck.input_table()}
    reps.update({n: torch.cat(v) for n, v in out.items()})
    return reps


def centred_unit(rep: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(rows minus their mean, L2-normalised; the mean L2 norm of the centred rows)."""
    c = rep - rep.mean(0, keepdim=True)
    norms = c.norm(dim=1)
    return c / norms.clamp_min(1e-30)[:, None], float(norms.mean())


# --- scoring -------------------------------------------------------------------------------------------
def score_neighbours(texts: list[str], probe: str, root: str, family: set[str]) -> dict:
    """L, M, S of one probe's neighbour texts (module docstring)."""
    forms = [canonical(t) for t in texts]
    mine = canonical(probe)
    n = len(forms)
    return {
        "L": sum(f != mine for f in forms) / n,
        "M": sum(root in f for f in forms) / n,
        "S": sum(f in family for f in forms) / n,
    }


def run_layers(checkpoints, families: dict | None = None, k: int = K, n_layers: int = 2) -> dict:
    families = families or FAMILIES
    labels = labels_for(checkpoints)
    results, rep_names = {}, None
    for label, ck in zip(labels, checkpoints):
        reps = representations(ck, n_layers)
        rep_names = list(reps)
        token_text = [b.decode("utf-8", errors="replace") for b in ck.tokenizer.token_bytes("exact")]
        units, norms = {}, {}
        for name, rep in reps.items():
            units[name], norms[name] = centred_unit(rep)
        g = torch.Generator().manual_seed(0)
        a, b = torch.randint(0, ck.vocab_size, (2, 2000), generator=g)
        a, b = a[a != b], b[a != b]
        random_cos = {n: float((u[a] * u[b]).sum(1).mean()) for n, u in units.items()}
        probes, per_family, self_ok, single = {}, {}, True, 0
        for fam, spec in families.items():
            family_set = {canonical(w) for w in spec["family"]}
            rows = []
            for word in spec["probes"]:
                ids = ck.tokenizer.encode(word)
                if not ids:
                    raise KScaleError(f"probe {word!r} encodes to no tokens")
                q = ids[0]
                single += len(ids) == 1
                row = {"probe": word, "first_token_id": q, "first_token": token_text[q], "tokens": len(ids)}
                for name, u in units.items():
                    cos = u @ u[q]
                    self_ok &= int(cos.argmax()) == q or bool(cos.max() <= cos[q] + 1e-12)
                    cos[q] = -float("inf")
                    top = torch.topk(cos, k)
                    texts = [token_text[i] for i in top.indices.tolist()]
                    row[name] = {
                        "top_ids": top.indices.tolist(),
                        "top_tokens": texts,
                        "top_cosines": [round(float(c), 6) for c in top.values],
                        **score_neighbours(texts, word, spec["root"], family_set),
                    }
                rows.append(row)
            probes[fam] = rows
            per_family[fam] = {n: {lv: statistics.fmean(r[n][lv] for r in rows) for lv in LEVELS} for n in reps}
        overall = {n: {lv: statistics.fmean(per_family[f][n][lv] for f in families) for lv in LEVELS} for n in reps}
        depth = ["E_raw", *[n for n in rep_names if n.startswith("L")]]  # E_post has E_raw's geometry
        deltas = {f"{b}-{a}": {lv: overall[b][lv] - overall[a][lv] for lv in LEVELS} for a, b in zip(depth, depth[1:])}
        c = ck.model_cfg
        results[label] = {
            "checkpoint": str(ck.path),
            "model_info": {
                "input_layer": c.input_layer,
                "head": c.head,
                "pos_dim": c.pos_dim if c.input_layer == "kronecker" else None,
                "vocab_size": ck.vocab_size,
                "d_model": c.d_model,
                "n_layers": c.n_layers,
                "position": c.position,
                "step": ck.step,
                "tokens": ck.tokens,
            },
            "centred_mean_norm": norms,
            "sanity": {
                "self_retrieval": self_ok,
                "single_token_probes": single,
                "probes": sum(len(s["probes"]) for s in families.values()),
                "centred_random_pair_cosine": random_cos,
            },
            "overall": overall,
            "deltas": deltas,
            "per_family": per_family,
            "probes": probes,
        }
    return {
        "k": k,
        "levels": {"L": "loose: not a typographic variant", "M": "root-substring", "S": "strict family"},
        "representations": rep_names,
        "families": families,
        "models": labels,
        "results": results,
    }


# --- report --------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    k = res["k"]
    rows = [
        [
            m,
            n,
            *[f"{res['results'][m]['overall'][n][lv]:.3f}" for lv in LEVELS],
            f"{res['results'][m]['centred_mean_norm'][n]:.4g}",
        ]
        for m in res["models"]
        for n in res["representations"]
    ]
    text = (
        f"# Layered probe: morph@{k} through the first layers\n\n"
        f"L = loose (neighbours that are not case/space variants of the probe), M = root-substring, "
        f"S = strict family; {sum(len(f['probes']) for f in res['families'].values())} probes in "
        f"{len(res['families'])} families, every representation centred.\n\n"
        + markdown_table(["model", "representation", "L", "M", "S", "centred mean norm"], rows)
    )
    fams = list(res["families"])
    for m in res["models"]:
        r = res["results"][m]
        s = r["sanity"]
        text += (
            f"\n## {m} ({r['model_info']['input_layer']}, step {r['model_info']['step']})\n\n"
            f"self-retrieval: {'pass' if s['self_retrieval'] else 'FAIL'}; single-token probes: "
            f"{s['single_token_probes']}/{s['probes']}; centred random-pair cosine: "
            + ", ".join(f"{n} {v:+.4f}" for n, v in s["centred_random_pair_cosine"].items())
            + "\n\n"
        )
        fam_rows = [
            [f, n, *[f"{r['per_family'][f][n][lv]:.3f}" for lv in LEVELS]]
            for f in fams
            for n in res["representations"]
            if n != "E_post"
        ]
        text += markdown_table(["family", "representation", "L", "M", "S"], fam_rows)
        last = res["representations"][-1]
        ex = [
            [
                f,
                repr(row["probe"]),
                " · ".join(repr(t) for t in row["E_raw"]["top_tokens"]),
                " · ".join(repr(t) for t in row[last]["top_tokens"]),
            ]
            for f in fams
            for row in r["probes"][f][:1]
        ]
        text += "\n" + markdown_table(["family", "probe", f"E_raw top-{k}", f"{last} top-{k}"], ex)
    return text


def plot(res: dict):
    def draw(plt):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
        reps = res["representations"]
        for ax, lv in zip(axes, LEVELS):
            for m in res["models"]:
                ax.plot(reps, [res["results"][m]["overall"][n][lv] for n in reps], marker="o", label=m)
            ax.set_title(f"{lv} ({res['levels'][lv]})")
            ax.set_ylim(0, 1.05)
        axes[0].set_ylabel(f"morph@{res['k']}")
        axes[0].legend()
        return fig

    return draw


def layers_probe(
    checkpoint_paths, out_dir, *, families: dict | None = None, k: int = K, n_layers: int = 2, device: str = "cpu"
) -> dict:
    from ..inference import load_checkpoint

    res = run_layers([load_checkpoint(p, device) for p in checkpoint_paths], families, k, n_layers)
    res["paths"] = {k_: str(v) for k_, v in write_outputs(out_dir, "layers", res, markdown(res), plot(res)).items()}
    return res
