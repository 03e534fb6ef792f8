"""`kscale train`: bad configs, bit-exact resume after a kill, crash-safe checkpoints, every arm learns.

Real processes (gloo), a real tokenizer (GPT-2) and real text (CPython's LICENSE + Debian's licence texts):
the session's `tiny_dataset` and `tiny_config` (conftest.py).
"""

import json

import pytest

from tiny_runs import REPO, kscale, losses


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.foo=1"], "Key 'foo' not in 'GPTConfig'"),
        (["optim.lr=fast"], "key optim.lr"),
        (["parallel.tensor=2"], "parallel.nproc=1 is not possible"),
        (["parallel.nproc=2", "parallel.tensor=3"], "divisible by TP x PP = 3"),
        (["parallel.nproc=3", "parallel.tensor=3"], "model.n_heads=4 must be divisible"),
        (["model.head=tied"], "a Kronecker input layer has no V x d table"),
        (["data.global_batch_size=3"], "multiple of micro_batch_size"),
        (["optim.lr"], "is not key=value"),
    ],
)
def test_bad_configs_fail_before_any_process_starts(tmp_path, tiny_config, overrides, needle):
    r = kscale("train", tiny_config(tmp_path), *overrides)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.slow
def test_missing_and_malformed_config_files(tmp_path):
    r = kscale("train", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "config file not found" in r.stderr
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    r = kscale("train", tmp_path / "bad.yaml")
    assert r.returncode == 2 and "malformed YAML" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "layout",
    [["parallel.nproc=2"], ["parallel.nproc=2", "parallel.tensor=2"], ["parallel.nproc=2", "parallel.pipeline=2"]],
    ids=["dp2", "tp2", "pp2"],
)
def test_resume_after_kill_reproduces_the_uninterrupted_losses(tmp_path, tiny_config, layout):
    straight = tmp_path / "straight"
    straight.mkdir()
    r = kscale("train", tiny_config(straight), *layout)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = losses(straight / "run")
    assert sorted(expected) == list(range(1, 9))
    # norm statistics cover the whole projection in every layout: rows of N(0, 1/D) in d = 32 columns
    first = next(
        r
        for r in map(json.loads, (straight / "run" / "metrics.jsonl").read_text().splitlines())
        if r["step"] == 1 and "loss" in r
    )
    D = 256 * 16
    assert first["projection_row_norm"] == pytest.approx(((32 - 0.5) / D) ** 0.5, rel=0.05)
    assert first["projection_std"] == pytest.approx(D**-0.5, rel=0.05)
    assert expected[8] < expected[1]  # it learns
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = tiny_config(broken)
    r = kscale("train", cfg, *layout, env={"KSCALE_FAULT_EXIT_AFTER_STEP": "5"})  # killed after step 5
    assert r.returncode != 0
    assert (broken / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    r = kscale("train", cfg, *layout)  # resumes from latest (step 4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert losses(broken / "run") == expected  # bit-exact, every step


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_crash_during_checkpoint_write_keeps_latest_on_the_previous_checkpoint(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path)
    r = kscale("train", cfg, env={"KSCALE_FAULT_CRASH_IN_CHECKPOINT": "8"})
    assert r.returncode != 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert not (ckpts / "step_00000008").exists() and (ckpts / ".step_00000008.tmp").exists()
    r = kscale("train", cfg, "schedule.train_steps=6")  # a resume picks the complete one
    assert r.returncode == 0 and "resumed from" in r.stdout and "step_00000004" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("arm", ["bpe_tied", "bpe_untied", "kronecker_tied"])
def test_other_arms_learn(tmp_path, tiny_config, arm):
    model = {
        "bpe_tied": {"input_layer": "bpe", "head": "tied"},
        "bpe_untied": {"input_layer": "bpe", "head": "untied"},
        "kronecker_tied": {"head": "kronecker_tied"},
    }[arm]
    r = kscale("train", tiny_config(tmp_path, model=model))
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(tmp_path / "run")
    assert got[8] < got[1] - 0.05


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_into_another_tensor_parallel_layout(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, schedule={"train_steps": 4})
    assert kscale("train", cfg, "parallel.nproc=2").returncode == 0  # DP=2
    r = kscale("train", cfg, "parallel.nproc=2", "parallel.tensor=2", "schedule.train_steps=6")  # TP=2
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "RNG states re-seeded" not in r.stdout  # same world size
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 7)) and got[6] < got[1]


@pytest.mark.parametrize(
    "path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if "sweeps" not in p.parts)
)  # sweep specs: test_vocab_scaling.py
def test_every_shipped_config_is_valid(path):
    from kronecker_scale.config import load_config

    cfg = load_config(REPO / path)
    assert cfg.model.n_layers % cfg.parallel.pipeline == 0 and cfg.run.name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_non_finite_loss_is_skipped_and_counted_or_stops_the_run(tmp_path, tiny_config):
    skip = tmp_path / "skip"
    skip.mkdir()
    r = kscale(
        "train", tiny_config(skip), "run.on_nan=skip", "schedule.train_steps=4", env={"KSCALE_FAULT_NAN_AT_STEP": "2"}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (skip / "run" / "metrics.jsonl").read_text().splitlines()]
    by_step = {x["step"]: x for x in recs if "loss" in x}
    assert by_step[1]["skipped_steps"] == 0 and by_step[2]["skipped_steps"] == 1 and by_step[4]["skipped_steps"] == 1
    stop = tmp_path / "stop"
    stop.mkdir()
    r = kscale("train", tiny_config(stop), "schedule.train_steps=4", env={"KSCALE_FAULT_NAN_AT_STEP": "2"})
    assert r.returncode == 2 and "loss is not finite at step 2" in r.stderr
