"""The paper's probes on a tiny trained checkpoint (real `kscale train`, GPT-2 vocabulary): well-formed
JSON/markdown/PNG, and the numbers they must give on constructed cases."""
import json
import warnings

import pytest
import torch

import tiny_runs
from kronecker_scale.errors import KScaleError

warnings.filterwarnings("ignore", category=UserWarning)
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_runs.shared_base(tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2(base):
    return tiny_runs.gpt2_run(base)


@pytest.fixture(scope="module")
def ck(gpt2):
    from kronecker_scale.convert.load import load_checkpoint
    return load_checkpoint(gpt2)


def _osa(a, b):
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def test_shipped_pairs_follow_the_protocol():
    from kronecker_scale.probes.typos import default_pairs, read_pairs
    pairs = read_pairs(default_pairs())
    cats = {"geography", "math", "time", "colors", "idiom", "body", "animals", "counting", "syntax", "misc", "people"}
    assert len(pairs) >= 110 and {p["category"] for p in pairs} == cats
    assert all(sum(p["category"] == c for p in pairs) >= 10 for c in cats)
    assert sum(p["source"].startswith("codespell") for p in pairs) > 40
    for p in pairs:                              # one content word changed by 1-2 characters, the rest equal
        clean, typo = p["clean"].split(), p["typo"].split()
        diff = [(a.strip(".,"), b.strip(".,")) for a, b in zip(clean, typo) if a != b]
        assert len(clean) == len(typo) and len(diff) == 1 and diff[0] == (p["word"], p["typo_word"]), p
        assert 1 <= _osa(*diff[0]) <= 2, p


def test_typos_constructed_cases(base, gpt2, ck, tmp_path):
    from transformers import AutoModelForCausalLM

    from kronecker_scale.probes.typos import default_pairs, read_pairs, run_typos, score_pair
    pairs = read_pairs(default_pairs())
    same = [{"category": p["category"], "clean": p["clean"], "typo": p["clean"]} for p in pairs[::10]]
    res = run_typos(same, [ck, ck])                        # typo == clean, and two identical checkpoints
    a, b = (res["results"][m] for m in res["models"])
    assert res["models"] == ["gpt2@40#1", "gpt2@40#2"]
    assert a["overall"]["top1_rate"] == 1.0 and a["overall"]["mean_kl"] == 0.0
    assert a["overall"]["logprob_drop"] == 0.0 and a["overall"]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert a["overall"] == b["overall"]
    # real pairs through the CLI: two checkpoints side by side, JSON + markdown + PNG
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in pairs[::6]))
    r = tiny_runs.kscale("probe", "typos", "--pairs", f, ck.path, ck.path.parent / "step_00000020",
                         "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "out" / "typos.json").read_text())
    assert out["models"] == ["gpt2@40", "gpt2@20"]
    assert set(out["results"]["gpt2@40"]["by_category"]) == {p["category"] for p in pairs[::6]}
    assert (tmp_path / "out" / "typos.png").stat().st_size > 1000 and "| gpt2@40 |" in (
        tmp_path / "out" / "typos.md").read_text()
    # each metric against the exported transformers model, computed independently
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_runs.hf_export(base, gpt2)), dtype=torch.float32)
    for p in pairs[:3]:
        mine = score_pair(ck, p["clean"], p["typo"])
        outs = [hf(torch.tensor([ck.tokenizer.encode(t)]), output_hidden_states=True) for t in (p["clean"], p["typo"])]
        lp, lq = (torch.log_softmax(o.logits[0, -1].double(), -1) for o in outs)
        top = int(lp.argmax())
        assert mine["kl"] == pytest.approx(float((lp.exp() * (lp - lq)).sum()), abs=1e-5)
        assert mine["logprob_drop"] == pytest.approx(float(lp[top] - lq[top]), abs=1e-4)
        assert mine["preserved"] == (top == int(lq.argmax()))
        hc, ht = (o.hidden_states[-1][0, -1].double() for o in outs)
        assert mine["cosine"] == pytest.approx(float(torch.cosine_similarity(hc, ht, dim=0)), abs=1e-5)


def test_bad_pairs_files_are_named(tmp_path):
    from kronecker_scale.probes.typos import read_pairs
    f = tmp_path / "p.jsonl"
    f.write_text('{"category": "x", "clean": "a"}\n')
    with pytest.raises(KScaleError, match="typo") as e:
        read_pairs(f)
    assert f"{f}:1" in str(e.value)


def test_codec_geometry_closed_form_and_known_neighbours():
    from kronecker_scale.embedding.codec import dense_codec
    from kronecker_scale.embedding import ByteTable
    from kronecker_scale.probes.geometry import CodecSpace, canonical, neighbours
    vocab = [b"run", b"runs", b" run", b"Run", b"running", b"ran", b"xyz", b"runner", b"rune", b"r"]
    space = CodecSpace(vocab, lambda s: [vocab.index(s.encode())], pos_dim=8)
    table = ByteTable.from_token_bytes(vocab, 8)
    z = torch.nn.functional.normalize(dense_codec(table.bytes, table.lengths, dtype=torch.float64), dim=1)
    torch.testing.assert_close(space.cosines("run"), z @ z[0], rtol=1e-9, atol=1e-12)
    nb = neighbours(space, "run", 3)
    # 'rune' and 'runs' share 3 positioned bytes with 'run' at length 4; ' run' (shifted) shares none
    got = [n["token"] for n in nb["neighbours"]]
    assert set(got[:2]) == {"rune", "runs"} and got[2] == "runner"          # the first two tie exactly
    assert nb["neighbours"][0]["cosine"] == pytest.approx(nb["neighbours"][1]["cosine"], abs=1e-12)
    assert space.cosines("run")[vocab.index(b" run")] < 0 and nb["morphological_at_k"] == 1.0
    assert canonical("\u0120Run.") == canonical(" run") == "run"


