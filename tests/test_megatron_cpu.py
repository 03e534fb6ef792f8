"""megatron-core 0.19.2 on CPU + gloo through kronecker_scale.model.megatron_cpu.

Every multi-rank test spawns real processes (torch.multiprocessing.spawn, gloo, a file:// rendezvous
in tmp_path). Workers live at module level so spawn can import them; each writes its results to
tmp_path with torch.save and the parent asserts on them.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kronecker_scale.model import megatron_cpu

pytestmark = pytest.mark.slow  # spawned gloo processes; the in-process test imports megatron (~6 s)

SEED = 1234
VOCAB, SEQ, HIDDEN, HEADS, LAYERS = 64, 16, 32, 4, 2
GLOBAL_BATCH, STEPS = 4, 3


# ----------------------------------------------------------------------------------------------
# worker helpers (run inside the spawned processes)
# ----------------------------------------------------------------------------------------------
def _setup(rank: int, world: int, init_file: str, tp: int = 1, pp: int = 1) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    megatron_cpu.init_distributed(rank, world, f"file://{init_file}", timeout=timedelta(seconds=120))
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, distributed_timeout_minutes=2
    )
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)


def _teardown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _save(out_dir: str, name: str, rank: int, obj) -> None:
    torch.save(obj, Path(out_dir) / f"{name}.rank{rank}.pt")


def _load(out_dir: Path, name: str, rank: int):
    return torch.load(out_dir / f"{name}.rank{rank}.pt", weights_only=False)


def _gpt(tp: int, pp: int):
    """Tiny GPTModel; use_cpu_initialization, no dropout (layouts must compute the same thing)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # batch_p2p_comm stays on (gloo runs batch_isend_irecv); batch_p2p_sync=False drops the
        # torch.cuda.synchronize() megatron adds after it (p2p_communication.py:419)
        pipeline_dtype=torch.float32,
        batch_p2p_sync=False,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def _batch() -> torch.Tensor:
    """The global batch every layout trains on: GLOBAL_BATCH sequences of SEQ + 1 tokens."""
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(7))


def _microbatches(sequences: torch.Tensor, micro_batch_size: int) -> list:
    return [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in sequences.split(micro_batch_size)]


def _forward_step(data_iterator, model):
    from functools import partial

    tokens, labels = next(data_iterator)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    # attention_mask=None: the local spec's causal softmax builds its own mask
    # (megatron/core/transformer/utils.py get_default_causal_mask, a device="cuda" tensor).
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, torch.ones_like(labels, dtype=torch.float))


def _loss_func(loss_mask, output_tensor):
    """megatron's 3-tuple form: (loss summed over tokens, token count, values to report)."""
    loss_sum = (output_tensor.float().view(-1) * loss_mask.view(-1)).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def _global_loss(forward_data_store) -> float:
    """Token-mean loss over all microbatches of the step and all data-parallel ranks."""
    from megatron.core import parallel_state

    total = torch.stack([d["lm loss"] for d in forward_data_store]).sum(0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------------
def _rng_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _setup(rank, world, init_file, tp=world)
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    x = torch.ones(4096)
    drop = torch.nn.functional.dropout
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    outside_before = torch.rand(8)
    with tracker.fork():
        fork_1 = drop(x, p=0.5) == 0
    outside_after = torch.rand(8)  # fork() must leave the default stream where it was
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    with tracker.fork():
        fork_2 = drop(x, p=0.5) == 0
    outside = drop(x, p=0.5) == 0
    torch.manual_seed(SEED)
    plain_before = torch.rand(8)
    plain_after = torch.rand(8)
    _save(
        out_dir,
        "rng",
        rank,
        dict(
            fork_1=fork_1,
            fork_2=fork_2,
            outside=outside,
            outside_before=outside_before,
            outside_after=outside_after,
            plain_before=plain_before,
            plain_after=plain_after,
        ),
    )
    _teardown()


def _train_worker(rank: int, world: int, init_file: str, out_dir: str, tp: int, name: str) -> None:
    """STEPS optimizer steps of the tiny GPT with DDP + distributed Adam at the given TP (DP = rest)."""
    _setup(rank, world, init_file, tp=tp)
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = _gpt(tp, 1)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True),
        module=model,
    )
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, use_distributed_optimizer=True), [ddp]
    )
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    # data parallel ranks split the global batch; every layout takes two microbatches per step
    local = _batch().chunk(dp_size)[dp_rank]
    micro_batch_size = local.shape[0] // 2
    forward_backward = get_forward_backward_func()
    losses, grad_norms, grads0 = [], [], None
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        store = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=iter(_microbatches(local, micro_batch_size)),
            model=[ddp],
            num_microbatches=2,
            seq_length=SEQ,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        if step == 0:
            grads0 = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
        ok, grad_norm, _ = optimizer.step()
        assert ok
        losses.append(_global_loss(store))
        grad_norms.append(float(grad_norm))
    _save(out_dir, name, rank, dict(losses=losses, grad_norms=grad_norms, initial=initial, grads0=grads0))
    _teardown()


