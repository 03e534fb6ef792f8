"""`kscale train`: validate the config, take the run directory's lock, write the resolved config, then run
the ranks.

Under torchrun or srun (RANK/WORLD_SIZE already set) this process is one rank. Otherwise it starts
`parallel.nproc` local processes (gloo on CPU, NCCL on GPU) and waits; if one fails the others are
stopped and the exit status is non-zero.

Signals (docs/design.md §5): SIGTERM, SIGINT or SIGHUP to the launcher is forwarded to every rank; the
ranks finish their step, save a checkpoint together and exit STOPPED_EXIT, and so does the launcher. It
waits at most KSCALE_STOP_GRACE_S seconds (default 120) and kills the ranks after that, or at once on a
second stop signal (exit 128 + the signal's number: no checkpoint of that stop). The preemption signal
(USR2) is forwarded the same way and ends in PREEMPTED_EXIT (requeue). If the launcher dies, even by
SIGKILL, its ranks take their process groups down with them (ranks.py). A rank started by srun or
torchrun handles the same signals itself.

One writer per run directory: an exclusive flock on `<run.dir>/.lock` (RunLock), held for the run's life
by the launcher, or by global rank 0 when there is no launcher (srun, torchrun, `kscale launch` jobs);
the file names its holder (host, PID, start time). A second run exits 2 naming the holder before it writes
anything. The kernel releases a flock when its holder dies, so the lock of a killed run is simply taken
over (the new run says so).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import load_config, to_yaml
from ..errors import KScaleError
from .ranks import LAUNCHER_PID_ENV, signal_rank_processes, signal_ranks, start_ranks, watch_launcher

PREEMPTED_EXIT = 3  # every rank saved a checkpoint on the preemption signal: requeue (Slurm), resume
STOPPED_EXIT = 4  # every rank saved a checkpoint on SIGTERM/SIGINT/SIGHUP: stopped, not requeued
STOP_GRACE_ENV = "KSCALE_STOP_GRACE_S"
DEFAULT_STOP_GRACE_S = 120.0
FAILURE_GRACE_S = 2.0  # after one rank failed: time for the others to exit on their own, then SIGKILL
REPEAT_S = 1.0  # a stop signal repeated sooner is the same request (`timeout` signals child and group)
LOCK_NAME = ".lock"


# --- one writer per run directory --------------------------------------------------------------------------
_held: dict[Path, RunLock] = {}  # run directories whose lock this process holds


class RunLock:
    """An exclusive, non-blocking flock on `<run.dir>/.lock`, whose content names the holder (one JSON
    line: host, pid, started, argv, Slurm job). Released by `release()` (which empties the file) or by the
    kernel when the holder dies; the file is never deleted (deleting a lock file lets two processes lock
    two different files). On a filesystem without flock (e.g. Lustre mounted without `-o flock`) the run
    goes on unlocked, with a warning."""

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir, self.path, self.fd = run_dir, run_dir / LOCK_NAME, fd

    @classmethod
    def acquire(cls, run_dir, console=None) -> RunLock:
        """The lock, or KScaleError naming its holder. Creates the run directory and the lock file only."""
        console = console or _note
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd, wait_s=1.0)
            os.close(fd)
            raise KScaleError(
                f"run directory {run_dir} is in use by another run: {describe_holder(holder)}",
                where=str(path),
                fix="wait for that run to end, or stop it (kill -TERM <PID> saves a checkpoint); "
                "or give this run another run.dir",
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            os.close(fd)
            console(
                f"warning: no lock on {path} ({os.strerror(e.errno)}: this filesystem has no flock); "
                "nothing stops a second run from writing into this run directory"
            )
            return cls(run_dir, None)
        previous = _read_holder(fd)
        if previous:
            console(
                f"note: {path} was left by {describe_holder(previous)}, which no longer holds it (it ended "
                "without releasing it, e.g. killed); the kernel releases a dead process's lock, so this run "
                "takes it over"
            )
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "argv": sys.argv[:8],
        }
        if os.environ.get("SLURM_JOB_ID"):
            info["slurm_job"] = os.environ["SLURM_JOB_ID"]
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        lock = cls(run_dir, fd)
        _held[run_dir] = lock
        return lock

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # released cleanly: nothing stale to report next time
            finally:
                os.close(self.fd)  # closing the last descriptor releases the flock
                self.fd = None
        if _held.get(self.run_dir) is self:
            del _held[self.run_dir]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int, wait_s: float = 0.0) -> dict | None:
    """The holder's JSON line (a holder that has just locked may not have written it yet: wait a little)."""
    deadline = time.time() + wait_s
    while True:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text or time.time() >= deadline:
            break
        time.sleep(0.05)
    if not text:
        return None
    try:
        info = json.loads(text.splitlines()[0])
        return info if isinstance(info, dict) else {"raw": text[:200]}
    except ValueError:
        return {"raw": text[:200]}


