"""bf16 and fp16 end to end (run.precision): megatron's mixed precision (Float16Module, fp32 main params),
the distributed optimizer on 2 ranks, and DeepSpeed in bf16, on the CPU.

The codec's scale tables (alpha, beta) and the byte table never leave their dtypes (fp64, uint8, int16)
whatever the module is cast to; a bf16 alpha would be ~0.2 % off per token length. On the tiny config
(the session's `tiny_config`, real GPT-2 tokens, conftest.py) every low-precision run's first loss is within
1 % of the fp32 run's and the loss falls.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tiny_runs import DEEPSPEED_ENV, kscale, losses

HALF = (torch.bfloat16, torch.float16)


# --- the module casts (no megatron) ---------------------------------------------------------------------
@pytest.mark.parametrize("cast", ["bfloat16", "half", "float", "to_bf16"])
def test_module_casts_keep_scale_tables_fp64_and_byte_tables_integer(cast):
    from kronecker_scale.embedding import ByteTable, KroneckerEmbedding, scale_tables

    table = ByteTable.from_token_bytes([b"a", b"ab", b"abc" * 3, b"", "naïve".encode(), b"x" * 20], pos_dim=16)
    emb = KroneckerEmbedding(table, 8, dtype=torch.float64)
    alpha, beta = scale_tables(16, dtype=torch.float64)
    emb = emb.to(torch.bfloat16) if cast == "to_bf16" else getattr(emb, cast)()
    assert emb.alpha.dtype == emb.beta.dtype == torch.float64
    assert torch.equal(emb.alpha, alpha) and torch.equal(emb.beta, beta)
    assert emb.token_bytes.dtype == torch.uint8 and emb.token_lengths.dtype == torch.int16
    assert (
        emb.weight.dtype
        == {"bfloat16": torch.bfloat16, "half": torch.float16, "float": torch.float32, "to_bf16": torch.bfloat16}[cast]
    )
    assert {n for n, _ in emb.named_buffers()} == {"token_bytes", "token_lengths", "alpha", "beta"}
    assert "alpha" not in emb.state_dict()  # still non-persistent


def test_bf16_embedding_is_the_fp64_codec_of_its_weights_to_bf16_rounding():
    from kronecker_scale.embedding import ByteTable, KroneckerEmbedding
    from kronecker_scale.embedding.reference import kronecker_embed_dense

    table = ByteTable.from_token_bytes([bytes([65 + i % 26]) * (1 + i % 16) for i in range(64)], pos_dim=16)
    emb = KroneckerEmbedding(table, 32, impl="torch").bfloat16()
    ids = torch.arange(table.vocab_size)
    got = emb(ids).double()
    ref = kronecker_embed_dense(
        table.bytes[ids],
        table.lengths[ids],
        emb.weight.detach().double(),
        length_normalize=True,
        z_normalize=True,
        eps=1e-6,
    )
    err = ((got - ref).abs().amax(1) / ref.abs().amax(1).clamp_min(1e-12)).max()
    assert err < 2**-8  # one bf16 rounding of the output


# --- Float16Module over the megatron GPT (spawned gloo process) -------------------------------------------
def float16_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.transformer.module import Float16Module

    from kronecker_scale.model import megatron_cpu
    from kronecker_scale.model.megatron_gpt import GPTConfig, build_model, transformer_config
    from tests import megatron_harness as H

    megatron_cpu.enable()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    out = {}
    table = H.byte_table()
    data = H.batch(table.num_token_ids)
    for head in ("untied", "kronecker_tied"):
        cfg = GPTConfig(input_layer="kronecker", head=head, pos_dim=16)
        per = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
            torch.manual_seed(1234)
            model = build_model(cfg, transformer_config(cfg, params_dtype=dtype), byte_table=table)
            if dtype != torch.float32:
                model = Float16Module(model.config, model)
            model.eval()
            with torch.no_grad():
                loss = model(data["tokens"], data["position_ids"], None, labels=data["labels"])
            per[name] = {
                "buffers": {n: b.dtype for n, b in model.named_buffers()},
                "params": {p.dtype for p in model.parameters()},
                "loss": loss.float().mean().item(),
            }
        out[head] = per
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_float16module_keeps_scale_tables_fp64_and_gives_the_fp32_loss(tmp_path):
    mp.start_processes(
        float16_worker, args=(1, str(tmp_path / "init"), str(tmp_path)), nprocs=1, join=True, start_method="spawn"
    )
    res = torch.load(tmp_path / "rank0.pt")
    for head, per in res.items():
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            got = per[name]
            assert got["params"] == {dtype}, (head, name)
            scale = {n: d for n, d in got["buffers"].items() if n.endswith((".alpha", ".beta"))}
            # the input layer's tables, and the Kronecker-tied head's own
            assert len(scale) == (4 if head == "kronecker_tied" else 2), scale
            assert set(scale.values()) == {torch.float64}, (head, name, scale)
            assert {d for n, d in got["buffers"].items() if n.endswith("token_bytes")} == {torch.uint8}
            assert {d for n, d in got["buffers"].items() if n.endswith("token_lengths")} == {torch.int16}
            assert got["loss"] == pytest.approx(per["fp32"]["loss"], rel=0.01), (head, name)


# --- training runs: `kscale train` on the tiny config -----------------------------------------------------
def _train(directory: Path, tiny_config, *overrides, env=None):
    directory.mkdir(parents=True, exist_ok=True)
    r = kscale("train", tiny_config(directory), *overrides, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return losses(directory / "run")


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory, tiny_config):
    return _train(tmp_path_factory.mktemp("fp32"), tiny_config)


def _trains_like_fp32(got: dict, fp32: dict, what: str) -> None:
    assert sorted(got) == list(range(1, 9)), what
    assert got[1] == pytest.approx(fp32[1], rel=0.01), what  # same initial weights and batch
    assert got[8] < got[1] - 0.1, (what, got)  # it learns


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_megatron_mixed_precision_trains_like_fp32(tmp_path, tiny_config, fp32_losses, precision):
    got = _train(tmp_path, tiny_config, f"run.precision={precision}")
    _trains_like_fp32(got, fp32_losses, precision)
    assert got != fp32_losses  # it did run in half precision


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bf16_with_the_distributed_optimizer_on_two_ranks_trains_and_resumes_exactly(
    tmp_path, tiny_config, fp32_losses
):
    layout = ["run.precision=bf16", "parallel.nproc=2", "parallel.distributed_optimizer=true"]
    straight = _train(tmp_path / "straight", tiny_config, *layout)
    _trains_like_fp32(straight, fp32_losses, "bf16 + distributed optimizer")
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = tiny_config(broken)
    r = kscale("train", cfg, *layout, env={"KSCALE_FAULT_EXIT_AFTER_STEP": "5"})
    assert r.returncode != 0
    assert (broken / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    r = kscale("train", cfg, *layout)  # the sharded Adam states load back
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    assert losses(broken / "run") == straight


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_trains_in_half_precision(tmp_path, tiny_config, fp32_losses, precision):
    """configs/tiny-cpu-deepspeed.yaml's engine settings (ZeRO-2, 2 ranks) with run.precision=bf16 / fp16."""
    got = _train(
        tmp_path,
        tiny_config,
        f"run.precision={precision}",
        "run.engine=deepspeed",
        "deepspeed.zero_stage=2",
        "parallel.nproc=2",
        env=DEEPSPEED_ENV,
    )
    _trains_like_fp32(got, fp32_losses, f"deepspeed {precision}")
