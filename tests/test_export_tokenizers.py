"""The export's tokenizer (`kscale convert to-hf`, kronecker_scale/convert/hf_tokenizer.py): every format
the project reads becomes files that stock `AutoTokenizer.from_pretrained(OUT)` loads and that give our ids.

The exported tokenizer is always checked in a separate process that imports transformers and nothing of
ours (CHECK_SCRIPT): it gets the folder, the texts and our ids as JSON and reports its own ids, decodes and
(for the exported models) a text-generation pipeline's greedy continuation.

- fast: merge recovery on a hand-made vocabulary; the possessive-interval rewrite; refusals (missing
  bytes, an unconvertible SentencePiece model) that write nothing;
- slow (conversion of the real vocabularies, 2-6 s each, plus the separate process): gpt2 (HF
  tokenizer.json), cl100k, Llama 3, Tekken, a nested cut of cl100k, Mistral's SentencePiece;
- slow: tiny Kronecker models trained (real `kscale train` runs) on data prepared with Tekken (131,072
  ids, Llama-shaped) and cl100k (GPT-2-shaped), exported with `kscale convert to-hf`: parity report with
  tokenizer parity, AutoTokenizer ids, the text-generation pipeline.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_runs
from kronecker_scale.errors import KScaleError
from tiny_runs import kscale, real_text

pytestmark = pytest.mark.timeout(900)

# texts the separate process encodes: several scripts, emoji, code, whitespace runs, and real prose
MULTILINGUAL = [
    "Grüße aus Köln — naïve café, 日本語のテキスト, Ελληνικά, русский текст, emoji 🙂🚀👩🏽‍🚀 and\ttabs\n\n  spaces",
    "def main(argv):\n    for i, x in enumerate(argv):  # loop\n\t\tprint(f'{i:>4}: {x!r}')\n\n\n    return 0\n",
    "עברית וערבית: مرحبا بالعالم. हिन्दी पाठ। 한국어와 中文混合 text 1234567 3.14e-10 ¯\\_(ツ)_/¯",
    "     many   spaces\r\n\r\ntrailing \t \n",
]
CHECK_SCRIPT = r"""
import json, sys
from transformers import AutoTokenizer
spec = json.loads(open(sys.argv[1]).read())
tok = AutoTokenizer.from_pretrained(spec["dir"])
ids = [tok(t, add_special_tokens=False)["input_ids"] for t in spec["texts"]]
out = {"class": type(tok).__name__, "len": len(tok), "ids": ids,
       "decoded": [tok.decode(i, skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids],
       "bos": tok.bos_token, "eos": tok.eos_token, "eos_id": tok.eos_token_id}
if spec.get("prompt"):
    from transformers import pipeline
    gen = pipeline("text-generation", model=spec["dir"], tokenizer=spec["dir"], device="cpu")
    r = gen(spec["prompt"], max_new_tokens=spec["new_tokens"], do_sample=False, return_tensors=True)
    out["generated_ids"] = [int(i) for i in r[0]["generated_token_ids"]]
    r = gen(spec["prompt"], max_new_tokens=spec["new_tokens"], do_sample=False, return_full_text=False)
    out["generated_text"] = r[0]["generated_text"]
out["ours_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("kronecker_scale", "tiny_runs"))
print("RESULT " + json.dumps(out))
"""


def transformers_only(
    folder: Path, texts: list[str], tmp_path: Path, prompt: str | None = None, new_tokens: int = 8
) -> dict:
    """Run CHECK_SCRIPT in a fresh interpreter (outside the repository, hub offline) on the exported folder."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"dir": str(folder), "texts": texts, "prompt": prompt, "new_tokens": new_tokens}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT, str(spec)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out["ours_imported"] == []
    return out


def check_against_ours(tok, folder: Path, tmp_path: Path, texts: list[str], **kw) -> dict:
    out = transformers_only(folder, texts, tmp_path, **kw)
    assert out["class"] != "GPT2Tokenizer" and out["len"] > 1000
    for text, theirs, decoded in zip(texts, out["ids"], out["decoded"]):
        ours = tok.encode(text)
        assert theirs == ours, (text[:60], ours[:20], theirs[:20])
        assert decoded == tok.decode(ours)
    return out


# --- fast ---------------------------------------------------------------------------------------------
def test_merges_are_recovered_from_ranks_as_tiktoken_would_merge():
    from kronecker_scale.convert.hf_tokenizer import bpe_parts, merges_from_ranks

    ranks = {bytes([b]): b for b in range(256)}
    for i, tok in enumerate([b"ab", b"bc", b"abc", b"cd", b"abcd", b"xyz"]):
        ranks[tok] = 256 + i
    merges, unreachable = merges_from_ranks(ranks)
    # "abc": with ranks below its own, bpe gives [ab, c] ("ab" has the lower rank), not [a, bc]
    assert merges == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"c", b"d"), (b"abc", b"d")]
    assert unreachable == [b"xyz"]  # no "xy" or "yz": only reachable as a whole pre-token
    assert bpe_parts(ranks, b"abcd") == [b"abcd"] and bpe_parts(ranks, b"abcd", ranks[b"abcd"]) == [b"abc", b"d"]


