"""The deepspeed engine (run.engine=deepspeed): ZeRO 1-3 give the megatron engine's losses, exact resume
after a kill, conversion to the megatron format and back, and clear errors for a bad passthrough.

Real processes on gloo with DeepSpeed's CPU accelerator, the same tiny model, tokenizer and text as
test_train.py (the session's `tiny_dataset`, conftest.py). The first DeepSpeed start JIT-builds its
shm_comm op (~35 s), cached in TORCH_EXTENSIONS_DIR (default here: ~/.cache/kscale/torch_extensions).
"""

import json

import pytest
import torch

from tiny_runs import DEEPSPEED_ENV, kscale, losses

# measured: the engines agree to 3.3e-5 (relative) after 6 steps in fp32 on CPU (identical at step 1;
# differences in summation order grow through AdamW's normalisation)
LOSS_RTOL = 2e-4
SHAPE = {
    "data": {"global_batch_size": 8},
    "schedule": {"train_steps": 6, "warmup_steps": 2},
    "checkpoint": {"every": 3},
    "eval": {"every": 3, "batches": 2},
}


@pytest.fixture(scope="session")
def ds_config(tiny_config):
    """tiny_config with 6 steps of 2 ranks x 2 micro-batches of 2; keywords update sections as there."""

    def make(directory, **sections):
        merged = {k: dict(v) for k, v in SHAPE.items()}
        for k, v in sections.items():
            merged.setdefault(k, {}).update(v)
        return tiny_config(directory, **merged)

    return make


