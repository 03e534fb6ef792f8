"""The megatron-core GPT with Kronecker/BPE input layers and three heads, in real gloo processes.

Every layout starts from the TP=1/PP=1 reference's weights (tests/megatron_harness.py) and must give
the same loss, logits and (gathered) gradients.
"""

import pytest
import torch
import torch.multiprocessing as mp

from tests import megatron_harness as H

pytestmark = pytest.mark.slow  # every test spawns gloo processes (the reference too)

ARMS = {
    "kron_untied": dict(input_layer="kronecker", head="untied", pos_dim=16),
    "kron_ktied": dict(input_layer="kronecker", head="kronecker_tied", pos_dim=16),
    "bpe_tied": dict(input_layer="bpe", head="tied"),
    "bpe_untied": dict(input_layer="bpe", head="untied"),
    "kron_rope_rms_swiglu": dict(
        input_layer="kronecker", head="untied", pos_dim=16, position="rope", norm="rmsnorm", activation="swiglu"
    ),
}
KRON_ARMS = [a for a in ARMS if a.startswith("kron")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    cases = {name: {"model": m, "steps": 3} for name, m in ARMS.items()}
    (res,) = H.spawn(tmp, 1, cases)
    torch.save(res, tmp / "ref.pt")
    return res, str(tmp / "ref.pt")


def assert_same(got, ref, what, rtol=1e-5):
    scale = ref.abs().max().clamp_min(1e-12)
    err = (got - ref).abs().max()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} vs scale {scale:.3e}"


def compare(res, ref, name, *, logits=True, steps=1):
    assert len(res["losses"]) >= 1
    for a, b in zip(res["losses"][:steps], ref["losses"][:steps]):
        assert abs(a - b) <= 1e-5 * abs(b), f"{name}: loss {a} != {b}"
    if logits:
        assert_same(res["logits"], ref["logits"], f"{name} logits")
    for key, g in res["grads"].items():
        ref_key = key if key in ref["grads"] else "embedding.word_embeddings.weight"
        assert_same(g, ref["grads"][ref_key], f"{name} grad {key}")


def test_reference_trains(reference):
    res, _ = reference
    for name, r in res.items():
        assert len(r["losses"]) == 3 and r["losses"][-1] < r["losses"][0], (name, r["losses"])
        assert all(torch.isfinite(g).all() for g in r["grads"].values())
    for arm in ("bpe_tied", "bpe_untied"):  # padded ids (145 real, padded to 256) embed to zero
        table = res[arm]["state"]["embedding.word_embeddings.weight"]
        assert torch.all(table[145:] == 0) and table[:145].abs().sum() > 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_with_and_without_sequence_parallel_equals_tp1(reference, tmp_path, sp):
    """Every arm, and both TP layouts of the Kronecker projection."""
    ref, ref_file = reference
    tag = "sp" if sp else "tp2"
    cases = {f"{n}/{tag}": {"model": m, "tp": 2, "sp": sp, "ref": n} for n, m in ARMS.items()}
    cases.update(
        {
            f"{n}/{tag}-replicated": {"model": {**ARMS[n], "kronecker_tp": "replicated"}, "tp": 2, "sp": sp, "ref": n}
            for n in KRON_ARMS
        }
    )
    results = H.spawn(tmp_path, 2, cases, ref_file)
    for case, res in results[0].items():
        compare(res, ref[case.split("/")[0]], case)