def test_possessive_intervals_are_rewritten_for_oniguruma():
    from kronecker_scale.convert.hf_tokenizer import onig_pattern

    assert onig_pattern(r"\p{N}{1,3}+| ?\p{L}++|x{2}+|\{1,3}+") == r"\p{N}{1,3}| ?\p{L}++|x{2}|\{1,3}+"


def test_a_vocabulary_without_every_byte_is_refused_and_nothing_is_written(tmp_path):
    import base64

    from kronecker_scale.convert.hf_tokenizer import export_tokenizer
    from kronecker_scale.tokenizer import load_tokenizer

    src = tmp_path / "partial.tiktoken"  # bytes 0..199 only, plus two merges
    lines = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(200)]
    lines += [base64.b64encode(b"ab") + b" 200", base64.b64encode(b"abc") + b" 201"]
    src.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(KScaleError, match="200 of the 256 single bytes"):
        export_tokenizer(load_tokenizer(src), tmp_path / "out", 32)
    assert not (tmp_path / "out").exists()


def test_an_unconvertible_sentencepiece_model_is_refused(tmp_path):
    import sentencepiece as spm

    from kronecker_scale.convert.hf_tokenizer import export_tokenizer
    from kronecker_scale.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(real_text()[:20000])
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "word"), vocab_size=300, model_type="word", minloglevel=2
    )
    with pytest.raises(KScaleError, match="model type 3"):
        export_tokenizer(load_tokenizer(tmp_path / "word.model"), tmp_path / "out", 32)
    assert not (tmp_path / "out").exists()


# --- every real format, converted and read back by transformers alone ---------------------------------
def _cut_cl100k(tmp_path: Path) -> Path:
    from kronecker_scale.data.tokenizer_training import cut_tiktoken
    from kronecker_scale.tokenizer.assets import tokenizer_path

    return cut_tiktoken(tokenizer_path("cl100k"), 4096, tmp_path / "cl100k-4096.tiktoken")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "cl100k", "llama3", "tekken", "cut-cl100k-4096", "mistral-sp"])
def test_every_format_exports_an_autotokenizer_with_our_ids(name, tmp_path):
    from kronecker_scale.convert.hf_tokenizer import PARITY_SAMPLES, export_tokenizer
    from kronecker_scale.tokenizer import load_tokenizer
    from kronecker_scale.tokenizer.assets import tokenizer_path

    path = _cut_cl100k(tmp_path) if name.startswith("cut-") else tokenizer_path(name)
    tok = load_tokenizer(path)
    out = tmp_path / "hf"
    info = export_tokenizer(tok, out, model_max_length=64)
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 64
    assert info["self_check"]["ids_match"] and info["self_check"]["round_trip"]
    texts = [*PARITY_SAMPLES, *MULTILINGUAL, real_text()[:6000]]
    theirs = check_against_ours(tok, out, tmp_path, texts)
    if name != "mistral-sp":  # byte-level: every text comes back byte for byte
        assert theirs["decoded"] == texts
    expected_eos = {
        "gpt2": "<|endoftext|>",
        "cl100k": "<|endoftext|>",
        "llama3": "<|end_of_text|>",
        "tekken": "</s>",
        "mistral-sp": "</s>",
    }.get(name)
    assert theirs["eos"] == expected_eos
    if expected_eos:
        assert theirs["eos_id"] == tok.eos_id
    if name in ("cl100k", "llama3", "tekken", "cut-cl100k-4096"):
        assert info["merges"] >= info["ranks"] - 256 - info["tokens_without_merge"] and info["merges"] > 3000