def test_geometry_on_checkpoint_and_its_export(base, gpt2, tmp_path):
    hf_dir = tiny_runs.hf_export(base, gpt2)
    from kronecker_scale.probes.geometry import geometry_probe
    geometry_probe([gpt2, hf_dir], tmp_path, pos_dim=16)
    res = json.loads((tmp_path / "geometry.json").read_text())
    assert res["spaces"] == ["gpt2@40", hf_dir.name, "codec(P=16)", "random"]
    ours, theirs = res["results"]["gpt2@40"]["families"], res["results"][hf_dir.name]["families"]
    # single-token probes: the exported table's neighbours are ours (the same materialised rows)
    for fam in ours:
        for a, b in zip(ours[fam], theirs[fam]):
            if len(tiny_runs_tokenize(a["probe"])) == 1:
                assert [n["id"] for n in a["neighbours"]] == [n["id"] for n in b["neighbours"]], a["probe"]
    for space in res["spaces"]:
        for rows in res["results"][space]["families"].values():
            for row in rows:
                assert len(row["neighbours"]) == 5 and 0 <= row["morphological_at_k"] <= 1
                assert all(n["token"].encode() != row["probe"].encode() for n in row["neighbours"])   # self excluded
    assert (tmp_path / "geometry.png").is_file() and "morphological@5" in (tmp_path / "geometry.md").read_text()


def tiny_runs_tokenize(text):
    from kronecker_scale.tokenizer import load_tokenizer
    from kronecker_scale.tokenizer.assets import tokenizer_path
    return load_tokenizer(tokenizer_path("gpt2")).encode(text)


def test_echo_report_and_override_consistency(ck, tmp_path):
    from kronecker_scale.probes.echo import _prompt_ids, echo_probe
    res = echo_probe([ck.path], tmp_path, new_tokens=4)
    recs = res["results"]["gpt2@40"]["records"]
    assert {r["kind"] for r in recs} == {"normal", "typo", "forced_oov"} and len(recs) == 24
    assert all(len(r["continuation_ids"]) == 4 and isinstance(r["echoed"], bool) for r in recs)
    assert all(r["target_tokens"] == 1 for r in recs if r["kind"] == "forced_oov")
    assert (tmp_path / "echo.png").is_file() and "forced OOV" in (tmp_path / "echo.md").read_text()
    # a forced override carrying a real token's own bytes is that token: same continuation
    word = " library"
    assert len(ck.tokenizer.encode(word)) == 1
    plain, _ = _prompt_ids(ck, word, forced=False)
    forced, ov = _prompt_ids(ck, word, forced=True)
    torch.testing.assert_close(ck.forward(torch.tensor(plain))[0], ck.forward(torch.tensor(forced), ov)[0],
                               rtol=0, atol=1e-5)
    assert ck.greedy(plain, 4) == ck.greedy(forced, 4, ov)


def test_norm_drift_equals_direct_norms_and_the_trainer_log(gpt2, tmp_path):
    from kronecker_scale.convert.load import load_checkpoint, read_tensors
    from kronecker_scale.probes.norm_drift import norm_drift_probe
    norm_drift_probe([gpt2], tmp_path)
    rows = json.loads((tmp_path / "norm_drift.json").read_text())["results"]["gpt2"]
    assert [x["step"] for x in rows] == [20, 40] and rows[0]["embedding_rms_drift"] == 1.0
    logged = {x["step"]: x for x in map(json.loads, (gpt2 / "metrics.jsonl").read_text().splitlines()) if "loss" in x}
    for row in rows:
        step_dir = gpt2 / "checkpoints" / f"step_{row['step']:08d}"
        w = read_tensors(step_dir, ["embedding.word_embeddings.weight"])["embedding.word_embeddings.weight"].double()
        assert row["weight_row_norm"] == pytest.approx(float(w.norm(dim=1).mean()), rel=1e-12)
        assert row["weight_std"] == pytest.approx(float(w.std()), rel=1e-12)
        assert row["weight_row_norm"] == pytest.approx(logged[row["step"]]["projection_row_norm"], rel=1e-6)
        assert row["weight_std"] == pytest.approx(logged[row["step"]]["projection_std"], rel=1e-6)
    table = load_checkpoint(gpt2).input_table()          # the latest checkpoint's materialised embeddings
    assert rows[-1]["embedding_rms"] == pytest.approx(float(table.pow(2).mean().sqrt()), rel=1e-9)
    assert (tmp_path / "norm_drift.png").is_file()


def test_loading_and_probing_leave_no_global_cpu_layer(ck):
    """megatron's CPU layer is process-global; a library user (or this test process) must get it back off."""
    from kronecker_scale.model import megatron_cpu
    ck.forward(torch.tensor([1, 2, 3]))
    assert not megatron_cpu.is_enabled()
