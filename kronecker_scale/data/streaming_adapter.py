"""The one adapter to mosaicml-streaming 0.13.0 (pinned): its import, its world, its shared memory.

- Import: `import streaming` imports torchvision, which cannot load beside a CPU torch (PyPI's
  torchvision is a CUDA build); when torchvision is unusable, `streaming.vision` is pre-seeded with an
  empty module so the text parts import (research/feasibility.md §5).
- World: streaming reads RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE from the environment when a
  dataset is built. Those are the global ranks, which are wrong under tensor and pipeline parallelism
  (research/anchors.md §3): TP ranks and PP stages of one replica must see the same samples. The
  adapter builds datasets inside `data_parallel_world(dp_rank, dp_size)`, which presents each
  data-parallel rank as its own node (so TP/PP peers on one machine never share streaming's
  node-local shared memory), and gives every process its own local cache directory. Because several
  such "node leaders" then share one machine, construction is made process-local
  (`process_local_construction`): streaming's global `dist.barrier()` calls and its own
  `init_process_group` are hidden from it, and a file lock serialises the shared-memory prefix
  allocation that its barriers would otherwise order.
- Shared memory left in /dev/shm by crashed runs: `clean_stale_shared_memory()` removes every
  streaming segment on the machine, so a job calls it once at start-up (local rank 0, before any
  dataset exists), never while other datasets are alive.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def import_streaming():
    if "streaming" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception:
            sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    import streaming
    return streaming


@contextlib.contextmanager
def data_parallel_world(dp_rank: int, dp_size: int):
    """Environment streaming sees while a dataset is built: this DP rank, alone on its 'node'."""
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(RANK=str(dp_rank), WORLD_SIZE=str(dp_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _NoDist:
    """torch.distributed as streaming sees it while a dataset is built: not initialized."""

    def __getattr__(self, name):
        import torch.distributed as dist
        return getattr(dist, name)

    @staticmethod
    def is_initialized() -> bool:
        return False


@contextlib.contextmanager
def process_local_construction(lock_path: str = "/tmp/kscale-streaming.lock"):
    import fcntl

    import streaming.base.dataset as ds_mod
    import streaming.base.shared.prefix as prefix_mod
    saved = (ds_mod.dist, prefix_mod.dist, ds_mod.maybe_init_dist)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ds_mod.dist, prefix_mod.dist = _NoDist(), _NoDist()
        ds_mod.maybe_init_dist = lambda: False
        try:
            yield
        finally:
            ds_mod.dist, prefix_mod.dist, ds_mod.maybe_init_dist = saved
            fcntl.flock(lock, fcntl.LOCK_UN)


def clean_stale_shared_memory() -> None:
    """Remove all of streaming's shared memory on this machine (what crashed runs leave in /dev/shm)."""
    from streaming.base.util import clean_stale_shared_memory as clean
    clean()
