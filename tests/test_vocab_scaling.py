"""The vocabulary-scaling sweep end to end at toy size: nested cuts of cl100k and BPEs trained on the
corpus, data prepared per vocabulary, both arms trained on one token budget, the report against V."""

import json
import math
from pathlib import Path

import pytest
import yaml

from tiny_runs import REPO, kscale, losses, real_text


@pytest.mark.slow
def test_vocab_sweep_end_to_end(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    (corpus / "val").mkdir()
    for f in sorted(Path("/usr/share/common-licenses").glob("*"))[:8]:
        if f.is_file():
            (corpus / "train" / f"{f.name}.txt").write_bytes(f.read_bytes())
    (corpus / "val" / "python.txt").write_text(real_text()[:20000])
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "model": {"n_layers": 1, "d_model": 32, "n_heads": 4, "seq_len": 32, "pos_dim": 16},
                "data": {"train": [{"path": "unused"}], "micro_batch_size": 2, "global_batch_size": 2},
                "schedule": {"warmup_steps": 1},
                "checkpoint": {"every": 0, "save_at_end": False},
                "eval": {"every": 5, "batches": 1},
                "logging": {"tensorboard": False},
            }
        )
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "toy",
                "train_config": "base.yaml",
                "corpus": {"train": "corpus/train", "val": "corpus/val"},
                "vocabularies": {"nested": {"source": "cl100k", "sizes": [512, 1024]}, "trained": {"sizes": [400]}},
                "arms": {
                    "kron": {"model.input_layer": "kronecker", "model.head": "untied"},
                    "bpe": {"model.input_layer": "bpe", "model.head": "untied"},
                },
                "budget_tokens": 320,
            }
        )
    )  # 5 steps of 2 x 32 tokens
    out = tmp_path / "sweep"
    r = kscale("vocab-sweep", spec, "--sweep-dir", out, env={"OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((out / "vocab_scaling.json").read_text())
    assert len(rows) == 6 and all(r["status"] == "done" for r in rows)
    meta = json.loads((out / "sweep.json").read_text())
    by_name = {Path(e["run_dir"]).name.split("-", 1)[1]: e for e in meta["elements"]}
    assert set(by_name) == {
        f"{v}-{a}" for v in ("nested-cl100k-512", "nested-cl100k-1024", "trained-bpe-400") for a in ("kron", "bpe")
    }
    sizes = {(r["vocabulary"], r["arm"]): r for r in rows}
    assert sizes[("nested-cl100k-512", "kronecker/untied")]["V"] == 512
    assert sizes[("nested-cl100k-1024", "bpe/untied")]["V"] == 1024
    for r in rows:  # every run saw the same budget: 5 steps
        run_dir = next(
            Path(e["run_dir"])
            for e in meta["elements"]
            if Path(e["run_dir"]).name.endswith(f"{r['vocabulary']}-{'kron' if 'kron' in r['arm'] else 'bpe'}")
        )
        assert max(losses(run_dir)) == 5 and r["loss"] == losses(run_dir)[5]
    # the BPE arm's input table grows with V (V x d); the Kronecker arm's projection does not (256 P x d)
    d, P = 32, 16
    for V in (512, 1024):
        k, b = sizes[(f"nested-cl100k-{V}", "kronecker/untied")], sizes[(f"nested-cl100k-{V}", "bpe/untied")]
        assert b["params"] - k["params"] == V * d - 256 * P * d
    assert (out / "vocab_scaling.png").stat().st_size > 10000
    # bits per byte = val loss x tokens / (bytes x ln 2), tokens and bytes of the held-out text
    from kronecker_scale.tokenizer import load_tokenizer

    val_text = real_text()[:20000]
    for r in rows:
        e = next(
            e
            for e in meta["elements"]
            if Path(e["run_dir"]).name.endswith(f"{r['vocabulary']}-{'kron' if 'kron' in r['arm'] else 'bpe'}")
        )
        tok = load_tokenizer(yaml.safe_load((Path(e["run_dir"]) / "config.yaml").read_text())["tokenizer"]["path"])
        n_tokens = len(tok.encode(val_text)) + 1
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * n_tokens / (len(val_text.encode()) * math.log(2)))
    assert "| nested-cl100k-512 | 512 |" in (out / "vocab_scaling.md").read_text()


@pytest.mark.parametrize("name", ["vocab-scaling.yaml", "vocab-scaling-cpu.yaml"])
def test_shipped_sweep_specs_are_valid(name):
    from kronecker_scale.config import load_config
    from kronecker_scale.launch import vocab_scaling

    spec = vocab_scaling.read_spec(REPO / "configs" / "sweeps" / name)
    cfg = load_config(spec["train_config"], spec.get("overrides", []))
    sizes = [size for _, _, size in vocab_scaling._vocabularies(spec)]
    assert min(sizes) >= 8192 and cfg.model.seq_len > 0 and spec["budget_tokens"] >= cfg.data.global_batch_size
    if name == "vocab-scaling.yaml":  # the range: 8K to 262K
        assert min(sizes) == 8192 and max(sizes) == 262144
