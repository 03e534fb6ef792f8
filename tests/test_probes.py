"""The paper's probes on a tiny trained checkpoint (real `kscale train`, GPT-2 vocabulary): well-formed
JSON/markdown/PNG, and the numbers they must give on constructed cases."""

import json
import warnings

import pytest
import torch

from kronecker_scale.errors import KScaleError
from tiny_runs import kscale

warnings.filterwarnings("ignore", category=UserWarning)
pytestmark = pytest.mark.timeout(600)
# gpt2_run and gpt2_hf (conftest.py) are a real `kscale train` run and its export: the tests that ask for
# them (or for ck) are slow


@pytest.fixture(scope="module")
def ck(gpt2_run):
    from kronecker_scale.inference import load_checkpoint

    return load_checkpoint(gpt2_run)


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """n greedy continuation ids from a transformers model, one full forward per token."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


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
    for p in pairs:  # one content word changed by 1-2 characters, the rest equal
        clean, typo = p["clean"].split(), p["typo"].split()
        diff = [(a.strip(".,"), b.strip(".,")) for a, b in zip(clean, typo) if a != b]
        assert len(clean) == len(typo) and len(diff) == 1 and diff[0] == (p["word"], p["typo_word"]), p
        assert 1 <= _osa(*diff[0]) <= 2, p


@pytest.mark.slow
def test_typos_constructed_cases(gpt2_hf, ck, tmp_path):
    from kronecker_scale.probes.typos import default_pairs, read_pairs, run_typos, score_pair

    pairs = read_pairs(default_pairs())
    same = [{"category": p["category"], "clean": p["clean"], "typo": p["clean"]} for p in pairs[::10]]
    res = run_typos(same, [ck, ck])  # typo == clean, and two identical checkpoints
    a, b = (res["results"][m] for m in res["models"])
    assert res["models"] == ["gpt2@40#1", "gpt2@40#2"]
    assert a["overall"]["top1_rate"] == 1.0 and a["overall"]["mean_kl"] == 0.0
    assert a["overall"]["logprob_drop"] == 0.0 and a["overall"]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert a["overall"] == b["overall"]
    # real pairs through the CLI: two checkpoints side by side, JSON + markdown + PNG
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in pairs[::6]))
    r = kscale("probe", "typos", "--pairs", f, ck.path, ck.path.parent / "step_00000020", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "out" / "typos.json").read_text())
    assert out["models"] == ["gpt2@40", "gpt2@20"]
    assert set(out["results"]["gpt2@40"]["by_category"]) == {p["category"] for p in pairs[::6]}
    assert (tmp_path / "out" / "typos.png").stat().st_size > 1000 and "| gpt2@40 |" in (
        tmp_path / "out" / "typos.md"
    ).read_text()
    # each metric against the exported transformers model, computed independently
    hf = hf_model(gpt2_hf)
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
    from kronecker_scale.embedding import ByteTable
    from kronecker_scale.embedding.codec import dense_codec
    from kronecker_scale.probes.geometry import CodecSpace, canonical, neighbours

    vocab = [b"run", b"runs", b" run", b"Run", b"running", b"ran", b"xyz", b"runner", b"rune", b"r"]
    space = CodecSpace(vocab, lambda s: [vocab.index(s.encode())], pos_dim=8)
    table = ByteTable.from_token_bytes(vocab, 8)
    z = torch.nn.functional.normalize(dense_codec(table.bytes, table.lengths, dtype=torch.float64), dim=1)
    torch.testing.assert_close(space.cosines("run"), z @ z[0], rtol=1e-9, atol=1e-12)
    nb = neighbours(space, "run", 3)
    # 'rune' and 'runs' share 3 positioned bytes with 'run' at length 4; ' run' (shifted) shares none
    got = [n["token"] for n in nb["neighbours"]]
    assert set(got[:2]) == {"rune", "runs"} and got[2] == "runner"  # the first two tie exactly
    assert nb["neighbours"][0]["cosine"] == pytest.approx(nb["neighbours"][1]["cosine"], abs=1e-12)
    assert space.cosines("run")[vocab.index(b" run")] < 0 and nb["morphological_at_k"] == 1.0
    assert canonical("\u0120Run.") == canonical(" run") == "run"


@pytest.mark.slow
def test_geometry_on_checkpoint_and_its_export(gpt2_run, gpt2_hf, ck, tmp_path):
    import statistics

    from kronecker_scale.probes.geometry import canonical, geometry_probe

    geometry_probe([gpt2_run, gpt2_hf], tmp_path, pos_dim=16)
    res = json.loads((tmp_path / "geometry.json").read_text())
    assert res["spaces"] == ["gpt2@40", gpt2_hf.name, "codec(P=16)", "random"]
    ours, theirs = res["results"]["gpt2@40"]["families"], res["results"][gpt2_hf.name]["families"]
    # single-token probes: the exported table's neighbours are ours (the same materialised rows), and both
    # are the top 5 cosines of that row against every row of the checkpoint's table, computed here
    table = torch.nn.functional.normalize(ck.input_table(), dim=1)
    exact = ck.tokenizer.token_bytes("exact")
    single = 0
    for fam in ours:
        for a, b in zip(ours[fam], theirs[fam]):
            ids = ck.tokenizer.encode(a["probe"])
            if len(ids) != 1:
                continue
            single += 1
            assert [n["id"] for n in a["neighbours"]] == [n["id"] for n in b["neighbours"]], a["probe"]
            cos = table @ table[ids[0]]
            cos[[i for i, t in enumerate(exact) if t == a["probe"].encode()]] = -float("inf")  # the probe itself
            fifth = float(torch.topk(cos, 5).values[-1])
            got = [n["id"] for n in a["neighbours"]]
            assert [n["cosine"] for n in a["neighbours"]] == pytest.approx(cos[got].tolist(), abs=1e-9), a["probe"]
            assert min(n["cosine"] for n in a["neighbours"]) >= fifth - 1e-9, a["probe"]
    assert single >= 10
    # morphological@5 of every row is the share of its 5 neighbours whose canonical form is not the probe's
    for space in res["spaces"]:
        rows = [row for rs in res["results"][space]["families"].values() for row in rs]
        for row in rows:
            assert len(row["neighbours"]) == 5
            assert all(n["token"].encode() != row["probe"].encode() for n in row["neighbours"])  # self excluded
            other = sum(canonical(n["token"]) != canonical(row["probe"]) for n in row["neighbours"])
            assert row["morphological_at_k"] == other / 5 and row["typographic_at_k"] == 1 - other / 5, row
            assert [n["class"] for n in row["neighbours"]] == [
                "morphological" if canonical(n["token"]) != canonical(row["probe"]) else "typographic"
                for n in row["neighbours"]
            ]
        assert res["results"][space]["morphological_at_k"] == pytest.approx(
            statistics.fmean(row["morphological_at_k"] for row in rows), abs=1e-12
        )
    assert (tmp_path / "geometry.png").is_file() and "morphological@5" in (tmp_path / "geometry.md").read_text()


@pytest.mark.slow
def test_echo_report_and_override_consistency(ck, gpt2_hf, tmp_path):
    from kronecker_scale.probes.echo import TEMPLATE, _prompt_ids, echo_probe

    res = echo_probe([ck.path], tmp_path, new_tokens=4)
    recs = res["results"]["gpt2@40"]["records"]
    assert {r["kind"] for r in recs} == {"normal", "typo", "forced_oov"} and len(recs) == 24
    assert all(r["target_tokens"] == 1 for r in recs if r["kind"] == "forced_oov")
    assert (tmp_path / "echo.png").is_file() and "forced OOV" in (tmp_path / "echo.md").read_text()
    # every record against an independent decode: tokenized prompts through the exported transformers
    # model (its own greedy loop), the continuation's text, and `echoed` = the target appears in it
    hf = hf_model(gpt2_hf)
    before, after = TEMPLATE[0].split("{target}")
    for r in recs:
        assert len(r["continuation_ids"]) == 4
        assert r["continuation"] == ck.tokenizer.decode(r["continuation_ids"])
        assert r["echoed"] == (r["target"].strip() in r["continuation"]), r
        if r["kind"] != "forced_oov":
            target = ck.tokenizer.encode(r["target"])
            ids = ck.tokenizer.encode(before) + target + ck.tokenizer.encode(after)
            assert r["prompt_tokens"] == len(ids) and r["target_tokens"] == len(target)
            assert r["continuation_ids"] == hf_greedy(hf, ids, 4), r
    for kind in ("normal", "typo", "forced_oov"):
        echoed = [r["echoed"] for r in recs if r["kind"] == kind]
        assert len(echoed) == 8 and res["results"]["gpt2@40"]["echo_rate"][kind] == sum(echoed) / 8
    # a forced override carrying a real token's own bytes is that token: same continuation
    word = " library"
    assert len(ck.tokenizer.encode(word)) == 1
    plain, _ = _prompt_ids(ck, word, forced=False)
    forced, ov = _prompt_ids(ck, word, forced=True)
    torch.testing.assert_close(
        ck.forward(torch.tensor(plain))[0], ck.forward(torch.tensor(forced), ov)[0], rtol=0, atol=1e-5
    )
    assert ck.greedy(plain, 4) == ck.greedy(forced, 4, ov)


@pytest.mark.slow
def test_norm_drift_equals_direct_norms_and_the_trainer_log(gpt2_run, tmp_path):
    from kronecker_scale.inference import load_checkpoint, read_tensors
    from kronecker_scale.probes.norm_drift import norm_drift_probe

    norm_drift_probe([gpt2_run], tmp_path)
    rows = json.loads((tmp_path / "norm_drift.json").read_text())["results"]["gpt2"]
    assert [x["step"] for x in rows] == [20, 40] and rows[0]["embedding_rms_drift"] == 1.0
    logged = {
        x["step"]: x for x in map(json.loads, (gpt2_run / "metrics.jsonl").read_text().splitlines()) if "loss" in x
    }
    direct = {}
    for row in rows:
        step_dir = gpt2_run / "checkpoints" / f"step_{row['step']:08d}"
        w = read_tensors(step_dir, ["embedding.word_embeddings.weight"])["embedding.word_embeddings.weight"].double()
        direct[row["step"]] = float(w.norm(dim=1).mean()), float(w.std())
        assert row["weight_row_norm"] == pytest.approx(direct[row["step"]][0], rel=1e-12)
        assert row["weight_std"] == pytest.approx(direct[row["step"]][1], rel=1e-12)
        assert row["weight_row_norm"] == pytest.approx(logged[row["step"]]["projection_row_norm"], rel=1e-6)
        assert row["weight_std"] == pytest.approx(logged[row["step"]]["projection_std"], rel=1e-6)
    # drift: the value over the first checkpoint's
    assert rows[1]["weight_row_norm_drift"] == pytest.approx(direct[40][0] / direct[20][0], rel=1e-12)
    assert rows[1]["weight_std_drift"] == pytest.approx(direct[40][1] / direct[20][1], rel=1e-12)
    table = load_checkpoint(gpt2_run).input_table()  # the latest checkpoint's materialised embeddings
    assert rows[-1]["embedding_rms"] == pytest.approx(float(table.pow(2).mean().sqrt()), rel=1e-9)
    assert (tmp_path / "norm_drift.png").is_file()


@pytest.mark.slow
def test_loading_and_probing_leave_no_global_cpu_layer(ck):
    """megatron's CPU layer is process-global; a library user (or this test process) must get it back off."""
    from kronecker_scale.model import megatron_cpu

    ck.forward(torch.tensor([1, 2, 3]))
    assert not megatron_cpu.is_enabled()