def describe_holder(info: dict | None) -> str:
    if not info:
        return "a process that has not written its name yet (look with `fuser -v <run.dir>/.lock`)"
    if "raw" in info:
        return f"a process whose lock file reads {info['raw']!r}"
    text = f"PID {info.get('pid')} on host {info.get('host')} (started {info.get('started')}"
    if info.get("slurm_job"):
        text += f", Slurm job {info['slurm_job']}"
    if info.get("argv"):
        text += ": " + " ".join(str(a) for a in info["argv"])
    return text + ")"


def holds_lock(run_dir) -> bool:
    return Path(run_dir).resolve() in _held


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def checked_config(config_path, overrides, nproc: int | None = None) -> DictConfig:
    """The validated config, checked against this machine (a local run) and the engine's library; nothing
    is read from or written to the run directory."""
    cfg = load_config(config_path, list(overrides) + ([f"parallel.nproc={nproc}"] if nproc else []))
    if cfg.launcher.cluster == "local" and "RANK" not in os.environ:
        from ..distributed import resolve_device

        resolve_device(cfg.run.device, local_ranks=cfg.parallel.nproc)  # a Slurm job checks on its nodes
    check_engine(cfg)
    check_embedding_impl(cfg)
    return cfg


def check_run_dir(cfg) -> None:
    """Read-only, before the lock is taken (which creates the directory) and anything is written: a restart
    or resume that would destroy or misuse the run directory stops here."""
    from ..train.run_dir import check_before_start

    check_before_start(cfg)


def prepare_run(config_path, overrides, nproc: int | None = None):
    """The validated config, checked against the run directory and written to it under its lock: nothing
    is written when a check fails or another run holds the directory."""
    cfg = checked_config(config_path, overrides, nproc)
    check_run_dir(cfg)
    with RunLock.acquire(cfg.run.dir):
        return cfg, write_resolved(cfg)


def check_engine(cfg) -> None:
    """What only the engine's library can check (the DeepSpeed JSON with its passthrough), before any
    process starts, any job is submitted or anything is written."""
    if cfg.run.engine == "deepspeed":
        from ..train.deepspeed_adapter import deepspeed_config

        deepspeed_config(cfg, dp_size=cfg.parallel.nproc)  # TP = PP = 1: every rank is data parallel


def check_embedding_impl(cfg) -> None:
    """model.embedding_impl=triton that cannot import stops here, before any rank starts (whether a CUDA
    device is there is the device check's question, asked on the node that runs the job)."""
    if cfg.model.input_layer != "kronecker" or cfg.model.embedding_impl != "triton":
        return
    from ..embedding.kronecker_embedding import triton_problem

    problem = triton_problem(on_cuda=True)
    if problem:
        raise KScaleError(
            f"embedding impl 'triton' cannot run: {problem}",
            where="model.embedding_impl=triton",
            fix="install the CUDA build (docs/setup.md), or set model.embedding_impl=auto",
        )


