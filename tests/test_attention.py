"""Core attention backends and activation recompute (model.attention_backend, model.recompute).

- `sdpa` (torch's scaled_dot_product_attention in megatron's core-attention slot) computes what megatron's
  unfused `local` attention computes: logits, gradients and three training steps within 1e-5 (fp32,
  causal), at TP = 1 and at TP = 2 with and without sequence parallelism, from the same weights
  (tests/megatron_harness.py); grouped-query attention against DotProductAttention directly.
- `te` is Transformer Engine's layer spec: a clear error where TE is not importable (this CPU machine).
- Recompute (selective: core attention; full: every layer) leaves losses and gradients as they are, with
  dropout on: megatron's checkpointing restores the RNG states (the CPU layer maps its CUDA tracker onto
  the CPU generator), so the recomputed forward draws the same masks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests import megatron_harness as H

BASE = dict(input_layer="kronecker", head="untied", pos_dim=16)
LLAMA = dict(BASE, position="rope", norm="rmsnorm", activation="swiglu", bias=False)
DROP = dict(BASE, hidden_dropout=0.1, attention_dropout=0.1)
RTOL = 1e-5


def assert_close(got: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    scale = ref.abs().max().clamp_min(1e-12)
    err = (got - ref).abs().max()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} vs scale {scale:.3e}"


def assert_same_run(res: dict, ref: dict, name: str, *, logits: bool = True) -> None:
    assert len(res["losses"]) == len(ref["losses"]) >= 1, name
    for step, (a, b) in enumerate(zip(res["losses"], ref["losses"]), 1):
        assert abs(a - b) <= RTOL * abs(b), f"{name}: step {step} loss {a} != {b}"
    if logits:
        assert_close(res["logits"], ref["logits"], f"{name} logits")
    assert res["grads"].keys() == ref["grads"].keys()
    for key, g in res["grads"].items():
        assert_close(g, ref["grads"][key], f"{name} grad {key}")


# --- TP = 1: every backend / recompute case in one process -----------------------------------------------
REFERENCE_CASES = {
    "local": {"model": {**BASE, "attention_backend": "local"}, "steps": 3},
    "sdpa": {"model": {**BASE, "attention_backend": "sdpa"}, "steps": 3, "ref": "local"},
    "llama/local": {"model": {**LLAMA, "attention_backend": "local"}, "steps": 3},
    "llama/sdpa": {"model": {**LLAMA, "attention_backend": "sdpa"}, "steps": 3, "ref": "llama/local"},
    # dropout on (hidden and attention): recompute must redraw the same masks
    **{
        f"drop/{backend}/{recompute}": {
            "model": {**DROP, "attention_backend": backend, "recompute": recompute},
            "steps": 3,
        }
        for backend in ("local", "sdpa")
        for recompute in ("none", "selective", "full")
    },
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attn-ref")
    (res,) = H.spawn(tmp, 1, REFERENCE_CASES)
    torch.save(res, tmp / "ref.pt")
    return res, str(tmp / "ref.pt")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sdpa_equals_local_attention_at_tp1(reference):
    res, _ = reference
    for arm in ("", "llama/"):
        assert_same_run(res[f"{arm}sdpa"], res[f"{arm}local"], f"{arm}sdpa vs local")
    assert res["local"]["losses"][-1] < res["local"]["losses"][0]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["local", "sdpa"])
def test_recompute_leaves_losses_and_gradients_unchanged(reference, backend):
    res, _ = reference
    none = res[f"drop/{backend}/none"]
    for recompute in ("selective", "full"):
        assert_same_run(res[f"drop/{backend}/{recompute}"], none, f"{backend} recompute={recompute}", logits=False)
    # dropout is on: the runs differ from the dropout-free ones (the masks are drawn and matter)
    assert abs(none["losses"][0] - res[backend]["losses"][0]) > 1e-4


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sdpa_at_tp2_with_and_without_sequence_parallel_equals_local_tp1(reference, tmp_path):
    ref, ref_file = reference
    cases = {
        f"{arm}sdpa/tp2{'-sp' if sp else ''}": {
            "model": {**model, "attention_backend": "sdpa"},
            "tp": 2,
            "sp": sp,
            "steps": 3,
            "ref": f"{arm}local",
        }
        for arm, model in (("", BASE), ("llama/", LLAMA))
        for sp in (False, True)
    }
    # full recompute with dropout at TP = 2 (the tracker's model-parallel RNG state is restored too)
    cases["drop/tp2/none"] = {
        "model": {**DROP, "attention_backend": "sdpa"},
        "tp": 2,
        "sp": True,
        "steps": 2,
        "ref": "drop/sdpa/none",
    }
    cases["drop/tp2/full"] = {
        "model": {**DROP, "attention_backend": "sdpa", "recompute": "full"},
        "tp": 2,
        "sp": True,
        "steps": 2,
        "ref": "drop/sdpa/none",
    }
    results = H.spawn(tmp_path, 2, cases, ref_file)
    for rank, per_rank in enumerate(results):
        for case, res in per_rank.items():
            if case.startswith("drop/"):
                continue
            arm = case.split("sdpa/")[0]
            assert_same_run(res, ref[f"{arm}local"], f"rank {rank} {case} vs local TP=1")
        assert_same_run(
            per_rank["drop/tp2/full"], per_rank["drop/tp2/none"], f"rank {rank} TP=2 full recompute", logits=False
        )


# --- the core-attention module itself: grouped-query attention, masks, dropout ---------------------------
def core_attention_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from kronecker_scale.model import megatron_cpu
    from kronecker_scale.model.megatron_gpt import SDPAttention

    megatron_cpu.enable()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    out = {}
    g = torch.Generator().manual_seed(3)
    s, b, heads, dh = 12, 2, 4, 8
    for groups in (4, 2, 1):  # MHA, GQA, MQA
        for mask_type in (AttnMaskType.causal, AttnMaskType.padding):
            cfg = TransformerConfig(
                num_layers=1,
                hidden_size=heads * dh,
                num_attention_heads=heads,
                num_query_groups=groups,
                attention_dropout=0.0,
                masked_softmax_fusion=False,
                use_cpu_initialization=True,
            )
            q = torch.randn(s, b, heads, dh, generator=g, requires_grad=True)
            k = torch.randn(s, b, groups, dh, generator=g, requires_grad=True)
            v = torch.randn(s, b, groups, dh, generator=g, requires_grad=True)
            # padding: megatron's boolean mask, True = masked out ([b, 1, sq, sk]); keys 9.. of sample 1 hidden
            mask = None
            if mask_type == AttnMaskType.padding:
                mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
                mask[1, :, :, 9:] = True
            grad = torch.randn(s, b, heads * dh, generator=g)
            got = {}
            for name, cls in (("local", DotProductAttention), ("sdpa", SDPAttention)):
                module = cls(cfg, layer_number=1, attn_mask_type=mask_type, attention_type="self")
                for t in (q, k, v):
                    t.grad = None
                y = module(q, k, v, mask)
                y.backward(grad)
                got[name] = (y.detach(), *(t.grad.clone() for t in (q, k, v)))
            out[f"g{groups}/{mask_type.name}"] = got
    # attention dropout: active in training, off in eval, reproducible from the tracker's state
    cfg = TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, attention_dropout=0.5, use_cpu_initialization=True
    )
    module = SDPAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    q, k, v = (torch.randn(s, b, 4, 8, generator=g) for _ in range(3))
    tracker = tensor_parallel.get_cuda_rng_tracker()
    state = tracker.get_states()
    first = module(q, k, v, None)
    tracker.set_states(state)
    again = module(q, k, v, None)
    module.eval()
    out["dropout"] = {"train": first, "again": again, "eval": module(q, k, v, None)}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sdpa_core_attention_equals_dot_product_attention_with_grouped_queries_and_masks(tmp_path):
    mp.start_processes(
        core_attention_worker,
        args=(1, str(tmp_path / "init"), str(tmp_path)),
        nprocs=1,
        join=True,
        start_method="spawn",
    )
    res = torch.load(tmp_path / "rank0.pt")
    for case, got in res.items():
        if case == "dropout":
            continue
        for what, a, b in zip(("out", "dq", "dk", "dv"), got["sdpa"], got["local"]):
            assert_close(a, b, f"{case} {what}")
    drop = res["dropout"]
    assert torch.equal(drop["train"], drop["again"])  # the tracker's state decides the mask
    assert not torch.allclose(drop["train"], drop["eval"])


# --- configuration --------------------------------------------------------------------------------------
@pytest.mark.slow  # imports megatron-core (~6 s)
def test_backend_names_are_checked_and_te_is_a_clear_error_without_transformer_engine():
    from kronecker_scale.errors import KScaleError
    from kronecker_scale.model.config import GPTConfig

    with pytest.raises(KScaleError, match="attention_backend"):
        GPTConfig(attention_backend="flash").validate()
    with pytest.raises(KScaleError, match="recompute"):
        GPTConfig(recompute="some").validate()
    from kronecker_scale.model.megatron_gpt import resolve_attention_backend, transformer_engine_problem

    assert resolve_attention_backend("local") == "local" and resolve_attention_backend("sdpa") == "sdpa"
    problem = transformer_engine_problem()
    if problem is None:
        pytest.skip("Transformer Engine is usable here: auto picks it")
    assert resolve_attention_backend("auto") == "sdpa"
    with pytest.raises(KScaleError, match="attention_backend=te cannot run") as e:
        resolve_attention_backend("te")
    assert problem in str(e.value)


def test_te_backend_is_refused_before_any_process_starts(tmp_path):
    import importlib.util

    from kronecker_scale.config import load_config
    from kronecker_scale.errors import KScaleError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  train: [{path: x}]\n")
    load_config(cfg, ["model.attention_backend=sdpa", "model.recompute=full"])
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("transformer_engine is installed")
    with pytest.raises(KScaleError, match="transformer_engine is not installed"):
        load_config(cfg, ["model.attention_backend=te"])
    with pytest.raises(KScaleError, match="CUDA only"):
        load_config(cfg, ["model.attention_backend=te", "run.device=cpu"])
