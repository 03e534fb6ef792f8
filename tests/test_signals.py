"""Signals and the run directory's lock (launch/local.py, launch/ranks.py, train/preemption.py).

- SIGTERM / SIGINT to `kscale train --nproc 2`: every rank stops after the same step, saves, and the
  launcher exits STOPPED_EXIT without a traceback, leaving no process behind; a new run resumes from it.
- SIGKILL of the launcher: its ranks (and what they started) are gone within seconds.
- One writer per run directory: a second run exits 2 naming the holder and writes nothing; the lock of a
  killed run is taken over; a rank started by srun/torchrun (RANK set) holds it itself and stops on SIGTERM.

Real `kscale train` processes on the session's tiny dataset, slowed down with KSCALE_FAULT_STEP_SLEEP_S so
that a signal lands mid-run.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kronecker_scale.distributed import free_port
from kronecker_scale.launch.local import STOPPED_EXIT, RunLock
from tiny_runs import REPO, kscale, losses

SLOW_STEPS = {"KSCALE_FAULT_STEP_SLEEP_S": "0.3", "OMP_NUM_THREADS": "1"}


def long_config(tiny_config, directory, nproc):
    """A run that would take minutes (60 slow steps), checkpointed only at its end: any checkpoint it has
    after a signal is the signal's."""
    return tiny_config(
        directory,
        parallel={"nproc": nproc},
        schedule={"train_steps": 60, "warmup_steps": 2},
        checkpoint={"every": 0},
        eval={"every": 0},
    )


class Run:
    """`kscale train` started in the background, its output in files."""

    def __init__(self, directory: Path, *args, env=None, name="run"):
        self.out, self.err = directory / f"{name}.out", directory / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kronecker_scale.cli", "train", *map(str, args)],
                stdout=out,
                stderr=err,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), **SLOW_STEPS, **(env or {})},
            )
        self.pid = self.proc.pid

    def wait(self, timeout=240) -> int:
        return self.proc.wait(timeout=timeout)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def kill(self):
        if self.proc.poll() is None:
            for p in family(self.pid):
                try:
                    p.kill()
                except psutil.Error:
                    pass
            self.proc.kill()
            self.proc.wait()


