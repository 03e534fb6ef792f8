"""`kscale launch`: the same config as `kscale train`, submitted to Slurm through submitit (the one
adapter to submitit 1.5.x), or run locally / in-process for debugging.

One Slurm task per GPU: each task is one rank; rank, local rank, world size and the rendezvous
address come from Slurm's environment, and every task sees all the node's GPUs (megatron picks its
own with LOCAL_RANK; submitit's default would hide the others). On the preemption / time-limit
signal the ranks save a checkpoint together, rank 0 requeues the job, and the requeued job resumes
from `latest`.

Job folder per run: `<run.dir>/slurm/` holds submitit's logs and pickles, `job.json` (job id, run
directory, resolved config) and the sbatch script that was submitted.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from ..config import to_yaml
from ..errors import KScaleError
from .local import PREEMPTED_EXIT, STOPPED_EXIT

SUBMITIT_TESTED = "1.5."  # _make_sbatch_string and the submission layout are submitit internals


def _submitit():
    import submitit

    if not submitit.__version__.startswith(SUBMITIT_TESTED):
        raise KScaleError(
            f"submitit {submitit.__version__} is not the tested {SUBMITIT_TESTED}x",
            where="python environment",
            fix="pip install submitit==1.5.4 (requirements/lock-cpu.txt)",
        )
    return submitit


def world_size(launcher: DictConfig) -> int:
    return launcher.nodes * launcher.tasks_per_node


def executor_parameters(cfg: DictConfig, job_name: str) -> dict:
    """submitit's Slurm parameters (its names: sbatch flags with underscores) from `launcher.*`."""
    la = cfg.launcher
    extra = {}
    for item in la.sbatch_extra:
        key, sep, value = str(item).lstrip("-").partition("=")
        if not key:
            raise KScaleError(
                f"launcher.sbatch_extra entry {item!r} is empty",
                where="config key launcher.sbatch_extra",
                fix="write sbatch options as 'name=value' or 'flag', e.g. 'reservation=big'",
            )
        extra[key.replace("-", "_")] = value if sep else True
    setup = [f"export {k}={shlex.quote(str(v))}" for k, v in la.env.items()] + list(la.setup)
    params = dict(
        job_name=job_name,
        time=la.time_min,
        nodes=la.nodes,
        ntasks_per_node=la.tasks_per_node,
        cpus_per_task=la.cpus_per_task,
        mem=f"{la.mem_gb * la.tasks_per_node}GB",
        partition=la.partition,
        account=la.account,
        qos=la.qos,
        constraint=la.constraint,
        signal_delay_s=la.signal_delay_s,
        setup=setup or None,
        additional_parameters=extra or None,
        stderr_to_stdout=False,
    )
    if la.gpus_per_node:
        params["gpus_per_node"] = la.gpus_per_node
    if la.exclusive:
        params["exclusive"] = True
    return {k: v for k, v in params.items() if v is not None}