def _pp_worker(rank: int, world: int, init_file: str, out_dir: str, reference_file: str) -> None:
    """One forward_backward step at PP=2 (no DDP, grads land in param.grad)."""
    _setup(rank, world, init_file, pp=world)
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = _gpt(1, world)
    # use_cpu_initialization draws each full weight from the one CPU generator in build order
    # (tensor_parallel/layers.py _initialize_affine_weight_cpu). Stage 0 builds what PP=1 builds
    # first (embeddings, layer 0) and matches it, but stage 1 draws global layer 1 straight after
    # seeding, where PP=1 draws it after the embeddings and layer 0: PP layouts start from
    # different weights. So load the PP=1 initial weights, stage-local decoder.layers.<i> being
    # global layer <i + offset>.
    reference = torch.load(reference_file, weights_only=False)
    offset = parallel_state.get_pipeline_model_parallel_rank() * (LAYERS // world)

    def global_name(name: str) -> str:
        if name.startswith("decoder.layers."):
            _, _, index, rest = name.split(".", 3)
            return f"decoder.layers.{int(index) + offset}.{rest}"
        return name

    state = model.state_dict()
    model.load_state_dict(
        {k: reference["initial"][global_name(k)] if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    )
    store = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(_microbatches(_batch(), 2)),
        model=[model],
        num_microbatches=2,
        seq_length=SEQ,
        micro_batch_size=2,
        forward_only=False,
    )
    loss = _global_loss(store) if parallel_state.is_pipeline_last_stage() else None
    grads = {global_name(n): p.grad.detach().clone() for n, p in model.named_parameters()}
    _save(out_dir, "pp", rank, dict(loss=loss, grads=grads, last_stage=parallel_state.is_pipeline_last_stage()))
    _teardown()


def _checkpoint_worker(rank: int, world: int, init_file: str, out_dir: str, ckpt_dir: str) -> None:
    """dist_checkpointing round trip of model.sharded_state_dict() at TP=world."""
    _setup(rank, world, init_file, tp=world)
    from megatron.core import dist_checkpointing, tensor_parallel

    model = _gpt(world, 1)
    with torch.no_grad():  # move every parameter off its init value (zero biases, unit norms)
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (i + 1))
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED + 1)
    fresh = _gpt(world, 1)
    differed_before = {n: not torch.equal(p, saved[n]) for n, p in fresh.named_parameters()}
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir))
    equal_after = {n: torch.equal(p, saved[n]) for n, p in fresh.named_parameters()}
    _save(
        out_dir,
        "ckpt",
        rank,
        dict(
            differed_before=differed_before,
            equal_after=equal_after,
            shard_sum=sum(float(p.sum()) for p in saved.values()),
        ),
    )
    _teardown()