def family(pid: int) -> list[psutil.Process]:
    """The process and everything under it (ranks, what the ranks started), as psutil handles."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has ended; `is_running` also guards against a reused PID)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def left_over(snapshot: list[psutil.Process], ranks: list[int]) -> list[psutil.Process]:
    """Processes of the run still running: those seen before the signal, and anything in a rank's process
    group (what a rank started later, e.g. the checkpoint writer's Manager, even if re-parented)."""
    groups = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in ranks:
                groups.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive(snapshot + groups)


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return (
        max((r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r), default=0)
        if path.is_file()
        else 0
    )


def wait_for(predicate, timeout, what, run: Run | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(f"the run ended ({run.proc.returncode}) before {what}:\n{run.stderr()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ranks_of(run: Run, n: int) -> tuple[list[psutil.Process], list[int]]:
    """Once the launcher's `n` ranks are up: the launcher and everything under it, and the ranks' PIDs."""
    wait_for(lambda: len(psutil.Process(run.pid).children()) >= n, 120, f"{n} ranks", run)
    ranks = [p.pid for p in psutil.Process(run.pid).children()]
    assert len(ranks) == n
    return family(run.pid), ranks


def stopped_step(stdout: str, signame: str) -> int:
    found = re.findall(rf"stopped by {signame}: checkpoint saved at step (\d+)", stdout)
    assert len(found) == 1, stdout[-3000:]
    return int(found[0])


@pytest.fixture
def cleanup():
    runs: list[Run] = []
    yield runs.append
    for run in runs:
        run.kill()


# --- fast: the pieces ----------------------------------------------------------------------------------
def test_stop_signals_are_caught_and_win_over_the_preemption_signal():
    from kronecker_scale.train import preemption

    saved = {s: signal.getsignal(s) for s in (*preemption.STOP_SIGNALS, preemption.preempt_signal())}
    try:
        preemption.install_handler()
        for s in preemption.STOP_SIGNALS:  # today SIGTERM and SIGHUP kill, SIGINT raises
            if s == signal.SIGHUP and saved[s] == signal.SIG_IGN:
                continue  # under nohup SIGHUP stays ignored
            assert callable(signal.getsignal(s)) and signal.getsignal(s) is not signal.default_int_handler
        signal.raise_signal(preemption.preempt_signal())
        assert preemption.requested() == "SIGUSR2"
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(preemption.preempt_signal())  # a later preemption does not undo the stop
        assert preemption.requested() == "SIGTERM"
        assert preemption.Preempted(7, "SIGTERM").stopped and not preemption.Preempted(7, "SIGUSR2").stopped
        assert str(preemption.Preempted(7, "SIGINT")) == "stopped by SIGINT: checkpoint saved at step 7"
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        preemption._flag["signal"] = None


def test_lock_names_its_holder_and_the_lock_of_a_killed_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from kronecker_scale.launch.local import RunLock\n"
            "RunLock.acquire(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        from kronecker_scale.errors import KScaleError

        with pytest.raises(KScaleError) as e:
            RunLock.acquire(tmp_path)
        assert f"PID {holder.pid} on host {socket.gethostname()}" in str(e.value) and "in use" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    notes = []
    lock = RunLock.acquire(tmp_path, console=notes.append)  # the kernel released the dead holder's flock
    assert len(notes) == 1 and f"PID {holder.pid}" in notes[0] and "no longer holds it" in notes[0]
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / ".lock").read_text() == ""  # released cleanly: nothing stale next time
    notes.clear()
    RunLock.acquire(tmp_path, console=notes.append).release()
    assert notes == []


# --- slow: real runs ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_to_the_launcher_saves_every_rank_and_exits_stopped(tmp_path, tiny_config, cleanup, sig):
    cfg = long_config(tiny_config, tmp_path, nproc=2)
    run = Run(tmp_path, cfg)
    cleanup(run)
    procs, ranks = ranks_of(run, 2)
    wait_for(lambda: steps_logged(tmp_path / "run") >= 3, 300, "step 3", run)
    run.proc.send_signal(sig)
    assert run.wait(180) == STOPPED_EXIT, run.stderr()[-3000:]
    step = stopped_step(run.stdout(), sig.name)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{step:08d}"
    assert sorted(p.name for p in (ckpts / f"step_{step:08d}" / "rng").iterdir()) == [
        "rank_00000.pt",
        "rank_00001.pt",
    ]  # both ranks saved that step
    assert steps_logged(tmp_path / "run") == step < 60  # and none went on past it
    assert "Traceback" not in run.stderr() and "KeyboardInterrupt" not in run.stderr()
    wait_for(lambda: not left_over(procs, ranks), 5, "every process of the run to end")
    if sig == signal.SIGTERM:  # a new run takes the lock and continues from it
        r = kscale("train", cfg, f"schedule.train_steps={step + 2}", env={"OMP_NUM_THREADS": "1"}, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"resumed from {ckpts / f'step_{step:08d}'} at step {step}" in r.stdout
        assert sorted(losses(tmp_path / "run")) == list(range(1, step + 3))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ranks_die_within_seconds_of_a_killed_launcher(tmp_path, tiny_config, cleanup):
    cfg = long_config(tiny_config, tmp_path, nproc=2)
    run = Run(tmp_path, cfg)
    cleanup(run)
    procs, ranks = ranks_of(run, 2)
    wait_for(lambda: steps_logged(tmp_path / "run") >= 2, 300, "step 2", run)
    procs = procs + [p for p in family(run.pid) if p not in procs]  # whatever the ranks started by now
    run.proc.kill()  # SIGKILL: the launcher cannot pass anything on
    run.wait(10)
    killed = time.time()
    wait_for(lambda: not left_over(procs[1:], ranks), 10, "the orphaned ranks to exit")
    assert time.time() - killed < 5  # PR_SET_PDEATHSIG: at once (~0.1 s here)
    # its lock died with it: the next run is told and takes it over
    notes = []
    RunLock.acquire(tmp_path / "run", console=notes.append).release()
    assert len(notes) == 1 and f"PID {run.pid}" in notes[0] and "no longer holds it" in notes[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_second_run_into_a_locked_run_dir_exits_2_naming_the_holder_and_writes_nothing(tmp_path, tiny_config, cleanup):
    cfg = long_config(tiny_config, tmp_path, nproc=1)
    first = Run(tmp_path, cfg, name="first")
    cleanup(first)
    wait_for(lambda: steps_logged(tmp_path / "run") >= 1, 300, "the first run's step 1", first)
    resolved = tmp_path / "run" / "config.yaml"
    before = (resolved.read_bytes(), resolved.stat().st_mtime_ns)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    second = kscale("train", cfg, "optim.lr=1e-3", "schedule.train_steps=5", env={"OMP_NUM_THREADS": "1"})
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"PID {first.pid} on host {socket.gethostname()}" in second.stderr and "in use" in second.stderr
    assert "Traceback" not in second.stderr and "device:" not in second.stdout  # no rank started
    assert (resolved.read_bytes(), resolved.stat().st_mtime_ns) == before  # its config was not written
    assert {p.name for p in (tmp_path / "run").iterdir()} <= names | {"checkpoints"}
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(180) == STOPPED_EXIT, first.stderr()[-3000:]
    step = stopped_step(first.stdout(), "SIGTERM")
    third = kscale("train", cfg, f"schedule.train_steps={step + 1}", env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]  # the lock is free again
    assert "resumed from" in third.stdout and "no longer holds it" not in third.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_rank_started_by_srun_or_torchrun_holds_the_lock_and_stops_on_sigterm(tmp_path, tiny_config, cleanup):
    """RANK / WORLD_SIZE set: `kscale train` is the rank itself (no launcher), so global rank 0 holds the
    lock and handles the stop signal."""
    cfg = long_config(tiny_config, tmp_path, nproc=1)
    rank = Run(
        tmp_path,
        cfg,
        env={
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        },
    )
    cleanup(rank)
    wait_for(lambda: steps_logged(tmp_path / "run") >= 2, 300, "step 2", rank)
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == rank.pid
    other = kscale("train", cfg, env={"OMP_NUM_THREADS": "1"})  # a local launcher into the same directory
    assert other.returncode == 2 and f"PID {rank.pid} on host {socket.gethostname()}" in other.stderr
    rank.proc.send_signal(signal.SIGTERM)
    assert rank.wait(180) == STOPPED_EXIT, rank.stderr()[-3000:]
    step = stopped_step(rank.stdout(), "SIGTERM")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert "Traceback" not in rank.stderr()
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released on the way out
