"""Losses over the real vocabulary (docs/design.md §5) and the paper's norm statistics in the training
metrics.

- Padded ids take no probability mass: the same weights give the same loss at TP=1 and TP=2 with
  different paddings (133 ids -> 192 at TP=1, 256 at TP=2 with vocab_divisible_by=64), equal to the
  cross-entropy over the real logits; a trained checkpoint's training loss equals the cross-entropy of
  its transformers export (which has no padded rows).
- The engine's norm statistics (`projection_unit_norm`: the mean column norm of W [D, d], 1.0 at init;
  BPE `table_row_norm` over the real rows) equal an independent computation from the whole weight in
  every TP layout, and from a trained checkpoint's weight against its metrics.jsonl.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests import megatron_harness as H

ARMS = {
    "kron_untied": dict(input_layer="kronecker", head="untied", pos_dim=16),
    "kron_ktied": dict(input_layer="kronecker", head="kronecker_tied", pos_dim=16),
    "bpe_tied": dict(input_layer="bpe", head="tied"),
    "bpe_untied": dict(input_layer="bpe", head="untied"),
}
DIVISIBLE_BY = 64  # 133 real ids: 192 rows at TP=1, 256 at TP=2
LAYOUTS = {
    "tp1": dict(tp=1),
    "tp2": dict(tp=2),
    "tp2-sp": dict(tp=2, sp=True),
    "tp2-replicated": dict(tp=2, kronecker_tp="replicated"),
}


def _evaluate(model, data, tp_group, tp):
    """(mean per-token loss from GPTModel's own cross-entropy, all logits [b, s, V_padded] gathered)."""
    model.eval()
    with torch.no_grad():
        loss = model(data["tokens"], data["position_ids"], None, labels=data["labels"])
        local = model(data["tokens"], data["position_ids"], None)
    vocab_split = type("P", (), {"tensor_model_parallel": True, "partition_dim": 2})()
    return loss.double().mean().item(), H._gather(local, vocab_split, tp_group, tp)


def mask_worker(rank: int, world: int, init_file: str, out_dir: str):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from kronecker_scale.model import megatron_cpu
    from kronecker_scale.model.megatron_gpt import GPTConfig, build_model, transformer_config
    from kronecker_scale.train.megatron_engine import input_layer_norms

    megatron_cpu.enable()
    table = H.byte_table()
    data = H.batch(table.num_token_ids)
    results: dict = {}
    for arm, model_kw in ARMS.items():
        ref: dict = {}
        for layout, lay in LAYOUTS.items():
            if "kronecker_tp" in lay and model_kw["input_layer"] != "kronecker":
                continue
            tp = lay["tp"]
            ps.initialize_model_parallel(tensor_model_parallel_size=tp)
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
            torch.manual_seed(1234)
            cfg = GPTConfig(
                **model_kw, vocab_divisible_by=DIVISIBLE_BY, kronecker_tp=lay.get("kronecker_tp", "shard_d")
            )
            tcfg = transformer_config(cfg, tensor_parallel=tp, sequence_parallel=lay.get("sp", False))
            model = build_model(cfg, tcfg, byte_table=table, vocab_size=table.vocab_size)
            group = ps.get_tensor_model_parallel_group()
            tp_rank = ps.get_tensor_model_parallel_rank()
            norms_at_init = input_layer_norms(model, cfg)
            full_input = H._gather(
                model.embedding.word_embeddings.weight.detach(), model.embedding.word_embeddings.weight, group, tp
            )
            if layout == "tp1":
                ref = {n: p.detach().clone() for n, p in model.named_parameters()}
            else:  # the TP=1 weights; vocab-sized ones grow by padded rows, filled with random values
                g = torch.Generator().manual_seed(99)
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        full = ref[n]
                        vocab_split = getattr(p, "tensor_model_parallel", False) and p.partition_dim == 0
                        rows = p.shape[0] * (tp if vocab_split else 1)
                        if rows > full.shape[0]:
                            extra = torch.randn(rows - full.shape[0], *full.shape[1:], generator=g)
                            full = torch.cat([full, extra * full.std()])
                        p.copy_(H._shard(full, p, tp_rank, tp))
            loss, logits = _evaluate(model, data, group, tp)
            results[f"{arm}/{layout}"] = {
                "padded": model.vocab_size,
                "loss": loss,
                "logits": logits,
                "norms": norms_at_init,
                "input_weight": full_input,
            }
            ps.destroy_model_parallel()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = tmp_path_factory.mktemp("mask")
    mp.start_processes(mask_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_loss_is_the_same_at_tp1_and_tp2_with_different_padding(layouts):
    res = layouts[0]
    data = H.batch(H.byte_table().num_token_ids)
    real = H.byte_table().num_token_ids
    for arm in ARMS:
        ref = res[f"{arm}/tp1"]
        assert ref["padded"] == 192
        # GPTModel's loss is the cross-entropy over the real ids' logits alone
        ce = F.cross_entropy(ref["logits"][..., :real].double().reshape(-1, real), data["labels"].reshape(-1))
        assert ref["loss"] == pytest.approx(ce.item(), rel=1e-6), arm
        assert torch.all(ref["logits"][..., real:] == torch.finfo(torch.float32).min), arm
        for layout in LAYOUTS:
            key = f"{arm}/{layout}"
            if layout == "tp1" or key not in res:
                continue
            got = res[key]
            assert got["padded"] == 256
            print(f"{key}: loss {got['loss']:.8f} vs TP=1 {ref['loss']:.8f}")
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6), key
            torch.testing.assert_close(got["logits"][..., :real], ref["logits"][..., :real], rtol=1e-5, atol=1e-6)
            assert torch.all(got["logits"][..., real:] == torch.finfo(torch.float32).min), key
            assert got["loss"] == layouts[1][key]["loss"]  # every TP rank has the whole loss


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_norm_statistics_equal_a_direct_computation_in_every_layout(layouts):
    from kronecker_scale.probes.norm_drift import paper_norms

    real = H.byte_table().num_token_ids
    for rank in range(2):
        for key, r in layouts[rank].items():
            arm = key.split("/")[0]
            w = r["input_weight"].double()  # the whole weight as built (at init)
            direct = paper_norms(w, ARMS[arm]["input_layer"], real_rows=real)
            n = r["norms"]
            if ARMS[arm]["input_layer"] == "kronecker":
                assert w.shape == (256 * 16, 64)
                assert n["projection_unit_norm"] == pytest.approx(direct["projection_unit_norm"], rel=1e-10), key
                assert n["projection_unit_norm_std"] == pytest.approx(direct["projection_unit_norm_std"], rel=1e-8)
                # W ~ N(0, 1/D), D = 4096: every column's norm is ~1 (std ~0.011), their mean within ~0.002
                assert abs(n["projection_unit_norm"] - 1.0) < 0.02, key
                assert n["projection_unit_norm_std"] < 0.03, key
                assert n["projection_row_norm"] == pytest.approx(float(w.norm(dim=1).mean()), rel=1e-10), key
                assert n["projection_std"] == pytest.approx(float(w.std()), rel=1e-8), key
            else:
                assert n["table_row_norm"] == pytest.approx(direct["table_row_norm"], rel=1e-10), key
                assert n["table_row_norm_std"] == pytest.approx(direct["table_row_norm_std"], rel=1e-8), key
                assert n["table_std"] == pytest.approx(float(w.std()), rel=1e-8), key
                assert n["table_row_norm"] > 0 and not w[real:].any()  # padded rows are zero and left out


# --- a trained checkpoint: training loss = the export's cross-entropy; metrics = the checkpoint's W -----
@pytest.mark.slow
def test_training_loss_equals_the_exported_models_cross_entropy(gpt2_run, gpt2_hf):
    from kronecker_scale.convert.to_hf import load_hf
    from kronecker_scale.inference import load_checkpoint
    from kronecker_scale.inference.load import cpu_layer
    from tiny_runs import real_text

    ck = load_checkpoint(gpt2_run)
    assert ck.model.vocab_size > ck.vocab_size == 50257  # padded head rows, dropped by the export
    hf = load_hf(gpt2_hf)
    ids = torch.tensor(ck.tokenizer.encode(real_text()[:6000])[: 2 * 33]).reshape(2, 33)
    tokens, labels = ids[:, :-1], ids[:, 1:]
    positions = torch.arange(32).repeat(2, 1)
    with torch.no_grad(), cpu_layer():
        ours = ck.model(tokens, positions, None, labels=labels).double().mean().item()  # megatron's loss
    with torch.no_grad():
        logits = hf(tokens).logits.double()
    theirs = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()
    print(f"training loss {ours:.8f}, exported model's cross-entropy {theirs:.8f}")
    assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.mark.slow
def test_logged_norm_statistics_equal_the_checkpoints_weight(gpt2_run, bpe_run):
    from kronecker_scale.inference import read_tensors

    key = "embedding.word_embeddings.weight"
    for run in (gpt2_run, bpe_run):
        rows_ = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        logged = {r["step"]: r for r in rows_ if "loss" in r}
        steps = sorted((run / "checkpoints").glob("step_*"))
        assert steps
        for step_dir in steps:
            row = logged[int(step_dir.name.split("_")[1])]
            w = read_tensors(step_dir, [key])[key].double()
            if run == gpt2_run:
                units = w.norm(dim=0)  # W [D, d]: the d output units' norms
                assert row["projection_unit_norm"] == pytest.approx(float(units.mean()), rel=1e-6)
                assert row["projection_unit_norm_std"] == pytest.approx(float(units.std()), rel=1e-6)
            else:
                rows = w[:50257].norm(dim=1)  # real ids only
                assert row["table_row_norm"] == pytest.approx(float(rows.mean()), rel=1e-6)
                assert row["table_row_norm_std"] == pytest.approx(float(rows.std()), rel=1e-6)
