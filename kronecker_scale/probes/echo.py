"""Generation echo (paper §6.12): does the model repeat a string from its prompt?

Three kinds of prompts around one target string: `normal` (the string tokenized as usual), `typo` (a
misspelled form, tokenized) and `forced_oov` (the string as ONE position whose bytes are given
explicitly: the byte override, so a string the vocabulary has no token for still gets an embedding;
Kronecker input layers only). Greedy decoding; `echoed` = the string (stripped) appears in the
continuation.
"""

from __future__ import annotations

from ..errors import KScaleError
from .report import labels_for, markdown_table, write_outputs

TEMPLATE = ("The word is{target}. Repeat the word:", "{target}")  # prompt, then what an echo looks like
TARGETS = [  # (clean, typo): the paper's forced-OOV strings and ordinary words
    (" kubernetes", " kuberentes"),
    (" tensorflow", " tensorflwo"),
    (" deserialization", " deserializaton"),
    (" kronekticus", " kronektikus"),
    (" elephant", " elefant"),
    (" library", " libary"),
    (" government", " goverment"),
    (" tomorrow", " tommorow"),
]


def _prompt_ids(ck, target: str, forced: bool):
    """(ids, overrides): the prompt with `target` tokenized, or as one overridden position."""
    before, after = TEMPLATE[0].split("{target}")
    head, tail = ck.tokenizer.encode(before), ck.tokenizer.encode(after)
    if not forced:
        return head + ck.tokenizer.encode(target) + tail, None
    # any id works as the carrier: its bytes are replaced by the target's
    return head + [0] + tail, {len(head): target.encode("utf-8")}


def run_echo(checkpoints, targets=TARGETS, new_tokens: int = 12) -> dict:
    labels = labels_for(checkpoints)
    results = {}
    for label, ck in zip(labels, checkpoints):
        kron = ck.model_cfg.input_layer == "kronecker"
        if kron and any(len(c.encode()) > ck.model_cfg.pos_dim for c, _ in targets):
            raise KScaleError(
                f"a target string is longer than pos_dim={ck.model_cfg.pos_dim} bytes",
                fix="use shorter targets for a forced byte override",
            )
        records = []
        for clean, typo in targets:
            runs = [("normal", clean, False), ("typo", typo, False)] + ([("forced_oov", clean, True)] if kron else [])
            for kind, text, forced in runs:
                ids, overrides = _prompt_ids(ck, text, forced)
                out = ck.greedy(ids, new_tokens, overrides)
                continuation = ck.tokenizer.decode(out)
                records.append(
                    {
                        "kind": kind,
                        "target": text,
                        "prompt_tokens": len(ids),
                        "target_tokens": 1 if forced else len(ck.tokenizer.encode(text)),
                        "continuation": continuation,
                        "continuation_ids": out,
                        "echoed": text.strip() in continuation,
                    }
                )
        rates = {
            kind: sum(r["echoed"] for r in records if r["kind"] == kind)
            / max(1, sum(r["kind"] == kind for r in records))
            for kind in ("normal", "typo", "forced_oov")
        }
        results[label] = {"checkpoint": str(ck.path), "echo_rate": rates, "records": records}
    return {"models": labels, "template": TEMPLATE[0], "new_tokens": new_tokens, "results": results}


def markdown(res: dict) -> str:
    rows = [
        [m, *[f"{res['results'][m]['echo_rate'][k]:.2f}" for k in ("normal", "typo", "forced_oov")]]
        for m in res["models"]
    ]
    text = "# Generation echo\n\nprompt: `" + res["template"] + "`, greedy\n\n"
    text += markdown_table(["model", "normal", "typo", "forced OOV"], rows)
    for m in res["models"]:
        recs = [
            [r["kind"], repr(r["target"]), repr(r["continuation"]), "yes" if r["echoed"] else "no"]
            for r in res["results"][m]["records"]
        ]
        text += f"\n## {m}\n\n" + markdown_table(["kind", "target", "continuation", "echoed"], recs)
    return text


def plot(res: dict):
    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        kinds = ["normal", "typo", "forced_oov"]
        width = 0.8 / len(res["models"])
        for i, m in enumerate(res["models"]):
            ax.bar(
                [j + i * width for j in range(3)], [res["results"][m]["echo_rate"][k] for k in kinds], width, label=m
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(3)], kinds)
        ax.set_ylabel("echo rate")
        ax.set_ylim(0, 1.05)
        ax.legend()
        return fig

    return draw


def echo_probe(checkpoint_paths, out_dir, new_tokens: int = 12, device: str = "cpu") -> dict:
    from ..inference import load_checkpoint

    res = run_echo([load_checkpoint(p, device) for p in checkpoint_paths], new_tokens=new_tokens)
    res["paths"] = {k: str(v) for k, v in write_outputs(out_dir, "echo", res, markdown(res), plot(res)).items()}
    return res
