"""Loaders over prepared MDS datasets: explicit data-parallel rank, deterministic, resumable.

`build_loader` returns a `TokenLoader`: an iterator of batches {"tokens": int64 [B, T], "labels":
int64 [B, T]} (inputs and next-token targets from one seq_len + 1 sample) whose `state_dict()` goes
into every checkpoint and whose `load_state_dict()` makes a resumed run continue with exactly the next
sample. TP ranks and PP stages of one replica pass the same dp_rank and get the same batches.

The node cache: the shards are read from one uncompressed copy of each dataset split per node, shared by
every process of the node (all local ranks, TP/PP peers, other jobs of the same user) and reused by every
later start, restart and requeue. Layout, under the cache root (`data.cache_dir`, else $KSCALE_DATA_CACHE,
else `${TMPDIR:-/tmp}/kscale-data-cache-<uid>`, a folder of this user's own, mode 0700):

    <root>/<dataset>-<split>-<fingerprint>/   index.json, the decompressed shards, kscale-cache.json
    <root>/<dataset>-<split>-<fingerprint>.lock         readers (shared) / eviction (exclusive)
    <root>/<dataset>-<split>-<fingerprint>.write.lock   held while the copy is written

The fingerprint covers the split's path, manifest.json and index.json (content and mtime), so a dataset
prepared again gets a new copy. The first process that needs a copy writes it under an exclusive lock
into a temporary folder and renames it into place; the others wait, then read it. Every reader holds a
shared lock on the copy for its lifetime. `data.cache_limit` ("50%" of the cache's filesystem by
default, a size such as "200gb", or null for no bound) bounds what the root keeps across runs: copies
past it go least recently used first, never one that a live loader holds. Nothing is deleted when a run
ends (reuse is the point); what killed runs leave is removed at the next start: half-written copies,
streaming's shared memory and lock files (streaming_adapter.clean_stale_shared_memory), and the
per-process copies older versions made (`/tmp/kscale-data-cache/<rank>-<pid>`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import KScaleError
from .prepare import MANIFEST, read_manifest
from .streaming_adapter import (
    PREFIX_LOCK,
    clean_stale_shared_memory,
    data_parallel_world,
    import_streaming,
    open_lock_file,
    process_local_construction,
    write_uncompressed_copy,
)

DEFAULT_CACHE_LIMIT = "50%"
CACHE_FORMAT = "kscale-node-cache-v1"
_MARKER = "kscale-cache.json"  # written last; a copy without it (or with another fingerprint) is rebuilt


@dataclass(frozen=True)
class DataSource:
    path: str
    proportion: float | None = None  # mixing weight; None = every sample once per epoch


def check_manifest(
    manifest: dict,
    *,
    tokenizer_fingerprint: str | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    where: str = "",
) -> None:
    """The dataset must match the model: same tokenizer, ids below its vocabulary, same seq_len."""
    if tokenizer_fingerprint and manifest["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise KScaleError(
            f"dataset was tokenized with another tokenizer: dataset {manifest['tokenizer_fingerprint'][:16]}, "
            f"model {tokenizer_fingerprint[:16]}",
            where=where,
            fix="prepare the data with the model's tokenizer (or train with the tokenizer the data was made with)",
        )
    if vocab_size is not None and manifest["vocab_size"] > vocab_size:
        raise KScaleError(
            f"dataset vocabulary ({manifest['vocab_size']}) is larger than the model's ({vocab_size})", where=where
        )
    if seq_len is not None and manifest["seq_len"] != seq_len:
        raise KScaleError(
            f"dataset seq_len is {manifest['seq_len']}, the model's is {seq_len}",
            where=where,
            fix="prepare the data with --seq-len equal to model.seq_len",
        )


def _token_dataset_class():
    streaming = import_streaming()

    class TokenDataset(streaming.StreamingDataset):
        def __getitem__(self, index):  # used for every sample the loader yields
            sample = super().__getitem__(index)["tokens"].astype(np.int64)
            return torch.from_numpy(sample)

    return TokenDataset


def _collate(samples: list[torch.Tensor]) -> dict:
    x = torch.stack(samples)
    return {"tokens": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}


# --- the node cache ----------------------------------------------------------------------------------
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root, created if missing: `cache_dir`, else $KSCALE_DATA_CACHE, else this user's own
    `${TMPDIR:-/tmp}/kscale-data-cache-<uid>`. That default must be a real folder this user owns: one that
    another user made (or a link or a file in its place) is passed over for `...-<uid>.1`, `.2`, ..."""
    explicit = cache_dir or os.environ.get("KSCALE_DATA_CACHE")
    if explicit:
        root = Path(explicit).expanduser().absolute()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KScaleError(
                f"cannot create the data cache folder ({e})",
                where=str(root),
                fix="set data.cache_dir to a folder you can write",
            ) from None
        return root
    base = Path(os.environ.get("TMPDIR") or "/tmp").absolute()
    name = f"kscale-data-cache-{os.getuid()}"
    for i in range(100):
        root = base / (name if i == 0 else f"{name}.{i}")
        try:
            root.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise KScaleError(
                f"cannot create the data cache folder ({e})",
                where=str(root),
                fix="set data.cache_dir (or TMPDIR) to a folder you can write",
            ) from None
        st = root.lstat()
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            return root
    raise KScaleError(
        "no usable data cache folder: all are taken by other users",
        where=str(base / name),
        fix="set data.cache_dir to a folder of your own",
    )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(b|kb|mb|gb|tb|pb)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40, "pb": 1 << 50}


