"""MFU accounting (docs/design.md §6.1, train/records.py): model FLOPs per token by hand for two shapes,
the step record's `mfu`, and the count of every matmul torch's FlopCounterMode sees in a real forward +
backward of the megatron GPT."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from kronecker_scale.model.config import GPTConfig
from kronecker_scale.train.records import model_flops_per_token, step_record


def test_gpt2_small_by_hand():
    # GPT-2 small: L = 12, d = 768, f = 3072 (GELU), s = 1024, V = 50,257 padded to 50,304 (128 x TP=1)
    cfg = GPTConfig(n_layers=12, d_model=768, n_heads=12, seq_len=1024)
    got = model_flops_per_token(cfg, 50257)
    per_layer = 3 * 768 * 768 + 768 * 768 + 2 * 768 * 3072  # QKV + output + MLP weights = 7,077,888
    assert per_layer == 7_077_888
    assert got["layers"] == 6 * 12 * per_layer == 509_607_936
    assert got["attention"] == 6 * 12 * 768 * 1025 == 56_678_400  # causal: i + 1 keys for query i
    assert got["head"] == 6 * 768 * 50304 == 231_800_832
    assert got["input"] == 0  # a gather, not 6 x 256 P d
    assert got["total"] == 798_087_168
    full = model_flops_per_token(cfg, 50257, causal_attention="full")
    assert full["attention"] == 12 * 12 * 768 * 1024 == 113_246_208  # PaLM's 12 L h s
    # = 6 x (the 85M non-embedding matmul weights + the head) + the attention term
    assert got["total"] == 6 * (12 * per_layer + 768 * 50304) + 6 * 12 * 768 * 1025


def test_1b_llama_shape_by_hand_and_tp_padding():
    # configs/scale/1b-131k.yaml: L = 16, d = 2048, SwiGLU f = 5632, s = 2048, V = 131,072 (TP = 2)
    cfg = GPTConfig(
        n_layers=16,
        d_model=2048,
        n_heads=16,
        ffn_hidden=5632,
        seq_len=2048,
        activation="swiglu",
        norm="rmsnorm",
        position="rope",
        bias=False,
        pos_dim=32,
    )
    got = model_flops_per_token(cfg, 131072, tensor_parallel=2)
    assert got["layers"] == 6 * 16 * (4 * 2048**2 + 3 * 2048 * 5632) == 4_932_501_504
    assert got["attention"] == 6 * 16 * 2048 * 2049 == 402_849_792
    assert got["head"] == 6 * 2048 * 131072 == 1_610_612_736
    assert got["total"] == 6_945_964_032
    # a vocabulary that is not a multiple of 128 x TP is padded as the model pads it
    assert model_flops_per_token(cfg, 131073, tensor_parallel=2)["head"] == 6 * 2048 * (131072 + 256)


def test_step_record_mfu_uses_the_accounting(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 8)
    cfg = OmegaConf.create({"logging": {"peak_tflops": 989.0}})
    rec = step_record(
        cfg,
        step=1,
        loss=3.0,
        lr=1e-4,
        grad_norm=1.0,
        tokens=10,
        tokens_per_step=2**20,
        step_time=4.0,
        skipped=0,
        n_params=10**9,
        flops_per_token=6_945_964_032,
    )
    assert rec["tokens_per_s"] == 2**18
    assert rec["mfu"] == pytest.approx(6_945_964_032 * 2**18 / (989e12 * 8), rel=1e-12)
    cfg = OmegaConf.create({"logging": {"peak_tflops": None}})
    assert "mfu" not in step_record(
        cfg,
        step=1,
        loss=3.0,
        lr=1e-4,
        grad_norm=1.0,
        tokens=10,
        tokens_per_step=10,
        step_time=1.0,
        skipped=0,
        n_params=1,
        flops_per_token=1,
    )


# --- against torch's FlopCounterMode on the real model (spawned gloo process) -----------------------------
def flop_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from torch.utils.flop_counter import FlopCounterMode

    from kronecker_scale.model import megatron_cpu
    from kronecker_scale.model.megatron_gpt import build_model, transformer_config
    from tests import megatron_harness as H

    megatron_cpu.enable()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    table = H.byte_table()
    data = H.batch(table.num_token_ids)
    out = {}
    for name, extra in (
        ("gpt2", {}),
        ("llama", dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False, ffn_hidden=96)),
        ("ktied", dict(head="kronecker_tied")),
    ):
        cfg = GPTConfig(pos_dim=16, seq_len=H.S, attention_backend="local", **extra)
        model = build_model(cfg, transformer_config(cfg), byte_table=table)
        with FlopCounterMode(display=False) as counter:
            loss = model(data["tokens"], data["position_ids"], None, labels=data["labels"])
            loss.sum().backward()
        out[name] = {
            "counted": counter.get_total_flops(),
            "tokens": H.B * H.S,
            "cfg": cfg,
            "vocab": table.num_token_ids,
        }
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_accounting_equals_torchs_flop_count_of_a_real_step(tmp_path):
    """Every matmul of forward + backward, as FlopCounterMode counts them, against the accounting with the
    full s^2 attention term (what megatron's unfused local attention computes): equal."""
    mp.start_processes(
        flop_worker, args=(1, str(tmp_path / "init"), str(tmp_path)), nprocs=1, join=True, start_method="spawn"
    )
    res = torch.load(tmp_path / "rank0.pt", weights_only=False)
    for name, r in res.items():
        expected = model_flops_per_token(r["cfg"], r["vocab"], causal_attention="full")["total"] * r["tokens"]
        assert r["counted"] == expected, (name, r["counted"], expected)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_step_benchmark_smoke_rows_ratios_and_mfu(tmp_path):
    """`kscale bench step --grid smoke` (benchmarks/step.py): one row per backend x precision, MFU from the
    accounting, ratios that are quotients of its own times, and the files it writes."""
    from kronecker_scale.benchmarks import step

    rows = step.run(
        "smoke", ["local", "sdpa"], ["fp32", "bf16"], steps=1, warmup=1, device="cpu", peak_tflops=1.0, progress=False
    )
    assert [(r["backend"], r["precision"]) for r in rows] == [
        ("local", "fp32"),
        ("local", "bf16"),
        ("sdpa", "fp32"),
        ("sdpa", "bf16"),
    ]
    cfg = GPTConfig(**{k: step.GRIDS["smoke"][k] for k in step.SHAPE_KEYS if k in step.GRIDS["smoke"]})
    per_token = model_flops_per_token(cfg, step.GRIDS["smoke"]["vocab"])["total"]
    for r in rows:
        assert r["flops_per_token"] == per_token and r["step_ms"] > 0
        assert r["mfu"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12, rel=1e-9)
    assert len({round(r["first_loss"], 2) for r in rows}) == 1  # same weights and batch everywhere
    ms = {(r["backend"], r["precision"]): r["step_ms"] for r in rows}
    ratios = {x["ratio"]: x["value"] for x in step.ratios(rows)}
    assert ratios["sdpa / local (fp32)"] == pytest.approx(ms[("sdpa", "fp32")] / ms[("local", "fp32")])
    assert ratios["bf16 / fp32 (sdpa)"] == pytest.approx(ms[("sdpa", "bf16")] / ms[("sdpa", "fp32")])
    paths = step.write_outputs(rows, tmp_path, "kscale bench step --grid smoke")
    assert "sdpa / local (fp32)" in paths["md"].read_text() and paths["csv"].read_text().count("\n") == 5