def train(cfg, *overrides, env=None):
    return kscale("train", cfg, "parallel.nproc=2", *overrides, env={**DEEPSPEED_ENV, **(env or {})})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ds_config):
    """The megatron engine's run and one deepspeed run per ZeRO stage, same config (2 ranks, 2 micro-batches)."""
    out = {}
    for name in ("megatron", "zero1", "zero2", "zero3"):
        d = tmp_path_factory.mktemp(name)
        extra = [] if name == "megatron" else ["run.engine=deepspeed", f"deepspeed.zero_stage={name[-1]}"]
        r = train(ds_config(d), *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = d / "run"
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_gives_the_megatron_engines_losses(runs, stage):
    expected, got = losses(runs["megatron"]), losses(runs[f"zero{stage}"])
    assert sorted(got) == list(range(1, 7))
    assert got[1] == pytest.approx(expected[1], rel=1e-6)  # same initial weights, same first batch
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=LOSS_RTOL), step
    assert got[6] < got[1] - 0.1  # it learns
    recs = [json.loads(x) for x in (runs[f"zero{stage}"] / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    ref = [
        r["val_loss"]
        for r in map(json.loads, (runs["megatron"] / "metrics.jsonl").read_text().splitlines())
        if "val_loss" in r
    ]
    assert val == pytest.approx(ref, rel=LOSS_RTOL) and len(val) == 2
    first = next(r for r in recs if r["step"] == 1)  # norm statistics of the whole projection
    assert first["projection_std"] == pytest.approx((256 * 16) ** -0.5, rel=0.05)
    ckpt = runs[f"zero{stage}"] / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    state = torch.load(ckpt / "step_00000006" / "trainer_state.pt", weights_only=False)
    assert state["engine"] == "deepspeed" and state["zero_stage"] == stage and state["step"] == 6


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_after_kill_reproduces_the_uninterrupted_losses(tmp_path, ds_config, runs):
    cfg = ds_config(tmp_path)
    r = train(cfg, "run.engine=deepspeed", "deepspeed.zero_stage=2", env={"KSCALE_FAULT_EXIT_AFTER_STEP": "4"})
    assert r.returncode != 0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    r = train(cfg, "run.engine=deepspeed", "deepspeed.zero_stage=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "re-seeded" not in r.stdout
    assert losses(tmp_path / "run") == losses(runs["zero2"])  # bit-exact, every step


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_conversion_to_megatron_and_back_keeps_the_weights_and_the_megatron_engine_resumes(tmp_path, ds_config, runs):
    from kronecker_scale.train.deepspeed_adapter import consolidated_weights

    src = runs["zero3"] / "checkpoints" / "step_00000003"
    r = kscale("convert", "deepspeed-to-megatron", src, tmp_path / "mg", env=DEEPSPEED_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    mg = tmp_path / "mg" / "step_00000003"
    assert (tmp_path / "mg" / "latest").read_text().strip() == mg.name
    r = kscale("convert", "megatron-to-deepspeed", mg, tmp_path / "ds", env=DEEPSPEED_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = consolidated_weights(src), consolidated_weights(tmp_path / "ds" / "step_00000003")
    assert sorted(before) == sorted(after) and len(before) > 10
    for name in before:
        assert torch.equal(before[name], after[name]), name
    # the megatron engine continues from the converted checkpoint with the deepspeed run's losses
    # (weights, Adam states, step and data position all carried over)
    (tmp_path / "resume").mkdir()
    cfg = ds_config(tmp_path / "resume")
    r = train(cfg, f"checkpoint.resume={mg}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    got, expected = losses(tmp_path / "resume" / "run"), losses(runs["zero3"])
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=LOSS_RTOL), step


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_passthrough_key_is_a_clear_error(tmp_path, ds_config):
    cfg = ds_config(tmp_path, deepspeed={"passthrough": {"zero_optimisation": {"stage": 2}}})
    r = train(cfg, "run.engine=deepspeed")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "DeepSpeed 0.19.8 has no config key 'zero_optimisation'" in r.stderr
    assert "did you mean 'zero_optimization'?" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # checked before any process starts
    r = kscale(
        "launch",
        cfg,
        "run.engine=deepspeed",
        "launcher.cluster=slurm",
        "launcher.tasks_per_node=2",
        "--dry-run",
        env=DEEPSPEED_ENV,
    )  # and before anything is submitted
    assert r.returncode == 2 and "has no config key 'zero_optimisation'" in r.stderr, r.stderr[-3000:]


def test_passthrough_merges_and_conflicts_are_reported():
    from omegaconf import OmegaConf

    from kronecker_scale.config import TrainConfig
    from kronecker_scale.errors import KScaleError
    from kronecker_scale.train.deepspeed_adapter import check_with_deepspeed, generated_config, merge_passthrough

    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainConfig),
        {
            "data": {"micro_batch_size": 2, "global_batch_size": 16},
            "run": {"precision": "bf16"},
            "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
        },
    )
    gen = generated_config(cfg, dp_size=2)
    assert gen["gradient_accumulation_steps"] == 4 and gen["train_micro_batch_size_per_gpu"] == 2
    assert gen["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    assert gen["bf16"] == {"enabled": True} and gen["fp16"] == {"enabled": False}
    merged = merge_passthrough(
        gen,
        {
            "zero_optimization": {"overlap_comm": False},
            "wall_clock_breakdown": True,
            "train_micro_batch_size_per_gpu": 2,
        },
    )  # equal values are no conflict
    assert merged["zero_optimization"]["overlap_comm"] is False and merged["zero_optimization"]["stage"] == 3
    check_with_deepspeed(merged, {"wall_clock_breakdown": True})
    with pytest.raises(KScaleError, match="contradicts 2, which comes from data.micro_batch_size"):
        merge_passthrough(gen, {"train_micro_batch_size_per_gpu": 4})
    with pytest.raises(KScaleError, match="zero_optimization.stage=2 contradicts 3"):
        merge_passthrough(gen, {"zero_optimization": {"stage": 2}})
    with pytest.raises(KScaleError, match="set by the engine itself"):
        merge_passthrough(gen, {"optimizer": {"type": "Adam"}})
    with pytest.raises(KScaleError, match="DeepSpeed rejects the config") as e:
        check_with_deepspeed(merge_passthrough(gen, {"zero_optimization": {"overlap_com": True}}), {})
    assert "overlap_com" in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,needle",
    [
        (
            ["run.engine=deepspeed", "parallel.nproc=2", "parallel.tensor=2"],
            "the deepspeed engine is data parallel only",
        ),
        (["run.engine=deepspeed", "deepspeed.zero_stage=4"], "use 1, 2 or 3"),
        (["run.engine=deepspeed", "deepspeed.offload_params=true"], "parameter offload needs deepspeed.zero_stage=3"),
    ],
)
def test_bad_deepspeed_configs_fail_before_any_process_starts(tmp_path, tiny_config, overrides, needle):
    r = kscale("train", tiny_config(tmp_path), *overrides)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