def write_resolved(cfg) -> Path:
    """The resolved config in the run directory (what every rank, and a requeued job, reads). Written under
    the directory's lock: the caller's if it holds it, else taken for the write (`kscale launch`), so a
    directory another run holds is never written (KScaleError naming the holder)."""
    run_dir = Path(cfg.run.dir)
    if not holds_lock(run_dir):
        with RunLock.acquire(run_dir):
            return write_resolved(cfg)
    resolved = run_dir / "config.yaml"
    # srun starts every rank with the same path, possibly on a shared filesystem: a name per job, host, rank
    unique = f"{os.environ.get('SLURM_JOB_ID', 'local')}.{socket.gethostname()}.{os.environ.get('RANK', 0)}"
    tmp = resolved.with_suffix(f".yaml.{unique}.{os.getpid()}.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, resolved)
    return resolved


def run_rank(resolved_config: str | Path | DictConfig, overrides=(), *, write_config: bool = False) -> int:
    """One rank: called in each process. `resolved_config`: the resolved config's file, or the config itself.
    Returns 0, 2 (bad input, or the run directory is another run's), PREEMPTED_EXIT (checkpoint saved on
    the preemption signal: requeue, run again to resume) or STOPPED_EXIT (checkpoint saved on SIGTERM,
    SIGINT or SIGHUP: run again to resume).

    Without a local launcher (srun, torchrun, `kscale launch` jobs) global rank 0 takes the run
    directory's lock once the process group is up (and, with `write_config`, then writes config.yaml); if
    it cannot, every rank returns 2 before anything is written."""
    from .. import quiet

    quiet.install(os.environ.get("KSCALE_VERBOSE") == "1")  # before megatron and DeepSpeed are imported
    import torch

    from ..config import TrainConfig, validate
    from ..distributed import destroy_distributed, init_distributed
    from ..train import hooks, preemption
    from ..train.loop import TrainingRun

    given = resolved_config if isinstance(resolved_config, DictConfig) else OmegaConf.load(resolved_config)
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), given, OmegaConf.from_dotlist(list(overrides)))
    validate(cfg)
    preemption.install_handler()
    try:
        device = init_distributed(_requested_device(cfg))
    except KScaleError as e:  # e.g. run.device=cuda on a node without a usable GPU
        print(f"error (rank {os.environ.get('RANK', 0)}, {socket.gethostname()}): {e}", file=sys.stderr, flush=True)
        return 2
    rank = torch.distributed.get_rank()
    lock = None
    try:
        if not os.environ.get(LAUNCHER_PID_ENV):  # no launcher holds the run directory
            problem = None
            if rank == 0:
                try:
                    if write_config:  # `kscale train` under srun / torchrun
                        check_run_dir(cfg)
                    lock = RunLock.acquire(cfg.run.dir)
                    if write_config:
                        write_resolved(cfg)
                except KScaleError as e:
                    problem = e
            if not _every_rank_ok(problem is None, device):
                if problem is not None:
                    print(f"error (rank {rank}, {socket.gethostname()}): {problem}", file=sys.stderr, flush=True)
                return 2
        if rank == 0:
            if line := quiet.summary():
                print(line, file=sys.stderr, flush=True)
            print(
                f"device: {device} ({'NCCL' if device == 'cuda' else 'gloo'}), world size "
                f"{torch.distributed.get_world_size()}",
                flush=True,
            )
        TrainingRun(cfg, hooks.from_environment()).run()
    except KScaleError as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2
    except preemption.Preempted as e:
        if rank == 0:
            print(f"{e}; the run resumes from it when started again", flush=True)
        return STOPPED_EXIT if e.stopped else PREEMPTED_EXIT
    finally:
        destroy_distributed()
        if lock is not None:
            lock.release()
    return 0


def _every_rank_ok(ok: bool, device: str) -> bool:
    """Collective: True when `ok` on every rank."""
    import torch

    bad = torch.tensor([0.0 if ok else 1.0], device=device)
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0


def _requested_device(cfg) -> str:
    """run.device, where a Slurm job given GPUs (launcher.gpus_per_node > 0) means CUDA: checked on the
    compute node as the job starts (a login node often has no GPU, so submitting never needs one)."""
    la = cfg.launcher
    if cfg.run.device == "auto" and la.cluster == "slurm" and la.gpus_per_node > 0:
        return "cuda"
    return cfg.run.device