@pytest.mark.timeout(600)
def test_pp2_equals_pp1_over_three_steps(reference, tmp_path):
    ref, ref_file = reference
    arms = ["kron_untied", "kron_ktied", "bpe_tied"]
    cases = {f"{n}/pp2": {"model": ARMS[n], "pp": 2, "steps": 3, "ref": n} for n in arms}
    first, last = H.spawn(tmp_path, 2, cases, ref_file)
    for case in cases:
        name = case.split("/")[0]
        # the loss lives on the last stage; gradients are split between the stages
        assert last[case]["losses"] == pytest.approx(ref[name]["losses"], rel=1e-5)
        merged = {**first[case]["grads"], **last[case]["grads"]}
        compare({"losses": last[case]["losses"], "grads": merged}, ref[name], case, logits=False, steps=3)
        if name != "kron_untied":  # tied: the last stage's copy got the same (all-reduced) gradient
            assert_same(
                last[case]["grads"]["output_layer.weight"],
                first[case]["grads"]["embedding.word_embeddings.weight"],
                f"{case} tied copy",
            )


def test_parameter_counts_match_the_accounting(reference):
    from kronecker_scale.model.accounting import GPTShape, model_params

    res, _ = reference
    arm_of = {
        "kron_untied": "kronecker",
        "kron_ktied": "kronecker_tied",
        "bpe_tied": "bpe_tied",
        "bpe_untied": "bpe_untied",
        "kron_rope_rms_swiglu": "kronecker",
    }
    for name, m in ARMS.items():
        shape = GPTShape(
            vocab_size=256,
            d_model=64,
            n_layers=2,
            seq_len=64,
            n_heads=4,  # 145 ids padded to 128 x 2
            position=m.get("position", "learned_absolute"),
            norm=m.get("norm", "layernorm"),
            activation=m.get("activation", "gelu"),
        )
        assert res[name]["n_params"] == model_params(shape, arm_of[name], 16)["total"], name


@pytest.mark.timeout(600)
def test_checkpoint_round_trip_across_tp_change(reference, tmp_path):
    ref, ref_file = reference
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    arms = ["kron_untied", "kron_ktied", "bpe_tied"]
    for n in arms:
        (ckpt / n).mkdir()  # dist_checkpointing.save wants it to exist
    save = {f"{n}/save": {"model": ARMS[n], "tp": 2, "steps": 0, "ref": n, "save_ckpt": str(ckpt / n)} for n in arms}
    saved = H.spawn(tmp_path, 2, save, ref_file, tag="save")[0]
    load = {f"{n}/load": {"model": ARMS[n], "tp": 1, "steps": 0, "load_ckpt": str(ckpt / n)} for n in arms}
    load["kron_untied/load-replicated"] = {
        "model": {**ARMS["kron_untied"], "kronecker_tp": "replicated"},
        "tp": 1,
        "steps": 0,
        "load_ckpt": str(ckpt / "kron_untied"),
    }
    (loaded,) = H.spawn(tmp_path, 1, load, tag="load")
    for case, res in loaded.items():
        name = case.split("/")[0]
        before = saved[f"{name}/save"]["full_state"]
        assert res["full_state"].keys() == before.keys()
        for key, t in res["full_state"].items():
            assert torch.equal(t, before[key]), f"{case}: {key} changed across save(TP=2) -> load(TP=1)"
            assert torch.equal(t, ref[name]["state"][key]), f"{case}: {key} differs from the reference weights"
        if name.startswith("kron"):  # the byte table travels in the checkpoint
            table = H.byte_table().pad_to(128)
            assert torch.equal(res["buffers"]["embedding.word_embeddings.token_bytes"], table.bytes)


@pytest.mark.timeout(300)
def test_both_tp_layouts_of_the_input_layer_equal_the_single_device_embedding(tmp_path):
    out = tmp_path / "emb"
    out.mkdir()
    mp.start_processes(
        H.embedding_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True, start_method="spawn"
    )
    for rank in range(2):
        res = torch.load(out / f"rank{rank}.pt")
        cases = [k for k in res if "/" in k]
        assert len(cases) == 4
        for case in cases:
            assert_same(res[case]["out"], res["ref_out"], f"rank {rank} {case} output", rtol=1e-6)
            assert_same(res[case]["grad"], res["ref_grad"], f"rank {rank} {case} dW", rtol=1e-6)
