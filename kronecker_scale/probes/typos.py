"""Spelling robustness (paper §6.11): clean/typo prompt pairs, compared at the last position.

Per pair and model: top-1 preservation (argmax equal), KL(clean || typo) over the whole vocabulary in
nats, cosine of the last hidden states (after the final norm), and the log-prob drop of the clean
top-1 token, log p(top1 | clean) - log p(top1 | typo). Summaries per category and overall; every model
reads the prompts with its own tokenizer.

Token counts, as the paper defines them: `token_inflation` = mean over pairs of (n_typo - n_clean), the
extra tokens a typo costs (the paper's mean_token_inflation); `token_ratio` = sum n_typo / sum n_clean.
`distinct_top1_clean` / `_typo`: how many different next tokens a model predicts over the pairs (a
model that answers " the" everywhere preserves its top-1 cheaply).

Suspect pairs (clean and typo identical, or equal once whitespace is removed: no spelling change) are
listed in the result and warned about, and still scored, so a published pair set is measured as it is.

Pairs files: JSON Lines {category, clean, typo, ...} (the shipped set), or a JSON file holding a list of
such records or {"prompt_pairs": [...]} (the layout of the paper's reference results file).
"""

from __future__ import annotations

import json
import statistics
import sys
from importlib import resources
from pathlib import Path

import torch

from ..errors import KScaleError
from .report import labels_for, markdown_table, write_outputs

REQUIRED = ("category", "clean", "typo")


def default_pairs() -> Path:
    return Path(str(resources.files("kronecker_scale.probes") / "data" / "typo_pairs.jsonl"))


def read_pairs(path: str | Path) -> list[dict]:
    """The pairs of a JSON Lines file, or of a JSON file (a list of pairs, or {"prompt_pairs": [...]})."""
    path = Path(path)
    if not path.is_file():
        raise KScaleError("pairs file not found", where=str(path), fix=f"see {default_pairs()} for the format")
    text = path.read_text(encoding="utf-8")
    records = _json_document(text, path)
    if records is None:  # JSON Lines
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise KScaleError(f"malformed JSON ({e.msg})", where=f"{path}:{n}") from None
    pairs: list[dict] = []
    for where, rec in records:
        missing = [
            k for k in REQUIRED if not isinstance(rec, dict) or not isinstance(rec.get(k), str) or not rec.get(k)
        ]
        if missing:
            raise KScaleError(
                f"pair has no string field {missing[0]!r}",
                where=where,
                fix='each line is {"category": ..., "clean": ..., "typo": ...}',
            )
        assert isinstance(rec, dict)  # checked just above
        pairs.append(rec)
    if not pairs:
        raise KScaleError("pairs file is empty", where=str(path))
    return pairs


def _json_document(text: str, path: Path) -> list[tuple[str, object]] | None:
    """(where, record) of a whole-file JSON pairs document; None when the file is JSON Lines."""
    stripped = text.lstrip()
    if not stripped.startswith(("[", "{")):
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return None  # several JSON objects: JSON Lines
    if isinstance(doc, dict) and isinstance(doc.get("prompt_pairs"), list):
        doc = doc["prompt_pairs"]
    elif isinstance(doc, dict):
        return [(f"{path}:1", doc)]  # one pair on one line
    if not isinstance(doc, list):
        raise KScaleError('a JSON pairs file holds a list of pairs or {"prompt_pairs": [...]}', where=str(path))
    return [(f"{path}: pair {i}", rec) for i, rec in enumerate(doc)]


def suspect_pairs(pairs: list[dict]) -> list[dict]:
    """Pairs with no spelling change: typo == clean, or equal once whitespace is removed."""
    out = []
    for i, p in enumerate(pairs):
        if p["clean"] == p["typo"]:
            reason = "identical"
        elif "".join(p["clean"].split()) == "".join(p["typo"].split()):
            reason = "differ only in whitespace"
        else:
            continue
        out.append({"index": i, "category": p["category"], "clean": p["clean"], "typo": p["typo"], "reason": reason})
    return out


def token_counts(tokenizer, pairs: list[dict]) -> list[dict]:
    """{tokens_clean, tokens_typo} of every pair with this tokenizer (no special tokens added)."""
    return [
        {"tokens_clean": len(tokenizer.encode(p["clean"])), "tokens_typo": len(tokenizer.encode(p["typo"]))}
        for p in pairs
    ]


def token_stats(records: list[dict]) -> dict:
    """token_inflation (the paper's: mean of n_typo - n_clean) and token_ratio (sum n_typo / sum n_clean)."""
    n = len(records)
    clean = sum(r["tokens_clean"] for r in records)
    typo = sum(r["tokens_typo"] for r in records)
    return {
        "token_inflation": (typo - clean) / n if n else float("nan"),
        "token_ratio": typo / clean if clean else float("nan"),
    }


@torch.no_grad()
def score_pair(ck, clean: str, typo: str) -> dict:
    a, b = ck.tokenizer.encode(clean), ck.tokenizer.encode(typo)
    la, ha = ck.forward(torch.tensor(a[-ck.model_cfg.seq_len :]))
    lb, hb = ck.forward(torch.tensor(b[-ck.model_cfg.seq_len :]))
    p, q = torch.log_softmax(la[0, -1].double(), -1), torch.log_softmax(lb[0, -1].double(), -1)
    top = int(p.argmax())
    return {
        "top1_clean": top,
        "top1_typo": int(q.argmax()),
        "preserved": top == int(q.argmax()),
        "kl": max(float((p.exp() * (p - q)).sum()), 0.0),
        "cosine": float(torch.cosine_similarity(ha[0, -1].double(), hb[0, -1].double(), dim=0)),
        "logprob_drop": float(p[top] - q[top]),
        "tokens_clean": len(a),
        "tokens_typo": len(b),
        "top1_clean_text": ck.tokenizer.decode([top]),
    }