def sbatch_script(cfg: DictConfig, folder: Path, job_name: str, array: int | None = None) -> str:
    """The sbatch script submitit writes for these parameters (what --dry-run prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = executor_parameters(cfg, job_name)
    if array:
        params["map_count"] = array
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **params)


class TrainTask:
    """What each Slurm task runs (pickled by submitit): one rank of `kscale train`."""

    def __init__(self, resolved_config: str):
        self.resolved_config = resolved_config

    def __call__(self) -> dict:
        from .local import run_rank, train

        submitit = _submitit()
        env = submitit.JobEnvironment()
        if env.cluster != "slurm":  # debug executor: one process that starts the ranks
            code = train(self.resolved_config)
            if code:
                raise RuntimeError(f"training exited with status {code}")
            return {"run_dir": str(Path(self.resolved_config).parent)}
        # a MASTER_ADDR/PORT exported from the submitting shell means nothing here, and every element of a
        # job array would share it: submitit derives the port from this job's id instead
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(name, None)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # one OpenMP thread per CPU of the task, not one per core of the node for every rank
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        overrides = []
        if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
            overrides.append("checkpoint.resume=auto")  # a requeued job continues from its own `latest`
        code = run_rank(self.resolved_config, overrides=overrides)
        if code == PREEMPTED_EXIT:
            if env.global_rank == 0:
                requeue(env.job_id)
            sys.exit(code)  # SystemExit: submitit writes no result, the job goes on
        if code == STOPPED_EXIT:  # scancel / a stop signal: saved, not requeued, no traceback
            sys.exit(code)
        if code:
            raise RuntimeError(f"rank {env.global_rank} exited with status {code}")
        return {"run_dir": str(Path(self.resolved_config).parent), "rank": env.global_rank}


def requeue(job_id: str) -> None:
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    print(f"requeue {job_id}: {'ok' if out.returncode == 0 else out.stderr.strip()}", flush=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_executor(cfg: DictConfig, folder: Path, job_name: str):
    submitit = _submitit()
    if cfg.launcher.cluster == "debug":
        return submitit.DebugExecutor(folder=folder)
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    except RuntimeError as e:
        raise KScaleError(
            f"no Slurm here ({e})",
            where="launcher.cluster=slurm",
            fix="run on a Slurm login node, or use launcher.cluster=local",
        ) from None
    p = executor_parameters(cfg, job_name)
    ex.update_parameters(**{f"slurm_{k}": v for k, v in p.items()})
    return ex


def resolve(config_path, overrides=()) -> DictConfig:
    """The validated config (under Slurm, load_config sets the world size from the launcher)."""
    from ..config import load_config
    from ..train.run_dir import check_before_start
    from .local import check_engine

    cfg = load_config(config_path, list(overrides))
    check_engine(cfg)
    check_before_start(cfg)  # before anything is submitted: a resume the run directory refuses
    return cfg


def _record(folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / "job.json", json.dumps(info, indent=2))
    with open(folder / "jobs.jsonl", "a") as f:  # every submission, oldest first
        f.write(json.dumps(info) + "\n")


def launch(cfg: DictConfig, dry_run: bool = False, console=print):
    """Submit one run; returns the submitit job (None for a dry run or a local run)."""
    from .local import train, write_resolved

    la = cfg.launcher
    folder = Path(cfg.run.dir).resolve() / "slurm"
    if dry_run:
        console("# resolved config\n" + to_yaml(cfg))
        if la.cluster == "slurm":
            console("# sbatch script\n" + sbatch_script(cfg, folder / "%j", cfg.run.name))
        return None
    resolved = write_resolved(cfg).resolve()
    if la.cluster == "local":
        code = train(resolved)
        if code:
            raise KScaleError(f"local training exited with status {code}", where=str(resolved))
        return None
    job = make_executor(cfg, folder / "%j", cfg.run.name).submit(TrainTask(str(resolved)))
    info = {
        "job_id": job.job_id,
        "cluster": la.cluster,
        "run_dir": str(resolved.parent),
        "config": str(resolved),
        "logs": str(folder / str(job.job_id)),
    }
    if la.cluster == "slurm":
        info["sbatch"] = str(job.paths.submission_file)
    _record(folder, info)
    console(f"submitted job {job.job_id} ({la.cluster}): run directory {info['run_dir']}, logs {info['logs']}")
    if la.cluster == "debug":  # the debug executor runs the job in this process, now
        job.results()
    return job


def launch_sweep(
    config_path, overrides, spec: dict, sweep_dir: str | Path | None = None, dry_run: bool = False, console=print
):
    """Every element validated first (nothing is submitted if one is wrong), then one job array."""
    from . import sweep
    from .local import train, write_resolved

    elements = sweep.expand(spec)
    sweep_dir = Path(sweep_dir or Path("runs/sweeps") / spec["name"]).resolve()
    cfgs = []
    entries: list[dict] = []
    for i, e in enumerate(elements):
        run_dir = sweep_dir / f"{i:02d}-{sweep.slug(e)}"
        extra = sweep.dotlist(e) + [f"run.dir={run_dir}", f"run.name={spec['name']}-{i:02d}"]
        try:
            cfgs.append(resolve(config_path, [*overrides, *extra]))
        except KScaleError as err:
            raise KScaleError(
                f"sweep element {i} ({' '.join(sweep.dotlist(e))}): {err.what}", where=err.where, fix=err.fix
            ) from None
        entries.append({"index": i, "overrides": sweep.dotlist(e), "run_dir": str(run_dir)})
    la = cfgs[0].launcher
    if dry_run:
        for entry in entries:
            console(f"[{entry['index']}] {' '.join(entry['overrides'])} -> {entry['run_dir']}")
        if la.cluster == "slurm":
            console(
                "# sbatch script (job array)\n"
                + sbatch_script(cfgs[0], sweep_dir / "slurm" / "%j", spec["name"], array=len(cfgs))
            )
        return []
    sweep_dir.mkdir(parents=True, exist_ok=True)
    resolved = [write_resolved(c).resolve() for c in cfgs]
    meta = {
        "name": spec["name"],
        "kind": spec.get("kind", "sweep"),
        "config": str(Path(config_path).resolve()),
        "overrides": list(overrides),
        "cluster": la.cluster,
        "elements": entries,
    }
    _write_atomic(sweep_dir / "sweep.json", json.dumps(meta, indent=2))
    jobs = []
    if la.cluster == "local":
        for entry, r in zip(entries, resolved):
            console(f"sweep element {entry['index']}: {' '.join(entry['overrides'])}")
            entry["exit_status"] = train(r)
            jobs.append(entry["exit_status"])
    else:
        ex = make_executor(cfgs[0], sweep_dir / "slurm" / "%j", spec["name"])
        with ex.batch():
            for r in resolved:
                jobs.append(ex.submit(TrainTask(str(r))))
        for entry, job in zip(entries, jobs):
            entry["job_id"] = job.job_id
        console(
            f"submitted {len(jobs)} jobs"
            + (f" as array {jobs[0].job_id.split('_')[0]}" if jobs else "")
            + f": sweep directory {sweep_dir}"
        )
    _write_atomic(sweep_dir / "sweep.json", json.dumps(meta, indent=2))
    return jobs


def wait(jobs, console=print) -> int:
    """Wait for submitted jobs (or take local exit statuses); returns how many failed."""
    failed = 0
    for job in jobs:
        if isinstance(job, int):  # a local sweep element's exit status
            failed += job != 0
            continue
        try:
            job.results()  # one per task; raises the first task's error
        except Exception as e:  # submitit re-raises the job's error here
            failed += 1
            console(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}")
    return failed