def parse_cache_limit(limit, root: Path | None = None) -> int | None:
    """`data.cache_limit` in bytes: "N%" of the cache root's filesystem, a size ("200gb", binary units as in
    streaming's cache_limit, or plain bytes) or None / "none" (no bound)."""
    if limit is None or (isinstance(limit, str) and limit.strip().lower() in ("", "none", "null")):
        return None
    text = str(limit).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            return int(shutil.disk_usage(root or "/").total * pct / 100)
        m = _SIZE.match(text)
        if not m or float(m.group(1)) <= 0:
            raise ValueError
        return int(float(m.group(1)) * _UNITS[m.group(2) and m.group(2).lower()])
    except ValueError:
        raise KScaleError(
            f"data.cache_limit={limit!r} is not a size",
            where="data.cache_limit",
            fix='use a percentage of the cache filesystem ("50%"), a size ("200gb") or null',
        ) from None


class _CachePin:
    """A shared lock on one copy in the node cache, held while a loader may read it (eviction skips it)."""

    def __init__(self, fd: int, path: Path):
        self.fd: int | None = fd
        self.path = path

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.close()


def _same_file(fd: int, path: Path) -> bool:
    """Whether the locked descriptor is still the file at `path` (an eviction unlinks the lock file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _fingerprint(split_dir: Path, manifest: Path) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}\0{split_dir}\0".encode())
    for f in (manifest, split_dir / "index.json"):
        h.update(f.read_bytes())
        st = f.stat()
        h.update(f"\0{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:20]


def _copy_is_complete(entry: Path, fingerprint: str) -> bool:
    """The marker names this fingerprint and every file is there at its size (a /tmp cleaner may have
    deleted old files)."""
    try:
        meta = json.loads((entry / _MARKER).read_text())
        return (
            meta.get("format") == CACHE_FORMAT
            and meta.get("fingerprint") == fingerprint
            and all((entry / name).stat().st_size == size for name, size in meta["files"].items())
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _discard(root: Path, path: Path) -> None:
    """Move a folder out of the way (atomic), then delete it."""
    trash = root / f".trash-{path.name}-{os.getpid()}-{time.time_ns()}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _write_copy(root: Path, key: str, split_dir: Path, fingerprint: str) -> None:
    """Called under the copy's write lock: no one else is writing it."""
    from .integrity import verify_split

    verify_split(split_dir)  # sizes and SHA-256 of the shards vs the manifest: once per node copy
    for stale in root.glob(f".{key}.tmp-*"):  # a writer killed midway
        shutil.rmtree(stale, ignore_errors=True)
    entry = root / key
    if entry.exists():
        _discard(root, entry)
    tmp = root / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}"
    tmp.mkdir()
    try:
        files = write_uncompressed_copy(split_dir, tmp)
        meta = {
            "format": CACHE_FORMAT,
            "fingerprint": fingerprint,
            "source": str(split_dir),
            "files": files,
            "bytes": sum(files.values()),
            "created": time.time(),
            "host": socket.gethostname(),
        }
        (tmp / _MARKER).write_text(json.dumps(meta, indent=1) + "\n")
        os.rename(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _flock(fd: int, op: int, path: Path) -> None:
    try:
        fcntl.flock(fd, op)
    except OSError as e:
        if isinstance(e, BlockingIOError):
            raise
        raise KScaleError(
            f"the data cache's file system refuses locks ({e})",
            where=str(path),
            fix="set data.cache_dir to a node-local folder (e.g. under /tmp or local scratch)",
        ) from None


def cached_split(root: Path, split_dir: Path, manifest: Path) -> tuple[Path, _CachePin]:
    """(the node's uncompressed copy of this dataset split, written now if missing, the shared lock that
    keeps it from eviction while the caller reads it).

    Two locks per copy: readers hold KEY.lock shared for as long as they read (an eviction needs it
    exclusive); KEY.write.lock is held exclusively only while a copy is written, so a reader that finds
    no copy waits for the writer, never for other readers."""
    split_dir = Path(split_dir).resolve()
    fingerprint = _fingerprint(split_dir, Path(manifest))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", split_dir.parent.name)[:48].lstrip(".") or "data"
    key = f"{slug}-{split_dir.name}-{fingerprint}"
    entry, use_lock, write_lock = root / key, root / f"{key}.lock", root / f"{key}.write.lock"
    while True:
        fd = open_lock_file(use_lock)
        try:
            _flock(fd, fcntl.LOCK_SH, use_lock)
            if not _same_file(fd, use_lock):  # evicted meanwhile: again
                os.close(fd)
                continue
            if not _copy_is_complete(entry, fingerprint):
                wfd = open_lock_file(write_lock)
                try:
                    _flock(wfd, fcntl.LOCK_EX, write_lock)
                    if _same_file(wfd, write_lock) and not _copy_is_complete(entry, fingerprint):
                        _write_copy(root, key, split_dir, fingerprint)
                finally:
                    os.close(wfd)
                if not _copy_is_complete(entry, fingerprint):  # the write lock was replaced: again
                    os.close(fd)
                    continue
            with contextlib.suppress(OSError):  # last use: eviction goes by it
                os.utime(entry / _MARKER)
            return entry, _CachePin(fd, entry)
        except BaseException:
            os.close(fd)
            raise


def _try_exclusive(lock: Path):
    """An exclusive lock on `lock` if no one holds it now (fd), else None."""
    try:
        fd = open_lock_file(lock)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not _same_file(fd, lock):
        os.close(fd)
        return None
    return fd


def enforce_cache_limit(root: Path, limit: int | None, keep=()) -> list[str]:
    """Delete copies, least recently used first, until the root holds at most `limit` bytes; never one in
    `keep` or held by a live loader (a warning says so when those alone are over the limit). Returns the
    names deleted."""
    if limit is None:
        return []
    copies = []
    for marker in root.glob(f"*/{_MARKER}"):
        try:
            copies.append((marker.stat().st_mtime, marker.parent, int(json.loads(marker.read_text())["bytes"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    total, evicted = sum(size for _, _, size in copies), []
    for _, entry, size in sorted(copies):
        if total <= limit:
            break
        if entry.name in keep:
            continue
        use_lock, write_lock = root / f"{entry.name}.lock", root / f"{entry.name}.write.lock"
        fd = _try_exclusive(use_lock)  # no reader, and no writer (it reads too)
        if fd is None:
            continue
        try:
            _discard(root, entry)
            for lock in (write_lock, use_lock):  # waiting openers see another file: again
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
        finally:
            os.close(fd)
        total -= size
        evicted.append(entry.name)
    if total > limit:
        warnings.warn(
            f"the data cache {root} holds {total:,} bytes in copies in use, over data.cache_limit "
            f"({limit:,} bytes); nothing else can go",
            stacklevel=2,
        )
    return evicted


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_cache_leftovers(root: Path) -> list[str]:
    """Remove what killed runs left: deletions cut short (.trash-*), copies whose writer died (.KEY.tmp-*,
    when no one holds KEY's lock), and the per-process copies of older kscale versions
    (`${TMPDIR:-/tmp}/kscale-data-cache/<rank>-<pid>` of this user whose process is gone). Returns them."""
    removed = []
    for trash in root.glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(trash.name)
    for tmp in root.glob(".*.tmp-*"):
        fd = _try_exclusive(root / f"{tmp.name[1:].split('.tmp-')[0]}.write.lock")
        if fd is not None:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp.name)
            finally:
                os.close(fd)
    for legacy in {Path(os.environ.get("TMPDIR") or "/tmp") / "kscale-data-cache", Path("/tmp/kscale-data-cache")}:
        try:
            children = list(legacy.iterdir())
        except OSError:
            continue
        for d in children:
            m = re.fullmatch(r"\d+-(\d+)", d.name)
            try:
                st = d.lstat()
            except OSError:
                continue
            if m and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not _pid_alive(int(m.group(1))):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
    return removed


# --- the loader ----------------------------------------------------------------------------------------
class TokenLoader:
    """A StreamingDataLoader plus what a checkpoint needs to resume it exactly."""

    def __init__(self, loader, dataset, split: str, dp_rank: int, dp_size: int, pins=()):
        self.loader, self.dataset, self.split = loader, dataset, split
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.cache_pins = list(pins)  # shared locks on the node-cache copies it reads

    def __iter__(self):
        with data_parallel_world(self.dp_rank, self.dp_size):
            return iter(self.loader)

    def __len__(self):
        return len(self.loader)

    @property
    def cache_paths(self) -> list[Path]:
        return [pin.path for pin in self.cache_pins]

    def state_dict(self) -> dict:
        # streaming multiplies the samples yielded here by the world size it detects: the DP world's
        with data_parallel_world(self.dp_rank, self.dp_size):
            return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        with data_parallel_world(self.dp_rank, self.dp_size):
            self.loader.load_state_dict(state)


def build_loader(
    sources: list[DataSource] | list[DataSource | str],
    split: str,
    *,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int = 1234,
    shuffle: bool = True,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    num_canonical_nodes: int | None = None,
    tokenizer_fingerprint=None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    cache_limit: str | int | None = DEFAULT_CACHE_LIMIT,
) -> TokenLoader:
    """A loader for this data-parallel rank over one or more prepared datasets (mixed by proportion).

    The shards come from the node cache (module docstring) under `cache_dir` (None: this user's default
    root), bounded by `cache_limit`. Any process may call it at any time: no collective, no local rank."""
    streaming = import_streaming()
    sources = [DataSource(s) if isinstance(s, (str, Path)) else s for s in sources]  # type: ignore[arg-type]  # paths welcome too
    if not sources:
        raise KScaleError("no data sources given", where="data.sources")
    if not 0 <= dp_rank < dp_size:
        raise KScaleError(f"data-parallel rank {dp_rank} is outside 0..{dp_size - 1}")
    split_dirs = []
    for src in sources:
        manifest = read_manifest(src.path)
        check_manifest(
            manifest,
            tokenizer_fingerprint=tokenizer_fingerprint,
            vocab_size=vocab_size,
            seq_len=seq_len,
            where=str(src.path),
        )
        if manifest["splits"].get(split, {}).get("samples", 0) == 0:
            raise KScaleError(
                f"the dataset has no {split!r} samples",
                where=str(src.path),
                fix="prepare it with --val-input or --val-fraction" if split == "val" else None,
            )
        split_dirs.append((Path(src.path) / split).resolve())
    if len(set(split_dirs)) < len(split_dirs):
        raise KScaleError(
            "a dataset is listed twice",
            where=", ".join(str(s.path) for s in sources),
            fix="list each dataset once; its proportion sets its weight",
        )
    root = cache_root(cache_dir)
    limit = parse_cache_limit(cache_limit, root)
    fallback_lock = str(root / "streaming-prefix.lock")  # when the machine-wide lock cannot be opened
    clean_stale_shared_memory(lock_path=PREFIX_LOCK, fallback_lock=fallback_lock)
    clean_cache_leftovers(root)
    pins, streams = [], []
    try:
        for src, split_dir in zip(sources, split_dirs):
            local, pin = cached_split(root, split_dir, Path(src.path) / MANIFEST)
            pins.append(pin)
            streams.append(streaming.Stream(remote=None, local=str(local), proportion=src.proportion))
    except BaseException:
        for pin in pins:
            pin.close()
        raise
    enforce_cache_limit(root, limit, keep={pin.path.name for pin in pins})
    dataset_cls = _token_dataset_class()
    for attempt in range(3):
        try:
            with data_parallel_world(dp_rank, dp_size), process_local_construction(PREFIX_LOCK, fallback_lock):
                dataset = dataset_cls(
                    streams=streams,
                    shuffle=shuffle,
                    shuffle_seed=seed,
                    batch_size=micro_batch_size,
                    num_canonical_nodes=num_canonical_nodes or dp_size,
                    shuffle_algo="py1e",
                )
            break
        except FileExistsError:  # another user's process took the same shared-memory prefix meanwhile
            if attempt == 2:
                raise
    loader = streaming.StreamingDataLoader(
        dataset,
        batch_size=micro_batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        drop_last=True,
        persistent_workers=num_workers > 0,
    )
    return TokenLoader(loader, dataset, split, dp_rank, dp_size, pins)
