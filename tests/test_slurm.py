"""`kscale launch` against a real Slurm (munge + slurmctld + slurmd on localhost, started by the test
set-up from Debian's packages and stopped by PID afterwards; see slurm_cluster.py): a 2-task job equals
the same run started locally, a job preempted twice resumes to the uninterrupted losses, a 4-element
sweep runs as one job array, and the sbatch template trains like `launch`. Dry runs and bad launcher
settings need no Slurm.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import slurm_cluster
from tiny_runs import DEEPSPEED_ENV, REPO, kscale, losses

pytestmark = pytest.mark.slow
SLURM_TASK = ["launcher.cluster=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=2", "launcher.time_min=15"]


@pytest.fixture(scope="module")
def slurm():
    was_up = slurm_cluster.slurm_up()
    if not slurm_cluster.start():
        pytest.skip(f"no Slurm: {slurm_cluster.SKIP_REASON}")
    yield
    if not was_up:
        slurm_cluster.stop()


def job_env():
    # sbatch exports this environment to the job: the repo on the path, one thread per rank
    return {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def steps_logged(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.is_file() else 0


def job_gone(job_id) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", str(job_id)], capture_output=True, text=True)
    return job_id not in out.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config):
    """The uninterrupted local run every Slurm run is compared with (2 ranks, 40 steps)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(
        tmp,
        parallel={"nproc": 2},
        schedule={"train_steps": 40, "warmup_steps": 2},
        checkpoint={"every": 100},
        eval={"every": 20, "batches": 2},
    )
    r = kscale("train", cfg, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg, losses(tmp / "run")


# --- no Slurm needed ------------------------------------------------------------------------------
def test_dry_run_prints_config_and_sbatch_and_writes_nothing(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path)
    r = kscale(
        "launch",
        cfg,
        "launcher.cluster=slurm",
        "launcher.nodes=2",
        "launcher.gpus_per_node=8",
        "launcher.tasks_per_node=8",
        "launcher.partition=gpu",
        "launcher.account=lm",
        "launcher.qos=high",
        "launcher.constraint=h100",
        "launcher.exclusive=true",
        "launcher.env.NCCL_DEBUG=WARN",
        "launcher.setup=[module load cuda,source /opt/venv/bin/activate]",
        "launcher.sbatch_extra=[reservation=big,--mail-type=END]",
        "data.global_batch_size=32",
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    resolved, script = r.stdout.split("# sbatch script\n")
    assert yaml.safe_load(resolved.split("# resolved config\n")[1])["parallel"]["nproc"] == 16  # 2 nodes x 8
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lm",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100",
        "#SBATCH --exclusive",
        "#SBATCH --reservation=big",
        "#SBATCH --mail-type=END",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --mem=64GB",
        "export NCCL_DEBUG=WARN",
        "module load cuda",
        "source /opt/venv/bin/activate",
    ]:
        assert line in script.splitlines(), line
    assert "srun --unbuffered" in script and "submitit.core._submit" in script
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["launcher.cluster=slurm", "launcher.gpus_per_node=8", "launcher.tasks_per_node=4"], "one task per GPU"),
        (["launcher.cluster=moon"], "use slurm, local or debug"),
        (["launcher.cluster=slurm", "launcher.tasks_per_node=3", "parallel.tensor=2"], "divisible by TP x PP = 2"),
        (["launcher.nodes=0"], "launcher.nodes=0 is not possible"),
    ],
)
def test_bad_launcher_settings_fail_before_submitting(tmp_path, tiny_config, overrides, needle):
    r = kscale("launch", tiny_config(tmp_path), *overrides)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_sweep_rejects_per_element_resources_and_bad_elements(tmp_path, tiny_config):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  launcher.nodes: [1, 2]\n")
    r = kscale("launch", tiny_config(tmp_path), "--sweep", sweep, "--sweep-dir", tmp_path / "sw")
    assert r.returncode == 2 and "one job array shares one set of resources" in r.stderr
    sweep.write_text("runs:\n  - {model.d_model: 32}\n  - {model.n_heads: 5}\n")
    r = kscale("launch", tiny_config(tmp_path), "--sweep", sweep, "--sweep-dir", tmp_path / "sw")
    assert r.returncode == 2 and "sweep element 1" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "sw").exists()  # nothing written, nothing submitted


