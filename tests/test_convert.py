"""Checkpoint conversion on tiny checkpoints trained by real `kscale train` runs (GPT-2 vocabulary):
Hugging Face export with logit parity, summary, extract, and an offline TP 1 -> 2 -> 1 reshard round trip."""

import json
import warnings

import pytest
import torch

from kronecker_scale.errors import KScaleError
from tiny_runs import kscale, real_text

warnings.filterwarnings("ignore", category=UserWarning)
pytestmark = pytest.mark.timeout(600)
# the tiny runs (gpt2_run, llama_tp2_run, bpe_run: conftest.py) are real `kscale train` runs: every test
# that asks for one is slow


def _export_and_compare(run, out, via_cli: bool):
    from kronecker_scale.convert.to_hf import export_to_hf, load_hf, parity
    from kronecker_scale.inference import load_checkpoint

    if via_cli:  # the console command: export, then its own parity report
        r = kscale("convert", "to-hf", run, out)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "same greedy continuation: True" in r.stdout
        assert float(r.stdout.split("max KL(ours || HF) ")[1].split(",")[0]) <= 1e-6
        info = json.loads((out / "kscale_export.json").read_text())
    else:
        info = export_to_hf(run, out)
    ck = load_checkpoint(run)
    return info, ck, parity(ck, out, real_text()[:4000], greedy_tokens=20), load_hf(out)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["gpt2", "llama_tp2", "bpe"])
def test_export_to_hf_matches_our_logits(request, tmp_path, which):
    run = request.getfixturevalue(f"{which}_run")
    info, ck, p, hf = _export_and_compare(run, tmp_path / "hf", via_cli=which == "gpt2")
    arch = {"gpt2": "GPT2LMHeadModel", "llama_tp2": "LlamaForCausalLM", "bpe": "GPT2LMHeadModel"}[which]
    assert info["architecture"] == arch and type(hf).__name__ == arch
    assert hf.config.vocab_size == 50257 and info["padded_rows_dropped"] == ck.model.vocab_size - 50257 > 0
    assert p["positions"] == 32
    assert p["max_kl"] <= 1e-6, p  # fp32, every position of real text
    assert p["top1_match"] == 1.0 and p["greedy_match"] and len(p["greedy_hf"]) == 20
    # the exported input table is the codec + projection materialised (or the BPE table), padded rows dropped
    table = hf.get_input_embeddings().weight.detach().double()
    assert table.shape == (50257, 32)
    torch.testing.assert_close(table, ck.input_table(), rtol=1e-6, atol=1e-6)
    tied = hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert tied == (which == "bpe")
    if which == "llama_tp2":  # kronecker_tied: lm_head = table / sqrt(d)
        torch.testing.assert_close(hf.lm_head.weight.double(), ck.input_table() / 32**0.5, rtol=1e-6, atol=1e-7)
    # the tokenizer files load with stock AutoTokenizer and tokenize like ours
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "The capital of France is Paris."
    assert tok(text)["input_ids"] == ck.tokenizer.encode(text)
    assert json.loads((tmp_path / "hf" / "kscale_export.json").read_text())["step"] == ck.step


def test_export_refuses_architectures_transformers_lacks(tmp_path):
    from kronecker_scale.convert.to_hf import hf_architecture, split_qkv
    from kronecker_scale.model.config import GPTConfig

    assert hf_architecture(GPTConfig()) == "gpt2"
    assert hf_architecture(GPTConfig(position="rope", norm="rmsnorm", activation="swiglu")) == "llama"
    with pytest.raises(KScaleError, match="model.position=rope, model.norm=layernorm"):
        hf_architecture(GPTConfig(position="rope"))
    # megatron's fused QKV is grouped per head: [q_h, k_h, v_h] for each head h
    h, hd = 2, 3
    fused = torch.arange(3 * h * hd).float()
    q, k, v = split_qkv(fused, h, h, hd)
    assert q.tolist() == [0, 1, 2, 9, 10, 11] and k.tolist() == [3, 4, 5, 12, 13, 14]
    assert v.tolist() == [6, 7, 8, 15, 16, 17]


