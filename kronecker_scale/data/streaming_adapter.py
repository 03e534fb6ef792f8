"""The one adapter to mosaicml-streaming 0.13.0 (pinned): its import, its world, its shared memory, and
the uncompressed copy of a dataset that the node's data cache holds.

- Import: `import streaming` imports torchvision, which cannot load beside a CPU torch (PyPI's
  torchvision is a CUDA build); when torchvision is unusable, `streaming.vision` is pre-seeded with an
  empty module so the text parts import.
- World: streaming reads RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE from the environment when a
  dataset is built. Those are the global ranks, which are wrong under tensor and pipeline parallelism:
  TP ranks and PP stages of one replica must see the same samples. The
  adapter builds datasets inside `data_parallel_world(dp_rank, dp_size)`, which presents each
  data-parallel rank as its own streaming node. That is what fixes the sample order (streaming's
  partition depends on its node layout), so it stays as it is: every process is its own streaming node
  with its own shared-memory prefix, and construction is process-local (`process_local_construction`):
  streaming's global `dist.barrier()` calls and its own `init_process_group` are hidden from it, and a
  machine-wide file lock serialises the shared-memory prefix allocation that its barriers would
  otherwise order.
- Data on disk: the processes of a node share one copy of each dataset split (loader.py's node cache).
  Streaming does not manage that copy: `write_uncompressed_copy` writes it once (every shard
  decompressed, index.json rewritten as uncompressed) and the loader opens it as a stream with
  `remote=None`, which streaming reads in place without downloading, decompressing, evicting or
  checking it against other datasets' local directories. (Handing streaming a shared `local` with a
  `remote` would make all local ranks one streaming node, which changes the sample order, and ties
  them to each other's barriers; a second job on the same node and data would be refused.)
- Shared memory left in /dev/shm by killed runs: `clean_stale_shared_memory()` removes this user's
  streaming segments that no live process maps (and streaming's per-prefix lock files in the temporary
  folder whose prefix is gone), so it is safe at any time, beside live jobs. streaming's own
  `streaming.base.util.clean_stale_shared_memory` unlinks every segment of the machine, those of live
  jobs included, and stops at the first unused prefix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import sys
import tempfile
import time
import types
from pathlib import Path

from ..errors import KScaleError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

# One lock for every user of the machine (streaming's prefixes live in the machine-wide /dev/shm). Opened
# read-only where another user created it; a process that cannot open it at all uses its fallback.
PREFIX_LOCK = "/tmp/kscale-streaming.lock"
SHM_DIR = "/dev/shm"


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


# --- file locks that any user can take ----------------------------------------------------------------
def open_lock_file(path) -> int:
    """A descriptor of `path` to flock(), the file created (0644) when missing.

    Read-write when allowed, else read-only (flock works on either), so a lock file another user created
    first does not stop this one. No O_CREAT on an existing file: with fs.protected_regular a sticky
    folder such as /tmp refuses it on another user's file even when the mode would allow the open.
    PermissionError when the file can be opened neither way."""
    path = os.fspath(path)
    for _ in range(100):
        denied = None
        for flags in (os.O_RDWR, os.O_RDONLY):
            try:
                return os.open(path, flags | os.O_CLOEXEC)
            except FileNotFoundError:
                break
            except PermissionError as e:
                denied = e
        else:
            assert denied is not None  # the loop ends early unless every candidate was denied
            raise denied
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue  # created meanwhile by another process: open it
    raise OSError(errno.EAGAIN, "lock file keeps appearing and disappearing", path)


@contextlib.contextmanager
def exclusive_lock(path, fallback=None):
    """Hold an exclusive flock on `path` (on `fallback` when `path` cannot be opened at all)."""
    try:
        fd = open_lock_file(path)
    except PermissionError:
        if fallback is None:
            raise
        fd = open_lock_file(fallback)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def process_local_construction(lock_path: str = PREFIX_LOCK, fallback_lock: str | None = None):
    """Build a dataset as if torch.distributed were not initialized, one process of the machine at a time."""
    import streaming.base.dataset as ds_mod
    import streaming.base.shared.prefix as prefix_mod

    saved = (ds_mod.dist, prefix_mod.dist, ds_mod.maybe_init_dist)
    with exclusive_lock(lock_path, fallback_lock):
        ds_mod.dist, prefix_mod.dist = _NoDist(), _NoDist()
        ds_mod.maybe_init_dist = lambda: False
        try:
            yield
        finally:
            ds_mod.dist, prefix_mod.dist, ds_mod.maybe_init_dist = saved


# --- stale shared memory --------------------------------------------------------------------------------
def _shm_patterns():
    import_streaming()
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN

    def names(alternatives) -> str:
        return "|".join(map(re.escape, alternatives))

    segment = re.compile(rf"^(\d{{6}})_({names(SHM_TO_CLEAN)})$")
    filelock = re.compile(rf"^(\d{{6}})_({names((BARRIER_FILELOCK, CACHE_FILELOCK))})$")
    return segment, filelock


def _mapped_shm_names() -> set[str]:
    """Names of the /dev/shm files that live processes map, read from /proc/*/maps. A process whose maps
    cannot be read (another user's, or a non-dumpable one such as a container's init) is passed over: a
    process using streaming can always read its own user's Python processes."""
    names: set[str] = set()
    pattern = re.compile(rb"/dev/shm/(\S+)")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                data = f.read()
        except OSError:  # not readable, or the process ended meanwhile
            continue
        names.update(m.decode(errors="replace") for m in pattern.findall(data))
    return names


def clean_stale_shared_memory(
    *, min_age_s: float = 60.0, lock_path: str = PREFIX_LOCK, fallback_lock: str | None = None
) -> list[str]:
    """Remove what killed streaming runs of this user left on this machine; returns the names removed.

    A /dev/shm segment with streaming's naming (`NNNNNN_locals`, `NNNNNN_barrier`, ...) goes when this user
    owns it, it is older than `min_age_s` and no live process maps any segment of its prefix (a live
    dataset maps all of its own for its whole life). streaming's lock files of a prefix
    (`<tmp>/NNNNNN_barrier_filelock`, `..._cache_filelock`) go when no segment of that prefix is left:
    streaming skips every prefix that has them, so without this each killed run uses up a prefix for good.
    Runs under the construction lock, so no kscale process is between creating and mapping a segment.
    Linux only (/proc, /dev/shm); elsewhere it does nothing."""
    if not (os.path.isdir("/proc/self") and os.path.isdir(SHM_DIR)):
        return []
    segment, filelock = _shm_patterns()
    uid, now = os.getuid(), time.time()
    removed: list[str] = []
    tmp = tempfile.gettempdir()

    def ours_and_old(path) -> bool:
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return st.st_uid == uid and now - st.st_mtime >= min_age_s

    with exclusive_lock(lock_path, fallback_lock):
        present = [(n, m.group(1)) for n in os.listdir(SHM_DIR) if (m := segment.match(n))]
        prefixes = {p for _, p in present}
        stale = [(n, p) for n, p in present if ours_and_old(os.path.join(SHM_DIR, n))]
        try:
            locks = [(n, m.group(1)) for n in os.listdir(tmp) if (m := filelock.match(n))]
        except OSError:
            locks = []
        old_locks = [(n, p) for n, p in locks if ours_and_old(os.path.join(tmp, n))]
        if not stale and all(p in prefixes for _, p in old_locks):
            return removed
        mapped = _mapped_shm_names()
        in_use = {m.group(1) for n in mapped if (m := segment.match(n))}
        for name, prefix in stale:
            if prefix in in_use:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
        left = {m.group(1) for n in os.listdir(SHM_DIR) if (m := segment.match(n))}
        for name, prefix in old_locks:
            if prefix in left or prefix in in_use:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(tmp, name))
                removed.append(name)
    return removed


# --- the uncompressed copy ------------------------------------------------------------------------------
def write_uncompressed_copy(src: Path, out: Path) -> dict[str, int]:
    """Write the MDS dataset in folder `src` (index.json + shards) into the existing folder `out` as an
    uncompressed MDS dataset: every shard decompressed once (or copied when it was not compressed), and
    an index.json that says so. Same shards, same samples, same order. Returns {file name: bytes}."""
    import_streaming()
    from streaming.base.compression import decompress

    src, out = Path(src), Path(out)
    try:
        index = json.loads((src / "index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KScaleError(
            f"unreadable MDS index ({e})", where=str(src / "index.json"), fix="prepare the dataset again"
        ) from None
    if index.get("version") != 2:
        raise KScaleError(f"unsupported MDS index version {index.get('version')!r}", where=str(src / "index.json"))
    files = {}
    for shard in index["shards"]:
        raw, zipped, algo = shard["raw_data"], shard.get("zip_data"), shard.get("compression")
        if shard.get("format") != "mds" or "/" in raw["basename"]:
            raise KScaleError(f"not a flat MDS shard: {raw['basename']!r} ({shard.get('format')})", where=str(src))
        try:
            data = (src / zipped["basename"]).read_bytes() if zipped and algo else (src / raw["basename"]).read_bytes()
        except OSError as e:
            raise KScaleError(f"cannot read a shard ({e})", where=str(src), fix="prepare the dataset again") from None
        if zipped and algo:
            try:
                data = decompress(algo, data)
            except Exception as e:  # zstd's own error types; a damaged shard of an older dataset
                raise KScaleError(
                    f"shard {zipped['basename']} is damaged: {algo} cannot decompress it ({e})",
                    where=str(src / zipped["basename"]),
                    fix="copy the dataset again, or prepare it again with --overwrite",
                ) from None
        if len(data) != raw["bytes"]:
            raise KScaleError(
                f"shard {raw['basename']} has {len(data):,} bytes, its index says {raw['bytes']:,}",
                where=str(src),
                fix="prepare the dataset again",
            )
        (out / raw["basename"]).write_bytes(data)
        files[raw["basename"]] = len(data)
        shard["compression"], shard["zip_data"] = None, None
    text = json.dumps(index, sort_keys=True).encode()
    (out / "index.json").write_bytes(text)
    files["index.json"] = len(text)
    return files
