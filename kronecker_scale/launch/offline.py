"""Offline ranks: the converters (reshard, engine conversion) start one gloo process per rank of the
target layout, each builds the engine and reads or writes its part of a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import KScaleError
from .ranks import signal_ranks, start_ranks


def run_offline_ranks(
    module: str, args: list[str], step_dir: Path, out_root: str | Path, cfg, timeout: float, what: str
) -> Path:
    """Start cfg.parallel.nproc gloo ranks of `python -m module *args OUT_ROOT CONFIG` (the config written
    to a hidden file in OUT_ROOT) and wait; returns the checkpoint they wrote under OUT_ROOT."""
    from ..train.checkpoint import latest_checkpoint

    out_root = Path(out_root)
    if out_root.resolve() == step_dir.parent.resolve():
        raise KScaleError(
            "the output folder is the checkpoint's own folder",
            where=str(out_root),
            fix="write the new checkpoint into a new folder",
        )
    out_root.mkdir(parents=True, exist_ok=True)
    resolved = out_root / f".{what}-config.yaml"
    resolved.write_text(OmegaConf.to_yaml(cfg))
    procs = start_ranks(
        module, [*args, str(out_root), str(resolved)], cfg.parallel.nproc, stderr=subprocess.PIPE, text=True
    )
    failed = _wait(procs, timeout)
    resolved.unlink(missing_ok=True)
    if failed is not None:
        rank, code, err = failed
        raise KScaleError(
            f"{what} failed on rank {rank} (exit status {code}): {err.strip()[-1500:]}", where=str(step_dir)
        )
    return latest_checkpoint(out_root)  # type: ignore[return-value]  # every rank exited 0: their save set `latest`


def offline_rank(main, resolved: Path) -> int:
    """One offline rank: the process group, `main(cfg)`, errors as exit status 2, clean-up."""
    from .. import quiet

    quiet.install(os.environ.get("KSCALE_VERBOSE") == "1")
    from ..config import TrainConfig
    from ..distributed import destroy_distributed, init_distributed

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(resolved))
    init_distributed()
    try:
        main(cfg)
    except KScaleError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy_distributed()
    return 0


def _wait(procs, timeout: float):
    """None when every rank exits 0; else (rank, code, stderr) of the first failure (the rest are stopped)."""
    deadline = time.time() + timeout
    while True:
        codes = [p.poll() for p in procs]
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if bad or time.time() > deadline:
            signal_ranks(procs, signal.SIGKILL)
            rank, code = bad[0] if bad else (0, "timeout")
            return rank, code, procs[rank].communicate()[1] or ""
        if all(c == 0 for c in codes):
            for p in procs:
                p.communicate()
            return None
        time.sleep(0.2)
