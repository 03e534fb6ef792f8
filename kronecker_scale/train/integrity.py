"""What makes a checkpoint trustworthy before a run resumes from it: a manifest of every file's size and
SHA-256 written last (checkpoint.save), checked on resume; room on the disk before a save starts.

Hashing is split over the ranks (file i on rank i mod world size), so a large checkpoint costs each rank
only its share.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

MANIFEST = "manifest.json"


def _world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_shared(folder: Path, names: list[str]) -> dict[str, str]:
    """Collective: {name: sha256} of the files, each rank hashing its share."""
    rank, world = _world()
    mine = {n: _sha256(folder / n) for n in names[rank::world]}
    if world == 1:
        return mine
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def write_manifest(folder: Path) -> None:
    """Collective, after every rank has written its files: folder/manifest.json (rank 0)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    names = _files(folder)
    hashes = _hash_shared(folder, names)
    if _world()[0] == 0:
        files = {n: {"size": (folder / n).stat().st_size, "sha256": hashes[n]} for n in names}
        (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def manifest_size(folder: Path) -> int | None:
    """Bytes of a checkpoint by its manifest (None without one)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return sum(f["size"] for f in json.loads(path.read_text())["files"].values())


def problem(folder: Path) -> str | None:
    """Collective. What is wrong with a checkpoint (a missing, truncated or changed file), or None. A
    checkpoint written before manifests existed is checked for its trainer state only."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not (folder / "trainer_state.pt").is_file():
        return "trainer_state.pt is missing (an incomplete checkpoint)"
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name, entry in files.items():  # sizes first: cheap, and catches truncation
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size:,} bytes, {entry['size']:,} were written"
    hashes = _hash_shared(folder, sorted(files))
    for name in sorted(files):
        if hashes[name] != files[name]["sha256"]:
            return f"{name} has changed since it was written (SHA-256 differs)"
    return None


def free_space_problem(root: Path, previous: Path | None) -> str | None:
    """'disk full' in words when the previous checkpoint's size does not fit in what is free under root."""
    need = manifest_size(previous) if previous is not None else None
    if not need:
        return None
    free = shutil.disk_usage(root).free
    if free >= need:
        return None
    return (
        f"disk full: a checkpoint needs about {need / 2**20:,.1f} MiB (the last one's size) and "
        f"{free / 2**20:,.1f} MiB are free on the file system of {root}"
    )