def train(config_path, overrides=(), nproc: int | None = None) -> int:
    """`kscale train`: this process is one rank under torchrun / srun, else the launcher of
    parallel.nproc local ranks. Returns the exit status (0, 2, PREEMPTED_EXIT, STOPPED_EXIT, a failed
    rank's status, or 128 + a signal's number when the ranks had to be killed)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun / srun
        cfg = checked_config(config_path, overrides, nproc)
        # only global rank 0 writes config.yaml, once it holds the lock; every rank runs from this text
        return run_rank(OmegaConf.create(to_yaml(cfg)), write_config=True)
    with _StopSignals() as stop:
        cfg = checked_config(config_path, overrides, nproc)
        if stop.received:
            sig = stop.received[0][0]
            _note(f"kscale: {signal.Signals(sig).name} before any rank started: stopped")
            return 128 + sig
        check_run_dir(cfg)
        with RunLock.acquire(cfg.run.dir):
            resolved = write_resolved(cfg)
            procs = start_ranks(
                "kronecker_scale.launch.local", [str(resolved)], cfg.parallel.nproc, hold_signals=stop.signals
            )
            try:
                return _supervise(procs, stop)
            finally:
                signal_ranks(procs, signal.SIGKILL)  # leftovers of finished ranks, if any
                for p in procs:
                    try:
                        p.wait(timeout=10)
                    except Exception:  # noqa: BLE001  (a zombie we cannot reap is no reason to fail)
                        pass


class _StopSignals:
    """The launcher's handlers while `kscale train` runs: SIGTERM, SIGINT, SIGHUP (stop) and the preemption
    signal are recorded (in order) for `_supervise`, which forwards them to the ranks; the previous handlers
    come back afterwards. Outside the main thread (no handlers possible) nothing is caught."""

    def __init__(self):
        from ..train.preemption import ignored, preempt_signal, stop_signals

        self.stops = tuple(int(s) for s in stop_signals() if not ignored(s))  # nohup: SIGHUP stays ignored
        self.signals = (*self.stops, int(preempt_signal()))
        self.received: list[tuple[int, float]] = []  # (signal, time.monotonic())
        self._previous: dict = {}

    def __enter__(self):
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread
            self.__exit__()
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handler(self, signum, frame):
        self.received.append((signum, time.monotonic()))


def _stop_grace_s() -> float:
    value = os.environ.get(STOP_GRACE_ENV, "")
    try:
        return float(value) if value else DEFAULT_STOP_GRACE_S
    except ValueError:
        raise KScaleError(
            f"{STOP_GRACE_ENV}={value!r} is not a number of seconds",
            where=STOP_GRACE_ENV,
            fix=f"unset it (default {DEFAULT_STOP_GRACE_S:.0f} s) or give seconds, e.g. 300",
        ) from None


def _status(code: int) -> int:
    """A rank's exit status as the launcher's: a rank killed by signal N gives 128 + N, as a shell says."""
    return 128 - code if code < 0 else code


def _supervise(procs, stop: _StopSignals) -> int:
    """Wait for the ranks, forwarding the signals the launcher receives. The exit status: 0 when every rank
    finished; STOPPED_EXIT / PREEMPTED_EXIT when they saved and stopped on a signal; a failed rank's status
    (the others are killed FAILURE_GRACE_S later); 128 + the stop signal's number when they were killed,
    after the grace period or on a second stop signal."""
    grace = _stop_grace_s()
    orderly = (0, STOPPED_EXIT, PREEMPTED_EXIT)
    handled, stop_sig, stop_at = 0, None, 0.0
    deadline = failed_at = None
    while True:
        while handled < len(stop.received):
            sig, at = stop.received[handled]
            handled += 1
            name = signal.Signals(sig).name
            if sig in stop.stops and stop_sig is not None:
                if at - stop_at < REPEAT_S:
                    continue  # the same request, delivered twice
                _note(f"kscale: {name} again: killing the ranks now (no checkpoint of this stop)")
                return _kill(procs, 128 + stop_sig)
            if sig in stop.stops:
                stop_sig, stop_at = sig, at
                _note(
                    f"kscale: {name}: the ranks finish their step, save a checkpoint and stop (killed if they "
                    f"take over {grace:.0f} s; another stop signal kills them now)"
                )
            signal_rank_processes(procs, sig)
            deadline = deadline or time.time() + grace
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return _summary(codes)
        failed = [c for c in codes if c is not None and c not in orderly]
        if failed and failed_at is None:
            failed_at = time.time()
        if any(c in (STOPPED_EXIT, PREEMPTED_EXIT) for c in codes):
            deadline = deadline or time.time() + grace  # the others are on their way out
        if failed_at is not None and time.time() > failed_at + FAILURE_GRACE_S:
            _kill(procs, 0)
            return _status(failed[0])
        if deadline is not None and time.time() > deadline:
            _note(f"kscale: the ranks did not stop within {grace:.0f} s: killed")
            _kill(procs, 0)
            done = [c for c in codes if c is not None]
            if not failed and any(c in (STOPPED_EXIT, PREEMPTED_EXIT) for c in done):
                return _summary(done)  # the checkpoint is complete: a rank hung after
            return 128 + (stop_sig or int(stop.signals[-1]))
        time.sleep(0.1)


def _summary(codes: list[int]) -> int:
    failed = [c for c in codes if c not in (0, STOPPED_EXIT, PREEMPTED_EXIT)]
    if failed:
        return _status(failed[0])
    for status in (STOPPED_EXIT, PREEMPTED_EXIT):
        if status in codes:
            return status
    return 0


def _kill(procs, status: int) -> int:
    signal_ranks(procs, signal.SIGKILL)
    for p in procs:
        try:
            p.wait(timeout=10)
        except Exception:  # noqa: BLE001
            pass
    return status


if __name__ == "__main__":
    watch_launcher()  # die with the launcher (and take down what this rank started)
    sys.exit(run_rank(sys.argv[1]))
