"""Nothing lost (docs/reliability.md): checkpoint lineage on restart and rollback, optimizer settings that
change on resume, a model that may not, damaged checkpoints, a full disk, bad settings. Real `kscale
train` processes (gloo, GPT-2's vocabulary, real text) on the tiny config."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tiny_runs import kscale, losses

pytestmark = pytest.mark.slow


def steps_in(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*") if p.is_dir())


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def metric_steps(run: Path) -> list[int]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return [r["step"] for r in rows if "loss" in r]


@pytest.fixture
def six_steps(tmp_path, tiny_config):
    """A run of 6 steps with checkpoints at 2, 4 and 6 (all kept)."""
    cfg = tiny_config(
        tmp_path,
        schedule={"train_steps": 6, "warmup_steps": 1},
        checkpoint={"every": 2, "keep_last": 3},
        eval={"every": 0},
    )
    r = kscale("train", cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    return cfg, tmp_path / "run"


def test_start_over_is_refused_then_moves_the_old_run_aside(six_steps):
    cfg, run = six_steps
    config_before = (run / "config.yaml").read_text()
    r = kscale("train", cfg, "checkpoint.resume=none")
    assert r.returncode == 2 and "run.restart=true" in r.stderr
    assert (run / "config.yaml").read_text() == config_before and steps_in(run / "checkpoints") == [2, 4, 6]

    r = kscale("train", cfg, "checkpoint.resume=none", "run.restart=true", "schedule.train_steps=4")
    assert r.returncode == 0, r.stderr[-2000:]
    aside = list(run.glob("previous-*"))
    assert len(aside) == 1 and steps_in(aside[0] / "checkpoints") == [2, 4, 6]  # moved, not deleted
    assert (aside[0] / "metrics.jsonl").is_file()
    assert steps_in(run / "checkpoints") == [2, 4] and latest(run) == "step_00000004"
    assert metric_steps(run) == [1, 2, 3, 4]  # one history, the new one


def test_rollback_keeps_one_history_and_resumes_exactly(six_steps):
    cfg, run = six_steps
    before = losses(run)
    r = kscale("train", cfg, f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rollback to step 2" in r.stdout
    assert steps_in(run / "checkpoints") == [2, 4, 6] and latest(run) == "step_00000006"
    abandoned = list((run / "checkpoints").glob("abandoned-*"))
    assert len(abandoned) == 1 and steps_in(abandoned[0]) == [4, 6]
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]  # no interleaved histories
    cut = [json.loads(x) for f in run.glob("metrics.abandoned-*.jsonl") for x in f.read_text().splitlines()]
    assert sorted(r["step"] for r in cut if "loss" in r) == [3, 4, 5, 6]
    assert losses(run) == before  # the resumed run is exact


def test_retention_never_deletes_the_checkpoint_resumed_from(six_steps):
    cfg, run = six_steps
    r = kscale("train", cfg, f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}", "checkpoint.keep_last=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert steps_in(run / "checkpoints") == [2, 6] and latest(run) == "step_00000006"


def test_learning_rate_may_change_on_resume(six_steps):
    cfg, run = six_steps
    r = kscale("train", cfg, "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.beta2=0.99", "schedule.train_steps=8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "optim.lr: 0.003 -> 0.001" in r.stdout and "optim.beta2" in r.stdout
    rows = {json.loads(x)["step"]: json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x}
    # cosine from 1e-3 to 1e-4 over 8 steps after 1 warmup step, at step 7 (index 6): the new settings apply
    import math

    expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (6 - 1) / 7))
    assert rows[7]["lr"] == pytest.approx(expected, rel=1e-9)


def test_a_changed_model_is_refused_before_anything_is_touched(six_steps):
    cfg, run = six_steps
    config_before = (run / "config.yaml").read_text()
    r = kscale("train", cfg, "model.d_model=64", "schedule.train_steps=8")
    assert r.returncode == 2 and "model.d_model: 32 -> 64" in r.stderr
    assert (run / "config.yaml").read_text() == config_before and latest(run) == "step_00000006"


def _truncate_largest(step_dir: Path) -> str:
    biggest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = biggest.read_bytes()
    biggest.write_bytes(data[: len(data) // 2])
    return biggest.name


def test_a_truncated_latest_falls_back_to_the_previous_checkpoint(six_steps):
    cfg, run = six_steps
    name = _truncate_largest(run / "checkpoints" / "step_00000006")
    explicit = kscale(
        "train", cfg, f"checkpoint.resume={run / 'checkpoints' / 'step_00000006'}", "schedule.train_steps=8"
    )
    assert explicit.returncode == 2 and name in explicit.stderr and "damaged" in explicit.stderr
    r = kscale("train", cfg, "schedule.train_steps=8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipping damaged checkpoint" in r.stdout and name in r.stdout
    assert "resumed from" in r.stdout and "step_00000004 at step 4" in r.stdout
    assert latest(run) == "step_00000008"


def test_a_partial_checkpoint_left_behind_is_cleaned_at_start(six_steps):
    cfg, run = six_steps
    partial = run / "checkpoints" / ".step_00000008.tmp"
    partial.mkdir()
    (partial / "half-written").write_bytes(b"x" * 100)
    r = kscale("train", cfg, "schedule.train_steps=8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not partial.exists() and "removed the partial checkpoint" in r.stdout


@pytest.mark.parametrize(
    "override, key",
    [("data.micro_batch_size=0", "data.micro_batch_size"), ("schedule.train_steps=-5", "schedule.train_steps")],
)
def test_impossible_settings_name_their_key(tmp_path, tiny_config, override, key):
    r = kscale("train", tiny_config(tmp_path), override)
    assert r.returncode == 2 and f"config key {key}" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs (root only): room for a few files, not for a checkpoint of the tiny model."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_says_so_and_leaves_no_partial_checkpoint(tmp_path, tiny_config, small_disk):
    cfg = tiny_config(
        tmp_path,
        schedule={"train_steps": 4, "warmup_steps": 1},
        checkpoint={"every": 2},
        eval={"every": 0},
        run={"dir": str(small_disk / "run")},
    )
    r = kscale("train", cfg)
    assert r.returncode == 2 and "disk full" in r.stderr and "Traceback" not in r.stderr, r.stderr[-5000:]
    ckpts = small_disk / "run" / "checkpoints"
    assert not list(ckpts.glob(".step_*.tmp")) and not (ckpts / "latest").exists()
    shutil.rmtree(small_disk / "run", ignore_errors=True)
