"""The node data cache: one uncompressed copy of each dataset split per node, shared by every local rank
and reused by every later start; per user; bounded; leftovers of killed runs (half-written copies, old
per-process copies, streaming's shared memory and lock files) removed at the next start; and the same
sample order as streaming reading the original shards itself."""

import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from kronecker_scale.config import load_config
from kronecker_scale.data import build_loader
from kronecker_scale.data.loader import (
    DataSource,
    _collate,
    _token_dataset_class,
    cache_root,
    cached_split,
    parse_cache_limit,
)
from kronecker_scale.data.prepare import FORMAT
from kronecker_scale.data.streaming_adapter import (
    PREFIX_LOCK,
    SHM_DIR,
    data_parallel_world,
    import_streaming,
    process_local_construction,
)
from kronecker_scale.errors import KScaleError
from tiny_runs import REPO, kscale

SEQ = 8


def make_dataset(path: Path, n_train: int, *, seed: int = 0, shard_bytes: int = 1 << 10) -> Path:
    """A prepared dataset of random (so distinguishable) samples in several small zstd shards, without a
    tokenizer: what the loader reads of a `kscale prepare-data` output."""
    streaming = import_streaming()
    rng = np.random.default_rng(seed)
    samples = {}
    for split, n in (("train", n_train), ("val", 16)):
        with streaming.MDSWriter(
            out=str(path / split),
            columns={"tokens": f"ndarray:uint32:{SEQ + 1}"},
            compression="zstd",
            size_limit=shard_bytes,
        ) as writer:
            for _ in range(n):
                writer.write({"tokens": rng.integers(0, 50_000, SEQ + 1, dtype=np.uint32)})
        samples[split] = {"samples": n, "tokens": n * SEQ, "dropped_tail_tokens": 0}
    (path / "manifest.json").write_text(
        json.dumps(
            {
                "format": FORMAT,
                "tokenizer": "synthetic",
                "tokenizer_format": "synthetic",
                "tokenizer_fingerprint": "synthetic",
                "vocab_size": 50_000,
                "eod_id": 0,
                "seq_len": SEQ,
                "sample_tokens": SEQ + 1,
                "dtype": "uint32",
                "splits": samples,
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return [make_dataset(root / name, n, seed=i) for i, (name, n) in enumerate((("a", 203), ("b", 150), ("c", 120)))]


def rows(loader) -> list[tuple]:
    return [tuple(r.tolist()) for b in loader for r in b["tokens"]]


def copy_bytes(copy: Path) -> int:
    return json.loads((copy / "kscale-cache.json").read_text())["bytes"]


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def reference_loader(sources: list[DataSource], local: Path, *, dp_rank: int, dp_size: int, micro: int, seed: int):
    """The loader as it was before the node cache: streaming copying and decompressing the original shards
    into a private local folder per process (Stream(remote=original split, local=...)), same world, same
    arguments."""
    streaming = import_streaming()
    streams = [
        streaming.Stream(remote=str(Path(s.path) / "train"), local=str(local / f"{i}-train"), proportion=s.proportion)
        for i, s in enumerate(sources)
    ]
    with data_parallel_world(dp_rank, dp_size), process_local_construction():
        dataset = _token_dataset_class()(
            streams=streams,
            shuffle=True,
            shuffle_seed=seed,
            batch_size=micro,
            num_canonical_nodes=dp_size,
            shuffle_algo="py1e",
        )
    return streaming.StreamingDataLoader(dataset, batch_size=micro, collate_fn=_collate, drop_last=True)


def test_every_rank_gets_the_same_samples_and_resume_state_as_streaming_reading_the_original_shards(datasets, tmp_path):
    a, b, _ = datasets
    for sources in ([DataSource(str(a))], [DataSource(str(a), 0.7), DataSource(str(b), 0.3)]):
        for dp_size in (1, 2, 3):
            for dp_rank in range(dp_size):
                kw = {"dp_rank": dp_rank, "dp_size": dp_size, "micro": 2, "seed": 7}
                ref = reference_loader(sources, tmp_path / f"ref-{len(sources)}-{dp_size}-{dp_rank}", **kw)
                new = build_loader(
                    sources,
                    "train",
                    micro_batch_size=2,
                    dp_rank=dp_rank,
                    dp_size=dp_size,
                    seed=7,
                    cache_dir=tmp_path / "cache",
                )
                with data_parallel_world(dp_rank, dp_size):
                    expected = rows(ref)
                assert len(expected) > 20 and rows(new) == expected, (len(sources), dp_size, dp_rank)
                it = iter(new)  # resume state after 3 batches: the same too
                for _ in range(3):
                    next(it)
                with data_parallel_world(dp_rank, dp_size):
                    ref_it = iter(ref)
                    for _ in range(3):
                        next(ref_it)
                    ref_state = ref.state_dict()
                assert new.state_dict() == ref_state
    copies = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert len(copies) == 2 and copies[0].startswith("a-train-") and copies[1].startswith("b-train-")


def test_default_cache_root_is_this_users_own_and_passes_over_one_someone_else_made(datasets, tmp_path, monkeypatch):
    monkeypatch.delenv("KSCALE_DATA_CACHE", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    uid = os.getuid()
    taken = tmp_path / f"kscale-data-cache-{uid}"
    if os.geteuid() == 0:  # another user made the folder first
        taken.mkdir()
        os.chown(taken, 65534, 65534)
    else:  # a link put where the folder should be
        (tmp_path / "elsewhere").mkdir()
        taken.symlink_to(tmp_path / "elsewhere")
    loader = build_loader([str(datasets[0])], "train", micro_batch_size=2, dp_rank=0, dp_size=1)
    ours = tmp_path / f"kscale-data-cache-{uid}.1"
    assert cache_root() == ours and [p.parent for p in loader.cache_paths] == [ours]
    assert ours.stat().st_uid == uid and ours.stat().st_mode & 0o777 == 0o700
    assert not any(taken.iterdir()) and len(rows(loader)) > 90


def _second_user_loader(dataset: str, micro: int) -> dict:
    """In a forked child: become uid 65534 and read `dataset` through a default-root loader."""
    from streaming.base.shared.memory import SharedMemory

    inherited = {id(o) for o in gc.get_objects() if isinstance(o, SharedMemory)}
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        tempfile.tempdir = None  # streaming's lock files go to this user's TMPDIR
        loader = build_loader([dataset], "train", micro_batch_size=micro, dp_rank=0, dp_size=1, seed=5)
        return {"rows": rows(loader), "copies": [str(p) for p in loader.cache_paths]}
    except BaseException as e:  # noqa: BLE001  (reported to the parent)
        return {"error": f"{type(e).__name__}: {e}"}
    finally:  # unlink the shared memory this child made (it skips atexit)
        for o in gc.get_objects():
            if isinstance(o, SharedMemory) and id(o) not in inherited:
                for shm in o.created_shms:
                    with contextlib.suppress(OSError):
                        shm.unlink()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="acting as a second user needs root")
def test_a_second_user_on_the_node_gets_an_own_cache_and_no_permission_error(tmp_path, monkeypatch):
    """Root loads a dataset first (its cache, the machine-wide construction lock); then a forked process that
    has become uid 65534 loads the same dataset with the same TMPDIR."""
    shared = Path(tempfile.mkdtemp(prefix="kscale-shared-tmp-", dir="/tmp"))
    try:
        shared.chmod(0o1777)  # like /tmp
        dataset = make_dataset(shared / "ds", 120, seed=3)
        for p in [shared / "ds", *(shared / "ds").rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        monkeypatch.delenv("KSCALE_DATA_CACHE", raising=False)
        monkeypatch.setenv("TMPDIR", str(shared))
        first = build_loader([str(dataset)], "train", micro_batch_size=2, dp_rank=0, dp_size=1, seed=5)
        expected = rows(first)
        assert Path(PREFIX_LOCK).stat().st_uid == 0
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the second user
            os.close(read)
            payload = json.dumps(_second_user_loader(str(dataset), 2)).encode()
            with os.fdopen(write, "wb") as out:
                out.write(payload)
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as inp:
            result = json.loads(inp.read() or b'{"error": "no answer"}')
        os.waitpid(pid, 0)
        assert "error" not in result, result["error"]
        theirs = shared / "kscale-data-cache-65534"
        assert [Path(p).parent for p in result["copies"]] == [theirs] and theirs.stat().st_uid == 65534
        assert [p.parent for p in first.cache_paths] == [shared / "kscale-data-cache-0"]
        assert [tuple(r) for r in result["rows"]] == expected
    finally:
        shutil.rmtree(shared, ignore_errors=True)


_KILLED_RUN = """
import os, signal, sys
from kronecker_scale.data import build_loader
loader = build_loader([sys.argv[1]], "train", micro_batch_size=2, dp_rank=0, dp_size=1, cache_dir=sys.argv[2])
next(iter(loader))
print(loader.dataset._shm_prefix_int, flush=True)
os.killpg(0, signal.SIGKILL)          # the whole process group, as a scheduler kills a job
"""


def _streaming_leftovers(prefix: int) -> list[Path]:
    tag = f"{prefix:06}_"
    tmp = Path(tempfile.gettempdir())
    return [p for p in Path(SHM_DIR).iterdir() if p.name.startswith(tag)] + [
        p for p in tmp.iterdir() if p.name.startswith(tag) and p.name.endswith("filelock")
    ]


@pytest.mark.slow
@pytest.mark.skipif(not Path(SHM_DIR).is_dir(), reason="Linux /dev/shm")
def test_shared_memory_of_a_killed_run_is_cleaned_at_the_next_start(datasets, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(datasets[0]), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        cwd=REPO,
        start_new_session=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    prefix = int(proc.stdout.split()[-1])
    leftovers = _streaming_leftovers(prefix)
    names = {p.name for p in leftovers}
    assert {f"{prefix:06}_locals", f"{prefix:06}_barrier", f"{prefix:06}_shard_states"} <= names
    assert f"{prefix:06}_barrier_filelock" in names
    old = time.time() - 600  # killed ten minutes ago
    for p in leftovers:
        os.utime(p, (old, old))
    loader = build_loader(
        [str(datasets[0])], "train", micro_batch_size=2, dp_rank=0, dp_size=1, cache_dir=tmp_path / "cache"
    )
    # gone (a name may be back, made new, when this loader took the freed prefix)
    assert not [p.name for p in leftovers if p.exists() and p.stat().st_mtime <= old + 1]
    assert len(rows(loader)) > 90


def _open_copy(root, split_dir, manifest, start, done, out):
    start.wait(60)
    path, pin = cached_split(Path(root), Path(split_dir), Path(manifest))
    out.put(str(path))
    done.wait(60)  # every process holds its copy at once; a stuck one breaks this
    pin.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_processes_starting_together_write_one_copy_and_none_waits_for_another_to_finish(datasets, tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    n = 4
    start, done, out = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
    args = (str(tmp_path / "cache"), str(datasets[1] / "train"), str(datasets[1] / "manifest.json"), start, done, out)
    (tmp_path / "cache").mkdir()
    procs = [ctx.Process(target=_open_copy, args=args) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n
    paths = {out.get(timeout=5) for _ in range(n)}
    assert len(paths) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [Path(paths.pop()).name]


def test_cache_limit_evicts_least_recently_used_copies_but_never_one_in_use(datasets, tmp_path):
    a, b, c = map(str, datasets)
    kw = {"micro_batch_size": 2, "dp_rank": 0, "dp_size": 1, "cache_dir": tmp_path / "cache"}
    held = build_loader([a], "train", cache_limit=None, **kw)
    size = copy_bytes(held.cache_paths[0])
    released = build_loader([b], "train", cache_limit=None, **kw)
    b_copy = released.cache_paths[0]
    limit = size + copy_bytes(b_copy)  # c (smaller than b) makes it too much
    del released
    gc.collect()
    newest = build_loader([c], "train", cache_limit=str(limit), **kw)
    present = {p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.is_dir()}
    assert present == {"a", "c"} and not b_copy.exists()  # b went; a is older but in use
    assert len(rows(held)) > 90 and len(rows(newest)) > 50
    with pytest.warns(UserWarning, match="over data.cache_limit"):  # all in use: nothing can go
        again = build_loader([b], "train", cache_limit=str(size), **kw)
    assert {p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.is_dir()} == {"a", "b", "c"}
    assert len(rows(again)) > 70
    assert parse_cache_limit("50%", tmp_path) == shutil.disk_usage(tmp_path).total // 2
    assert parse_cache_limit("1.5kb") == 1536 and parse_cache_limit("none") is None
    with pytest.raises(KScaleError, match="cache_limit"):
        parse_cache_limit("lots")


def test_leftovers_of_killed_runs_go_and_a_damaged_copy_is_written_again(datasets, tmp_path, monkeypatch):
    kw = {"micro_batch_size": 2, "dp_rank": 0, "dp_size": 1, "seed": 3, "cache_dir": tmp_path / "cache"}
    first = build_loader([str(datasets[0])], "train", **kw)
    expected, copy = rows(first), first.cache_paths[0]
    del first
    gc.collect()
    half = tmp_path / "cache" / f".{copy.name}.tmp-somehost-123"  # a writer killed midway
    trash = tmp_path / "cache" / ".trash-x-123-456"  # a deletion cut short
    for d in (half, trash):
        d.mkdir()
        (d / "shard.00000.mds").write_bytes(b"x" * 100)
    next(copy.glob("shard.*.mds")).unlink()  # a /tmp cleaner took a shard
    dead = subprocess.Popen(["true"])
    dead.wait()
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the old layout: one copy per process
    legacy = tmp_path / "kscale-data-cache" / f"0-{dead.pid}" / "0-train"
    legacy.mkdir(parents=True)
    (legacy / "shard.00000.mds").write_bytes(b"x" * 100)
    again = build_loader([str(datasets[0])], "train", **kw)
    assert again.cache_paths == [copy] and rows(again) == expected
    assert not half.exists() and not trash.exists() and not legacy.parent.exists()


def test_cache_limit_is_checked_with_the_config(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  train: [{path: /data/x}]\n")
    assert load_config(tmp_path / "c.yaml").data.cache_limit == "50%"
    assert load_config(tmp_path / "c.yaml", ["data.cache_limit=200gb"]).data.cache_limit == "200gb"
    assert load_config(tmp_path / "c.yaml", ["data.cache_limit=null"]).data.cache_limit is None
    with pytest.raises(KScaleError, match="data.cache_limit"):
        load_config(tmp_path / "c.yaml", ["data.cache_limit=lots"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_1_rank_run_then_two_2_rank_runs_leave_one_copy_of_the_shards(tiny_config, tiny_dataset, tmp_path):
    """Real `kscale train` starts on one node and dataset: 1 process, then 2 data-parallel ranks, then 2
    tensor-parallel peers (3 steps each). Before the node cache every process kept its own copy (5)."""
    cfg = tiny_config(
        tmp_path,
        schedule={"train_steps": 3, "warmup_steps": 1},
        checkpoint={"every": 0},
        eval={"every": 2, "batches": 1},
    )
    cache = tmp_path / "cache"
    index = {split: json.loads((tiny_dataset / split / "index.json").read_text()) for split in ("train", "val")}
    raw = {split: sum(s["raw_data"]["bytes"] for s in index[split]["shards"]) for split in index}
    sizes = []
    for i, extra in enumerate([(), ("parallel.nproc=2",), ("parallel.nproc=2", "parallel.tensor=2")]):
        t0 = time.perf_counter()
        r = kscale("train", cfg, *extra, f"run.dir={tmp_path / f'run{i}'}", env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        sizes.append(tree_bytes(cache))
        print(f"run {i} {extra or '1 process'}: {time.perf_counter() - t0:.1f} s, cache {sizes[-1]:,} bytes")
    copies = sorted(p for p in cache.iterdir() if p.is_dir())
    assert [p.name.rsplit("-", 1)[0] for p in copies] == ["ds-train", "ds-val"]
    assert [copy_bytes(p) - (p / "index.json").stat().st_size for p in copies] == [raw["train"], raw["val"]]
    assert len(list(cache.rglob("shard.*.mds"))) == len(list(tiny_dataset.rglob("shard.*.mds.zstd")))
    assert sizes[0] == sizes[1] == sizes[2]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    print(f"one copy: train {raw['train']:,} + val {raw['val']:,} bytes of shards; cache {sizes[-1]:,} bytes")