# ----------------------------------------------------------------------------------------------
# parent side
# ----------------------------------------------------------------------------------------------
def _spawn(fn, world: int, tmp: Path, *args) -> None:
    init_file = tmp / f"rendezvous-{fn.__name__}-{world}-{len(list(tmp.iterdir()))}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the children inherit it (conftest sets it too)
    mp.spawn(fn, args=(world, str(init_file), str(tmp), *args), nprocs=world, join=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """Single-process TP=1 run: the numbers every other layout must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    _spawn(_train_worker, 1, tmp, 1, "reference")
    return tmp / "reference.rank0.pt", _load(tmp, "reference", 0)


def _assert_trained(losses: list[float], reference_losses: list[float]) -> None:
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # same batch every step: Adam must bring the loss down
    assert abs(losses[0] - reference_losses[0]) < 1e-5
    assert max(abs(a - b) for a, b in zip(losses, reference_losses)) < 1e-4


@pytest.mark.timeout(300)
def test_cuda_rng_tracker_fork_is_reproducible_and_rank_dependent(tmp_path):
    _spawn(_rng_worker, 2, tmp_path)
    r0, r1 = _load(tmp_path, "rng", 0), _load(tmp_path, "rng", 1)
    for r in (r0, r1):
        assert torch.equal(r["fork_1"], r["fork_2"])  # same seed, same mask
        assert not torch.equal(r["fork_1"], r["outside"])  # model-parallel stream != default
        assert 0.4 < r["fork_1"].float().mean() < 0.6
        # fork() leaves the default (data-parallel) stream untouched: it continues where it was,
        # exactly as torch.manual_seed(SEED) followed by two draws.
        assert torch.equal(r["outside_before"], r["plain_before"])
        assert torch.equal(r["outside_after"], r["plain_after"])
    assert not torch.equal(r0["fork_1"], r1["fork_1"])  # TP ranks get different seeds
    assert torch.equal(r0["outside"], r1["outside"])  # the default stream is shared


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "tp1_dp2"])
def test_gpt_trains_like_single_process(tmp_path, reference, tp):
    _, ref = reference
    assert len(ref["losses"]) == STEPS and all(math.isfinite(x) for x in ref["losses"])
    assert ref["losses"][-1] < ref["losses"][0]  # the reference itself trains
    assert abs(ref["losses"][0] - math.log(VOCAB)) < 0.5  # untrained model: about uniform
    _spawn(_train_worker, 2, tmp_path, tp, "run")
    runs = [_load(tmp_path, "run", rank) for rank in range(2)]
    for run in runs:
        _assert_trained(run["losses"], ref["losses"])
        assert run["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
    if tp == 2:
        # use_cpu_initialization: every TP rank draws the full weight and keeps its slice, so the
        # shards of the two ranks put together are the TP=1 weights.
        for name, full in ref["initial"].items():
            shards = [run["initial"][name] for run in runs]
            if shards[0].shape == full.shape:  # replicated (layer norms, row-parallel biases)
                assert torch.equal(shards[0], full) and torch.equal(shards[1], full), name
            else:
                dim = next(d for d in range(full.dim()) if shards[0].shape[d] != full.shape[d])
                assert torch.equal(torch.cat(shards, dim), full), name


@pytest.mark.timeout(300)
def test_pipeline_parallel_matches_single_stage(tmp_path, reference):
    reference_file, ref = reference
    _spawn(_pp_worker, 2, tmp_path, str(reference_file))
    stages = [_load(tmp_path, "pp", rank) for rank in range(2)]
    assert [s["last_stage"] for s in stages] == [False, True]
    assert stages[0]["loss"] is None
    loss = stages[1]["loss"]
    assert math.isfinite(loss) and abs(loss - ref["losses"][0]) < 1e-5
    names = set()
    for stage in stages:
        for name, grad in stage["grads"].items():
            names.add(name)
            assert grad.abs().sum() > 0, name  # the backward pass reached this stage
            torch.testing.assert_close(grad, ref["grads0"][name], rtol=1e-4, atol=1e-6, msg=name)
    assert names == set(ref["grads0"])  # the two stages together hold every parameter


@pytest.mark.timeout(300)
def test_dist_checkpoint_round_trip_tp2(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _spawn(_checkpoint_worker, 2, tmp_path, str(ckpt))
    results = [_load(tmp_path, "ckpt", rank) for rank in range(2)]
    assert (ckpt / "metadata.json").exists()
    assert results[0]["shard_sum"] != results[1]["shard_sum"]  # the ranks held different shards
    for r in results:
        assert len(r["equal_after"]) > 10
        assert all(r["differed_before"].values())  # the load has every parameter to restore
        assert all(r["equal_after"].values()), [n for n, ok in r["equal_after"].items() if not ok]


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore")  # megatron's import-time "Apex/TE not installed" warnings
def test_enable_disable_in_process():
    from torch.overrides import _get_current_function_mode_stack

    originals = {
        n: getattr(torch.cuda, n)
        for n in (
            "get_rng_state",
            "set_rng_state",
            "manual_seed",
            "current_device",
            "current_stream",
            "Stream",
            "Event",
            "stream",
            "synchronize",
        )
    }
    random_get = torch.cuda.random.get_rng_state
    type_before = torch.Tensor.type
    assert not megatron_cpu.is_enabled()
    try:
        megatron_cpu.enable()
        megatron_cpu.enable()  # idempotent
        if torch.cuda.is_available():  # on a GPU machine enable() is a no-op
            assert not megatron_cpu.is_enabled()
            return
        from megatron.core.optimizer import clip_grads, distrib_optimizer
        from megatron.core.tensor_parallel import random as mp_random

        assert megatron_cpu.is_enabled()
        assert len(_get_current_function_mode_stack()) == 1
        x = torch.zeros(3, device="cuda")
        assert x.device.type == "cpu"
        assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
        assert x.cuda() is x and x.to("cuda").device.type == "cpu"
        assert x.to(torch.float64).dtype == torch.float64  # ordinary CPU paths unchanged
        assert x.to(torch.zeros(1, dtype=torch.int64)).dtype == torch.int64
        assert x.to("cuda:0", torch.float16).dtype == torch.float16
        assert x.type() == "torch.FloatTensor"  # .type() is only rewritten inside the checks
        torch.cuda.manual_seed(5)
        state = torch.cuda.get_rng_state()
        assert torch.equal(state, torch.get_rng_state())
        assert torch.equal(mp_random._get_cuda_rng_state(), state)
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
        torch.cuda.synchronize()
        grad = torch.ones(4)
        param = torch.nn.Parameter(torch.zeros(4))
        param.grad = grad
        clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
        assert torch.allclose(grad, torch.full((4,), 0.25), atol=1e-6)
        assert distrib_optimizer.DistributedOptimizer.__init__.__wrapped__ is not None
    finally:
        megatron_cpu.disable()
    assert not megatron_cpu.is_enabled()
    assert _get_current_function_mode_stack() == []
    assert not torch._C._is_torch_function_mode_enabled()
    assert {n: getattr(torch.cuda, n) for n in originals} == originals
    assert torch.cuda.random.get_rng_state is random_get and torch.Tensor.type is type_before
    if not torch.cuda.is_available():
        from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
        from megatron.core.tensor_parallel import random as mp_random

        assert mp_random._get_cuda_rng_state.__module__ == mp_random.__name__
        assert not hasattr(clip_grads.clip_grad_by_total_norm_fp32, "__wrapped__")
        assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
        assert not hasattr(distrib_optimizer.DistributedOptimizer.__init__, "__wrapped__")
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")
    megatron_cpu.disable()  # a second disable is harmless