# --- tiny models on Tekken and cl100k, exported with `kscale convert to-hf` ---------------------------
def vocab_run(base: Path, vocab: str, model: dict) -> Path:
    """A tiny Kronecker model trained (`kscale train`, 6 steps) on CPython's LICENSE plus multilingual
    text tokenized with `vocab` (made once per session under base)."""
    from kronecker_scale.data import prepare_data
    from kronecker_scale.tokenizer.assets import tokenizer_path

    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".lock-{vocab}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = base / f"export-{vocab}"
        if (run / "checkpoints" / "latest").is_file():
            return run
        data = base / f"data-{vocab}"
        (data / "in").mkdir(parents=True, exist_ok=True)
        (data / "in" / "text.txt").write_text(real_text() + "\n\n".join(MULTILINGUAL * 20))
        prepare_data(tokenizer_path(vocab), [data / "in"], data / "ds", 32, workers=1, overwrite=True)
        cfg = tiny_runs.write_config(
            base / f"export-{vocab}.yaml",
            data / "ds",
            model=model,
            tokenizer={"path": vocab},
            data={"cache_dir": str(base / "cache" / f"export-{vocab}")},
            schedule={"train_steps": 6, "warmup_steps": 1},
            checkpoint={"every": 6},
            eval={"every": 0},
            logging={"every": 3},
            run={"dir": str(run), "name": f"export-{vocab}"},
        )
        r = kscale("train", cfg, env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "vocab,shape,arch,size",
    [
        ("tekken", tiny_runs.LLAMA_STYLE, "LlamaForCausalLM", 131072),
        ("cl100k", tiny_runs.GPT2_STYLE, "GPT2LMHeadModel", 100277),
    ],
)
def test_export_of_a_tiktoken_family_model_is_a_working_hf_model(tiny_runs_base, tmp_path, vocab, shape, arch, size):
    from kronecker_scale.inference import load_checkpoint

    run = vocab_run(tiny_runs_base, vocab, shape)
    out = tmp_path / "hf"
    r = kscale("convert", "to-hf", run, out, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "same greedy continuation: True" in r.stdout
    assert "tokenizer parity (" in r.stdout and "same ids on" in r.stdout and "): True" in r.stdout
    info = json.loads((out / "kscale_export.json").read_text())
    assert info["architecture"] == arch and info["vocab_size"] == size
    assert not (out / "kscale_tokenizer").exists() and "not AutoTokenizer-readable" not in info["tokenizer"]
    tp = info["parity"]["tokenizer"]
    assert tp["ok"] and tp["ids_match"] and tp["round_trip"] and tp["samples"] >= 16 and tp["tokens"] > 500
    assert info["parity"]["max_kl"] <= 1e-6
    ck = load_checkpoint(run)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == ck.tokenizer.eos_id is not None
    # transformers alone: the tokenizer gives our ids, and the text-generation pipeline runs on the export
    prompt = "It is a truth universally acknowledged, that"
    theirs = check_against_ours(
        ck.tokenizer, out, tmp_path, [*MULTILINGUAL, real_text()[:4000], prompt], prompt=prompt, new_tokens=8
    )
    prompt_ids = ck.tokenizer.encode(prompt)
    ours = ck.greedy(prompt_ids, 8)
    stop = next((i + 1 for i, t in enumerate(ours) if t == ck.tokenizer.eos_id), len(ours))
    assert theirs["generated_ids"] == prompt_ids + ours[:stop]
    assert isinstance(theirs["generated_text"], str)