@pytest.mark.slow
def test_to_hf_refuses_a_full_folder(gpt2_run, tmp_path):
    from kronecker_scale.convert.to_hf import export_to_hf

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(KScaleError, match="output folder is not empty"):
        export_to_hf(gpt2_run, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_summary_counts_match_the_model(gpt2_run, llama_tp2_run):
    from kronecker_scale.convert.summary import checkpoint_summary
    from kronecker_scale.inference import load_checkpoint

    for run, arm, tp in [(gpt2_run, "kronecker", 1), (llama_tp2_run, "kronecker_tied", 2)]:
        s = checkpoint_summary(run)
        ck = load_checkpoint(run)
        params = sum(p.numel() for p in ck.model.parameters())
        assert s["arm"] == arm and s["parallel"]["tensor"] == tp and s["step"] == ck.step and s["tokens"] == ck.tokens
        assert s["parameters"]["total"] == params == s["parameters_by_accounting"]["total"]
        assert s["parameters"]["input"] == 256 * 16 * 32
    assert s["parameters"]["head"] == 0
    r = kscale("convert", "summary", gpt2_run)
    assert r.returncode == 0 and "step        40" in r.stdout and "kronecker" in r.stdout


@pytest.mark.slow
def test_extract_gives_the_input_layer_alone(gpt2_run, bpe_run, tmp_path):
    from kronecker_scale.convert.summary import extract_input_layer, load_extracted
    from kronecker_scale.inference import load_checkpoint

    extract_input_layer(gpt2_run, tmp_path / "input.safetensors")
    meta = json.loads((tmp_path / "input.json").read_text())
    assert meta["pos_dim"] == 16 and meta["d_model"] == 32 and meta["vocab_size"] == 50257
    emb, _ = load_extracted(tmp_path / "input.safetensors")
    ck = load_checkpoint(gpt2_run)
    assert meta["fingerprint"] == ck.byte_table.fingerprint
    ids = torch.tensor(ck.tokenizer.encode(real_text()[:500]))
    assert torch.equal(emb(ids), ck.model.embedding.word_embeddings(ids))
    with pytest.raises(KScaleError, match="not a kscale checkpoint"):
        extract_input_layer(gpt2_run / "nowhere", tmp_path / "x.safetensors")
    with pytest.raises(KScaleError, match="no Kronecker projection"):
        extract_input_layer(bpe_run, tmp_path / "x.safetensors")


@pytest.mark.slow
def test_reshard_round_trip_is_exact(gpt2_run, tmp_path):
    from kronecker_scale.convert.reshard import reshard
    from kronecker_scale.inference import load_checkpoint, read_tensors, tensor_shapes

    original = gpt2_run / "checkpoints" / "step_00000020"
    tp2 = reshard(original, tmp_path / "tp2", tensor=2, pipeline=1)
    assert tp2 == tmp_path / "tp2" / "step_00000020"
    assert sorted(p.name for p in tp2.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # two ranks wrote it
    assert "tensor: 2" in (tp2 / "config.yaml").read_text()
    back = reshard(tp2, tmp_path / "tp1", tensor=1, pipeline=1)
    keys = sorted(tensor_shapes(original))
    assert any(k.startswith("optimizer.") for k in keys)
    assert keys == sorted(tensor_shapes(back)) == sorted(tensor_shapes(tp2))  # model and optimizer
    a, b, mid = read_tensors(original, keys), read_tensors(back, keys), read_tensors(tp2, keys)
    for k in keys:
        assert torch.equal(a[k], b[k]), k  # bit-exact round trip
        if a[k].shape == mid[k].shape:
            assert torch.equal(a[k], mid[k]), k
        else:  # vocabulary padded to 256 at TP=2: same real rows, zero padding beyond
            rows = a[k].shape[0]
            assert torch.equal(a[k][:rows], mid[k][:rows]) and not mid[k][rows:].any(), k
    states = [torch.load(p / "trainer_state.pt", weights_only=False) for p in (original, tp2, back)]
    assert all(s["step"] == 20 and s["train_loader"] == states[0]["train_loader"] for s in states)
    assert [s["world_size"] for s in states] == [1, 2, 1]
    # the TP=2 checkpoint evaluates like the original: the same logits on real text
    ids = torch.tensor(load_checkpoint(original).tokenizer.encode(real_text()[:3000])[:32])
    assert torch.equal(load_checkpoint(original).forward(ids)[0], load_checkpoint(tp2).forward(ids)[0])


@pytest.mark.slow
def test_reshard_refuses_impossible_layouts(gpt2_run, tmp_path):
    r = kscale("convert", "reshard", gpt2_run, tmp_path / "x", "--tensor", "3")
    assert r.returncode == 2 and "divisible" in r.stderr and "Traceback" not in r.stderr