def test_sweep_expansion():
    from kronecker_scale.launch import sweep

    spec = {
        "grid": {"model.input_layer": ["kronecker", "bpe"], "optim.lr": [1e-3, 2e-3]},
        "runs": [{"tokenizer.path": "gpt2"}, {"tokenizer.path": "llama3", "model.pos_dim": 16}],
    }
    elements = sweep.expand(spec)
    assert len(elements) == 8
    assert elements[0] == {"tokenizer.path": "gpt2", "model.input_layer": "kronecker", "optim.lr": 1e-3}
    assert elements[-1] == {
        "tokenizer.path": "llama3",
        "model.pos_dim": 16,
        "model.input_layer": "bpe",
        "optim.lr": 2e-3,
    }
    assert len({sweep.slug(e) for e in elements}) == 8
    assert sweep.grid_from_args(["model.pos_dim=16,32"]) == {"model.pos_dim": [16, 32]}


# --- real Slurm -----------------------------------------------------------------------------------
def test_two_task_job_equals_local_run(slurm, tmp_path, reference):
    cfg, ref = reference
    run = tmp_path / "run"
    r = kscale("launch", cfg, *SLURM_TASK, "launcher.tasks_per_node=2", f"run.dir={run}", "--wait", env=job_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert losses(run) == ref  # bit-identical to the local 2-process run
    info = json.loads((run / "slurm" / "job.json").read_text())
    logs = run / "slurm" / info["job_id"]
    assert {p.name for p in logs.glob("*_log.out")} == {f"{info['job_id']}_0_log.out", f"{info['job_id']}_1_log.out"}
    assert "#SBATCH --ntasks-per-node=2" in Path(info["sbatch"]).read_text()
    assert yaml.safe_load((run / "config.yaml").read_text())["parallel"]["nproc"] == 2


def test_job_preempted_twice_resumes_to_the_same_losses(slurm, tmp_path, reference):
    cfg, ref = reference
    run = tmp_path / "run"
    r = kscale(
        "launch",
        cfg,
        *SLURM_TASK,
        "launcher.tasks_per_node=2",
        f"run.dir={run}",
        env={**job_env(), "KSCALE_FAULT_STEP_SLEEP_S": "0.25"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = json.loads((run / "slurm" / "job.json").read_text())["job_id"]
    resumed_at = []
    for target in (8, 22):
        wait_for(lambda target=target: steps_logged(run) >= target, 240, f"step {target}")
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what Slurm sends before a limit
        wait_for(
            lambda: (
                len(list((run / "slurm" / job_id).glob("*_0_log.out")))
                and (run / "slurm" / job_id / f"{job_id}_0_log.out").read_text().count("resumed from") > len(resumed_at)
            ),
            240,
            "the requeued job to resume",
        )
        resumed_at.append(int((run / "checkpoints" / "latest").read_text().strip().split("_")[1]))
    wait_for(lambda: job_gone(job_id), 300, "the job to finish")
    assert len(resumed_at) == 2 and 8 <= resumed_at[0] < resumed_at[1] < 40
    assert losses(run) == ref  # same losses as never interrupted
    log = (run / "slurm" / job_id / f"{job_id}_0_log.out").read_text()
    assert log.count("preempted by SIGUSR2") == 2 and f"requeue {job_id}: ok" in log


def test_sweep_runs_as_a_four_element_job_array(slurm, tmp_path, tiny_config):
    cfg = tiny_config(
        tmp_path,
        schedule={"train_steps": 6, "warmup_steps": 1},
        eval={"every": 6, "batches": 1},
        checkpoint={"every": 0, "save_at_end": False},
    )
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump({"name": "arms", "grid": {"model.input_layer": ["kronecker", "bpe"], "optim.lr": [1e-3, 3e-3]}})
    )
    sweep_dir = tmp_path / "sweep"
    r = kscale("launch", cfg, *SLURM_TASK, "--sweep", sweep, "--sweep-dir", sweep_dir, "--wait", env=job_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    ids = [e["job_id"] for e in meta["elements"]]
    assert (
        len(ids) == 4
        and len({i.split("_")[0] for i in ids}) == 1
        and [i.split("_")[1] for i in ids] == ["0", "1", "2", "3"]
    )  # one array, tasks 0-3
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["done"] * 4
    for row, e in zip(rows, meta["elements"]):
        assert row["loss"] == losses(e["run_dir"])[6]  # the table holds each run's final loss
        layer = yaml.safe_load((Path(e["run_dir"]) / "config.yaml").read_text())["model"]["input_layer"]
        assert f"model.input_layer={layer}" in row["overrides"]
    kron, bpe = rows[0]["params"], rows[2]["params"]
    assert kron < bpe  # the input table is gone
    assert (sweep_dir / "summary.md").read_text().count("| done |") == 4


def test_sbatch_template_trains_like_launch(slurm, tmp_path, reference):
    cfg, ref = reference
    run = tmp_path / "run"
    # the template targets GPU nodes; this CPU node has none, so its GPU line is dropped here
    script = tmp_path / "train.sbatch"
    script.write_text(
        "".join(
            line
            for line in (REPO / "slurm" / "train.sbatch").read_text().splitlines(True)
            if "--gpus-per-node" not in line
        )
    )
    env = {**os.environ, **job_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "--mem=4G",
            f"--output={tmp_path}/slurm-%j.out",
            "--chdir",
            str(REPO),
            str(script),
            str(cfg),
            f"run.dir={run}",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    job_id = out.stdout.strip().split(";")[0]
    wait_for(lambda: job_gone(job_id), 300, "the template job")
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert losses(run) == ref, log[-3000:]


def test_debug_cluster_runs_in_process_like_train(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, schedule={"train_steps": 4, "warmup_steps": 1}, checkpoint={"every": 0})
    r = kscale("launch", cfg, "launcher.cluster=debug", f"run.dir={tmp_path / 'debug'}", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    r = kscale("train", cfg, f"run.dir={tmp_path / 'local'}", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "debug") == losses(tmp_path / "local") and len(losses(tmp_path / "local")) == 4
    assert json.loads((tmp_path / "debug" / "slurm" / "job.json").read_text())["cluster"] == "debug"


def test_deepspeed_engine_on_slurm_survives_preemption(slurm, tmp_path, tiny_config):
    """run.engine=deepspeed (ZeRO-2) through `launch`: preempted once, it ends with the local run's losses."""
    cfg = tiny_config(
        tmp_path,
        schedule={"train_steps": 16, "warmup_steps": 2},
        checkpoint={"every": 100},
        eval={"every": 8, "batches": 1},
    )
    engine = ["run.engine=deepspeed", "deepspeed.zero_stage=2"]
    r = kscale(
        "train",
        cfg,
        "parallel.nproc=2",
        *engine,
        f"run.dir={tmp_path / 'local'}",
        env={**DEEPSPEED_ENV, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "slurm-run"
    r = kscale(
        "launch",
        cfg,
        *SLURM_TASK,
        "launcher.tasks_per_node=2",
        *engine,
        f"run.dir={run}",
        env={**job_env(), **DEEPSPEED_ENV, "KSCALE_FAULT_STEP_SLEEP_S": "0.5"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = json.loads((run / "slurm" / "job.json").read_text())["job_id"]
    wait_for(lambda: steps_logged(run) >= 4, 300, "step 4")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for(lambda: job_gone(job_id), 400, "the job to finish")
    log = (run / "slurm" / job_id / f"{job_id}_0_log.out").read_text()
    assert "preempted by SIGUSR2" in log and "resumed from" in log, log[-3000:]
    assert losses(run) == losses(tmp_path / "local")


def test_local_grid_sweep_runs_and_summarizes_without_wait(tmp_path, tiny_config):
    cfg = tiny_config(
        tmp_path,
        schedule={"train_steps": 2, "warmup_steps": 1},
        eval={"every": 0},
        checkpoint={"every": 0, "save_at_end": False},
    )
    sweep_dir = tmp_path / "sweep"
    r = kscale(
        "launch",
        cfg,
        "--grid",
        "optim.lr=1e-3,3e-3",
        "--name",
        "lr",
        "--sweep-dir",
        sweep_dir,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((sweep_dir / "summary.json").read_text())  # local runs are done when launch returns
    assert [row["status"] for row in rows] == ["done", "done"]
    assert [row["overrides"] for row in rows] == ["optim.lr=0.001", "optim.lr=0.003"]
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    assert [row["loss"] for row in rows] == [losses(e["run_dir"])[2] for e in meta["elements"]]