def summarise(records: list[dict]) -> dict:
    kls = [r["kl"] for r in records]
    return {
        "pairs": len(records),
        "top1_rate": sum(r["preserved"] for r in records) / len(records),
        "top1_matches": sum(r["preserved"] for r in records),
        "mean_kl": statistics.fmean(kls),
        "median_kl": statistics.median(kls),
        "cosine": statistics.fmean(r["cosine"] for r in records),
        "logprob_drop": statistics.fmean(r["logprob_drop"] for r in records),
        "distinct_top1_clean": len({r["top1_clean"] for r in records}),
        "distinct_top1_typo": len({r["top1_typo"] for r in records}),
        **token_stats(records),
    }


def run_typos(pairs: list[dict], checkpoints: list) -> dict:
    """checkpoints: LoadedCheckpoint objects. Returns {models, categories, results{label: {...}}}."""
    labels = labels_for(checkpoints)
    categories = list(dict.fromkeys(p["category"] for p in pairs))
    results = {}
    for label, ck in zip(labels, checkpoints):
        records = [{**pair, **score_pair(ck, pair["clean"], pair["typo"])} for pair in pairs]
        results[label] = {
            "checkpoint": str(ck.path),
            "overall": summarise(records),
            "by_category": {c: summarise([r for r in records if r["category"] == c]) for c in categories},
            "pairs": records,
        }
    return {"models": labels, "categories": categories, "suspect_pairs": suspect_pairs(pairs), "results": results}


def markdown(res: dict) -> str:
    models = res["models"]
    overall = [
        [
            m,
            f"{o['top1_rate']:.4f}",
            f"{o['mean_kl']:.4f}",
            f"{o['median_kl']:.4f}",
            f"{o['cosine']:.4f}",
            f"{o['logprob_drop']:.4f}",
            f"{o['token_inflation']:.3f}",
            f"{o['token_ratio']:.3f}",
            f"{o['distinct_top1_clean']} / {o['distinct_top1_typo']}",
        ]
        for m in models
        for o in [res["results"][m]["overall"]]
    ]
    cols = [
        "model",
        "top-1 preserved",
        "mean KL",
        "median KL",
        "cosine",
        "log-prob drop",
        "token inflation (mean extra tokens)",
        "token ratio",
        "distinct top-1 (clean / typo)",
    ]
    cat_rows = [
        [
            c,
            *[
                f"{res['results'][m]['by_category'][c]['top1_matches']}/"
                f"{res['results'][m]['by_category'][c]['pairs']} ({res['results'][m]['by_category'][c]['mean_kl']:.3f})"
                for m in models
            ],
        ]
        for c in res["categories"]
    ]
    text = (
        "# Spelling robustness (typo probe)\n\n"
        + markdown_table(cols, overall)
        + "\n## Per category: top-1 preserved (mean KL)\n\n"
        + markdown_table(["category", *models], cat_rows)
    )
    suspects = res.get("suspect_pairs") or []
    if suspects:
        text += f"\n## Suspect pairs ({len(suspects)}, scored like the others)\n\n" + markdown_table(
            ["#", "category", "clean", "typo", "why"],
            [[x["index"], x["category"], repr(x["clean"]), repr(x["typo"]), x["reason"]] for x in suspects],
        )
    return text


def plot(res: dict):
    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        cats, models = res["categories"], res["models"]
        width = 0.8 / max(len(models), 1)
        for i, m in enumerate(models):
            xs = [j + i * width for j in range(len(cats))]
            axes[0].bar(xs, [res["results"][m]["by_category"][c]["top1_rate"] for c in cats], width, label=m)
            axes[1].bar(xs, [res["results"][m]["by_category"][c]["mean_kl"] for c in cats], width, label=m)
        for ax, title in zip(axes, ["top-1 preserved", "mean KL(clean || typo), nats"]):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats, rotation=45, ha="right")
            ax.set_title(title)
            ax.legend()
        return fig

    return draw


def typos_probe(pairs_path, checkpoint_paths, out_dir, device: str = "cpu") -> dict:
    from ..inference import load_checkpoint

    pairs = read_pairs(pairs_path)
    warn_suspects(suspect_pairs(pairs), pairs_path)
    checkpoints = [load_checkpoint(p, device) for p in checkpoint_paths]
    res = run_typos(pairs, checkpoints)
    res["pairs_file"] = str(pairs_path)
    res["paths"] = {k: str(v) for k, v in write_outputs(out_dir, "typos", res, markdown(res), plot(res)).items()}
    return res


def warn_suspects(suspects: list[dict], pairs_path, stream=None) -> None:
    """One warning line per suspect pair (on stderr): they are scored, but measure no typo."""
    for x in suspects:
        print(
            f"warning: {pairs_path}: pair {x['index']} ({x['category']}) {x['reason']}: clean {x['clean']!r}, "
            f"typo {x['typo']!r} (scored, but it measures no spelling change)",
            file=stream or sys.stderr,
        )
